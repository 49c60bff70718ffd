"""d2build eval [--annotations FILE --images DIR] [--count N] [--engine|--graph PATH] KEY=VALUE ...: COCO AP.

Runs the chosen model (runtime.backend: tensorrt | reference | onnxruntime | detectron2) on every
annotated image and scores it with pycocotools -- box AP, mask AP where both sides have masks,
keypoint (OKS) AP where both have keypoints -- beside the AP of the Detectron2 model it came from on
the same letterboxed input (`--detectron2-resize shortest_edge`: with Detectron2's own test-time
resize instead), and the difference. The annotation file and folder come from the arguments or from
`eval.annotations` / `eval.images`. (For NMS sweeps, the eval *stage* is cheaper: see
docs/ARCHITECTURE.md#evaluation.)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from d2build.commands import _runtime

SUMMARY = "COCO box/mask/keypoint AP of a built model on your annotations, beside Detectron2's own (pycocotools)"
log = logging.getLogger("d2build")


def main(argv: list[str]) -> int:
    p = _runtime.parser("eval", "COCO-style evaluation of the recipe's model (or an explicit engine/graph), "
                                "beside the Detectron2 model it came from.")
    p.add_argument("--annotations", help="COCO-format instances .json (default: eval.annotations)")
    p.add_argument("--images", help="folder holding the json's file_name images (default: eval.images)")
    p.add_argument("--count", type=int, help="only the json's first N images by id (default: eval.count; 0 = all)")
    p.add_argument("--detectron2-resize", choices=("letterbox", "shortest_edge"), default="letterbox",
                   help="how the Detectron2 reference sees each image: the graph's letterbox (default) or "
                        "Detectron2's own ResizeShortestEdge")
    args = _runtime.parse(p, argv)
    setup = _runtime.setup("eval", args) if args is not None else None
    if setup is None:
        return 2
    recipe, out = setup
    from d2build import evaluation
    from d2build.inputs import coco_problem

    annotations = args.annotations or recipe.eval.annotations
    images = args.images or recipe.eval.images
    if not annotations or not images:
        print("d2build eval: give --annotations FILE and --images DIR (or eval.annotations= and eval.images=)",
              file=sys.stderr)
        return 2
    problem = coco_problem(Path(annotations), Path(images))
    if problem:
        print(f"d2build eval: {annotations} {problem}", file=sys.stderr)
        return 2
    gt = evaluation.load_coco(annotations)
    count = args.count if args.count is not None else recipe.eval.count
    ids = sorted(gt.getImgIds())[: count or None]
    files = {image_id: gt.loadImgs(image_id)[0]["file_name"] for image_id in ids}
    from d2build import photos

    try:  # every image's size against a dynamic graph's range, before anything is built or run
        sizes = photos.image_sizes([str(Path(images) / f) for f in files.values()])
    except ValueError as e:
        print(f"d2build eval: {e}", file=sys.stderr)
        return 2
    models = {}
    model = _runtime.open_model_or_report(recipe, args, out, sizes)
    if model is None:
        return 2
    models[model.backend] = model
    if model.backend != "detectron2" or args.detectron2_resize != "letterbox":
        models["detectron2" if model.backend != "detectron2" else "detectron2_native"] = _runtime.eager_model(
            recipe, out, args.overrides, args.detectron2_resize)
    info = model.info
    try:
        category_of, note = evaluation.category_map(gt, info)
        sigmas = None
        if info.keypoint_names and evaluation.has(gt, "keypoints"):
            from d2build import detectron
            from d2build.recipe import ConfigRef

            configured = tuple(detectron.load_cfg(ConfigRef.of(recipe.model.config, recipe.model.config_overrides))
                               .TEST.KEYPOINT_OKS_SIGMAS)
            sigmas = evaluation.keypoint_sigmas(info, recipe.eval.keypoint_oks_sigmas, configured)
    except ValueError as e:
        print(f"d2build eval: {annotations}: {e}", file=sys.stderr)
        return 2
    if note:
        log.warning("%s: %s", annotations, note)
    from d2build.processing import load_image_bgr

    results: dict[str, list[dict]] = {k: [] for k in models}
    with_masks: dict[str, bool] = {k: False for k in models}
    seconds: dict[str, float] = {k: 0.0 for k in models}
    batch = model.info.batch
    for start in range(0, len(ids), batch):  # a model built for N images per run gets N
        chunk = ids[start:start + batch]
        chunk_files = [files[image_id] for image_id in chunk]
        bgrs = [load_image_bgr(Path(images) / f) for f in chunk_files]
        counts: dict[str, list[int]] = {}
        for side, m in models.items():
            dets, _, s = m.detect_batch(bgrs)
            seconds[side] += s
            counts[side] = [len(d) for d in dets]
            for image_id, det in zip(chunk, dets):
                rles = evaluation.encode_masks(det.masks) if det.masks is not None else None
                with_masks[side] |= rles is not None
                results[side] += evaluation.to_results(image_id, det.boxes, det.scores, det.classes, category_of,
                                                       rles, det.keypoints)
        for k, f in enumerate(chunk_files):
            log.info("[%d/%d] %s: %s detections", start + k + 1, len(ids), f,
                     ", ".join(f"{side} {counts[side][k]}" for side in models))
    (out / "detections_coco.json").write_text(json.dumps(results[model.backend]))
    metrics: dict[str, dict] = {}
    for side in models:
        types = ["bbox"] + (["segm"] if with_masks[side] and evaluation.has(gt, "segm") else []) + (
            ["keypoints"] if sigmas is not None else [])
        metrics[side] = {t: evaluation.evaluate(gt, results[side], t, sigmas, ids) for t in types}
    ref = next((k for k in models if k != model.backend), None)
    doc = {"backend": model.backend, "model": str(model.path), "annotations": str(annotations), "images": len(ids),
           "detections": len(results[model.backend]), "metrics": metrics[model.backend], "by_backend": metrics,
           "seconds_per_image": {k: v / max(1, len(ids)) for k, v in seconds.items()},
           "category_mapping_note": note}
    if ref is not None:
        doc["reference"] = ref
        doc["delta"] = {t: {k: v - metrics[ref][t][k] for k, v in m.items()}
                        for t, m in metrics[model.backend].items() if t in metrics[ref]}
    (out / "eval.json").write_text(json.dumps(doc, indent=1))
    for t, m in metrics[model.backend].items():
        beside = ""
        if ref is not None and t in metrics[ref]:
            beside = f"   ({ref} {metrics[ref][t]['AP'] * 100:.2f}, difference {(m['AP'] - metrics[ref][t]['AP']) * 100:+.2f})"
        log.info("%-9s AP %.2f  AP50 %.2f  AP75 %.2f%s", t, m["AP"] * 100, m["AP50"] * 100, m["AP75"] * 100, beside)
    log.info("wrote %s", out / "eval.json")
    return 0
