"""d2build infer [--images DIR|bundled] [--engine|--graph PATH] KEY=VALUE ...: detections JSON + pictures."""

from __future__ import annotations

import json
import logging

from d2build.commands import _runtime

SUMMARY = "run a built model on images: detections.json and pictures (runtime.backend=tensorrt|reference|onnxruntime|detectron2)"
log = logging.getLogger("d2build")


def main(argv: list[str]) -> int:
    p = _runtime.parser("infer", "Run the recipe's model (or an explicit engine/graph) on images.")
    p.add_argument("--images", default="bundled", help="a folder of images, or `bundled` (default)")
    p.add_argument("--count", type=int, default=3, help="how many images (default 3)")
    ready = _runtime.prepare("infer", p, argv, images=_images)
    if ready is None:
        return 2
    args, recipe, out, model = ready
    from d2build import photos
    from d2build.visualize import draw_detections

    (out / "pictures").mkdir(exist_ok=True)
    results = []
    refs = _images(args)
    thr = recipe.runtime.score_threshold
    batch = getattr(getattr(model, "info", None), "batch", 1)
    for start in range(0, len(refs), batch):  # a model built for a batch of N gets N images per run
        chunk = [photos.load(ref) for ref in refs[start:start + batch]]
        if hasattr(model, "detect_batch"):
            dets, lbs, seconds = model.detect_batch([p.bgr for p in chunk])
        else:
            det, lb, seconds = model.detect(chunk[0].bgr)
            dets, lbs = [det], [lb]
        for i, (photo, det, lb) in enumerate(zip(chunk, dets, lbs), start + 1):
            shown = det.subset(det.scores >= thr)
            stem = photo.name.rsplit(".", 1)[0]
            draw_detections(photo.bgr, shown, model.info.class_names, skeleton=model.info.keypoint_skeleton,
                            title=f"{photo.name}: {len(shown)} of {len(det)} detections with score >= {thr} "
                                  f"({model.backend})").save(out / "pictures" / f"{stem}.png")
            results.append(detections_json(photo.name, det, lb.original_hw if lb else photo.bgr.shape[:2],
                                           model.info, seconds / len(chunk)))
            if det.segmentation is not None:  # panoptic/<stem>.png (COCO panoptic ids), semantic/<stem>.png
                results[-1].update(segmentation_files(out, stem, det.segmentation))
            log.info("[%d/%d] %s: %d detections (%d >= %.2f), %.2f s", i, len(refs), photo.name, len(det),
                     len(shown), thr, seconds / len(chunk))
    doc = {"model": str(model.path), "backend": model.backend, "input": list(model.input_hw), "batch": batch,
           "recipe": recipe.name, "images": results}
    (out / "detections.json").write_text(json.dumps(doc, indent=1))
    log.info("wrote %s and %s", out / "detections.json", out / "pictures")
    return 0


def _images(args) -> list[str]:
    """The image references --images and --count name; ValueError saying why there are none."""
    from d2build import photos

    if args.count < 1:
        raise ValueError(f"--count {args.count}: give 1 or more")
    try:
        return photos.list_images(args.images, args.count)
    except OSError as e:
        raise ValueError(f"--images {args.images}: not `bundled` or a folder ({e.strerror or e})") from None


def segmentation_files(out, stem: str, seg) -> dict:
    """Write an image's panoptic and semantic PNGs under `out`; their JSON (file names, segments_info)."""
    from d2build.deploy.runtime import segmentation_pngs, segmentation_to_dict

    names = (f"panoptic/{stem}.png", f"semantic/{stem}.png")
    for name, data in zip(names, segmentation_pngs(seg)):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    return segmentation_to_dict(seg, files=names)


def detections_json(name: str, det, hw, info, seconds: float) -> dict:
    """One image's detections in original pixels: class names, masks as COCO run-length encodings,
    keypoints as (x, y, score, name)."""
    from d2build.evaluation import encode_masks

    rles = encode_masks(det.masks) if det.masks is not None else [None] * len(det)
    items = []
    for k in range(len(det)):
        c = int(det.classes[k])
        item = {"box": [round(float(v), 2) for v in det.boxes[k]], "score": round(float(det.scores[k]), 5),
                "class_id": c, "class": info.class_name(c)}
        if rles[k] is not None:
            item["mask"] = rles[k]
        if det.keypoints is not None:
            names = info.keypoint_names or [f"keypoint{j}" for j in range(det.keypoints.shape[1])]
            item["keypoints"] = [{"x": round(float(x), 2), "y": round(float(y), 2), "score": round(float(s), 5),
                                  "name": names[j]} for j, (x, y, s) in enumerate(det.keypoints[k])]
        items.append(item)
    return {"image": name, "height": int(hw[0]), "width": int(hw[1]), "seconds": round(seconds, 4),
            "detections": items}
