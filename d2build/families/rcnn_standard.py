"""Surgery, standard-op flavour (`surgery.ops=standard`): the R-CNN graph without TensorRT plugins.

The same kept parts of the export as the plugin flavour (backbone, FPN, RPN head, box head, mask or
keypoint head; `rcnn_graph.RCNNSurgeon` finds them), but everything between them is built from ops
TensorRT 10/11's ONNX parser imports natively and ONNX Runtime runs with its own kernels:
`NonMaxSuppression` (INMSLayer) and `RoiAlign` (opset 16+, half_pixel: the ROIAlign_TRT v2 plugin
TensorRT ships, not a deprecated one) plus ordinary tensor ops. It follows Detectron2's inference
code step by step rather than the plugins' semantics:

* proposals (`find_top_rpn_proposals`): per-level top-k of the objectness logits (the merged-row
  TopK of the plugin flavour), decode with the dw/dh clamp, clip, drop empty boxes, then one
  `NonMaxSuppression` whose batch items are (image, level) pairs -- per-level NMS, suppressing at
  IoU > threshold as torchvision does -- and the top `post_nms_topk` of what survives, per image,
  ranked by logit. Every NMS batch item holds at most `pre_nms_topk` (<= 1000) candidates, far
  below the 5000 TensorRT's INMSLayer considers, so the two runtimes see the same candidates.
* ROI pooling (`ROIPooler` with `assign_boxes_to_levels`): the FPN level of each box computed in the
  graph, floor(4 + log2(sqrt(area) / 224)) clamped to P2..P5 written as comparisons, and one
  `RoiAlign` per level on exactly the boxes of that level (`NonZero` selects them). Only real
  proposals and real detections are pooled, so the heads cost what the image's detections cost.
* detections (`fast_rcnn_inference`): softmax, per-class decode and clip, scores > threshold, one
  `NonMaxSuppression` whose batch items are (image, class) pairs, the top `max_detections` per
  image by score. Outputs are static: `num_detections [B,1]`, `detection_boxes [B,D,4]`,
  `detection_scores [B,D]`, `detection_classes [B,D]` (int32), zero past num_detections.
* mask / keypoint heads (`mask_rcnn_inference`, Keypoint R-CNN's heatmaps): run on the valid
  detections only and scattered back into static `detection_masks [B,D,28,28]` /
  `detection_heatmaps [B,D,K,56,56]` (zeros in padding rows).

Intermediate tensors have data-dependent shapes (NonZero, NonMaxSuppression); graph outputs never do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build.families.rcnn_graph import _CORNERS_TO_PARAMS, _CORNERS_TO_WH, BIG, STRIDES, BoxStage, RCNNSurgeon
from d2build.graph import GraphMismatch, find_calls, find_one

I64 = np.int64


def _i64(*v: int) -> np.ndarray:
    return np.array(v, I64)


class StandardSurgeon(RCNNSurgeon):
    flavour = "standard"

    @property
    def batch(self) -> int:
        return self.spec.batch

    # ------------------------------------------------------------------ dynamic input sizes

    def clip_limits(self) -> Any:
        """[W, H, W, H]: of the actual input when the graph takes any size."""
        if not self.spec.dynamic:
            return super().clip_limits()
        if getattr(self, "_limits", None) is None:
            b = self.b
            hw = b.op("Gather", [b.op("Shape", [self.input], name="input_shape"), _i64(3, 2, 3, 2)], {"axis": 0},
                      name="input_whwh")
            self._limits = b.op("Cast", [hw], {"to": onnx.TensorProto.FLOAT}, name="clip_limits")
        return self._limits

    def rpn_levels(self):
        """As the plugin flavour's, but for an input of any size: the anchors of each level are made in the
        graph from its feature map's size, as Detectron2's DefaultAnchorGenerator makes them."""
        if not self.spec.dynamic:
            return super().rpn_levels()
        s, b, g = self.spec, self.b, self.graph
        L, B = len(s.rpn_in_features), self.batch
        obj = find_calls(g, "proposal_generator.rpn_head.objectness_logits", "Conv", L)
        dlt = find_calls(g, "proposal_generator.rpn_head.anchor_deltas", "Conv", L)
        rows, tables = [], []
        for lvl, (o, d) in enumerate(zip(obj, dlt)):
            if o.inputs[0] is not d.inputs[0]:
                raise GraphMismatch(f"RPN level {lvl}: objectness and delta convs read different tensors")
            conv = self._merged_rpn_conv(lvl, L, o, d)
            rows.append(b.op("Reshape", [conv, _i64(B, L + 4, -1)], name=f"rpn_rows_level{lvl}"))
            tables.append(self._anchor_table(o.inputs[0], lvl))
        self.facts["anchors"] = {"per_level": "from each feature map's size (dynamic input)"}
        return rows, None, b.op("Concat", tables, {"axis": 0}, name="rpn_anchor_table")

    def _anchor_table(self, feature: gs.Variable, lvl: int) -> gs.Variable:
        """[A*H*W, 8] rows (w, h, w, h, cx, cy, 0, 0) of one level, in the merged conv's (anchor, y, x) order:
        shifts arange(W) * stride and arange(H) * stride plus the cell anchors, in float32 as Detectron2 adds them."""
        s, b = self.spec, self.b
        t = f"anchors_p{lvl + 2}"
        stride = np.float32(s.rpn_strides[lvl])
        cell = s.cell_anchors[lvl]
        shape = b.op("Shape", [feature], name=f"{t}_shape")
        hl = b.op("Gather", [shape, np.array(2, I64)], {"axis": 0}, name=f"{t}_h")
        wl = b.op("Gather", [shape, np.array(3, I64)], {"axis": 0}, name=f"{t}_w")
        zero, one = np.array(0, I64), np.array(1, I64)
        xs = b.op("Mul", [b.op("Cast", [b.op("Range", [zero, wl, one], name=f"{t}_x_index")],
                                {"to": onnx.TensorProto.FLOAT}, name=f"{t}_x_float"), stride], name=f"{t}_x")
        ys = b.op("Mul", [b.op("Cast", [b.op("Range", [zero, hl, one], name=f"{t}_y_index")],
                                {"to": onnx.TensorProto.FLOAT}, name=f"{t}_y_float"), stride], name=f"{t}_y")
        grid = b.op("Concat", [b.op("Unsqueeze", [hl, _i64(0)], name=f"{t}_h_1d"),
                               b.op("Unsqueeze", [wl, _i64(0)], name=f"{t}_w_1d")], {"axis": 0}, name=f"{t}_grid")
        x = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [xs, _i64(0)], name=f"{t}_x_row"), grid],
                                  name=f"{t}_x_grid"), _i64(-1, 1)], name=f"{t}_x_flat")
        y = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [ys, _i64(1)], name=f"{t}_y_col"), grid],
                                  name=f"{t}_y_grid"), _i64(-1, 1)], name=f"{t}_y_flat")
        shifts = b.op("Concat", [x, y, x, y], {"axis": 1}, name=f"{t}_shifts")  # [H*W, 4]
        boxes = b.op("Add", [b.op("Unsqueeze", [shifts, _i64(0)], name=f"{t}_shifts_3d"),
                             cell.reshape(len(cell), 1, 4)], name=f"{t}_boxes_3d")  # [A, H*W, 4]
        boxes = b.op("Reshape", [boxes, _i64(-1, 4)], name=f"{t}_boxes")
        x1, y1, x2, y2 = b.op("Split", [boxes, _i64(1, 1, 1, 1)], {"axis": 1}, outputs=4, name=f"{t}_corners")
        w = b.op("Sub", [x2, x1], name=f"{t}_width")
        h = b.op("Sub", [y2, y1], name=f"{t}_height")
        cx = b.op("Add", [x1, b.op("Mul", [np.float32(0.5), w], name=f"{t}_half_w")], name=f"{t}_cx")
        cy = b.op("Add", [y1, b.op("Mul", [np.float32(0.5), h], name=f"{t}_half_h")], name=f"{t}_cy")
        z = b.op("Mul", [w, np.float32(0)], name=f"{t}_zero")
        return b.op("Concat", [w, h, w, h, cx, cy, z, z], {"axis": 1}, name=f"{t}_table")

    # ------------------------------------------------------------------ proposals

    def proposals(self) -> tuple[gs.Variable, gs.Variable]:
        """Detectron2's RPN; returns (valid [B, P] bool, boxes [B, P, 4]) of the top-P proposals per image."""
        s, b = self.spec, self.b
        B, L, k, P = self.batch, len(s.rpn_in_features), s.rpn_pre_nms_topk, s.rpn_post_nms_topk
        if P > L * k:
            raise GraphMismatch(f"surgery.rpn.post_nms_topk={P} exceeds the {L} levels x pre_nms_topk={k} candidates")
        logits, _, boxes, nonempty = self.rpn_candidates()
        real = b.op("And", [nonempty, b.op("Greater", [logits, np.float32(-BIG / 2)], name="rpn_own_level")],
                    name="rpn_candidates")  # an anchor of this level (not a -BIG filler), non-empty once clipped
        logits = b.op("Where", [real, logits, np.float32(-BIG)], name="rpn_masked_logits")
        sel = b.op("NonMaxSuppression", [
            b.op("Reshape", [boxes, _i64(B * L, k, 4)], name="rpn_nms_boxes"),
            b.op("Reshape", [logits, _i64(B * L, 1, k)], name="rpn_nms_scores"),
            _i64(P), np.array([s.rpn_iou], np.float32), np.array([-BIG / 2], np.float32)],
            {"center_point_box": 0}, name="rpn_nms")  # batch item = (image, level): per-level NMS
        dense = self._kept_scores(sel, logits, k, B * L * k, -BIG, "rpn")  # [B*L*k], -BIG where not kept
        dense = b.op("Reshape", [dense, _i64(B, L * k)], name="rpn_kept_by_image")
        top, which = b.op("TopK", [dense, _i64(P)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                          name="rpn_post_nms_topk")  # [B, P]
        rois = b.op("GatherND", [boxes, b.op("Unsqueeze", [which, _i64(2)], name="rpn_top_index")],
                    {"batch_dims": 1}, name="proposals")  # [B, P, 4]
        valid = b.op("Greater", [top, np.float32(-BIG / 2)], name="proposal_valid")  # [B, P]
        return valid, rois

    def _kept_scores(self, sel: gs.Variable, scores: gs.Variable, per_item: Any, total: Any, fill: float,
                     tag: str) -> gs.Variable:
        """NonMaxSuppression's selected (item, 0, j) as a dense score vector: kept scores, `fill` elsewhere.

        `scores` is the [items * per_item] score table the NMS ranked (any shape; flattened here)."""
        b = self.b
        item = b.op("Gather", [sel, _i64(0)], {"axis": 1}, name=f"{tag}_nms_item")  # [K]
        j = b.op("Gather", [sel, _i64(2)], {"axis": 1}, name=f"{tag}_nms_index")
        flat = b.op("Add", [b.op("Mul", [item, per_item], name=f"{tag}_nms_item_offset"), j], name=f"{tag}_nms_flat")
        table = b.op("Reshape", [scores, _i64(-1)], name=f"{tag}_scores_flat")
        kept = b.op("Gather", [table, flat], {"axis": 0}, name=f"{tag}_kept_scores")
        shape = total if isinstance(total, gs.Variable) else _i64(total)
        base = b.op("Expand", [np.array([fill], np.float32), shape], name=f"{tag}_fill")
        return b.op("ScatterND", [base, b.op("Unsqueeze", [flat, _i64(1)], name=f"{tag}_nms_flat_2d"), kept],
                    name=f"{tag}_kept_dense")

    # ------------------------------------------------------------------ ROI pooling

    def pool(self, boxes: gs.Variable, valid: gs.Variable | None, image: Any, pooler: tuple[int, int],
             tag: str) -> tuple[gs.Variable, gs.Variable]:
        """Detectron2's ROIPooler on the valid rows of `boxes [R, 4]` (every row when `valid` is None):
        (pooled [n, C, P, P], their rows [n]).

        Rows come out grouped by FPN level (P2 first); `image [R]` is each row's batch index."""
        s, b = self.spec, self.b
        feats = self.features(s.roi_in_features)
        strides = [STRIDES[f] for f in s.roi_in_features]
        if strides != [4, 8, 16, 32]:
            raise GraphMismatch(f"ROI pooling expects P2..P5; ROI_HEADS.IN_FEATURES is {list(s.roi_in_features)}")
        wh = b.op("MatMul", [boxes, _CORNERS_TO_WH], name=f"{tag}_wh")  # [R, 2]
        w, h = b.op("Split", [wh, _i64(1, 1)], {"axis": 1}, outputs=2, name=f"{tag}_wh_split")
        size = b.op("Sqrt", [b.op("Mul", [w, h], name=f"{tag}_area")], name=f"{tag}_size")
        # floor(4 + log2(size / 224 + 1e-8)) clamped to [2, 5], minus 2: the steps at 0.5, 1 and 2
        rel = b.op("Add", [b.op("Div", [size, np.float32(s.canonical_box_size)], name=f"{tag}_rel"),
                           np.float32(1e-8)], name=f"{tag}_rel_eps")
        steps = b.op("GreaterOrEqual", [rel, np.array([0.5, 1.0, 2.0], np.float32)], name=f"{tag}_level_steps")
        level = b.op("ReduceSum", [b.op("Cast", [steps], {"to": onnx.TensorProto.INT64}, name=f"{tag}_steps_int"),
                                   _i64(1)], {"keepdims": 0}, name=f"{tag}_level")  # [R] 0..3
        pooled, rows = [], []
        for lvl, (feat, stride) in enumerate(zip(feats, strides)):
            on = b.op("Equal", [level, _i64(lvl)], name=f"{tag}_is_p{lvl + 2}")
            if valid is not None:
                on = b.op("And", [valid, on], name=f"{tag}_take_p{lvl + 2}")
            idx = b.op("Reshape", [b.op("NonZero", [on], name=f"{tag}_rows_p{lvl + 2}_2d"), _i64(-1)],
                       name=f"{tag}_rows_p{lvl + 2}")
            rois = b.op("Gather", [boxes, idx], {"axis": 0}, name=f"{tag}_rois_p{lvl + 2}")
            batch = b.op("Gather", [image, idx], {"axis": 0}, name=f"{tag}_images_p{lvl + 2}")
            pooled.append(b.op("RoiAlign", [feat, rois, batch], {
                "mode": "avg", "output_height": pooler[0], "output_width": pooler[0],
                "sampling_ratio": pooler[1], "spatial_scale": 1.0 / stride,
                "coordinate_transformation_mode": "half_pixel"}, name=f"{tag}_roi_align_p{lvl + 2}"))
            rows.append(idx)
        return (b.op("Concat", pooled, {"axis": 0}, name=f"{tag}_pooled"),
                b.op("Concat", rows, {"axis": 0}, name=f"{tag}_pooled_rows"))

    # ------------------------------------------------------------------ detections

    def box_stage(self, rois: gs.Variable, valid: gs.Variable | None, image: Any,
                  stage: BoxStage) -> tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]:
        """One box head on the valid rows of `rois [R, 4]` (`image [R]`: their batch indices; `valid` None: all).

        Returns, for the n pooled rows in pooling order: class probabilities [n, C+1], decoded and clipped boxes
        [n, C+1, 4] (or [n, 1, 4] when class-agnostic), their batch indices [n] and their rows in `rois` [n]."""
        s, b, g = self.spec, self.b, self.graph
        C, t = s.num_classes, stage.tag
        pooled, rows = self.pool(rois, valid, image, s.box_pooler, f"box{t}")
        fc1 = find_one(g, f"roi_heads.box_head{stage.scope}.fc1", "Gemm")
        res = s.box_pooler[0]
        channels = self.features(s.roi_in_features)[0].shape[1]
        fc1.inputs[0] = b.op("Reshape", [pooled, _i64(-1, channels * res * res)], name=f"box_features{t}")
        cls = find_one(g, f"roi_heads.box_predictor{stage.scope}.cls_score", "Gemm")
        reg = find_one(g, f"roi_heads.box_predictor{stage.scope}.bbox_pred", "Gemm")
        k = self._fold_regression_weights(reg, C, stage)
        probs = b.op("Softmax", [cls.outputs[0]], {"axis": -1}, name=f"class_probs{t}")  # [n, C+1]
        props = b.op("Gather", [rois, rows], {"axis": 0}, name=f"pooled_proposals{t}")  # [n, 4]
        img = b.op("Gather", [image, rows], {"axis": 0}, name=f"pooled_images{t}")
        deltas = b.op("Reshape", [reg.outputs[0], _i64(-1, k, 4)], name=f"box_deltas{t}")
        params = b.op("MatMul", [b.op("Unsqueeze", [props, _i64(1)], name=f"proposals_3d{t}"), _CORNERS_TO_PARAMS],
                      name=f"proposal_params{t}")
        whwh, ctr = b.op("Split", [params, _i64(4, 4)], {"axis": 2}, outputs=2, name=f"proposal_split{t}")
        return probs, self._decode(deltas, whwh, ctr, f"box{t}"), img, rows

    def detections(self, valid: gs.Variable, rois: gs.Variable) -> list[gs.Variable]:
        """Box stage(s) on the valid proposals, Detectron2's fast_rcnn_inference, static [B, D] outputs.

        A cascade runs each later stage on the previous stage's boxes (all of them valid, in that stage's
        pooling order) and carries the sum of the stages' probabilities along, re-gathered in each stage's
        order, so the mean is Detectron2's ((s0 + s1) + s2) / 3 for every proposal."""
        s, b = self.spec, self.b
        B, P = self.batch, s.rpn_post_nms_topk
        rois = b.op("Reshape", [rois, _i64(B * P, 4)], name="proposals_flat")
        image: Any = np.repeat(np.arange(B, dtype=I64), P)  # batch index of each proposal row
        valid = b.op("Reshape", [valid, _i64(B * P)], name="proposal_valid_flat")
        stages = s.box_stages
        total = boxes = None
        for stage in stages:
            probs, boxes, image, rows = self.box_stage(rois, valid, image, stage)
            if total is not None:
                total = b.op("Add", [b.op("Gather", [total, rows], {"axis": 0}, name=f"cascade_score_rows{stage.tag}"),
                                     probs], name=f"cascade_score_sum{stage.tag}")
            else:
                total = probs
            rois, valid = b.op("Reshape", [boxes, _i64(-1, 4)], name=f"cascade_proposals{stage.tag}"), None
        if len(stages) > 1:
            total = b.op("Mul", [total, np.float32(1.0 / len(stages))], name="cascade_mean_scores")
        return self.class_nms(total, boxes, image)

    def class_nms(self, probs: gs.Variable, boxes: gs.Variable, image: gs.Variable) -> list[gs.Variable]:
        """fast_rcnn_inference on n rows of all images: probs [n, C+1], boxes [n, C+1 or 1, 4], image [n]."""
        s, b = self.spec, self.b
        B, C = self.batch, s.num_classes
        fg_scores = b.op("Slice", [probs, _i64(0), _i64(C), _i64(1)], name="class_scores")  # [n, C]
        if s.box_stages[-1].agnostic:  # one box per row, shared by its classes
            fg_boxes = b.op("Expand", [boxes, _i64(1, C, 1)], name="class_boxes")  # [n, C, 4]
        else:
            fg_boxes = b.op("Slice", [boxes, _i64(0), _i64(C), _i64(1)], name="class_boxes")  # [n, C, 4]
        # NMS batch item = (image, class): that class's boxes of all rows, scores -1 on other images' rows
        boxes_cn = b.op("Transpose", [fg_boxes], {"perm": [1, 0, 2]}, name="boxes_by_class")  # [C, n, 4]
        n = b.op("Shape", [image], name="pooled_count")  # [1]
        boxes_bcn = b.op("Expand", [b.op("Unsqueeze", [boxes_cn, _i64(0)], name="boxes_by_class_4d"),
                                    b.op("Concat", [_i64(B, C), n, _i64(4)], {"axis": 0}, name="nms_boxes_shape")],
                         name="boxes_by_image_class")
        mine = b.op("Equal", [b.op("Unsqueeze", [image, _i64(0)], name="pooled_images_row"),
                              np.arange(B, dtype=I64).reshape(B, 1)], name="row_of_image")  # [B, n]
        scores_cn = b.op("Transpose", [fg_scores], {"perm": [1, 0]}, name="scores_by_class")  # [C, n]
        scores_bcn = b.op("Where", [b.op("Unsqueeze", [mine, _i64(1)], name="row_of_image_3d"),
                                    b.op("Unsqueeze", [scores_cn, _i64(0)], name="scores_by_class_3d"),
                                    np.float32(-1)], name="scores_by_image_class")  # [B, C, n]
        return self.name_detections(self.top_detections(boxes_bcn, scores_bcn, n, s.rpn_post_nms_topk))

    def top_detections(self, boxes_bcn: gs.Variable, scores_bcn: gs.Variable, n: Any,
                       per_class: int) -> list[gs.Variable]:
        """One NonMaxSuppression over (image, class) batch items -- boxes [B, C, n, 4], scores [B, C, n] (-1: not
        a candidate), a score > nms.score_threshold kept, IoU > nms.iou_threshold suppressed, at most `per_class`
        kept per item -- then the top `max_detections` per image by score: (num, boxes, scores, classes), static."""
        s, b = self.spec, self.b
        B, C, D = self.batch, s.num_classes, s.max_detections
        nms_boxes = b.op("Reshape", [boxes_bcn, _i64(B * C, -1, 4)], name="nms_boxes")
        nms_scores = b.op("Reshape", [scores_bcn, _i64(B * C, 1, -1)], name="nms_scores")
        sel = b.op("NonMaxSuppression", [nms_boxes, nms_scores, _i64(per_class), np.array([s.nms_iou], np.float32),
                                         np.array([s.score_threshold], np.float32)],
                   {"center_point_box": 0}, name="detection_nms")
        total = b.op("Mul", [n, _i64(B * C)], name="nms_table_size") if isinstance(n, gs.Variable) else B * C * n
        dense = self._kept_scores(sel, scores_bcn, n, total, -1.0, "det")  # [B*C*n]
        dense = b.op("Concat", [b.op("Reshape", [dense, _i64(B, -1)], name="kept_by_image"),
                                np.full((B, D), -1.0, np.float32)], {"axis": 1}, name="kept_padded")
        top, which = b.op("TopK", [dense, _i64(D)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                          name="detections_topk")  # [B, D]; index = class * n + row
        ok = b.op("Greater", [top, np.float32(-0.5)], name="detection_valid")
        table = b.op("Concat", [b.op("Reshape", [boxes_bcn, _i64(B, -1, 4)], name="boxes_by_image"),
                                np.zeros((B, D, 4), np.float32)], {"axis": 1}, name="boxes_padded")
        det_boxes = b.op("GatherND", [table, b.op("Unsqueeze", [which, _i64(2)], name="detections_index")],
                         {"batch_dims": 1}, name="detections_gather")
        zero = np.float32(0)
        det_boxes = b.op("Where", [b.op("Unsqueeze", [ok, _i64(2)], name="detection_valid_3d"), det_boxes, zero],
                         name="detection_boxes")
        det_scores = b.op("Where", [ok, top, zero], name="detection_scores")
        det_classes = b.op("Cast", [b.op("Where", [ok, b.op("Div", [which, n], name="detections_class_index"),
                                                   _i64(0)], name="detections_class")],
                           {"to": onnx.TensorProto.INT32}, name="detection_classes")
        num = b.op("ReduceSum", [b.op("Cast", [ok], {"to": onnx.TensorProto.INT32}, name="detection_valid_int"),
                                 _i64(1)], {"keepdims": 1}, name="num_detections")
        self._det_valid = ok
        return [num, det_boxes, det_scores, det_classes]

    # ------------------------------------------------------------------ heads on the detections

    def _head_on_detections(self, det_boxes: gs.Variable, pooler: tuple[int, int], tag: str):
        s, b = self.spec, self.b
        B, D = self.batch, s.max_detections
        boxes = b.op("Reshape", [det_boxes, _i64(B * D, 4)], name=f"{tag}_boxes_flat")
        valid = b.op("Reshape", [self._det_valid, _i64(B * D)], name=f"{tag}_valid_flat")
        return self.pool(boxes, valid, np.repeat(np.arange(B, dtype=I64), D), pooler, tag)

    def _scatter_rows(self, values: gs.Variable, rows: gs.Variable, shape: tuple[int, ...], name: str,
                      tag: str) -> gs.Variable:
        """[n, ...] values of the pooled rows into zeros of `shape` ([B*D, ...]) at those rows."""
        b = self.b
        base = np.zeros(shape, np.float32)
        return b.op("ScatterND", [base, b.op("Unsqueeze", [rows, _i64(1)], name=f"{tag}_rows_2d"), values],
                    name=name)

    def masks(self, det_classes: gs.Variable, det_boxes: gs.Variable) -> gs.Variable:
        s, b, g = self.spec, self.b, self.graph
        assert s.mask_pooler is not None
        B, D, C = self.batch, s.max_detections, s.num_classes
        pooled, rows = self._head_on_detections(det_boxes, s.mask_pooler, "mask")
        find_one(g, "roi_heads.mask_head.mask_fcn1", "Conv").inputs[0] = pooled
        logits = find_one(g, "roi_heads.mask_head.predictor", "Conv").outputs[0]  # [m, C, M, M]
        m = 2 * s.mask_pooler[0]
        classes = b.op("Gather", [b.op("Cast", [b.op("Reshape", [det_classes, _i64(B * D)], name="mask_classes_flat")],
                                       {"to": onnx.TensorProto.INT64}, name="mask_classes_int64"), rows],
                       {"axis": 0}, name="mask_classes")
        count = b.op("Shape", [rows], name="mask_count")
        first = b.op("Mul", [b.op("Range", [_i64(0).reshape(()), b.op("Squeeze", [count, _i64(0)], name="mask_n"),
                                            _i64(1).reshape(())], name="mask_row_index"), _i64(C)],
                     name="mask_row_offset")
        flat = b.op("Reshape", [logits, _i64(-1, m, m)], name="mask_logits_flat")
        chosen = b.op("Gather", [flat, b.op("Add", [first, classes], name="mask_index")], {"axis": 0},
                      name="mask_of_class")
        probs = b.op("Sigmoid", [chosen], name="mask_probs")
        out = self._scatter_rows(probs, rows, (B * D, m, m), "mask_scatter", "mask")
        out = b.op("Reshape", [out, _i64(B, D, m, m)], name="detection_masks")
        out.name, out.dtype, out.shape = "detection_masks", np.float32, [B, D, m, m]
        return out

    def keypoints(self, det_boxes: gs.Variable) -> gs.Variable:
        s, b, g = self.spec, self.b, self.graph
        assert s.keypoint_pooler is not None
        B, D, K = self.batch, s.max_detections, s.num_keypoints
        pooled, rows = self._head_on_detections(det_boxes, s.keypoint_pooler, "keypoint")
        find_one(g, "roi_heads.keypoint_head.conv_fcn1", "Conv").inputs[0] = pooled
        upsample = find_one(g, "roi_heads.keypoint_head", "Resize")
        m = 4 * s.keypoint_pooler[0]
        out = self._scatter_rows(upsample.outputs[0], rows, (B * D, K, m, m), "keypoint_scatter", "keypoint")
        out = b.op("Reshape", [out, _i64(B, D, K, m, m)], name="keypoint_heatmaps")
        out.name, out.dtype, out.shape = "detection_heatmaps", np.float32, [B, D, K, m, m]
        return out

    # ------------------------------------------------------------------ whole graph

    def check_graph(self) -> None:
        """Data-dependent intermediate shapes are this flavour's design; its outputs are static anyway."""

    def extra_domains(self) -> list[onnx.OperatorSetIdProto]:
        return []  # standard ops only

    def check_model(self, model: onnx.ModelProto) -> None:
        from d2build import standard_ops

        standard_ops.check(model)
