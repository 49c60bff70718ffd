"""candidates: every image of the eval set through the graph and through Detectron2, once, before the final NMS.

In the DAG when `eval.annotations` is set. The graph is the recipe's (flavour, RPN settings, precision,
calibration) rebuilt from the export with a final NMS that keeps every (proposal, class) above
`eval.score_floor` and suppresses nothing (IoU threshold 1.0), up to `eval.max_candidates` per image;
Detectron2 eager runs with the same settings. Everything before the final NMS -- backbone, RPN, box
head -- and the heads after it (a detection's mask depends on its box only) are what any NMS variant
computes, so the eval stage of every variant of an NMS sweep reuses this one artifact and only re-runs
its NMS on the candidates (d2build/evaluation.py). The key holds the export, the RPN settings, the
flavour, the precision (and the calibration at int8), the eval images and the floor -- not
`surgery.nms.*`. The eval images count by their bytes, not only by the folder's path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from d2build.cache import Artifact, file_digest
from d2build.recipe import Recipe
from d2build.stages.base import Context, Stage, config_ref


def eval_images_digest(annotations: str, images: str, count: int | None) -> str:
    """One sha256 over the names and bytes of the images the stage reads (the json's first `count` image
    ids), so that replacing an image in the folder rebuilds the candidates; the folder's path alone would not."""
    import hashlib
    import json

    listed = {im["id"]: im["file_name"] for im in json.loads(Path(annotations).expanduser().read_text())["images"]}
    h = hashlib.sha256()
    for i in sorted(listed)[: count or None]:
        path = Path(images).expanduser() / listed[i]
        h.update(f"{listed[i]}\0{file_digest(path) if path.is_file() else 'missing'}\0".encode())
    return h.hexdigest()


class CandidatesStage(Stage):
    name = "candidates"
    VERSION = 2  # 2: Detectron2 with its own resize as a third side; dynamic graphs
    tools = ("torch", "torchvision", "sal-detectron2", "onnx", "onnx-graphsurgeon", "onnxruntime",
             "onnxruntime-extensions", "pycocotools", "numpy")

    def __init__(self, mode: str = "fp32"):
        self.needs = ("weights", "export", "calibration") if mode == "int8" else ("weights", "export")

    def config_slice(self, recipe: Recipe) -> dict[str, Any]:
        m, e = recipe.model, recipe.eval
        d = recipe.to_dict()
        return {
            "family": m.family, **config_ref(m.config), "input": list(m.input), "dynamic": d["model"]["dynamic"],
            "ops": recipe.surgery.ops, "rpn": d["surgery"]["rpn"],
            "precision": recipe.precision.mode,
            "keep_fp32": [] if recipe.precision.mode == "fp32" else list(recipe.precision.keep_fp32),
            "annotations": str(Path(e.annotations).expanduser().resolve()),
            "annotations_sha256": file_digest(Path(e.annotations).expanduser()),
            "images": str(Path(e.images).expanduser().resolve()), "count": e.count,
            "images_sha256": eval_images_digest(e.annotations, e.images, e.count),
            "score_floor": e.score_floor, "max_candidates": e.max_candidates,
            "names": {k: d["model"][k] for k in ("class_names", "keypoint_names", "keypoint_skeleton")},
        }

    def preflight(self, recipe: Recipe) -> list[Any]:
        """The annotation file's categories must map onto the model's classes (by name or by count)."""
        from d2build import detectron, evaluation
        from d2build.recipe import Problem

        info = detectron.model_info(recipe.to_dict()["model"])
        try:
            evaluation.category_map(evaluation.load_coco(recipe.eval.annotations), info)
        except ValueError as e:
            return [Problem(recipe.source, "eval.annotations", f"{recipe.eval.annotations}: {e}",
                            "set model.class_names to the json's category names, or use a json of this model's "
                            "classes")]
        return []

    def run(self, cfg: dict[str, Any], inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        import json

        import onnx
        import torch

        from d2build import backends, detectron, evaluation
        from d2build.families import family
        from d2build.processing import load_image_bgr
        from d2build.runtime import Model
        from d2build.stages.precision import transform
        from d2build.stages.weights import load_state

        fam = family(cfg["family"])
        hw = tuple(cfg["input"])
        nms = {"score_threshold": cfg["score_floor"], "iou_threshold": 1.0, "max_detections": cfg["max_candidates"]}
        surgery = {"ops": cfg["ops"], "nms": nms, "rpn": cfg["rpn"]}
        d2cfg = detectron.load_cfg(cfg["config"], fam.eager_overrides(surgery))
        ctx.step(f"candidate graph ({cfg['ops']}, {cfg['precision']}): final NMS keeps every score > "
                 f"{cfg['score_floor']}, suppresses nothing")
        export = onnx.load(str(inputs["export"].path("model.onnx")))
        graph, _ = fam.surgery(export, d2cfg, surgery, hw, dynamic=bool(cfg["dynamic"]))
        ranges = (json.loads(inputs["calibration"].path("ranges.json").read_text())
                  if cfg["precision"] == "int8" else None)
        graph, _ = transform(graph, cfg["precision"], cfg["keep_fp32"], ranges)
        info = detectron.model_info({"family": cfg["family"], "config": cfg["config"], "input": cfg["input"],
                                     "dynamic": cfg["dynamic"], **cfg["names"]}, d2cfg)
        graph_model = Model(backends.open_graph(graph), info)
        runner = graph_model.runner
        model = detectron.build_model(d2cfg, load_state(inputs["weights"]))
        gt = evaluation.load_coco(cfg["annotations"])
        ids = sorted(gt.getImgIds())[: cfg["count"] or None]
        cap = cfg["max_candidates"]
        sides: dict[str, dict[int, evaluation.Candidates]] = {s: {} for s in SIDES}
        seconds = {s: 0.0 for s in SIDES}
        for i, image_id in enumerate(ids, 1):
            info = gt.loadImgs(image_id)[0]
            bgr = load_image_bgr(Path(cfg["images"]) / info["file_name"])
            ctx.count(i, len(ids), f"{info['file_name']}: graph and Detectron2, every candidate")
            x, (lb,) = graph_model.prepare([bgr])
            chw = x[0]
            t0 = time.perf_counter()
            out = runner.run({runner.input_name: x})
            n = int(out["num_detections"][0, 0])
            sides["graph"][image_id] = evaluation.Candidates.from_rows(
                out["detection_boxes"][0, :n], out["detection_scores"][0, :n], out["detection_classes"][0, :n], lb,
                lambda rows, b_in, b: fam.decode_heads(out, 0, rows, b_in, b, lb, 0.5), cap)
            t1 = time.perf_counter()
            inst = fam.eager(model, chw)
            sides["detectron2"][image_id] = evaluation.Candidates.from_rows(
                inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_classes.numpy(), lb,
                _eager_heads(inst, lb, torch), cap)
            t2 = time.perf_counter()
            sides["detectron2_native"][image_id] = _native_candidates(fam, model, d2cfg, bgr, cap, torch)
            seconds["graph"] += t1 - t0
            seconds["detectron2"] += t2 - t1
            seconds["detectron2_native"] += time.perf_counter() - t2
        facts: dict[str, Any] = {"images": len(ids), "score_floor": cfg["score_floor"]}
        for side, per_image in sides.items():
            evaluation.save_candidates(out_dir / f"{side}.json", per_image)
            counts = [len(c.scores) for c in per_image.values()]
            facts[side] = {"candidates_per_image": sum(counts) / max(1, len(counts)),
                           "truncated_images": sum(c.truncated for c in per_image.values()),
                           "seconds_per_image": seconds[side] / max(1, len(ids))}
        facts["flavour"] = cfg["ops"]
        return facts


SIDES = ("graph", "detectron2", "detectron2_native")


def _native_candidates(fam, model, cfg, bgr, cap: int, torch):
    """Detectron2 as it runs on its own: ResizeShortestEdge (INPUT.MIN/MAX_SIZE_TEST), the unpadded image
    (the model pads it and clips to its real size), results mapped back as detector_postprocess does."""
    from d2build import evaluation
    from d2build.processing import Letterbox, resize_shortest_edge

    chw, lb = resize_shortest_edge(bgr, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, 1)
    lb = Letterbox(lb.original_hw, lb.resized_hw, lb.scale, lb.resized_hw)
    inst = fam.eager(model, chw)
    return evaluation.Candidates.from_rows(inst.pred_boxes.tensor.numpy(), inst.scores.numpy(),
                                           inst.pred_classes.numpy(), lb, _eager_heads(inst, lb, torch), cap)


def _eager_heads(inst, lb, torch):
    """Masks (Detectron2's own paste) and keypoints of the given rows of Detectron2's Instances."""
    from d2build.processing import detections_from_instances

    def heads(rows, boxes_input, boxes) -> dict[str, Any]:
        det = detections_from_instances(inst[torch.from_numpy(rows)], lb)
        return {"masks": det.masks, "keypoints": det.keypoints}

    return heads
