"""candidates: every image of the eval set through the graph and through Detectron2, once, before the final NMS.

In the DAG when `eval.annotations` is set. The graph is `precision[eval]`: the recipe's (flavour, RPN
settings, precision, calibration) with a final NMS that keeps every (proposal, class) above
`eval.score_floor` and suppresses nothing (IoU threshold 1.0), up to `eval.max_candidates` per image
(`surgery[eval]`, see `candidate_graph`); Detectron2 eager runs with the same settings. Everything
before the final NMS -- backbone, RPN, box head -- and the heads after it (a detection's mask depends
on its box only) are what any NMS variant computes, so the eval stage of every variant of an NMS sweep
reuses this one artifact and only re-runs its NMS on the candidates (d2build/evaluation.py). The key
holds the candidate graph's key (so the export, surgery's and precision's versions, the RPN settings,
the flavour, the precision and the calibration at int8), the eval images and the floor -- not
`surgery.nms.*`. The eval images count by their bytes, not only by the folder's path.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from d2build.cache import Artifact, file_digest
from d2build.families.base import Outputs
from d2build.recipe import (CandidatesSlice, EvalImages, Files, GraphDevice, GraphSpec, ModelSlice, NmsConfig, Problem,
                            Recipe)
from d2build.stages.base import Context, Stage


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


def eval_images(recipe: Recipe) -> EvalImages:
    e = recipe.eval
    assert e.annotations is not None and e.images is not None
    return EvalImages(str(Path(e.annotations).expanduser().resolve()), file_digest(Path(e.annotations).expanduser()),
                      str(Path(e.images).expanduser().resolve()), e.count,
                      eval_images_digest(e.annotations, e.images, e.count))


def candidate_graph(recipe: Recipe, spec: GraphSpec) -> GraphSpec:
    """The recipe's graph at batch 1 with a final NMS that keeps every score above eval.score_floor, up to
    eval.max_candidates per image, and suppresses nothing."""
    e = recipe.eval
    nms = NmsConfig(iou_threshold=1.0, score_threshold=e.score_floor, max_detections=e.max_candidates)
    return dataclasses.replace(spec, batch=1, surgery=dataclasses.replace(spec.surgery, nms=nms))


class CandidatesStage(Stage):
    """Reads `weights` and `graph` (precision[eval], the candidate graph in the recipe's precision)."""

    kind = "candidates"
    # 2: Detectron2 with its own resize as a third side; dynamic graphs; 3: the graph is an input; 4: device, image
    # maps; 5: an RGB model's letterbox pads with its mean in BGR order
    VERSION = 5
    tools = ("torch", "torchvision", "sal-detectron2", "onnxruntime", "onnxruntime-extensions", "pycocotools",
             "numpy")

    def slice(self, recipe: Recipe) -> CandidatesSlice:
        return CandidatesSlice(ModelSlice.of(recipe, candidate_graph(recipe, GraphSpec.of(recipe))),
                               recipe.precision.mode, eval_images(recipe), GraphDevice.of(recipe))

    def preflight(self, recipe: Recipe) -> list[Problem]:
        """The annotation file's categories must map onto the model's classes (by name or by count)."""
        from d2build import detectron, evaluation

        from d2build.stages.verify import sizes_problems

        info = detectron.model_info(ModelSlice.of(recipe))
        gt = evaluation.load_coco(recipe.eval.annotations)
        try:
            evaluation.category_map(gt, info)
        except ValueError as e:
            return [Problem(recipe.source, "eval.annotations", f"{recipe.eval.annotations}: {e}",
                            "set model.class_names to the json's category names, or use a json of this model's "
                            "classes")]
        ids = sorted(gt.getImgIds())[: recipe.eval.count or None]
        files = [str(Path(recipe.eval.images).expanduser() / gt.loadImgs(i)[0]["file_name"]) for i in ids]
        return sizes_problems(recipe, "eval.images", files)

    def run(self, cfg: CandidatesSlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        import torch

        from d2build import backends, detectron, evaluation
        from d2build.families import builder
        from d2build.processing import load_image_bgr
        from d2build.runtime import Model
        from d2build.stages.weights import load_state

        g = cfg.model.graph
        fam = builder(g.family)
        nms = g.surgery.nms
        d2cfg = detectron.load_cfg(g.config, fam.eager_overrides(g.surgery))
        ctx.step(f"candidate graph ({g.ops}, {cfg.precision}): final NMS keeps every score > "
                 f"{nms.score_threshold}, suppresses nothing")
        from d2build.backends import devices

        graph_model = Model(backends.open_graph(inputs["graph"].path(Files.GRAPH), **devices.stage_options(cfg.device)),
                            detectron.model_info(cfg.model, d2cfg))
        runner = graph_model.runner
        model = detectron.build_model(d2cfg, load_state(inputs["weights"]))
        if cfg.device is not None:  # every side on the graph's GPU, TF32 as runtime.tf32 says
            from d2build.backends.detectron2 import on_device

            model = on_device(model, cfg.device.device, tf32=cfg.device.tf32)
        gt = evaluation.load_coco(cfg.data.annotations)
        ids = sorted(gt.getImgIds())[: cfg.data.count or None]
        cap = nms.max_detections
        sides: dict[str, dict[int, evaluation.Candidates]] = {s: {} for s in SIDES}
        seconds = {s: 0.0 for s in SIDES}
        for i, image_id in enumerate(ids, 1):
            info = gt.loadImgs(image_id)[0]
            bgr = load_image_bgr(Path(cfg.data.images) / info["file_name"])
            ctx.count(i, len(ids), f"{info['file_name']}: graph and Detectron2, every candidate")
            x, (lb,) = graph_model.prepare([bgr])
            chw = x[0]
            t0 = time.perf_counter()
            out = runner.run({runner.input_name: x})
            n = int(out[Outputs.NUM][0, 0])
            sides["graph"][image_id] = evaluation.Candidates.from_rows(
                out[Outputs.BOXES][0, :n], out[Outputs.SCORES][0, :n], out[Outputs.CLASSES][0, :n], lb,
                lambda rows, b_in, b: fam.family.decode_heads(out, 0, rows, b_in, b, lb, 0.5), cap)
            save_maps(out_dir, "graph", image_id, fam.family.image_maps(out, 0, lb))  # e.g. semantic maps
            t1 = time.perf_counter()
            inst, maps = fam.eager_with_maps(model, chw, lb)
            sides["detectron2"][image_id] = evaluation.Candidates.from_rows(
                inst.pred_boxes.tensor.cpu().numpy(), inst.scores.cpu().numpy(), inst.pred_classes.cpu().numpy(), lb,
                _eager_heads(inst, lb, torch), cap)
            save_maps(out_dir, "detectron2", image_id, maps)
            t2 = time.perf_counter()
            sides["detectron2_native"][image_id] = _native_candidates(fam, model, d2cfg, bgr, cap, torch, out_dir,
                                                                      image_id)
            seconds["graph"] += t1 - t0
            seconds["detectron2"] += t2 - t1
            seconds["detectron2_native"] += time.perf_counter() - t2
        facts: dict[str, Any] = {"images": len(ids), "annotations": cfg.data.annotations,
                                 "score_floor": nms.score_threshold}
        for side, per_image in sides.items():
            evaluation.save_candidates(out_dir / f"{side}.json", per_image)
            counts = [len(c.scores) for c in per_image.values()]
            facts[side] = {"candidates_per_image": sum(counts) / max(1, len(counts)),
                           "truncated_images": sum(c.truncated for c in per_image.values()),
                           "seconds_per_image": seconds[side] / max(1, len(ids))}
        facts["ops"] = g.ops
        return facts


SIDES = ("graph", "detectron2", "detectron2_native")
MAPS = "maps"  # <side>/<image id>-<name>.png: a family's image-level maps (Panoptic FPN's semantic map)


def save_maps(out_dir: Path, side: str, image_id: int, maps: dict[str, Any]) -> None:
    from d2build.deploy.runtime import png_bytes

    for name, array in maps.items():
        if int(array.max(initial=0)) > 255:
            raise ValueError(f"{name} map of image {image_id} has values above 255: not an 8-bit PNG")
        path = out_dir / MAPS / side / f"{image_id}-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(array))


def load_maps(candidates: Artifact, side: str, image_id: int) -> dict[str, Any]:
    """The maps `save_maps` wrote for one image and side, by name (none for families without them)."""
    import numpy as np
    from PIL import Image

    prefix = f"{MAPS}/{side}/{image_id}-"
    return {name[len(prefix):-len(".png")]: np.asarray(Image.open(candidates.path(name))).astype(np.int32)
            for name in sorted(candidates.manifest["files"]) if name.startswith(prefix)}


def _native_candidates(fam, model, cfg, bgr, cap: int, torch, out_dir: Path, image_id: int):
    """Detectron2 as it runs on its own: ResizeShortestEdge (INPUT.MIN/MAX_SIZE_TEST), the unpadded image
    (the model pads it and clips to its real size), results mapped back as detector_postprocess does."""
    from d2build import evaluation
    from d2build.processing import Letterbox, resize_shortest_edge

    chw, lb = resize_shortest_edge(bgr, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, 1)
    lb = Letterbox(lb.original_hw, lb.resized_hw, lb.scale, lb.resized_hw)
    inst, maps = fam.eager_with_maps(model, chw, lb)
    save_maps(out_dir, "detectron2_native", image_id, maps)
    return evaluation.Candidates.from_rows(inst.pred_boxes.tensor.cpu().numpy(), inst.scores.cpu().numpy(),
                                           inst.pred_classes.cpu().numpy(), lb, _eager_heads(inst, lb, torch), cap)


def _eager_heads(inst, lb, torch):
    """Masks (Detectron2's own paste) and keypoints of the given rows of Detectron2's Instances."""
    from d2build.processing import detections_from_instances

    def heads(rows, boxes_input, boxes) -> dict[str, Any]:
        det = detections_from_instances(inst[torch.from_numpy(rows)], lb)
        return {"masks": det.masks, "keypoints": det.keypoints}

    return heads
