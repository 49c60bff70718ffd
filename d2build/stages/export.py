"""export: Detectron2 config + weights -> plain ONNX at the recipe's input size.

The exported graph is run with ONNX Runtime on a real photograph inside the stage and compared with
what Detectron2's forward computed on the same letterboxed input while it was traced (the model runs
once, for both); an export that does not reproduce Detectron2 is never published. verify then
compares the TensorRT-ready graph with Detectron2 eager proper on three photographs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import ConfigRef, ExportSlice, Files, Problem, Recipe
from d2build.stages.base import Context, Stage, StageFailed

# One photograph, the one traced, keeps a cold export cheap: its reference values come from the trace
# itself, so the check costs one ONNX Runtime run (~5 s at 1344 on 2 cores) instead of that plus a
# second Detectron2 forward (~7 s). Tests check the export against eager on a second photograph.
CHECK_PHOTO = "astronaut"
CHECK_IOU, CHECK_SCORE = 0.99, 1e-3


class ExportStage(Stage):
    kind = "export"
    VERSION = 3  # 3: checked against the traced forward's own outputs
    tools = ("torch", "torchvision", "sal-detectron2", "onnx", "onnxruntime")

    def slice(self, recipe: Recipe) -> ExportSlice:
        m = recipe.model
        return ExportSlice(m.family, ConfigRef.of(m.config, m.config_overrides), m.input)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        """What a LazyConfig's classes and backbone settle, one line each before the weights stage builds anything
        (reading the config costs 0.05 s; nothing is instantiated): the family the recipe names, and the fixed
        square input, one image at a time, of a square_pad backbone (ViTDet)."""
        from d2build import lazyconfig

        m = recipe.model
        if not lazyconfig.is_lazy(m.config):
            return []
        try:
            lazy = lazyconfig.load(m.config, dict(m.config_overrides))
            found = lazyconfig.family_of(lazy, m.config)
        except lazyconfig.LazyConfigError as e:
            return [Problem(recipe.source, "model.config", str(e), "use a LazyConfig of a supported model")]
        problems = []
        if found != m.family:
            problems.append(Problem(recipe.source, "model.family", f"{m.family}, but model.config {m.config} builds a "
                                    f"{found} model", f"use model.family={found}, or leave model.family out"))
        pad = lazyconfig.square_pad_problem(lazyconfig.square_pad_of(lazy), m.input, m.dynamic is not None,
                                            m.batch_size)
        if pad:
            problems.append(Problem(recipe.source, pad[0], f"{m.config}: {pad[1]}", pad[2]))
        return problems

    def run(self, cfg: ExportSlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        import onnx

        from d2build import detectron, photos
        from d2build.families import builder
        from d2build.graph import op_histogram
        from d2build.processing import letterbox
        from d2build.stages.weights import load_state

        fam = builder(cfg.family)
        d2cfg = detectron.load_cfg(cfg.config)
        detectron.check_family(d2cfg, cfg.family)
        detectron.check_input(d2cfg, cfg.input)
        model = detectron.build_model(d2cfg, load_state(inputs["weights"]))
        hw = cfg.input
        pad = detectron.bgr_normalisation(d2cfg)[0]
        chw, lb = letterbox(photos.bundled(CHECK_PHOTO).bgr, hw, pad)
        ctx.step(f"tracing at {hw[0]}x{hw[1]}")
        path = out_dir / Files.GRAPH
        traced = fam.export(model, chw, path)
        proto = onnx.load(str(path), load_external_data=False)
        ctx.count(1, 1, f"checking the export against Detectron2 on '{CHECK_PHOTO}'")
        return {
            "input": list(hw),
            "nodes": len(proto.graph.node),
            "op_counts": op_histogram(proto),
            "check": [check_export(fam, model, path, CHECK_PHOTO, chw, lb, reference=traced)],
        }


def check_export(fam: Any, model: Any, path: Path, name: str, chw, lb,
                 reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export vs Detectron2 on one image: every detection matched both ways, or StageFailed.

    The reference is Detectron2's forward on `chw`: run eagerly here, or given as the outputs it
    computed while being traced on that image (`reference`, from `family.export`)."""
    import onnxruntime as ort

    from d2build.compare import describe_mismatches, match_detections

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = fam.export_detections(dict(zip(names, sess.run(None, {"image": chw}))), lb)
    against = "trace" if reference is not None else "eager"
    if reference is None:
        inst = fam.eager(model, chw)
        reference = {"pred_boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
                     "pred_classes": inst.pred_classes.numpy()}
    ref = fam.export_detections(reference, lb)
    result = match_detections(ref, got, iou_min=CHECK_IOU, score_tol=CHECK_SCORE)
    if len(ref) == 0:
        raise StageFailed(f"Detectron2 found nothing on '{name}': the export check would prove nothing")
    if not result.all_matched:
        lines = "\n".join(describe_mismatches(result, ref, got))
        raise StageFailed(f"the export differs from Detectron2 on '{name}' "
                          f"({len(result.pairs)}/{len(ref)} matched):\n{lines}")
    return {"image": name, "against": against, "detections": len(ref), "matched": len(result.pairs),
            "mean_box_iou": result.mean_box_iou, "max_score_diff": result.max_score_diff}
