"""Surgery for FPN R-CNNs (Mask, Faster, Keypoint, Cascade): the export becomes the static graph TensorRT builds.

What is kept from the export, found by module scope: the backbone and FPN, the RPN head convs,
the box head(s) and predictor(s), and the heads the family has on its final boxes (`HeadSpec`): the
mask head (Mask R-CNN), the keypoint head (Keypoint R-CNN), or none (Faster R-CNN). Everything
data-dependent between them (Detectron2's proposal selection, ROI pooling with NonZero level
assignment, per-class NMS inside If nodes) is rebuilt by the flavour's strategy (`RCNNSurgeon.ops`):

* `PluginRCNN` (surgery.ops=plugins): static ops and plugin nodes (two EfficientNMS_TRT, one
  PyramidROIAlign_TRT per pooler) whose attributes come from the recipe and the Detectron2 config;
  the heads run on every (padded) slot;
* `StandardRCNN` (surgery.ops=standard): ops TensorRT 10/11 imports natively and ONNX Runtime runs
  with its own kernels -- `NonMaxSuppression` (INMSLayer) and `RoiAlign` (opset 16+, half_pixel: the
  ROIAlign_TRT v2 plugin TensorRT ships) -- following Detectron2's inference code step by step:
  per-level NMS as one NonMaxSuppression over (image, level) batch items, the FPN level of each box
  computed in the graph (floor(4 + log2(sqrt(area) / 224)) clamped to P2..P5, as comparisons) with
  one RoiAlign per level on exactly that level's real rows (NonZero), fast_rcnn_inference's
  class-wise NMS over (image, class) items and the top max_detections; the heads run on the valid
  detections only and are scattered back into static outputs (zeros in padding rows).

Both reproduce Detectron2's `find_top_rpn_proposals` through the surgeon's shared proposal stage:
per-level top-k (each level's logits live in their own score row, other levels read -BIG, so one
TopK over the L rows selects each level's top-k with global indices), decode with Detectron2's clamp
of dw/dh at log(1000/16), clip, empty boxes masked; then per-level NMS cut at post_nms_topk
(greedy per-level NMS then a global top-k is exactly batched_nms then keep[:k]).

Equivalent rewrites that keep the node count low (the plugin graph's budget is NVIDIA's sample's
219 at 1344): the objectness and anchor-delta convs of each level are merged into one conv whose
extra output channels are constant -BIG (zero weights); corner/centre conversions are MatMuls with
0/±1/±0.5 matrices (exact in float32); the box regression weights (10, 10, 5, 5) are folded into
bbox_pred. The head stages only append to the graph, so a family without a head builds exactly the
graph of one that has it, minus that head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build import plugins
from d2build.families.base import Outputs
from d2build.families.surgery.spec import STRIDES, BoxStage, HeadSpec
from d2build.families.surgery.surgeon import (BIG, CORNERS_TO_PARAMS, CORNERS_TO_WH, PluginOps, StandardOps, Surgeon,
                                              flavour_of, i64)
from d2build.graph import GraphMismatch, find_calls, find_one

I64 = np.int64
#: GridSample as Detectron2's point_sample calls grid_sample (bilinear, zeros padding, align_corners=False), in the
#: opset 16-19 spelling TensorRT's importer reads ("bilinear"; opset 20 renamed it "linear")
GRID_SAMPLE = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": 0}
# EfficientNMS_TRT with score_activation=1 compares logits against logit(score_threshold):
# the smallest normal float32 gives about -87, far above -BIG and below any real logit.
RPN_SCORE_THRESHOLD = 1.1754944e-38


def rcnn_surgeon(export: onnx.ModelProto, spec: HeadSpec, ops: str) -> "RCNNSurgeon":
    """The R-CNN surgeon for `surgery.ops`."""
    return RCNNSurgeon(export, spec, flavour_of(ops, PluginRCNN, StandardRCNN))


class RCNNSurgeon(Surgeon):
    """Proposals, box stage(s), detections and the family's heads; how each is built is the flavour's (`ops`)."""

    ops: "PluginRCNN | StandardRCNN"

    def outputs(self) -> list[gs.Variable]:
        """The graph outputs: proposals, box stage(s) and detections, then the family's heads."""
        proposals = self.ops.proposals(self)
        outs = self.ops.detections(self, *proposals)
        if self.spec.point_rend is not None:
            outs.append(self.point_rend_masks(outs[3], outs[1]))
        elif self.spec.mask_pooler is not None:
            outs.append(self.ops.masks(self, outs[3], outs[1]))
        if self.spec.keypoint_pooler is not None:
            outs.append(self.ops.keypoints(self, outs[1]))
        if self.spec.semantic_classes:
            outs.append(self.semantic_logits())
        return outs

    def conv_box_head_input(self, stage: BoxStage, pooled: gs.Variable, channels: int) -> None:
        """A box head with convolutions (FastRCNNConvFCHead with conv_dims, the LSJ and ViTDet "4conv1fc"): the
        pooled features enter its first conv as [rows, C, R, R]; its convs, norms and the export's own Flatten
        before fc1 stay as exported (Flatten keeps axis 0, so any row count passes)."""
        s = self.spec
        convs = find_calls(self.graph, f"roi_heads.box_head{stage.scope}.conv1", "Conv", 1)
        find_calls(self.graph, f"roi_heads.box_head{stage.scope}.conv{s.box_head_convs}", "Conv", 1)
        r = s.box_pooler[0]
        convs[0].inputs[0] = self.b.op("Reshape", [pooled, i64(-1, channels, r, r)],
                                       name=f"box_conv_features{stage.tag}")

    # ------------------------------------------------------------------ image-level and point heads (both flavours)

    def semantic_logits(self) -> gs.Variable:
        """Panoptic FPN's semantic head as exported (SemSegFPNHead on p2..p5: convs, GroupNorm, x2 upsamples,
        the predictor), its per-class logits at 1/4 of the input: `semantic_logits [B, C, H/4, W/4]`.

        The head's own final x4 upsample (Detectron2 runs it at inference) is left out: an output 16 times
        larger, and Detectron2 resizes again to the photograph after it; the runtime composes both resizes
        (processing.semantic_to_original). The head has no data-dependent op, so it is the same in both
        flavours; its GroupNorm exports as Reshape [0, G, -1] + InstanceNormalization + Reshape to the
        input's Shape, which holds for any batch and size."""
        s = self.spec
        out = find_one(self.graph, "sem_seg_head.predictor", "Conv").outputs[0]
        out.name, out.dtype = Outputs.SEMANTIC, np.float32
        if s.dynamic:
            out.shape = [s.batch, s.semantic_classes, "semantic_height", "semantic_width"]
        else:
            h, w = s.input_hw
            out.shape = [s.batch, s.semantic_classes, h // s.semantic_stride, w // s.semantic_stride]
        return out

    def point_rend_masks(self, det_classes: gs.Variable, det_boxes: gs.Variable) -> gs.Variable:
        """PointRend's mask head on the final detections (PointRendMaskHead._subdivision_inference) with static
        shapes: `detection_masks [B, D, M, M]` probabilities of each detection's class, M = 224 for the COCO
        config (28x28 first pass, three 2x subdivision steps of 784 points each).

        The coarse head samples p2 on a regular grid of points in each box (`_roi_pooler`: GridSample, not
        ROIAlign) and predicts 7x7 logits; the point head (1x1 Conv1d MLP on p2's features and the coarse
        logits at each point) first fills a regular 28x28 grid, then each step upsamples x2 (bilinear), takes
        the `num_points` most uncertain cells (TopK of -|logit|), re-predicts them and writes them back
        (ScatterElements). Only each detection's own class channel is carried: Detectron2 refines all
        classes, but channels are independent and only that one is read (uncertainty and mask_rcnn_inference).
        Every op is standard (GridSample opset 16, bilinear, zeros padding, align_corners 0; TopK K=784), the
        same in both flavours; it runs on every detection slot, and the standard graph zeroes the masks of
        slots past num_detections, as its other heads' outputs are zero there."""
        s, b, g = self.spec, self.b, self.graph
        pr = s.point_rend
        assert pr is not None
        B, D, C = s.batch, s.max_detections, s.num_classes
        R = B * D
        p2 = self.features(("p2",))[0]
        channels = p2.shape[1] if p2.shape else 256
        boxes = b.op("Reshape", [det_boxes, i64(B, D, 1, 4)], name="pointrend_boxes")
        size = b.op("MatMul", [boxes, CORNERS_TO_WH], name="pointrend_box_size")  # [B, D, 1, 2] (x2-x1, y2-y1)
        origin = b.op("Slice", [boxes, i64(0), i64(2), i64(3)], name="pointrend_box_origin")  # [B, D, 1, 2]
        limits = self.clip_limits()  # [W, H, W, H] of the input: the padded canvas p2 covers at stride 4
        canvas = (limits[:2] if isinstance(limits, np.ndarray)
                  else b.op("Slice", [limits, i64(0), i64(2), i64(0)], name="pointrend_canvas"))

        def fine_features(points: Any, tag: str) -> gs.Variable:
            """point_sample_fine_grained_features: box-normalised points [B, D, P, 2] (or [1, 1, P, 2]) -> p2's
            features there, [R, F, P]; the same float32 steps (x * w + x1, / canvas, * 2 - 1)."""
            img = b.op("Add", [b.op("Mul", [points, size], name=f"{tag}_scaled"), origin], name=f"{tag}_in_image")
            unit = b.op("Div", [img, canvas], name=f"{tag}_normalised")
            grid = b.op("Sub", [b.op("Mul", [unit, np.float32(2)], name=f"{tag}_doubled"), np.float32(1)],
                        name=f"{tag}_grid")  # [B, D, P, 2] (a constant grid of points broadcasts over the boxes)
            sampled = b.op("GridSample", [p2, grid], GRID_SAMPLE, name=f"{tag}_sample")  # [B, F, D, P]
            by_box = b.op("Transpose", [sampled], {"perm": [0, 2, 1, 3]}, name=f"{tag}_by_box")
            return b.op("Reshape", [by_box, i64(R, channels, -1)], name=f"{tag}_features")

        # the coarse head on p2 sampled at a regular grid in each box
        pooled = fine_features(pr.pooler_points.reshape(1, 1, -1, 2), "pointrend_pooler")
        pooled = b.op("Reshape", [pooled, i64(R, channels, pr.pooler_side, pr.pooler_side)],
                      name="pointrend_pooled")
        entry = (find_calls(g, "roi_heads.mask_head.coarse_head.reduce_channel_dim_conv", "Conv")
                 or find_calls(g, "roi_heads.mask_head.coarse_head.reduce_spatial_dim_conv", "Conv", 1))[0]
        entry.inputs[0] = pooled
        prediction = find_one(g, "roi_heads.mask_head.coarse_head.prediction", "Gemm")
        k = pr.coarse_side
        coarse = b.op("Reshape", [prediction.outputs[0], i64(R, C, k, k)], name="pointrend_coarse_logits")

        # the point head's layers, once per call in the export (shared weights): the first call's weights
        fcs = [find_calls(g, f"roi_heads.mask_head.point_head.fc{j}", "Conv")[0] for j in range(1, pr.num_fc + 1)]
        predictor = find_calls(g, "roi_heads.mask_head.point_head.predictor", "Conv")[0]
        own = b.op("Reshape", [b.op("Add", [det_classes, (np.arange(R, dtype=np.int32) * C).reshape(B, D)],
                                    name="pointrend_class_row"), i64(R)], name="pointrend_class_index")

        def point_logits(points_box: Any, tag: str) -> gs.Variable:
            """The point head at box-normalised points ([B, D, P, 2] or a constant [1, 1, P, 2]): each
            detection's own-class logit per point, [R, P]."""
            fine = fine_features(points_box, tag)
            grid = b.op("Sub", [b.op("Mul", [points_box, np.float32(2)], name=f"{tag}_box_doubled"),
                                np.float32(1)], name=f"{tag}_box_grid")  # point_sample on the coarse logits
            count = int(points_box.shape[2]) if isinstance(points_box, np.ndarray) else pr.num_points
            grid = b.op("Reshape", [grid, i64(-1, count, 1, 2)], name=f"{tag}_box_grid_4d")
            if isinstance(points_box, np.ndarray):  # one constant grid: the same for every detection slot
                grid = b.op("Expand", [grid, i64(R, count, 1, 2)], name=f"{tag}_box_grid_all")
            at = b.op("GridSample", [coarse, grid], GRID_SAMPLE, name=f"{tag}_coarse_sample")  # [R, C, P, 1]
            at = b.op("Reshape", [at, i64(R, C, -1)], name=f"{tag}_coarse_features")
            x = b.op("Concat", [fine, at], {"axis": 1}, name=f"{tag}_head_input")
            for j, fc in enumerate(fcs, 1):
                x = b.op("Relu", [b.op("Conv", [x, *fc.inputs[1:]], dict(fc.attrs), name=f"{tag}_fc{j}")],
                         name=f"{tag}_fc{j}_relu")
                if pr.coarse_pred_each_layer:
                    x = b.op("Concat", [x, at], {"axis": 1}, name=f"{tag}_fc{j}_with_coarse")
            logits = b.op("Conv", [x, *predictor.inputs[1:]], dict(predictor.attrs), name=f"{tag}_predictor")
            flat = b.op("Reshape", [logits, i64(R * C, -1)], name=f"{tag}_logits_by_class")
            return b.op("Gather", [flat, own], {"axis": 0}, name=f"{tag}_own_class")  # [R, P]

        side = pr.init_side
        mask = b.op("Reshape", [point_logits(pr.init_points.reshape(1, 1, -1, 2), "pointrend_init"),
                                i64(R, 1, side, side)], name="pointrend_init_logits")
        for step, table in enumerate(pr.step_grids, 1):
            tag = f"pointrend_step{step}"
            side *= 2
            n = min(pr.num_points, side * side)
            up = b.op("Resize", [mask, gs.Variable.empty(), np.array([1, 1, 2, 2], np.float32)],
                      {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, name=f"{tag}_upsample")
            flat = b.op("Reshape", [up, i64(R, side * side)], name=f"{tag}_flat")
            uncertainty = b.op("Neg", [b.op("Abs", [flat], name=f"{tag}_abs")], name=f"{tag}_uncertainty")
            _, idx = b.op("TopK", [uncertainty, i64(n)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                          name=f"{tag}_most_uncertain")  # [R, n]
            points = b.op("Gather", [table, idx], {"axis": 0}, name=f"{tag}_points")  # [R, n, 2]
            points = b.op("Reshape", [points, i64(B, D, n, 2)], name=f"{tag}_points_by_image")
            refined = point_logits(points, tag)
            flat = b.op("ScatterElements", [flat, idx, refined], {"axis": 1}, name=f"{tag}_write_back")
            mask = b.op("Reshape", [flat, i64(R, 1, side, side)], name=f"{tag}_logits")
        probs = b.op("Sigmoid", [mask], name="pointrend_mask_probs")
        valid = getattr(self.ops, "det_valid", None)
        if valid is not None:  # the standard graph's outputs are zero past num_detections
            probs = b.op("Reshape", [probs, i64(B, D, side, side)], name="pointrend_masks_4d")
            probs = b.op("Where", [b.op("Reshape", [valid, i64(B, D, 1, 1)], name="pointrend_valid"), probs,
                                   np.float32(0)], name="pointrend_valid_masks")
        out = b.op("Reshape", [probs, i64(B, D, side, side)], name=Outputs.MASKS)
        out.name, out.dtype, out.shape = Outputs.MASKS, np.float32, [B, D, side, side]
        return out

    # ------------------------------------------------------------------ the RPN (both flavours)

    def rpn_levels(self) -> tuple[list[gs.Variable], list[int] | None, Any]:
        """Per RPN level the merged conv's rows [B, L+4, A*H*W]; the levels' anchor counts (None for a
        dynamic input); the anchor table [N, 8] (w, h, w, h, cx, cy, 0, 0) of all levels in the rows' order
        (constants, or made in the graph from each feature map's size for a dynamic input)."""
        if self.spec.dynamic:
            return self._dynamic_rpn_levels()
        s, g = self.spec, self.graph
        levels = len(s.rpn_in_features)
        obj = find_calls(g, "proposal_generator.rpn_head.objectness_logits", "Conv", levels)
        dlt = find_calls(g, "proposal_generator.rpn_head.anchor_deltas", "Conv", levels)
        rows, sizes, anchor_rows = [], [], []
        for lvl, (o, d) in enumerate(zip(obj, dlt)):
            if o.inputs[0] is not d.inputs[0]:
                raise GraphMismatch(f"RPN level {lvl}: objectness and delta convs read different tensors")
            shape = o.outputs[0].shape
            if shape is None or any(not isinstance(v, int) for v in shape):
                raise GraphMismatch(f"RPN level {lvl}: objectness output has no static shape ({shape})")
            _, a, hl, wl = shape
            n = a * hl * wl
            if a != s.anchors_per_location or s.anchors[lvl].shape[0] != n:
                raise GraphMismatch(
                    f"RPN level {lvl} predicts {n} anchors ({a}x{hl}x{wl}) but {s.anchors[lvl].shape[0]} anchors "
                    f"were generated for input {s.input_hw[0]}x{s.input_hw[1]}: the export and the recipe's "
                    "model.input disagree")
            conv = self.merged_rpn_conv(lvl, levels, o, d)
            rows.append(self.b.op("Reshape", [conv, np.array([s.batch, levels + 4, n], np.int64)],
                                  name=f"rpn_rows_level{lvl}"))
            sizes.append(n)
            anchor_rows.append(self.anchor_rows(s.anchors[lvl], a))
        self.facts["anchors"] = {"per_level": sizes, "total": sum(sizes)}
        return rows, sizes, np.ascontiguousarray(np.concatenate(anchor_rows, axis=1).T)

    def _dynamic_rpn_levels(self):
        """rpn_levels for an input of any size: each level's anchors made in the graph (Surgeon.anchor_table)."""
        s, b, g = self.spec, self.b, self.graph
        L, B = len(s.rpn_in_features), self.spec.batch
        obj = find_calls(g, "proposal_generator.rpn_head.objectness_logits", "Conv", L)
        dlt = find_calls(g, "proposal_generator.rpn_head.anchor_deltas", "Conv", L)
        rows, tables = [], []
        for lvl, (o, d) in enumerate(zip(obj, dlt)):
            if o.inputs[0] is not d.inputs[0]:
                raise GraphMismatch(f"RPN level {lvl}: objectness and delta convs read different tensors")
            conv = self.merged_rpn_conv(lvl, L, o, d)
            rows.append(b.op("Reshape", [conv, i64(B, L + 4, -1)], name=f"rpn_rows_level{lvl}"))
            tables.append(self.anchor_table(o.inputs[0], lvl))
        self.facts["anchors"] = {"per_level": "from each feature map's size (dynamic input)"}
        return rows, None, b.op("Concat", tables, {"axis": 0}, name="rpn_anchor_table")

    def rpn_candidates(self):
        """Detectron2's per-level top-k of the objectness logits, decoded and clipped, for every image.

        Returns (logits [B, L*k, 1]: each slot's logit, -BIG in slots of a level with fewer than k anchors;
        level scores [B, L*k, L]: the logit in the slot's level column, -BIG elsewhere; boxes [B, L*k, 4];
        nonempty [B, L*k, 1]). One TopK over the L score rows of the concatenated levels selects each level's
        top-k with global indices; the rows and anchor table are gathered at them."""
        s, b = self.spec, self.b
        B, L, k = s.batch, len(s.rpn_in_features), s.rpn_pre_nms_topk
        rows, sizes, table = self.rpn_levels()
        data = b.op("Concat", rows, {"axis": 2}, name="rpn_levels")  # [B, L+4, N]
        score_rows = b.op("Slice", [data, np.array([0], np.int64), np.array([L], np.int64),
                                    np.array([1], np.int64)], name="rpn_score_rows")  # [B, L, N]
        logits, idx = b.op("TopK", [score_rows, np.array([k], np.int64)], {"axis": 2, "largest": 1, "sorted": 1},
                           outputs=2, name="rpn_topk_per_level")  # [B, L, k]
        idx = b.op("Reshape", [idx, np.array([B, L * k, 1], np.int64)], name="rpn_topk_flat")
        by_anchor = b.op("Transpose", [data], {"perm": [0, 2, 1]}, name="rpn_rows_by_anchor")  # [B, N, L+4]
        picked = b.op("GatherND", [by_anchor, idx], {"batch_dims": 1}, name="rpn_gather")  # [B, K, L+4]
        level_scores, deltas = b.op("Split", [picked, np.array([L, 4], np.int64)], {"axis": 2}, outputs=2,
                                    name="rpn_split")
        anchors = b.op("GatherND", [table, idx], name="rpn_gather_anchors")  # [B, K, 8]
        whwh, ctr = b.op("Split", [anchors, np.array([4, 4], np.int64)], {"axis": 2}, outputs=2,
                         name="rpn_anchor_split")
        boxes = self.decode(deltas, whwh, ctr, "rpn")
        wh = b.op("MatMul", [boxes, CORNERS_TO_WH], name="rpn_box_sizes")
        nonempty = b.op("Greater", [b.op("ReduceMin", [wh], {"axes": [2], "keepdims": 1}, name="rpn_min_side"),
                                    np.float32(0)], name="rpn_nonempty")  # [B, K, 1]
        short = sizes is None or any(n < k for n in sizes)
        if short:  # slots of a level with fewer than k anchors hold other levels' entries: mask them
            seg = np.full((1, L * k, L), -BIG, np.float32)
            for lvl in range(L):
                seg[0, lvl * k:(lvl + 1) * k, lvl] = 0
            level_scores = b.op("Add", [level_scores, seg], name="rpn_level_slots")
        logits = b.op("Reshape", [logits, np.array([B, L * k, 1], np.int64)], name="rpn_logits_flat")
        return logits, level_scores, boxes, nonempty

    def merged_rpn_conv(self, lvl: int, levels: int, obj: gs.Node, dlt: gs.Node) -> gs.Variable:
        """One conv per level: rows [score for level 0..L-1 (own level = logit, else -BIG), dx, dy, dw, dh].

        Channel order is (row, anchor), so a Reshape to [L+4, A*H*W] lists anchors in (a, y, x) order.
        """
        wo, bo = np.asarray(obj.inputs[1].values, np.float32), np.asarray(obj.inputs[2].values, np.float32)
        wd, bd = np.asarray(dlt.inputs[1].values, np.float32), np.asarray(dlt.inputs[2].values, np.float32)
        a = wo.shape[0]
        weights = np.zeros(((levels + 4) * a,) + wo.shape[1:], np.float32)
        bias = np.full(((levels + 4) * a,), -BIG, np.float32)
        weights[lvl * a:(lvl + 1) * a], bias[lvl * a:(lvl + 1) * a] = wo, bo
        for c in range(4):  # Detectron2 lays deltas out as channel a*4 + c
            weights[(levels + c) * a:(levels + c + 1) * a] = wd[c::4]
            bias[(levels + c) * a:(levels + c + 1) * a] = bd[c::4]
        return self.b.op("Conv", [obj.inputs[0], weights, bias], dict(obj.attrs), name=f"rpn_head_level{lvl}")

    def fold_regression_weights(self, reg: gs.Node, num_classes: int, stage: BoxStage) -> int:
        """Divide bbox_pred by the stage's BBOX_REG_WEIGHTS; a class-specific one also gains 4 zero outputs for
        the background column. Returns the boxes per proposal it predicts (C+1, or 1 when class-agnostic)."""
        if not reg.attrs.get("transB", 0):
            raise GraphMismatch("roi_heads.box_predictor.bbox_pred Gemm is expected with transB=1")
        w = np.asarray(reg.inputs[1].values, np.float32)
        bias = np.asarray(reg.inputs[2].values, np.float32)
        k = 1 if stage.agnostic else num_classes
        if w.shape[0] != 4 * k:
            raise GraphMismatch(f"bbox_pred{stage.scope} has {w.shape[0]} outputs, expected 4 x {k} "
                                + ("(class-agnostic)" if stage.agnostic else "classes"))
        if not stage.agnostic:
            w = np.concatenate([w, np.zeros((4, w.shape[1]), np.float32)])
            bias = np.concatenate([bias, np.zeros(4, np.float32)])
            k += 1
        scale = np.tile(1.0 / np.array(stage.weights, np.float32), k)
        reg.inputs[1] = gs.Constant(reg.name + "/W", (w * scale[:, None]).astype(np.float32))
        reg.inputs[2] = gs.Constant(reg.name + "/B", (bias * scale).astype(np.float32))
        reg.outputs[0].shape = None  # was [P, 4C]; shape inference recomputes it
        return k


class PluginRCNN(PluginOps):
    """The R-CNN steps in the plugin flavour: EfficientNMS_TRT for proposals and detections, PyramidROIAlign_TRT
    for every pooler, heads on every slot."""

    def proposals(self, sg: RCNNSurgeon) -> tuple[gs.Variable, gs.Variable]:
        """Detectron2's RPN as static ops and one EfficientNMS_TRT; returns (scores [B,P], boxes [B,P,4]).

        The threshold (logit about -87) keeps every real proposal, which puts EfficientNMS_TRT in its
        "dense" mode: masked candidates are not dropped but sorted last with score -32768 and can fill
        empty output slots, counted in num_detections. Their output score is sigmoid(-32768) = 0,
        while a real proposal's is > 0, so downstream validity is `score > 0`, not `row < num`.
        """
        s, b = sg.spec, sg.b
        _, scores, boxes, nonempty = sg.rpn_candidates()
        scores = b.op("Where", [nonempty, scores, np.float32(-BIG)], name="rpn_drop_empty")
        num, rois, probs, levels_out = plugins.efficient_nms(
            b, boxes, scores, name="rpn_nms", max_output_boxes=s.rpn_post_nms_topk,
            score_threshold=RPN_SCORE_THRESHOLD, iou_threshold=s.rpn_iou, score_activation=1)
        sg.nms_outputs(num, rois, probs, levels_out, s.rpn_post_nms_topk)
        return probs, rois

    def pyramid_roi_align(self, sg: RCNNSurgeon, rois: gs.Variable, count: int, pooler: tuple[int, int],
                          tag: str) -> gs.Variable:
        s = sg.spec
        feats = sg.features(s.roi_in_features)
        if len(feats) != plugins.ROI_ALIGN_LEVELS:
            raise GraphMismatch(f"{plugins.PYRAMID_ROI_ALIGN.op} pools {plugins.ROI_ALIGN_LEVELS} levels; "
                                f"ROI_HEADS.IN_FEATURES has {len(feats)}")
        out = plugins.pyramid_roi_align(sg.b, rois, feats, name=f"{tag}_pooler", pooled_size=pooler[0],
                                        image_size=s.input_hw, sampling_ratio=pooler[1],
                                        fpn_scale=s.canonical_box_size)
        channels = feats[0].shape[1] if feats[0].shape else 256
        out.dtype, out.shape = np.float32, [s.batch, count, channels, pooler[0], pooler[0]]
        return out

    def box_stage(self, sg: RCNNSurgeon, rois: gs.Variable, stage: BoxStage) -> tuple[gs.Variable, gs.Variable]:
        """One box head on the proposals `rois [B, P, 4]`: (class probabilities [B, P, C+1], decoded and clipped
        boxes [B, P, C+1, 4], or [B, P, 4] for class-agnostic regression)."""
        s, b, g = sg.spec, sg.b, sg.graph
        B, p, c, t = s.batch, s.rpn_post_nms_topk, s.num_classes, stage.tag
        pooled = self.pyramid_roi_align(sg, rois, p, s.box_pooler, f"box{t}")
        channels = pooled.shape[2]
        if s.box_head_convs:
            sg.conv_box_head_input(stage, pooled, channels)
        else:
            fc1 = find_one(g, f"roi_heads.box_head{stage.scope}.fc1", "Gemm")
            fc1.inputs[0] = b.op("Reshape", [pooled, np.array([B * p, channels * s.box_pooler[0] ** 2], np.int64)],
                                 name=f"box_features{t}")
        cls = find_one(g, f"roi_heads.box_predictor{stage.scope}.cls_score", "Gemm")
        reg = find_one(g, f"roi_heads.box_predictor{stage.scope}.bbox_pred", "Gemm")
        k = sg.fold_regression_weights(reg, c, stage)
        probs = b.op("Softmax", [cls.outputs[0]], {"axis": -1}, name=f"class_probs{t}")
        if B > 1 or len(s.box_stages) > 1:  # one stage at batch 1: the Where broadcasts [P, C+1] to [1, P, C+1]
            probs = b.op("Reshape", [probs, np.array([B, p, c + 1], np.int64)], name=f"class_probs_3d{t}")
        deltas = b.op("Reshape", [reg.outputs[0], np.array([B, p, k, 4], np.int64)], name=f"box_deltas{t}")
        params = b.op("MatMul", [b.op("Reshape", [rois, np.array([B, p, 1, 4], np.int64)], name=f"proposals_4d{t}"),
                                 CORNERS_TO_PARAMS], name=f"proposal_params{t}")
        whwh, ctr = b.op("Split", [params, np.array([4, 4], np.int64)], {"axis": 3}, outputs=2,
                         name=f"proposal_split{t}")
        boxes = sg.decode(deltas, whwh, ctr, f"box{t}")
        if stage.agnostic:
            boxes = b.op("Reshape", [boxes, np.array([B, p, 4], np.int64)], name=f"box_agnostic{t}")
        return probs, boxes

    def detections(self, sg: RCNNSurgeon, rpn_scores: gs.Variable, rois: gs.Variable) -> list[gs.Variable]:
        """Box stage(s) on the proposals, Detectron2's fast_rcnn_inference as one EfficientNMS_TRT.

        A cascade (CascadeROIHeads._forward_box) runs its stages in turn, each on the previous stage's
        clipped boxes (`_create_proposals_from_boxes`), and scores the last stage's boxes with the mean of
        the stages' class probabilities (summed in stage order, times 1/stages, as Detectron2 does)."""
        s, b = sg.spec, sg.b
        B, p, c = s.batch, s.rpn_post_nms_topk, s.num_classes
        stages = s.box_stages
        total = boxes = None
        for stage in stages:
            probs, boxes = self.box_stage(sg, rois if boxes is None else boxes, stage)
            total = probs if total is None else b.op("Add", [total, probs], name=f"cascade_score_sum{stage.tag}")
        if len(stages) > 1:
            total = b.op("Mul", [total, np.float32(1.0 / len(stages))], name="cascade_mean_scores")
        real = b.op("Greater", [b.op("Reshape", [rpn_scores, np.array([B, p, 1], np.int64)], name="rpn_scores_3d"),
                                np.float32(0)], name="real_proposals")
        probs = b.op("Where", [real, total, np.float32(0)], name="drop_padding_proposals")  # [B, P, C+1]
        outs = plugins.efficient_nms(b, boxes, probs, name="detection_nms", background_class=c,
                                     max_output_boxes=s.max_detections, score_threshold=s.score_threshold,
                                     iou_threshold=s.nms_iou)
        return sg.name_detections(outs)

    def masks(self, sg: RCNNSurgeon, det_classes: gs.Variable, det_boxes: gs.Variable) -> gs.Variable:
        """Mask head on the final boxes; each detection keeps its own class's mask, as probabilities."""
        s, b, g = sg.spec, sg.b, sg.graph
        assert s.mask_pooler is not None
        B, d, c = s.batch, s.max_detections, s.num_classes
        pooled = self.pyramid_roi_align(sg, det_boxes, d, s.mask_pooler, "mask")
        first = find_one(g, "roi_heads.mask_head.mask_fcn1", "Conv")
        res = s.mask_pooler[0]
        first.inputs[0] = b.op("Reshape", [pooled, np.array([B * d, pooled.shape[2], res, res], np.int64)],
                               name="mask_features")
        logits = find_one(g, "roi_heads.mask_head.predictor", "Conv").outputs[0]  # [B*D, C, M, M]
        m = 2 * res  # the mask head's deconv doubles the pooled resolution
        flat = b.op("Reshape", [logits, np.array([B * d * c, m, m], np.int64)], name="mask_logits_flat")
        pick = b.op("Add", [det_classes, (np.arange(B * d, dtype=np.int32) * c).reshape(B, d)], name="mask_index")
        chosen = b.op("Gather", [flat, pick], {"axis": 0}, name="mask_of_class")
        out = b.op("Sigmoid", [chosen], name="mask_probs")
        out.name, out.dtype, out.shape = Outputs.MASKS, np.float32, [B, d, m, m]
        return out

    def keypoints(self, sg: RCNNSurgeon, det_boxes: gs.Variable) -> gs.Variable:
        """Keypoint head on the final boxes: `detection_heatmaps [1, D, K, 56, 56]`, raw logits.

        The heatmaps leave the graph undecoded: Detectron2 resizes each detection's heatmaps to its
        own box size before the argmax, a data-dependent shape a static TensorRT graph cannot hold
        (a fixed-size stand-in would move keypoints by up to box/56 px). `processing.decode_keypoints`
        reproduces Detectron2's decode for all detections at once.
        """
        s, b, g = sg.spec, sg.b, sg.graph
        assert s.keypoint_pooler is not None
        d, res = s.max_detections, s.keypoint_pooler[0]
        pooled = self.pyramid_roi_align(sg, det_boxes, d, s.keypoint_pooler, "keypoint")
        first = find_one(g, "roi_heads.keypoint_head.conv_fcn1", "Conv")
        B = s.batch
        first.inputs[0] = b.op("Reshape", [pooled, np.array([B * d, pooled.shape[2], res, res], np.int64)],
                               name="keypoint_features")
        upsample = find_one(g, "roi_heads.keypoint_head", "Resize")  # the head's final x2 bilinear upsample
        m = 4 * res  # deconv and upsample double the pooled resolution twice
        out = b.op("Reshape", [upsample.outputs[0], np.array([B, d, s.num_keypoints, m, m], np.int64)],
                   name="keypoint_heatmaps")
        out.name, out.dtype, out.shape = Outputs.HEATMAPS, np.float32, [B, d, s.num_keypoints, m, m]
        return out


class StandardRCNN(StandardOps):
    """The R-CNN steps in the standard flavour: NonMaxSuppression, per-level RoiAlign on the real rows only."""

    def proposals(self, sg: RCNNSurgeon) -> tuple[gs.Variable, gs.Variable]:
        """Detectron2's RPN; returns (valid [B, P] bool, boxes [B, P, 4]) of the top-P proposals per image."""
        s, b = sg.spec, sg.b
        B, L, k, P = s.batch, len(s.rpn_in_features), s.rpn_pre_nms_topk, s.rpn_post_nms_topk
        if P > L * k:
            raise GraphMismatch(f"surgery.rpn.post_nms_topk={P} exceeds the {L} levels x pre_nms_topk={k} candidates")
        logits, _, boxes, nonempty = sg.rpn_candidates()
        real = b.op("And", [nonempty, b.op("Greater", [logits, np.float32(-BIG / 2)], name="rpn_own_level")],
                    name="rpn_candidates")  # an anchor of this level (not a -BIG filler), non-empty once clipped
        logits = b.op("Where", [real, logits, np.float32(-BIG)], name="rpn_masked_logits")
        sel = b.op("NonMaxSuppression", [
            b.op("Reshape", [boxes, i64(B * L, k, 4)], name="rpn_nms_boxes"),
            b.op("Reshape", [logits, i64(B * L, 1, k)], name="rpn_nms_scores"),
            i64(P), np.array([s.rpn_iou], np.float32), np.array([-BIG / 2], np.float32)],
            {"center_point_box": 0}, name="rpn_nms")  # batch item = (image, level): per-level NMS
        dense = self.kept_scores(sg, sel, logits, k, B * L * k, -BIG, "rpn")  # [B*L*k], -BIG where not kept
        dense = b.op("Reshape", [dense, i64(B, L * k)], name="rpn_kept_by_image")
        top, which = b.op("TopK", [dense, i64(P)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2,
                          name="rpn_post_nms_topk")  # [B, P]
        rois = b.op("GatherND", [boxes, b.op("Unsqueeze", [which, i64(2)], name="rpn_top_index")],
                    {"batch_dims": 1}, name="proposals")  # [B, P, 4]
        valid = b.op("Greater", [top, np.float32(-BIG / 2)], name="proposal_valid")  # [B, P]
        return valid, rois

    def pool(self, sg: RCNNSurgeon, boxes: gs.Variable, valid: gs.Variable | None, image: Any,
             pooler: tuple[int, int], tag: str) -> tuple[gs.Variable, gs.Variable]:
        """Detectron2's ROIPooler on the valid rows of `boxes [R, 4]` (every row when `valid` is None):
        (pooled [n, C, P, P], their rows [n]).

        Rows come out grouped by FPN level (P2 first); `image [R]` is each row's batch index."""
        s, b = sg.spec, sg.b
        feats = sg.features(s.roi_in_features)
        strides = [STRIDES[f] for f in s.roi_in_features]
        if strides != [4, 8, 16, 32]:
            raise GraphMismatch(f"ROI pooling expects P2..P5; ROI_HEADS.IN_FEATURES is {list(s.roi_in_features)}")
        wh = b.op("MatMul", [boxes, CORNERS_TO_WH], name=f"{tag}_wh")  # [R, 2]
        w, h = b.op("Split", [wh, i64(1, 1)], {"axis": 1}, outputs=2, name=f"{tag}_wh_split")
        size = b.op("Sqrt", [b.op("Mul", [w, h], name=f"{tag}_area")], name=f"{tag}_size")
        # floor(4 + log2(size / 224 + 1e-8)) clamped to [2, 5], minus 2: the steps at 0.5, 1 and 2
        rel = b.op("Add", [b.op("Div", [size, np.float32(s.canonical_box_size)], name=f"{tag}_rel"),
                           np.float32(1e-8)], name=f"{tag}_rel_eps")
        steps = b.op("GreaterOrEqual", [rel, np.array([0.5, 1.0, 2.0], np.float32)], name=f"{tag}_level_steps")
        level = b.op("ReduceSum", [b.op("Cast", [steps], {"to": onnx.TensorProto.INT64}, name=f"{tag}_steps_int"),
                                   i64(1)], {"keepdims": 0}, name=f"{tag}_level")  # [R] 0..3
        pooled, rows = [], []
        for lvl, (feat, stride) in enumerate(zip(feats, strides)):
            on = b.op("Equal", [level, i64(lvl)], name=f"{tag}_is_p{lvl + 2}")
            if valid is not None:
                on = b.op("And", [valid, on], name=f"{tag}_take_p{lvl + 2}")
            idx = b.op("Reshape", [b.op("NonZero", [on], name=f"{tag}_rows_p{lvl + 2}_2d"), i64(-1)],
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

    def box_stage(self, sg: RCNNSurgeon, rois: gs.Variable, valid: gs.Variable | None, image: Any,
                  stage: BoxStage) -> tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]:
        """One box head on the valid rows of `rois [R, 4]` (`image [R]`: their batch indices; `valid` None: all).

        Returns, for the n pooled rows in pooling order: class probabilities [n, C+1], decoded and clipped boxes
        [n, C+1, 4] (or [n, 1, 4] when class-agnostic), their batch indices [n] and their rows in `rois` [n]."""
        s, b, g = sg.spec, sg.b, sg.graph
        C, t = s.num_classes, stage.tag
        pooled, rows = self.pool(sg, rois, valid, image, s.box_pooler, f"box{t}")
        res = s.box_pooler[0]
        channels = sg.features(s.roi_in_features)[0].shape[1]
        if s.box_head_convs:
            sg.conv_box_head_input(stage, pooled, channels)
        else:
            fc1 = find_one(g, f"roi_heads.box_head{stage.scope}.fc1", "Gemm")
            fc1.inputs[0] = b.op("Reshape", [pooled, i64(-1, channels * res * res)], name=f"box_features{t}")
        cls = find_one(g, f"roi_heads.box_predictor{stage.scope}.cls_score", "Gemm")
        reg = find_one(g, f"roi_heads.box_predictor{stage.scope}.bbox_pred", "Gemm")
        k = sg.fold_regression_weights(reg, C, stage)
        probs = b.op("Softmax", [cls.outputs[0]], {"axis": -1}, name=f"class_probs{t}")  # [n, C+1]
        props = b.op("Gather", [rois, rows], {"axis": 0}, name=f"pooled_proposals{t}")  # [n, 4]
        img = b.op("Gather", [image, rows], {"axis": 0}, name=f"pooled_images{t}")
        deltas = b.op("Reshape", [reg.outputs[0], i64(-1, k, 4)], name=f"box_deltas{t}")
        params = b.op("MatMul", [b.op("Unsqueeze", [props, i64(1)], name=f"proposals_3d{t}"), CORNERS_TO_PARAMS],
                      name=f"proposal_params{t}")
        whwh, ctr = b.op("Split", [params, i64(4, 4)], {"axis": 2}, outputs=2, name=f"proposal_split{t}")
        return probs, sg.decode(deltas, whwh, ctr, f"box{t}"), img, rows

    def detections(self, sg: RCNNSurgeon, valid: gs.Variable, rois: gs.Variable) -> list[gs.Variable]:
        """Box stage(s) on the valid proposals, Detectron2's fast_rcnn_inference, static [B, D] outputs.

        A cascade runs each later stage on the previous stage's boxes (all of them valid, in that stage's
        pooling order) and carries the sum of the stages' probabilities along, re-gathered in each stage's
        order, so the mean is Detectron2's ((s0 + s1) + s2) / 3 for every proposal."""
        s, b = sg.spec, sg.b
        B, P = s.batch, s.rpn_post_nms_topk
        rois = b.op("Reshape", [rois, i64(B * P, 4)], name="proposals_flat")
        image: Any = np.repeat(np.arange(B, dtype=I64), P)  # batch index of each proposal row
        valid = b.op("Reshape", [valid, i64(B * P)], name="proposal_valid_flat")
        stages = s.box_stages
        total = boxes = None
        for stage in stages:
            probs, boxes, image, rows = self.box_stage(sg, rois, valid, image, stage)
            if total is not None:
                total = b.op("Add", [b.op("Gather", [total, rows], {"axis": 0}, name=f"cascade_score_rows{stage.tag}"),
                                     probs], name=f"cascade_score_sum{stage.tag}")
            else:
                total = probs
            rois, valid = b.op("Reshape", [boxes, i64(-1, 4)], name=f"cascade_proposals{stage.tag}"), None
        if len(stages) > 1:
            total = b.op("Mul", [total, np.float32(1.0 / len(stages))], name="cascade_mean_scores")
        return self.class_nms(sg, total, boxes, image)

    def class_nms(self, sg: RCNNSurgeon, probs: gs.Variable, boxes: gs.Variable,
                  image: gs.Variable) -> list[gs.Variable]:
        """fast_rcnn_inference on n rows of all images: probs [n, C+1], boxes [n, C+1 or 1, 4], image [n]."""
        s, b = sg.spec, sg.b
        B, C = s.batch, s.num_classes
        fg_scores = b.op("Slice", [probs, i64(0), i64(C), i64(1)], name="class_scores")  # [n, C]
        if s.box_stages[-1].agnostic:  # one box per row, shared by its classes
            fg_boxes = b.op("Expand", [boxes, i64(1, C, 1)], name="class_boxes")  # [n, C, 4]
        else:
            fg_boxes = b.op("Slice", [boxes, i64(0), i64(C), i64(1)], name="class_boxes")  # [n, C, 4]
        # every (row, class) pair a candidate of its row's image (scores -1 on other images' rows)
        count = b.op("Shape", [image], name="pooled_count")  # [1]
        mine = b.op("Equal", [b.op("Unsqueeze", [image, i64(0)], name="pooled_images_row"),
                              np.arange(B, dtype=I64).reshape(B, 1)], name="row_of_image")  # [B, n]
        scores = b.op("Where", [b.op("Unsqueeze", [mine, i64(2)], name="row_of_image_3d"),
                                b.op("Unsqueeze", [fg_scores, i64(0)], name="class_scores_3d"), np.float32(-1)],
                      name="scores_by_image")  # [B, n, C]
        shape = b.op("Concat", [i64(B), count, i64(C, 4)], {"axis": 0}, name="candidate_boxes_shape")
        boxes = b.op("Expand", [b.op("Unsqueeze", [fg_boxes, i64(0)], name="class_boxes_4d"), shape],
                     name="boxes_by_image")  # [B, n, C, 4]
        classes = b.op("Expand", [np.arange(C, dtype=I64).reshape(1, 1, C),
                                  b.op("Slice", [shape, i64(0), i64(3), i64(0)], name="candidate_classes_shape")],
                       name="classes_by_image")  # [B, n, C]
        return sg.name_detections(self.top_detections(
            sg, b.op("Reshape", [boxes, i64(B, -1, 4)], name="candidate_boxes"),
            b.op("Reshape", [scores, i64(B, -1)], name="candidate_scores"),
            b.op("Reshape", [classes, i64(B, -1)], name="candidate_classes")))

    def _head_on_detections(self, sg: RCNNSurgeon, det_boxes: gs.Variable, pooler: tuple[int, int], tag: str):
        s, b = sg.spec, sg.b
        B, D = s.batch, s.max_detections
        boxes = b.op("Reshape", [det_boxes, i64(B * D, 4)], name=f"{tag}_boxes_flat")
        valid = b.op("Reshape", [self.det_valid, i64(B * D)], name=f"{tag}_valid_flat")
        return self.pool(sg, boxes, valid, np.repeat(np.arange(B, dtype=I64), D), pooler, tag)

    def _scatter_rows(self, sg: RCNNSurgeon, values: gs.Variable, rows: gs.Variable, shape: tuple[int, ...],
                      name: str, tag: str) -> gs.Variable:
        """[n, ...] values of the pooled rows into zeros of `shape` ([B*D, ...]) at those rows."""
        b = sg.b
        base = np.zeros(shape, np.float32)
        return b.op("ScatterND", [base, b.op("Unsqueeze", [rows, i64(1)], name=f"{tag}_rows_2d"), values],
                    name=name)

    def masks(self, sg: RCNNSurgeon, det_classes: gs.Variable, det_boxes: gs.Variable) -> gs.Variable:
        s, b, g = sg.spec, sg.b, sg.graph
        assert s.mask_pooler is not None
        B, D, C = s.batch, s.max_detections, s.num_classes
        pooled, rows = self._head_on_detections(sg, det_boxes, s.mask_pooler, "mask")
        find_one(g, "roi_heads.mask_head.mask_fcn1", "Conv").inputs[0] = pooled
        logits = find_one(g, "roi_heads.mask_head.predictor", "Conv").outputs[0]  # [m, C, M, M]
        m = 2 * s.mask_pooler[0]
        classes = b.op("Gather", [b.op("Cast", [b.op("Reshape", [det_classes, i64(B * D)], name="mask_classes_flat")],
                                       {"to": onnx.TensorProto.INT64}, name="mask_classes_int64"), rows],
                       {"axis": 0}, name="mask_classes")
        count = b.op("Shape", [rows], name="mask_count")
        first = b.op("Mul", [b.op("Range", [i64(0).reshape(()), b.op("Squeeze", [count, i64(0)], name="mask_n"),
                                            i64(1).reshape(())], name="mask_row_index"), i64(C)],
                     name="mask_row_offset")
        flat = b.op("Reshape", [logits, i64(-1, m, m)], name="mask_logits_flat")
        chosen = b.op("Gather", [flat, b.op("Add", [first, classes], name="mask_index")], {"axis": 0},
                      name="mask_of_class")
        probs = b.op("Sigmoid", [chosen], name="mask_probs")
        out = self._scatter_rows(sg, probs, rows, (B * D, m, m), "mask_scatter", "mask")
        out = b.op("Reshape", [out, i64(B, D, m, m)], name=Outputs.MASKS)
        out.name, out.dtype, out.shape = Outputs.MASKS, np.float32, [B, D, m, m]
        return out

    def keypoints(self, sg: RCNNSurgeon, det_boxes: gs.Variable) -> gs.Variable:
        s, b, g = sg.spec, sg.b, sg.graph
        assert s.keypoint_pooler is not None
        B, D, K = s.batch, s.max_detections, s.num_keypoints
        pooled, rows = self._head_on_detections(sg, det_boxes, s.keypoint_pooler, "keypoint")
        find_one(g, "roi_heads.keypoint_head.conv_fcn1", "Conv").inputs[0] = pooled
        upsample = find_one(g, "roi_heads.keypoint_head", "Resize")
        m = 4 * s.keypoint_pooler[0]
        out = self._scatter_rows(sg, upsample.outputs[0], rows, (B * D, K, m, m), "keypoint_scatter", "keypoint")
        out = b.op("Reshape", [out, i64(B, D, K, m, m)], name="keypoint_heatmaps")
        out.name, out.dtype, out.shape = Outputs.HEATMAPS, np.float32, [B, D, K, m, m]
        return out
