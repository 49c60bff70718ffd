"""The surgeon every family's surgery uses, and the two graph flavours as strategies it is given.

`Surgeon` holds one export being rewritten and the pieces every meta-architecture shares: the
export folded and shape-inferred, the graph input with Detectron2's preprocessing moved inside
(mean subtraction, 1/std folded into the stem), the FPN features by name, the anchors of each dense
level (constants for a fixed input, made in the graph for a dynamic one, as Detectron2's
DefaultAnchorGenerator makes them), Box2BoxTransform's decode, the clip, the named detection
outputs, and `run()`: cleanup, toposort, shape inference, onnx.checker and the flavour's checks.
One subclass per meta-architecture says what comes after the backbone (rcnn.py: RPN, box stages,
heads; dense.py: RetinaNet's dense candidates).

The flavour (`surgery.ops`) is not a class axis of the surgeons: it is the strategy object a
surgeon is built with. `PluginOps` and `StandardOps` below carry what differs between the
flavours for every family (which op domains the graph declares, what is checked at the end, the
standard flavour's class-wise NonMaxSuppression + top-k); their per-meta-architecture subclasses
(rcnn.py, dense.py) carry the steps that are built differently in each flavour.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build import plugins
from d2build.families.base import Outputs
from d2build.families.surgery.spec import HeadSpec
from d2build.graph import OPSET, Builder, GraphMismatch, find_calls, find_one
from d2build.recipe import OPS

BIG = 1.0e4  # a logit no real proposal reaches; rows/columns holding -BIG are never selected
SCALE_CLAMP = math.log(1000.0 / 16)  # Detectron2's _DEFAULT_SCALE_CLAMP
FLOAT_MAX = float(np.finfo(np.float32).max)

# corners (x1, y1, x2, y2) -> (w, h, w, h, cx, cy, 0, 0); rows are input components
CORNERS_TO_PARAMS = np.array([
    [-1, 0, -1, 0, 0.5, 0, 0, 0],
    [0, -1, 0, -1, 0, 0.5, 0, 0],
    [1, 0, 1, 0, 0.5, 0, 0, 0],
    [0, 1, 0, 1, 0, 0.5, 0, 0],
], dtype=np.float32)
# (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
CENTER_TO_CORNERS = np.array([
    [1, 0, 1, 0],
    [0, 1, 0, 1],
    [-0.5, 0, 0.5, 0],
    [0, -0.5, 0, 0.5],
], dtype=np.float32)
# corners -> (x2 - x1, y2 - y1)
CORNERS_TO_WH = np.array([[-1, 0], [0, -1], [1, 0], [0, 1]], dtype=np.float32)


def i64(*v: int) -> np.ndarray:
    """An int64 constant (shapes, indices, axes)."""
    return np.array(v, np.int64)


def static_export(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The export with every shape computation folded: ONNX Runtime's basic optimisations (constant folding, shape
    to initializer, redundant node removal; standard-domain ops, module scopes kept in the node names)."""
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
    out.opset_import.extend([onnx.helper.make_opsetid("", OPSET)])
    return out


class Surgeon:
    """Rewrites one export with one flavour; `run()` returns the TensorRT-ready ModelProto and facts."""

    def __init__(self, export: onnx.ModelProto, spec: HeadSpec, ops: "PluginOps | StandardOps"):
        self.spec = spec
        self.ops = ops
        folded = gs.import_onnx(export)
        folded.fold_constants().cleanup()  # makes the export's padding arithmetic static, so shapes infer
        if any(n.op == "Shape" and (n.name or "").startswith("/backbone/") for n in folded.nodes):
            # ViT's shape arithmetic (window partition, position interpolation) outlives one fold: ONNX Runtime's
            # basic optimiser makes the backbone static in one pass (yacs backbones have no Shape node here)
            folded = gs.import_onnx(static_export(gs.export_onnx(folded)))
        self.graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(folded)))
        self.b = Builder(self.graph, "d2build")
        self.facts: dict[str, Any] = {}
        self._limits: gs.Variable | None = None

    # ------------------------------------------------------------------ input and features

    def features(self, names: tuple[str, ...]) -> list[gs.Tensor]:
        """FPN outputs by name: p2..p5 are fpn_output{k} convs, p6 the top block's pooling. A backbone without
        fpn_output convs (ViTDet's SimpleFeaturePyramid ends each level in a LayerNorm) is read structurally:
        each level's feature is the input of the dense head's first conv at that level's call."""
        if not any((n.name or "").startswith("/backbone/fpn_output") for n in self.graph.nodes):
            return self.dense_head_inputs(names)
        out = []
        for name in names:
            level = int(name[1:])
            if level <= 5:
                out.append(find_one(self.graph, f"backbone.fpn_output{level}", "Conv").outputs[0])
            else:
                out.append(find_one(self.graph, "backbone.top_block", "MaxPool").outputs[0])
        return out

    def dense_head_inputs(self, names: tuple[str, ...]) -> list[gs.Tensor]:
        """The levels' features as the inputs of the RPN head's (or RetinaNet head's) first convs: the export calls
        the head once per level, in the order of the spec's dense levels."""
        scope = next((p for p in ("/proposal_generator/rpn_head/", "/head/")
                      if any((n.name or "").startswith(p) for n in self.graph.nodes)), None)
        if scope is None:
            raise GraphMismatch("found neither backbone.fpn_output convs nor a dense head to read the features from")
        head = [n for n in self.graph.nodes if (n.name or "").startswith(scope)]
        inside = {t.name for n in head for t in n.outputs}
        entries: list[gs.Tensor] = []
        for n in head:  # first calls per level: convs fed from outside the head, each feature once
            if n.op == "Conv" and n.inputs[0].name not in inside and all(n.inputs[0] is not e for e in entries):
                entries.append(n.inputs[0])
        levels = self.spec.rpn_in_features
        if len(entries) != len(levels):
            raise GraphMismatch(f"expected one dense head call per level {list(levels)}, found {len(entries)}")
        by_name = dict(zip(levels, entries))
        missing = [n for n in names if n not in by_name]
        if missing:
            raise GraphMismatch(f"features {missing} are not dense head levels {list(levels)}")
        return [by_name[n] for n in names]

    def stem_conv(self) -> gs.Node:
        """The backbone's first conv: ResNet's stem.conv1 by name, else (RegNet's stem.conv, ViT's
        patch_embed.proj) the first Conv in topological order."""
        if find_calls(self.graph, "backbone.bottom_up.stem.conv1", "Conv"):
            return find_one(self.graph, "backbone.bottom_up.stem.conv1", "Conv")
        order = gs.Graph(nodes=list(self.graph.nodes), inputs=list(self.graph.inputs)).toposort().nodes
        first = next((n for n in order if n.op == "Conv"), None)
        if first is None or not (first.name or "").startswith("/backbone/"):
            raise GraphMismatch("the export's first Conv is not in the backbone: cannot move preprocessing into it")
        return first

    def input_and_preprocessing(self) -> gs.Variable:
        s, b = self.spec, self.b
        h, w = ("height", "width") if s.dynamic else s.input_hw
        inp = gs.Variable("input_tensor", np.float32, [s.batch, 3, h, w])
        self.input = inp
        stem = self.stem_conv()
        weight = np.array(stem.inputs[1].values, dtype=np.float32)
        mean = np.array(s.pixel_mean, dtype=np.float32)
        std = np.array(s.pixel_std, dtype=np.float32)
        if s.input_format == "RGB":  # input_tensor is BGR; an RGB model sees it through flipped channels
            weight, mean, std = weight[:, ::-1], mean[::-1], std[::-1]
        elif s.input_format != "BGR":
            raise GraphMismatch(f"INPUT.FORMAT={s.input_format!r} is not supported (BGR or RGB)")
        centered = b.op("Sub", [inp, mean.reshape(1, 3, 1, 1)], name="subtract_pixel_mean")
        stem.inputs[0] = centered
        if not np.all(std == 1.0):  # (x - m) / s through conv1 == (x - m) through conv1 with W / s
            weight = weight / std.reshape(1, 3, 1, 1)
        stem.inputs[1] = gs.Constant(stem.name + "/W", np.ascontiguousarray(weight))
        return inp

    # ------------------------------------------------------------------ anchors

    @staticmethod
    def anchor_rows(anchors: np.ndarray, a: int) -> np.ndarray:
        """[8, N] rows (w, h, w, h, cx, cy, 0, 0) in (a, loc) order, computed as Detectron2 does."""
        boxes = anchors.reshape(-1, a, 4).transpose(1, 0, 2).reshape(-1, 4)
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + np.float32(0.5) * w
        cy = boxes[:, 1] + np.float32(0.5) * h
        z = np.zeros_like(w)
        return np.stack([w, h, w, h, cx, cy, z, z]).astype(np.float32)

    def anchor_table(self, feature: gs.Variable, lvl: int) -> gs.Variable:
        """A dynamic input's [A*H*W, 8] rows (w, h, w, h, cx, cy, 0, 0) of one level, in the (anchor, y, x) order
        of `anchor_rows`: shifts arange(W) * stride and arange(H) * stride plus the cell anchors, in float32 as
        Detectron2 adds them."""
        s, b = self.spec, self.b
        t = f"anchors_p{lvl + 2}"
        stride = np.float32(s.rpn_strides[lvl])
        cell = s.cell_anchors[lvl]
        shape = b.op("Shape", [feature], name=f"{t}_shape")
        hl = b.op("Gather", [shape, np.array(2, np.int64)], {"axis": 0}, name=f"{t}_h")
        wl = b.op("Gather", [shape, np.array(3, np.int64)], {"axis": 0}, name=f"{t}_w")
        zero, one = np.array(0, np.int64), np.array(1, np.int64)
        xs = b.op("Mul", [b.op("Cast", [b.op("Range", [zero, wl, one], name=f"{t}_x_index")],
                                {"to": onnx.TensorProto.FLOAT}, name=f"{t}_x_float"), stride], name=f"{t}_x")
        ys = b.op("Mul", [b.op("Cast", [b.op("Range", [zero, hl, one], name=f"{t}_y_index")],
                                {"to": onnx.TensorProto.FLOAT}, name=f"{t}_y_float"), stride], name=f"{t}_y")
        grid = b.op("Concat", [b.op("Unsqueeze", [hl, i64(0)], name=f"{t}_h_1d"),
                               b.op("Unsqueeze", [wl, i64(0)], name=f"{t}_w_1d")], {"axis": 0}, name=f"{t}_grid")
        x = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [xs, i64(0)], name=f"{t}_x_row"), grid],
                                  name=f"{t}_x_grid"), i64(-1, 1)], name=f"{t}_x_flat")
        y = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [ys, i64(1)], name=f"{t}_y_col"), grid],
                                  name=f"{t}_y_grid"), i64(-1, 1)], name=f"{t}_y_flat")
        shifts = b.op("Concat", [x, y, x, y], {"axis": 1}, name=f"{t}_shifts")  # [H*W, 4]
        boxes = b.op("Add", [b.op("Unsqueeze", [shifts, i64(0)], name=f"{t}_shifts_3d"),
                             cell.reshape(len(cell), 1, 4)], name=f"{t}_boxes_3d")  # [A, H*W, 4]
        boxes = b.op("Reshape", [boxes, i64(-1, 4)], name=f"{t}_boxes")
        x1, y1, x2, y2 = b.op("Split", [boxes, i64(1, 1, 1, 1)], {"axis": 1}, outputs=4, name=f"{t}_corners")
        w = b.op("Sub", [x2, x1], name=f"{t}_width")
        h = b.op("Sub", [y2, y1], name=f"{t}_height")
        cx = b.op("Add", [x1, b.op("Mul", [np.float32(0.5), w], name=f"{t}_half_w")], name=f"{t}_cx")
        cy = b.op("Add", [y1, b.op("Mul", [np.float32(0.5), h], name=f"{t}_half_h")], name=f"{t}_cy")
        z = b.op("Mul", [w, np.float32(0)], name=f"{t}_zero")
        return b.op("Concat", [w, h, w, h, cx, cy, z, z], {"axis": 1}, name=f"{t}_table")

    # ------------------------------------------------------------------ boxes

    def clip_limits(self) -> Any:
        """[W, H, W, H] of the input, the clip limits of every box (of the actual input when it is dynamic)."""
        if not self.spec.dynamic:
            h, w = self.spec.input_hw
            return np.array([w, h, w, h], np.float32)
        if self._limits is None:
            b = self.b
            hw = b.op("Gather", [b.op("Shape", [self.input], name="input_shape"), i64(3, 2, 3, 2)], {"axis": 0},
                      name="input_whwh")
            self._limits = b.op("Cast", [hw], {"to": onnx.TensorProto.FLOAT}, name="clip_limits")
        return self._limits

    def decode(self, deltas: gs.Variable, whwh: Any, ctr: Any, tag: str, clip: bool = True) -> gs.Variable:
        """Box2BoxTransform.apply_deltas (weights already applied), then clip to the image (unless `clip` is
        False: RetinaNet's boxes enter NMS unclipped)."""
        b = self.b
        limit = np.array([FLOAT_MAX, FLOAT_MAX, SCALE_CLAMP, SCALE_CLAMP], np.float32)
        clamped = b.op("Min", [deltas, limit], name=f"{tag}_clamp_dwdh")
        grown = b.op("Exp", [clamped], name=f"{tag}_exp")
        u = b.op("Where", [np.array([False, False, True, True]), grown, clamped], name=f"{tag}_dxy_expwh")
        center = b.op("Add", [b.op("Mul", [u, whwh], name=f"{tag}_scale"), ctr], name=f"{tag}_center_size")
        corners = b.op("MatMul", [center, CENTER_TO_CORNERS], name=f"{tag}_corners")
        return self.clip(corners, tag) if clip else corners

    def clip(self, boxes: gs.Variable, tag: str) -> gs.Variable:
        """Boxes.clip: corners into [0, W] x [0, H] of the input."""
        b = self.b
        low = b.op("Max", [boxes, np.float32(0)], name=f"{tag}_clip_low")
        return b.op("Min", [low, self.clip_limits()], name=f"{tag}_clip_high")

    def nms_outputs(self, num, boxes, scores, classes, m: int) -> None:
        """Types and static shapes of (num [B,1] int32, boxes [B,m,4], scores [B,m], classes [B,m] int32)."""
        B = self.spec.batch
        num.dtype, num.shape = np.int32, [B, 1]
        boxes.dtype, boxes.shape = np.float32, [B, m, 4]
        scores.dtype, scores.shape = np.float32, [B, m]
        classes.dtype, classes.shape = np.int32, [B, m]

    def name_detections(self, outs: list[gs.Variable]) -> list[gs.Variable]:
        """The four detection tensors as the graph outputs every family ends in (static shapes)."""
        for v, name in zip(outs, Outputs.DETECTIONS):
            v.name = name
        self.nms_outputs(*outs, self.spec.max_detections)
        return list(outs)

    # ------------------------------------------------------------------ whole graph

    def outputs(self) -> list[gs.Variable]:
        """The graph outputs (the meta-architecture's subclass builds them)."""
        raise NotImplementedError

    def forget_inner_shapes(self) -> None:
        """Shape inference recomputes every inner shape: the export's were traced at batch 1 (and one size)."""
        keep = {t.name for t in (*self.graph.inputs, *self.graph.outputs)}
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Variable) and t.name not in keep:
                t.shape = None

    def run(self) -> tuple[onnx.ModelProto, dict[str, Any]]:
        g = self.graph
        inp = self.input_and_preprocessing()
        g.inputs, g.outputs = [inp], self.outputs()
        g.cleanup().toposort()
        self.forget_inner_shapes()
        self.ops.check_graph(g)
        g.opset = OPSET
        g.import_domains = [onnx.helper.make_opsetid("", OPSET), *self.ops.domains()]
        model = gs.export_onnx(g)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        self.ops.check_model(model)
        return model, self.facts


# ---------------------------------------------------------------------------------------- the flavours


class PluginOps:
    """`surgery.ops=plugins`: TensorRT plugin nodes (EfficientNMS_TRT, PyramidROIAlign_TRT) in a static graph."""

    name = "plugins"

    def check_graph(self, graph: gs.Graph) -> None:
        """The plugin graph is static: no data-dependent op may be left."""
        left = sorted({n.op for n in graph.nodes} & {"If", "Loop", "NonZero", "Scan"})
        if left:
            raise GraphMismatch(f"surgery left data-dependent ops in the graph: {left}")

    def domains(self) -> list[onnx.OperatorSetIdProto]:
        return [onnx.helper.make_opsetid(plugins.DOMAIN, plugins.DOMAIN_VERSION)]

    def check_model(self, model: onnx.ModelProto) -> None:
        pass


class StandardOps:
    """`surgery.ops=standard`: ONNX ops TensorRT 10/11's parser imports natively (NonMaxSuppression, RoiAlign).

    Intermediate tensors have data-dependent shapes (NonZero, NonMaxSuppression); graph outputs never do."""

    name = "standard"

    def __init__(self) -> None:
        self.det_valid: gs.Variable | None = None  # [B, D] bool: which detection rows are real (top_detections)

    def check_graph(self, graph: gs.Graph) -> None:
        """Data-dependent intermediate shapes are this flavour's design; its outputs are static anyway."""

    def domains(self) -> list[onnx.OperatorSetIdProto]:
        return []  # standard ops only

    def check_model(self, model: onnx.ModelProto) -> None:
        from d2build import standard_ops

        standard_ops.check(model)

    def kept_scores(self, sg: Surgeon, sel: gs.Variable, scores: gs.Variable, per_item: Any, total: Any, fill: float,
                    tag: str) -> gs.Variable:
        """NonMaxSuppression's selected (item, 0, j) as a dense score vector: kept scores, `fill` elsewhere.

        `scores` is the [items * per_item] score table the NMS ranked (any shape; flattened here)."""
        b = sg.b
        item = b.op("Gather", [sel, i64(0)], {"axis": 1}, name=f"{tag}_nms_item")  # [K]
        j = b.op("Gather", [sel, i64(2)], {"axis": 1}, name=f"{tag}_nms_index")
        flat = b.op("Add", [b.op("Mul", [item, per_item], name=f"{tag}_nms_item_offset"), j], name=f"{tag}_nms_flat")
        table = b.op("Reshape", [scores, i64(-1)], name=f"{tag}_scores_flat")
        kept = b.op("Gather", [table, flat], {"axis": 0}, name=f"{tag}_kept_scores")
        shape = total if isinstance(total, gs.Variable) else i64(total)
        base = b.op("Expand", [np.array([fill], np.float32), shape], name=f"{tag}_fill")
        return b.op("ScatterND", [base, b.op("Unsqueeze", [flat, i64(1)], name=f"{tag}_nms_flat_2d"), kept],
                    name=f"{tag}_kept_dense")

    def top_detections(self, sg: Surgeon, boxes: gs.Variable, scores: gs.Variable,
                       classes: gs.Variable) -> list[gs.Variable]:
        """Class-wise NMS, one NonMaxSuppression batch item per image, then the top `max_detections` per image:
        (num, boxes, scores, classes), static.

        `boxes [B, N, 4]`, `scores [B, N]` (-1: not a candidate) and `classes [B, N]` (int64) are every image's
        candidates, N static or not. The NMS keeps a score > nms.score_threshold and suppresses IoU >
        nms.iou_threshold within a class: classes are kept apart by torchvision's coordinate trick (what
        Detectron2's batched_nms does for up to 1000 candidates on the CPU and 25000 on a GPU): each box moves
        by class x (its image's largest candidate coordinate + 1), so boxes of two classes never overlap. One
        item per image instead of one per (image, class) is what makes the graph fast on a GPU: ONNX Runtime's
        CUDA kernel pays a host round trip per item. The item holds the image's top `NMS_CANDIDATES` candidates
        by score (a static TopK; TensorRT's INMSLayer ranks at most 5000 per item anyway): a candidate below
        that rank could only reach the top `max_detections` if nearly all the others were suppressed."""
        from d2build.standard_ops import TOPK_MAX

        s, b = sg.spec, sg.b
        B, D, K = s.batch, s.max_detections, TOPK_MAX
        scores = b.op("Concat", [scores, np.full((B, K), -1.0, np.float32)], {"axis": 1}, name="nms_scores_padded")
        boxes = b.op("Concat", [boxes, np.zeros((B, K, 4), np.float32)], {"axis": 1}, name="nms_boxes_padded")
        classes = b.op("Concat", [classes, np.zeros((B, K), np.int64)], {"axis": 1}, name="nms_classes_padded")
        top, rank = b.op("TopK", [scores, i64(K)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                         name="nms_candidates")  # [B, K]
        cand_boxes = b.op("GatherND", [boxes, b.op("Unsqueeze", [rank, i64(2)], name="nms_candidates_index")],
                          {"batch_dims": 1}, name="nms_candidate_boxes")  # [B, K, 4]
        cand_classes = b.op("GatherElements", [classes, rank], {"axis": 1}, name="nms_candidate_classes")  # [B, K]
        real = b.op("Unsqueeze", [b.op("Greater", [top, np.float32(s.score_threshold)], name="nms_real"), i64(2)],
                    name="nms_real_3d")
        seen = b.op("Where", [real, cand_boxes, np.float32(0)], name="nms_real_boxes")
        high = b.op("ReduceMax", [seen], {"axes": [1, 2], "keepdims": 1}, name="nms_max_coordinate")  # [B, 1, 1]
        low = b.op("Min", [b.op("ReduceMin", [seen], {"axes": [1, 2], "keepdims": 1}, name="nms_min_coordinate"),
                           np.float32(0)], name="nms_below_zero")  # 0 for clipped boxes: torchvision's offsets exactly
        span = b.op("Add", [b.op("Sub", [high, low], name="nms_extent"), np.float32(1)], name="nms_class_spacing")
        offset = b.op("Sub", [b.op("Mul", [b.op("Cast", [b.op("Unsqueeze", [cand_classes, i64(2)],
                                                               name="nms_candidate_classes_3d")],
                                                {"to": onnx.TensorProto.FLOAT}, name="nms_class_float"), span],
                                   name="nms_class_offset"), low], name="nms_offset")
        sel = b.op("NonMaxSuppression", [
            b.op("Add", [cand_boxes, offset], name="nms_boxes"),
            b.op("Unsqueeze", [top, i64(1)], name="nms_scores"),
            i64(D), np.array([s.nms_iou], np.float32), np.array([s.score_threshold], np.float32)],
            {"center_point_box": 0}, name="detection_nms")  # batch item = image
        dense = b.op("Reshape", [self.kept_scores(sg, sel, top, K, B * K, -1.0, "det"), i64(B, K)],
                     name="kept_by_image")
        kept, which = b.op("TopK", [dense, i64(D)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                           name="detections_topk")  # [B, D], index into the candidates
        ok = b.op("Greater", [kept, np.float32(-0.5)], name="detection_valid")
        det_boxes = b.op("GatherND", [cand_boxes, b.op("Unsqueeze", [which, i64(2)], name="detections_index")],
                         {"batch_dims": 1}, name="detections_gather")
        zero = np.float32(0)
        det_boxes = b.op("Where", [b.op("Unsqueeze", [ok, i64(2)], name="detection_valid_3d"), det_boxes, zero],
                         name=Outputs.BOXES)
        det_scores = b.op("Where", [ok, kept, zero], name=Outputs.SCORES)
        det_classes = b.op("Cast", [b.op("Where", [ok, b.op("GatherElements", [cand_classes, which], {"axis": 1},
                                                          name="detections_class_of"), i64(0)],
                                         name="detections_class")], {"to": onnx.TensorProto.INT32},
                           name=Outputs.CLASSES)
        num = b.op("ReduceSum", [b.op("Cast", [ok], {"to": onnx.TensorProto.INT32}, name="detection_valid_int"),
                                 i64(1)], {"keepdims": 1}, name=Outputs.NUM)
        self.det_valid = ok
        return [num, det_boxes, det_scores, det_classes]


def flavour_of(ops: str, plugin_ops: type, standard_ops: type):
    """A meta-architecture's strategy for `surgery.ops` (a new instance: a strategy keeps per-graph state)."""
    if ops not in OPS:
        raise GraphMismatch(f"surgery.ops={ops!r} is not a graph flavour ({', '.join(OPS)})")
    return (standard_ops if ops == "standard" else plugin_ops)()
