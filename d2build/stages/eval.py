"""eval: COCO AP of the graph and of Detectron2 on the user's annotated images, at the recipe's NMS settings.

In the DAG when `eval.annotations` is set. Applies each side's own final NMS (the graph's flavour:
EfficientNMS_TRT or ONNX NonMaxSuppression; Detectron2's batched_nms) with `surgery.nms.*` to the
candidates stage's per-image candidates and scores the result with pycocotools: box AP, mask AP
where the model and the annotations have masks, keypoint (OKS) AP where they have keypoints. The
graph's AP is always shown beside the AP of the Detectron2 model it came from, with the difference.
Cheap (no model runs), so each variant of an NMS sweep gets its own numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import asdict as dataclasses_asdict
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import EvalSlice, Files, GraphSpec, ModelSlice, PanopticTruth, Recipe
from d2build.stages.base import Context, Stage
from d2build.stages.candidates import SIDES, load_maps  # graph, detectron2 (same input), detectron2_native


def panoptic_truth(recipe: Recipe) -> PanopticTruth | None:
    """eval.panoptic and its PNGs, keyed by content (a replaced PNG rescores)."""
    import hashlib

    from d2build.cache import file_digest

    e = recipe.eval
    if not e.panoptic or not e.panoptic_masks:
        return None
    path, folder = Path(e.panoptic).expanduser().resolve(), Path(e.panoptic_masks).expanduser().resolve()
    h = hashlib.sha256()
    for ann in sorted(json.loads(path.read_text())["annotations"], key=lambda a: a["file_name"]):
        h.update(f"{ann['file_name']}\0{file_digest(folder / ann['file_name'])}\0".encode())
    return PanopticTruth(str(path), file_digest(path), str(folder), h.hexdigest())


class EvalStage(Stage):
    """Reads `candidates`."""

    kind = "eval"
    VERSION = 3  # 2: Detectron2 with its own resize beside; 3: the annotations come from the slice
    tools = ("pycocotools", "onnxruntime", "torchvision", "numpy")

    def slice(self, recipe: Recipe) -> EvalSlice:
        import dataclasses

        graph = dataclasses.replace(GraphSpec.of(recipe), batch=1)  # scores candidates: the batch plays no part
        return EvalSlice(ModelSlice.of(recipe, graph), recipe.eval.keypoint_oks_sigmas, panoptic_truth(recipe))

    def run(self, cfg: EvalSlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        from d2build import detectron, evaluation
        from d2build.families import family

        cand = inputs["candidates"]
        g = cfg.model.graph
        annotations = cand.info["annotations"]  # the file the candidates were made for (their key holds it)
        gt = evaluation.load_coco(annotations)
        d2cfg = detectron.load_cfg(g.config)
        info = detectron.model_info(cfg.model, d2cfg)
        category_of, note = evaluation.category_map(gt, info)
        if note:
            ctx.step(note)
        nms = g.surgery.nms
        ops = {"graph": g.ops, "detectron2": "detectron2", "detectron2_native": "detectron2"}
        panoptic = json.loads(Path(cfg.panoptic.annotations).read_text()) if cfg.panoptic else None
        fam = family(g.family)
        pq: dict[str, Any] = {}
        iou_types = ["bbox"]
        sigmas = None
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        per_image: dict[str, float] = {}
        for side in SIDES:
            candidates = evaluation.load_candidates(cand.path(f"{side}.json"))
            results: list[dict] = []
            segmentations = {}
            for image_id, c in candidates.items():
                keep = evaluation.final_nms(c, ops[side], nms.score_threshold, nms.iou_threshold, nms.max_detections)
                results += c.results(keep, image_id, category_of)
                if panoptic is not None:  # this variant's panoptic result: its detections with the image's maps
                    hw = tuple(gt.loadImgs(image_id)[0][k] for k in ("height", "width"))
                    segmentations[image_id] = fam.segmentation_of(c.detections(keep, hw),
                                                                   load_maps(cand, side, image_id), info)
            if panoptic is not None:
                assert cfg.panoptic is not None
                pq[side] = evaluation.panoptic_quality(panoptic, Path(cfg.panoptic.masks), segmentations)
            first = next(iter(candidates.values()), None)
            if side == "graph":
                if first is not None and first.rles is not None and evaluation.has(gt, "segm"):
                    iou_types.append("segm")
                if info.keypoint_names and evaluation.has(gt, "keypoints"):
                    iou_types.append("keypoints")
                    sigmas = evaluation.keypoint_sigmas(info, cfg.keypoint_oks_sigmas,
                                                        tuple(d2cfg.TEST.KEYPOINT_OKS_SIGMAS))
                (out_dir / "detections_coco.json").write_text(json.dumps(results))
            ids = sorted(candidates)
            metrics[side] = {t: evaluation.evaluate(gt, results, t, sigmas, ids) for t in iou_types}
            per_image[side] = len(results) / max(1, len(ids))
            ctx.step(f"{side}: " + ", ".join(f"{t} AP {m['AP'] * 100:.2f}" for t, m in metrics[side].items())
                     + (f", PQ {pq[side]['All']['PQ'] * 100:.2f}" if side in pq else ""))
        delta = {t: {k: metrics["graph"][t][k] - metrics["detectron2"][t][k] for k in metrics["graph"][t]}
                 for t in iou_types}
        delta_native = {t: {k: metrics["graph"][t][k] - metrics["detectron2_native"][t][k]
                            for k in metrics["graph"][t]} for t in iou_types}
        nms_doc = dataclasses_asdict(nms)
        doc = {"annotations": annotations, "images": len(ids), "nms": nms_doc, "category_mapping_note": note,
               "metrics": metrics, "delta": delta, "delta_native": delta_native, "detections_per_image": per_image,
               "truncated_images": {s: cand.info.get(s, {}).get("truncated_images", 0) for s in SIDES}}
        if pq:
            doc["panoptic"] = {"annotations": cfg.panoptic.annotations if cfg.panoptic else None, "quality": pq}
        (out_dir / Files.METRICS).write_text(json.dumps(doc, indent=2))
        (out_dir / Files.REPORT).write_text(render(doc, cfg))
        return {"images": len(ids), "nms": nms_doc, "ap": {t: {s: metrics[s][t]["AP"] for s in SIDES} for t in iou_types},
                "metrics": metrics, "delta_ap": {t: delta[t]["AP"] for t in iou_types},
                "delta_ap_native": {t: delta_native[t]["AP"] for t in iou_types},
                "detections_per_image": per_image,
                **({"pq": {s: pq[s]["All"]["PQ"] for s in SIDES}, "panoptic": pq} if pq else {})}

    def describe(self, info: dict[str, Any], folder: Path) -> str:
        parts = [f"{t} AP {v['graph'] * 100:.2f} (Detectron2 on the same input {v['detectron2'] * 100:.2f}, "
                 f"with its own resize {v['detectron2_native'] * 100:.2f})" for t, v in info["ap"].items()]
        if info.get("pq"):
            v = info["pq"]
            parts.append(f"PQ {v['graph'] * 100:.2f} (Detectron2 {v['detectron2'] * 100:.2f}, with its own resize "
                         f"{v['detectron2_native'] * 100:.2f})")
        return f"{'; '.join(parts)} on {info['images']} images; report {folder / Files.REPORT}"


NAMES = {"bbox": "box", "segm": "mask", "keypoints": "keypoint (OKS)"}


def render(doc: dict[str, Any], cfg: EvalSlice) -> str:
    nms = doc["nms"]
    lines = [f"# eval: {cfg.model.family} ({cfg.model.graph.ops} graph) on {doc['images']} images", "",
             f"Annotations: `{doc['annotations']}`. Final NMS: score > {nms['score_threshold']}, IoU "
             f"{nms['iou_threshold']}, at most {nms['max_detections']} per image; each side with its own NMS "
             "(the graph's flavour, Detectron2's batched_nms) on the same letterboxed input.", ""]
    if doc.get("category_mapping_note"):
        lines += [f"Note: {doc['category_mapping_note']}.", ""]
    lines += ["| metric | graph | Detectron2, same input | difference | Detectron2, its own resize | difference |",
              "|---|---:|---:|---:|---:|---:|"]
    for t, m in doc["metrics"]["graph"].items():
        for k, v in m.items():
            ref, nat = doc["metrics"]["detectron2"][t][k], doc["metrics"]["detectron2_native"][t][k]
            lines.append(f"| {NAMES[t]} {k} | {v * 100:.2f} | {ref * 100:.2f} | {(v - ref) * 100:+.2f} | "
                         f"{nat * 100:.2f} | {(v - nat) * 100:+.2f} |")
    for kind, q in (doc.get("panoptic") or {}).get("quality", {}).get("graph", {}).items():
        for k in ("PQ", "SQ", "RQ"):
            ref = doc["panoptic"]["quality"]["detectron2"][kind][k]
            nat = doc["panoptic"]["quality"]["detectron2_native"][kind][k]
            lines.append(f"| panoptic {k} {kind} ({q['categories']} categories) | {q[k] * 100:.2f} | {ref * 100:.2f} | "
                         f"{(q[k] - ref) * 100:+.2f} | {nat * 100:.2f} | {(q[k] - nat) * 100:+.2f} |")
    dpi = doc["detections_per_image"]
    lines += ["", f"Detections per image: graph {dpi['graph']:.1f}, Detectron2 {dpi['detectron2']:.1f} (same input), "
              f"{dpi['detectron2_native']:.1f} (own resize). AP and AR in points (pycocotools' values x 100). "
              "\"Same input\": Detectron2 eager on the exact tensor the graph got (the graph's accuracy against "
              "its model); \"its own resize\": ResizeShortestEdge as Detectron2 tests, which a fixed letterbox "
              "canvas may not match (a dynamic graph does)."]
    if any(doc["truncated_images"].values()):
        lines += ["", f"Warning: the candidate cap was reached on {doc['truncated_images']} image(s); raise "
                  "eval.max_candidates for exact low-threshold variants."]
    return "\n".join(lines) + "\n"
