"""Surgery for the LazyConfig baselines (prototype for issue 21): what the R-CNN surgeons need beyond the yacs FPN
models, as small overrides of `RCNNSurgeon` / `StandardSurgeon`, with the HeadSpec read from the built model.

Three differences, each cheap:

* The box head may start with convolutions ("4conv1fc": LSJ, ViTDet). The export has `conv1..conv4`, a
  `Flatten` and `fc1`; the pooled features must enter `conv1` as [rows, C, R, R] instead of `fc1` flattened.
  The norms are no obstacle: the exporter folds eval-mode BatchNorm into the convs, and channel LayerNorm
  (ViTDet's heads) is plain ReduceMean/Sub/Pow/Sqrt/Div arithmetic that stays between them.
* The features are not always `backbone.fpn_output{k}` convs (ViTDet's SimpleFeaturePyramid ends each level in a
  LayerNorm). Each level's feature is what the RPN head's first layer reads at that level's call: found by
  structure, for any backbone.
* The first convolution (where the pixel mean/std are folded) is not always `backbone.bottom_up.stem.conv1`
  (RegNet: `stem.conv`, ViT: `net.patch_embed.proj`): it is the first Conv after the graph input.

The ViT export also computes shapes from `x.shape` (window partition, relative positions); one
onnx-graphsurgeon fold leaves them, so `static_export` folds with ONNX Runtime's basic-level optimiser first
(standard ops only; module scopes survive), which makes the backbone static in one pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build.families import rcnn_graph
from d2build.families.rcnn_graph import HeadSpec, RCNNSurgeon
from d2build.families.rcnn_standard import StandardSurgeon
from d2build.graph import GraphMismatch, find_calls

#: standard ops the ViT backbone and LayerNorm heads add to d2build's list (all imported natively by TensorRT 10's
#: ONNX parser, onnx-tensorrt docs/operators.md: LayerNormalization via INormalizationLayer, Einsum via IEinsumLayer)
VIT_OPS = frozenset({"LayerNormalization", "Einsum", "Erf", "Pow", "ReduceMean", "Pad"})


def static_export(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The export with every shape computation folded (ONNX Runtime basic optimisations: constant folding, shape
    to initializer, redundant node removal; standard-domain ops only)."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "export.onnx", Path(tmp) / "static.onnx"
        onnx.save(proto, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        out = onnx.load(str(dst))
    del out.opset_import[:]
    out.opset_import.extend([onnx.helper.make_opsetid("", 17)])
    return out


def head_spec(model: Any, surgery: dict[str, Any], input_hw: tuple[int, int], batch: int = 1,
              dynamic: bool = False) -> HeadSpec:
    """rcnn_graph.head_spec's fields, read from the built model (model_facts) instead of yacs keys."""
    from d2build import model_facts

    f = model_facts.facts(model)
    if f.roi_heads != "StandardROIHeads" or f.anchor_generator != "DefaultAnchorGenerator" or not f.pooler_aligned:
        raise GraphMismatch(f"not supported by this prototype: {f.roi_heads}, {f.anchor_generator}, "
                            f"aligned pooling {f.pooler_aligned}")
    if f.square_pad and tuple(input_hw) != (f.square_pad, f.square_pad):
        raise GraphMismatch(f"the backbone pads every image to {f.square_pad}x{f.square_pad} (square_pad) but "
                            f"model.input is {input_hw[0]}x{input_hw[1]}: set model.config_overrides="
                            f"{{model.backbone.square_pad:{input_hw[0]}}} or model.input=[{f.square_pad},{f.square_pad}]")
    gen = model.proposal_generator.anchor_generator
    return HeadSpec(
        input_hw=tuple(input_hw), pixel_mean=f.pixel_mean, pixel_std=f.pixel_std, input_format=f.input_format,
        rpn_in_features=f.dense_in_features, roi_in_features=f.roi_in_features,
        anchors=tuple(a.astype(np.float32) for a in model_facts.anchors(model, input_hw, f.dense_in_features)),
        anchors_per_location=f.anchors_per_location,
        rpn_pre_nms_topk=int(surgery["rpn"]["pre_nms_topk"]), rpn_post_nms_topk=int(surgery["rpn"]["post_nms_topk"]),
        rpn_iou=float(surgery["rpn"]["iou_threshold"]), num_classes=f.num_classes,
        bbox_reg_weights=f.box_reg_weights[0], box_pooler=f.box_pooler, mask_pooler=f.mask_pooler,
        score_threshold=float(surgery["nms"]["score_threshold"]), nms_iou=float(surgery["nms"]["iou_threshold"]),
        max_detections=int(surgery["nms"]["max_detections"]), canonical_box_size=f.canonical_box_size,
        batch=batch, dynamic=dynamic,
        cell_anchors=tuple(c.numpy().astype(np.float32) for c in gen.cell_anchors),
        rpn_strides=tuple(f.strides[k] for k in f.dense_in_features),
    )


class _LazyParts:
    """The three overrides (module doc); mixed into both surgeons."""

    graph: gs.Graph
    spec: HeadSpec
    b: Any

    def features(self, names: tuple[str, ...]) -> list[gs.Tensor]:
        """Each level's feature: the input of the RPN head's first layer at that level's call."""
        rpn = [n for n in self.graph.nodes if (n.name or "").startswith("/proposal_generator/rpn_head/")]
        inside = {t.name for n in rpn for t in n.outputs}
        firsts = [n for n in rpn if n.op == "Conv" and n.inputs[0].name not in inside]
        levels = self.spec.rpn_in_features
        if len(firsts) != len(levels):
            raise GraphMismatch(f"expected one RPN head call per level {levels}, found {len(firsts)}")
        by_name = dict(zip(levels, (n.inputs[0] for n in firsts)))  # the export calls the head level by level
        missing = [n for n in names if n not in by_name]
        if missing:
            raise GraphMismatch(f"ROI features {missing} are not RPN levels {levels}")
        return [by_name[n] for n in names]

    def input_and_preprocessing(self):
        """As the parent's, on the first Conv after the graph input (whatever the backbone calls it)."""
        order = gs.Graph(nodes=list(self.graph.nodes)).toposort().nodes
        first = next(n for n in order if n.op == "Conv")
        real = rcnn_graph.find_one

        def find_one(graph, module_path, op):
            return first if module_path == "backbone.bottom_up.stem.conv1" else real(graph, module_path, op)

        with _patched(rcnn_graph, "find_one", find_one):
            return super().input_and_preprocessing()

    def box_stage(self, *args, **kwargs):
        """As the parent's; a box head with convolutions gets the pooled features at conv1 ([rows, C, R, R])."""
        stage = args[-1]
        convs = find_calls(self.graph, f"roi_heads.box_head{stage.scope}.conv1", "Conv")
        if not convs:
            return super().box_stage(*args, **kwargs)
        fc1 = find_calls(self.graph, f"roi_heads.box_head{stage.scope}.fc1", "Gemm", 1)[0]
        flattened = fc1.inputs[0]  # the export's Flatten of conv4's output
        out = super().box_stage(*args, **kwargs)
        features = fc1.inputs[0].inputs[0]  # the parent's Reshape of the pooled features for fc1
        pooled = features.inputs[0]
        r = self.spec.box_pooler[0]
        channels = self.features(self.spec.roi_in_features)[0].shape[1]
        convs[0].inputs[0] = self.b.op("Reshape", [pooled, np.array([-1, channels, r, r], np.int64)],
                                       name=f"box_conv_features{stage.tag}")
        fc1.inputs[0] = flattened
        return out


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class LazyPluginSurgeon(_LazyParts, RCNNSurgeon):
    pass


class LazyStandardSurgeon(_LazyParts, StandardSurgeon):
    """The standard flavour; its TensorRT op check admits VIT_OPS as well (recorded in the facts)."""

    def check_model(self, model: onnx.ModelProto) -> None:
        from d2build import standard_ops

        problems = [p for p in standard_ops.problems(model)
                    if not any(f"op {op} is not" in p for op in VIT_OPS)]
        if problems:
            raise standard_ops.UnsupportedOp(f"the standard-op graph cannot be imported by TensorRT: {problems[0]}")
        used = sorted({n.op_type for n in model.graph.node} & VIT_OPS)
        self.facts.update(flavour="standard", ops_added_to_the_standard_list=used)


def surgery(export: onnx.ModelProto, model: Any, surgery_cfg: dict[str, Any], input_hw: tuple[int, int]):
    """The TensorRT-ready graph of a LazyConfig Mask R-CNN export (both flavours), and the surgery facts."""
    spec = head_spec(model, surgery_cfg, input_hw)
    if any(n.op_type == "Shape" and n.name.startswith("/backbone/") for n in export.graph.node):
        export = static_export(export)
    surgeon = LazyStandardSurgeon if surgery_cfg.get("ops", "plugins") == "standard" else LazyPluginSurgeon
    return surgeon(export, spec).run()

