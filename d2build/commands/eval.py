"""d2build eval --annotations FILE --images DIR [--engine|--graph PATH] KEY=VALUE ...: COCO box/mask AP."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from d2build.commands import _runtime

SUMMARY = "COCO box (and mask) AP of a built model on your annotations (pycocotools)"
log = logging.getLogger("d2build")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def main(argv: list[str]) -> int:
    p = _runtime.parser("eval", "COCO-style evaluation of the recipe's model (or an explicit engine/graph).")
    p.add_argument("--annotations", required=True, help="COCO-format instances .json")
    p.add_argument("--images", required=True, help="folder holding the annotation file's file_name images")
    args = _runtime.parse(p, argv)
    setup = _runtime.setup("eval", args)
    if setup is None:
        return 2
    recipe, out = setup
    from pycocotools.coco import COCO

    gt = COCO(str(args.annotations))
    model = _runtime.open_model_or_report(recipe, args, out)
    if model is None:
        return 2
    try:
        category_of, note = category_map(gt, model.info)
    except ValueError as e:
        print(f"d2build: {args.annotations}: {e}", file=sys.stderr)
        return 2
    if note:
        log.warning("%s: %s", args.annotations, note)
    from d2build.commands.infer import encode_masks
    from d2build.processing import load_image_bgr

    results, with_masks = [], False
    ids = sorted(gt.getImgIds())
    for i, image_id in enumerate(ids, 1):
        info = gt.loadImgs(image_id)[0]
        path = Path(args.images) / info["file_name"]
        det, lb, seconds = model.detect(load_image_bgr(path))
        rles = encode_masks(det.masks) if det.masks is not None else None
        with_masks = with_masks or rles is not None
        for k in range(len(det)):
            x1, y1, x2, y2 = (float(v) for v in det.boxes[k])
            r = {"image_id": image_id, "category_id": category_of[int(det.classes[k])],
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(det.scores[k])}
            if rles is not None:
                r["segmentation"] = rles[k]
            results.append(r)
        log.info("[%d/%d] %s: %d detections, %.2f s", i, len(ids), info["file_name"], len(det), seconds)
    (out / "detections_coco.json").write_text(json.dumps(results))
    metrics = {}
    for iou_type in ("bbox", "segm") if with_masks and has_segmentation(gt) else ("bbox",):
        metrics[iou_type] = evaluate(gt, results, iou_type)
    doc = {"backend": model.backend, "model": str(model.path), "annotations": str(args.annotations),
           "images": len(ids), "detections": len(results), "metrics": metrics}
    (out / "eval.json").write_text(json.dumps(doc, indent=1))
    for iou_type, m in metrics.items():
        log.info("%s AP %.4f  AP50 %.4f  AP75 %.4f  (APs %.4f  APm %.4f  APl %.4f)", iou_type, m["AP"], m["AP50"],
                 m["AP75"], m["APs"], m["APm"], m["APl"])
    log.info("wrote %s", out / "eval.json")
    return 0


def category_map(gt, info) -> tuple[dict[int, int], str | None]:
    """Model class index -> annotation category id, and a note when the mapping is by position.

    By name when every model class name is a category name; by position (categories sorted by id)
    when the names are unknown or differ but the counts agree; otherwise an error saying which."""
    cats = sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])
    by_name = {c["name"]: c["id"] for c in cats}
    names = info.class_names
    if names and all(n in by_name for n in names):
        return {i: by_name[n] for i, n in enumerate(names)}, None
    if len(cats) == info.num_classes:
        why = "the model's class names are unknown" if not names else "its category names differ from the model's"
        return ({i: c["id"] for i, c in enumerate(cats)},
                f"{why}; mapping model class k to the k-th category by id ({', '.join(c['name'] for c in cats[:5])}"
                f"{', ...' if len(cats) > 5 else ''}). Set model.class_names to map by name")
    if names:
        missing = [n for n in names if n not in by_name][:5]
        raise ValueError(f"its {len(cats)} categories match neither the model's {len(names)} class names "
                         f"(missing e.g. {missing}) nor their count; set model.class_names to the json's names")
    raise ValueError(f"its {len(cats)} categories do not match the model's {info.num_classes} classes and the "
                     "model's class names are unknown; set model.class_names")


def has_segmentation(gt) -> bool:
    return any("segmentation" in a for a in gt.dataset.get("annotations", []))


def evaluate(gt, results: list[dict], iou_type: str) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in STAT_NAMES}
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
