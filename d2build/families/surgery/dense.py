"""Surgery for RetinaNet, both graph flavours (see families/retinanet.py for what the graph computes).

Reuses the surgeon's shared pieces (surgery/surgeon.py): input and preprocessing, the anchor rows and
(dynamic inputs) the in-graph anchor tables, Box2BoxTransform's decode, the clip, and the standard
flavour's class-wise NonMaxSuppression + top-k (`StandardOps.top_detections`). What is RetinaNet's
own is the dense candidate selection:

* per level, one TopK over the cls_score conv's raw output reshaped to [B, A*K*H*W]: channel a*K + k
  at location y*W + x, so a flat index i is anchor a = i // (K*H*W), class k = (i // (H*W)) % K and
  location i % (H*W) -- the anchor row a*H*W + loc of the level's (anchor, location)-ordered table
  (`RCNNSurgeon._anchor_rows`), whose deltas come from bbox_pred reshaped to [B, A, 4, H*W];
* the levels' candidates concatenated ([B, L*k]), their anchors and deltas gathered, decoded without
  clipping, scored with a sigmoid and masked at `score > score_threshold` (Detectron2's strict test:
  the plugin's own `>=` then never decides).

With a dynamic input each level's logits are padded with k entries of -BIG before its TopK (a level
may then have fewer than k anchors x classes); padded picks score 0 and their index is clamped into
the level. Batch: every op carries the image dimension (TopK per row, GatherND with batch_dims=1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build import plugins
from d2build.families.surgery.spec import HeadSpec
from d2build.families.surgery.surgeon import BIG, PluginOps, StandardOps, Surgeon, flavour_of, i64
from d2build.graph import GraphMismatch, find_calls


def dense_surgeon(export: onnx.ModelProto, spec: HeadSpec, ops: str) -> "DenseSurgeon":
    """The RetinaNet surgeon for `surgery.ops`."""
    return DenseSurgeon(export, spec, flavour_of(ops, PluginDense, StandardDense))


class DenseSurgeon(Surgeon):
    """The dense candidates of every level (both flavours), then the flavour's class-wise NMS (`ops`)."""

    ops: "PluginDense | StandardDense"

    def outputs(self) -> list[gs.Variable]:
        return self.ops.detections(self, *self.candidates())

    def _level_size(self, conv: gs.Node, lvl: int) -> tuple[Any, Any]:
        """(H*W, anchors table [A*H*W, 8]) of one level: constants for a fixed input, tensors for a dynamic one."""
        s, b = self.spec, self.b
        a, k = s.anchors_per_location, s.num_classes
        if s.dynamic:
            shape = b.op("Shape", [conv.inputs[0]], name=f"{self._tag(lvl)}_shape")
            hw = b.op("Mul", [b.op("Gather", [shape, i64(2)], {"axis": 0}, name=f"{self._tag(lvl)}_h"),
                              b.op("Gather", [shape, i64(3)], {"axis": 0}, name=f"{self._tag(lvl)}_w")],
                      name=f"{self._tag(lvl)}_hw")  # [1]
            return hw, self.anchor_table(conv.inputs[0], lvl)
        shape = conv.outputs[0].shape
        if shape is None or any(not isinstance(v, int) for v in shape):
            raise GraphMismatch(f"RetinaNet level {lvl}: cls_score output has no static shape ({shape})")
        _, ak, h, w = shape
        if ak != a * k or s.anchors[lvl].shape[0] != a * h * w:
            raise GraphMismatch(
                f"RetinaNet level {s.rpn_in_features[lvl]} predicts {ak // max(k, 1)}x{h}x{w} anchors x classes but "
                f"{s.anchors[lvl].shape[0]} anchors were generated for input {s.input_hw[0]}x{s.input_hw[1]} "
                f"({a} per location, {k} classes): the export and the recipe's model.input disagree")
        return h * w, np.ascontiguousarray(self.anchor_rows(s.anchors[lvl], a).T)

    def _tag(self, lvl: int) -> str:
        return f"retinanet_{self.spec.rpn_in_features[lvl]}"

    def candidates(self) -> tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]:
        """Each level's top-k (anchor, class) pairs, all levels together: (scores [B, N], score > threshold [B, N],
        classes [B, N] int64, boxes [B, N, 4] decoded, unclipped), N = levels x k (fewer where a fixed-size level
        has fewer than k anchors x classes)."""
        s, b, g = self.spec, self.b, self.graph
        B, L, K, k, A = s.batch, len(s.rpn_in_features), s.num_classes, s.rpn_pre_nms_topk, s.anchors_per_location
        cls = find_calls(g, "head.cls_score", "Conv", L)
        reg = find_calls(g, "head.bbox_pred", "Conv", L)
        logits, index, hw_of, offset_of, deltas, tables = [], [], [], [], [], []
        offset: Any = 0
        sizes = []
        for lvl, (c, r) in enumerate(zip(cls, reg)):
            t = self._tag(lvl)
            hw, table = self._level_size(c, lvl)
            flat = b.op("Reshape", [c.outputs[0], i64(B, -1)], name=f"{t}_logits")  # [B, A*K*H*W]
            if s.dynamic:  # a level may hold fewer than k pairs: pad, pick, clamp the padding's index into the level
                flat = b.op("Concat", [flat, np.full((B, k), -BIG, np.float32)], {"axis": 1}, name=f"{t}_padded")
                kl = k
            else:
                kl = min(k, A * K * hw)
            top, idx = b.op("TopK", [flat, i64(kl)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                            name=f"{t}_topk")  # [B, kl]
            if s.dynamic:
                last = b.op("Sub", [b.op("Mul", [hw, i64(A * K)], name=f"{t}_pairs"), i64(1)], name=f"{t}_last")
                idx = b.op("Min", [idx, last], name=f"{t}_index_in_level")
                hw_of.append(b.op("Expand", [hw, i64(kl)], name=f"{t}_hw_per_pick"))
                offset_of.append(b.op("Expand", [offset if isinstance(offset, gs.Variable) else i64(offset),
                                                 i64(kl)], name=f"{t}_offset_per_pick"))
                offset = b.op("Add", [offset if isinstance(offset, gs.Variable) else i64(offset),
                                      b.op("Mul", [hw, i64(A)], name=f"{t}_anchors")], name=f"{t}_next_offset")
            else:
                hw_of.append(np.full(kl, hw, np.int64))
                offset_of.append(np.full(kl, offset, np.int64))
                offset += A * hw
                sizes.append(A * hw)
            logits.append(top)
            index.append(idx)
            d = b.op("Reshape", [r.outputs[0], i64(B, A, 4, -1)], name=f"{t}_deltas_4d")
            d = b.op("Transpose", [d], {"perm": [0, 1, 3, 2]}, name=f"{t}_deltas_by_anchor")  # [B, A, H*W, 4]
            deltas.append(b.op("Reshape", [d, i64(B, -1, 4)], name=f"{t}_deltas"))  # rows a*H*W + loc
            tables.append(table)
        self._fold_dense_regression_weights(reg)
        self.facts["anchors"] = {"per_level": sizes or "from each feature map's size (dynamic input)",
                                 "total": sum(sizes) if sizes else None}
        self.facts["candidates_per_level"] = k
        cat = (lambda xs, name: b.op("Concat", xs, {"axis": 0}, name=name))
        logits = b.op("Concat", logits, {"axis": 1}, name="retinanet_top_logits")  # [B, N]
        idx = b.op("Concat", index, {"axis": 1}, name="retinanet_top_index")
        hw = cat(hw_of, "retinanet_hw_per_pick") if s.dynamic else np.concatenate(hw_of)
        off = cat(offset_of, "retinanet_offset_per_pick") if s.dynamic else np.concatenate(offset_of)
        channel = b.op("Div", [idx, hw], name="retinanet_channel")  # a*K + class
        loc = b.op("Sub", [idx, b.op("Mul", [channel, hw], name="retinanet_channel_start")], name="retinanet_location")
        anchor = b.op("Div", [channel, i64(K)], name="retinanet_anchor_of_cell")
        classes = b.op("Sub", [channel, b.op("Mul", [anchor, i64(K)], name="retinanet_class_start")],
                       name="retinanet_class")  # [B, N]
        row = b.op("Add", [b.op("Add", [b.op("Mul", [anchor, hw], name="retinanet_anchor_start"), loc],
                                name="retinanet_row_in_level"), off], name="retinanet_row")  # [B, N]
        table = (b.op("Concat", tables, {"axis": 0}, name="retinanet_anchor_table") if s.dynamic
                 else np.ascontiguousarray(np.concatenate(tables)))
        anchors = b.op("Gather", [table, row], {"axis": 0}, name="retinanet_anchors")  # [B, N, 8]
        whwh, ctr = b.op("Split", [anchors, i64(4, 4)], {"axis": 2}, outputs=2, name="retinanet_anchor_split")
        all_deltas = b.op("Concat", deltas, {"axis": 1}, name="retinanet_all_deltas")  # [B, anchors, 4]
        picked = b.op("GatherND", [all_deltas, b.op("Unsqueeze", [row, i64(2)], name="retinanet_row_3d")],
                      {"batch_dims": 1}, name="retinanet_picked_deltas")  # [B, N, 4]
        boxes = self.decode(picked, whwh, ctr, "retinanet", clip=False)
        scores = b.op("Sigmoid", [logits], name="retinanet_scores")
        keep = b.op("Greater", [scores, np.float32(s.score_threshold)], name="retinanet_above_threshold")
        return scores, keep, classes, boxes

    def _fold_dense_regression_weights(self, reg: list[gs.Node]) -> None:
        """bbox_pred channel a*4 + c divided by BBOX_REG_WEIGHTS[c] (nothing to do for RetinaNet's (1, 1, 1, 1))."""
        w = np.array(self.spec.bbox_reg_weights, np.float32)
        if np.all(w == 1):
            return
        for conv in reg:
            weight = np.asarray(conv.inputs[1].values, np.float32)
            bias = np.asarray(conv.inputs[2].values, np.float32)
            scale = np.tile(1.0 / w, weight.shape[0] // 4)
            conv.inputs[1] = gs.Constant(conv.name + "/W", (weight * scale[:, None, None, None]).astype(np.float32))
            conv.inputs[2] = gs.Constant(conv.name + "/B", (bias * scale).astype(np.float32))


class PluginDense(PluginOps):
    """Plugin flavour: one EfficientNMS_TRT over all levels' candidates, class-wise."""

    def detections(self, sg: DenseSurgeon, scores, keep, classes, boxes) -> list[gs.Variable]:
        """Class-wise NMS over all levels: one EfficientNMS_TRT whose scores [B, N, K] hold each candidate's score
        in its class's column (0 elsewhere and below the threshold); kept boxes clipped to the input."""
        s, b = sg.spec, sg.b
        K = s.num_classes
        own = b.op("Equal", [b.op("Unsqueeze", [classes, i64(2)], name="retinanet_class_3d"),
                             np.arange(K, dtype=np.int64)], name="retinanet_class_columns")  # [B, N, K]
        own = b.op("And", [own, b.op("Unsqueeze", [keep, i64(2)], name="retinanet_keep_3d")],
                   name="retinanet_candidate_columns")
        table = b.op("Where", [own, b.op("Unsqueeze", [scores, i64(2)], name="retinanet_scores_3d"), np.float32(0)],
                     name="retinanet_class_scores")
        num, det_boxes, det_scores, det_classes = plugins.efficient_nms(
            b, boxes, table, name="detection_nms", max_output_boxes=s.max_detections,
            score_threshold=s.score_threshold, iou_threshold=s.nms_iou)
        return sg.name_detections([num, sg.clip(det_boxes, "detection"), det_scores, det_classes])


class StandardDense(StandardOps):
    """Standard-op flavour: the same candidates, then StandardOps' class-wise NonMaxSuppression + top-k."""

    def detections(self, sg: DenseSurgeon, scores, keep, classes, boxes) -> list[gs.Variable]:
        b = sg.b
        masked = b.op("Where", [keep, scores, np.float32(-1)], name="retinanet_masked_scores")  # [B, N]
        num, det_boxes, det_scores, det_classes = self.top_detections(sg, boxes, masked, classes)
        return sg.name_detections([num, sg.clip(det_boxes, "detection"), det_scores, det_classes])
