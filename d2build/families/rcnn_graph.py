"""Surgery for FPN R-CNNs: the Detectron2 export becomes the static graph TensorRT builds from.

What is kept from the export, found by module scope: the backbone and FPN, the RPN head convs,
the box head and predictor, and the heads the family has on its final boxes (`HeadSpec`): the mask
head (Mask R-CNN), the keypoint head (Keypoint R-CNN), or none (Faster R-CNN). Everything
data-dependent between them (Detectron2's proposal selection, ROI pooling with NonZero level
assignment, per-class NMS inside If nodes) is replaced by static ops and plugin nodes (two
EfficientNMS_TRT, one PyramidROIAlign_TRT per pooler) whose attributes come from the recipe and
the Detectron2 config. The head stages only append to the graph, so a family without a head
builds exactly the graph of one that has it, minus that head. The proposal stage reproduces
Detectron2's `find_top_rpn_proposals`:

* per-level top-k: each level's logits live in their own score row (other levels read -BIG), so one
  TopK over the L score rows selects each level's top-k with global indices;
* decode with Detectron2's clamp of dw/dh at log(1000/16), clip to the image, empty boxes masked;
* per-level NMS: one EfficientNMS_TRT whose L score columns are the levels (class = level), cut at
  post_nms_topk: greedy per-level NMS then a global top-k is exactly batched_nms then keep[:k].

Equivalent rewrites that keep the node count low (the budget is the reference sample's 219):
the objectness and anchor-delta convs of each level are merged into one conv whose extra output
channels are constant -BIG (zero weights); corner/centre conversions are MatMuls with 0/±1/±0.5
matrices (exact in float32); the box regression weights (10, 10, 5, 5) are folded into bbox_pred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build import plugins
from d2build.graph import OPSET, Builder, GraphMismatch, find_calls, find_one
from d2build.recipe import SurgeryConfig

BIG = 1.0e4  # a logit no real proposal reaches; rows/columns holding -BIG are never selected
# EfficientNMS_TRT with score_activation=1 compares logits against logit(score_threshold):
# the smallest normal float32 gives about -87, far above -BIG and below any real logit.
RPN_SCORE_THRESHOLD = 1.1754944e-38
SCALE_CLAMP = math.log(1000.0 / 16)  # Detectron2's _DEFAULT_SCALE_CLAMP
FLOAT_MAX = float(np.finfo(np.float32).max)

# corners (x1, y1, x2, y2) -> (w, h, w, h, cx, cy, 0, 0); rows are input components
_CORNERS_TO_PARAMS = np.array([
    [-1, 0, -1, 0, 0.5, 0, 0, 0],
    [0, -1, 0, -1, 0, 0.5, 0, 0],
    [1, 0, 1, 0, 0.5, 0, 0, 0],
    [0, 1, 0, 1, 0, 0.5, 0, 0],
], dtype=np.float32)
# (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
_CENTER_TO_CORNERS = np.array([
    [1, 0, 1, 0],
    [0, 1, 0, 1],
    [-0.5, 0, 0.5, 0],
    [0, -0.5, 0, 0.5],
], dtype=np.float32)
# corners -> (x2 - x1, y2 - y1)
_CORNERS_TO_WH = np.array([[-1, 0], [0, -1], [1, 0], [0, 1]], dtype=np.float32)


@dataclass(frozen=True)
class HeadSpec:
    """What surgery needs from the Detectron2 config (read once, recorded in the manifest)."""

    input_hw: tuple[int, int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    input_format: str
    rpn_in_features: tuple[str, ...]
    roi_in_features: tuple[str, ...]
    anchors: tuple[np.ndarray, ...]  # per RPN level, [Hl*Wl*A, 4] in Detectron2's (loc, a) order
    anchors_per_location: int
    rpn_pre_nms_topk: int
    rpn_post_nms_topk: int
    rpn_iou: float
    num_classes: int
    bbox_reg_weights: tuple[float, float, float, float]
    box_pooler: tuple[int, int]  # resolution, sampling ratio
    mask_pooler: tuple[int, int] | None
    score_threshold: float
    nms_iou: float
    max_detections: int
    canonical_box_size: int = 224
    keypoint_pooler: tuple[int, int] | None = None  # resolution, sampling ratio; None: no keypoint stage
    num_keypoints: int = 0
    batch: int = 1  # images per inference (the graph input's first dimension)
    dynamic: bool = False  # input [B, 3, height, width] of any size (multiples of 32): anchors made in the graph
    cell_anchors: tuple[np.ndarray, ...] = ()  # per RPN level, [A, 4] (Detectron2's DefaultAnchorGenerator)
    rpn_strides: tuple[int, ...] = ()
    #: Cascade R-CNN: one (dx, dy, dw, dh) weight per box stage (ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS), each
    #: stage with its own box head and class-agnostic regression; () for one class-specific box stage
    cascade_bbox_reg_weights: tuple[tuple[float, float, float, float], ...] = ()

    @property
    def box_stages(self) -> tuple[BoxStage, ...]:
        """The box stages in order: Detectron2's one FastRCNN head, or a cascade's heads `box_head.0`, `.1`, ..."""
        if not self.cascade_bbox_reg_weights:
            return (BoxStage("", self.bbox_reg_weights, agnostic=False),)
        return tuple(BoxStage(f".{k}", tuple(w), agnostic=True, tag=f"_stage{k}")
                     for k, w in enumerate(self.cascade_bbox_reg_weights))


@dataclass(frozen=True)
class BoxStage:
    """One box head + predictor: its module scope suffix, regression weights, class-agnostic or not."""

    scope: str  # "" (roi_heads.box_head) or ".k" (roi_heads.box_head.k of a cascade)
    weights: tuple[float, float, float, float]
    agnostic: bool
    tag: str = ""  # node-name suffix


STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def anchor_facts(cfg, in_features: tuple[str, ...], input_hw: tuple[int, int]) -> dict[str, Any]:
    """Detectron2's own anchors for the levels `in_features` at this input size (HeadSpec's anchor fields)."""
    import torch
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.anchor_generator import build_anchor_generator

    if cfg.MODEL.ANCHOR_GENERATOR.NAME != "DefaultAnchorGenerator":
        raise GraphMismatch(f"MODEL.ANCHOR_GENERATOR.NAME={cfg.MODEL.ANCHOR_GENERATOR.NAME!r} is not supported by "
                            "surgery (supported: DefaultAnchorGenerator)")
    h, w = input_hw
    generator = build_anchor_generator(cfg, [ShapeSpec(channels=1, stride=STRIDES[f]) for f in in_features])
    grids = [torch.empty(1, 1, math.ceil(h / STRIDES[f]), math.ceil(w / STRIDES[f])) for f in in_features]
    per_loc = generator.num_anchors
    if len(set(per_loc)) != 1:
        raise GraphMismatch(f"levels have different anchor counts {per_loc}; not supported")
    return {"anchors": tuple(b.tensor.numpy().astype(np.float32) for b in generator(grids)),
            "anchors_per_location": per_loc[0],
            "cell_anchors": tuple(c.numpy().astype(np.float32) for c in generator.cell_anchors),
            "rpn_strides": tuple(STRIDES[f] for f in in_features)}


def head_spec(cfg, surgery: SurgeryConfig, input_hw: tuple[int, int], with_masks: bool,
              with_keypoints: bool = False, batch: int = 1, dynamic: bool = False, cascade: bool = False) -> HeadSpec:
    """Read the config facts surgery needs; generate anchors for this input size with Detectron2's own code.

    `with_masks` / `with_keypoints` say which heads the family's graph carries; the config must
    have exactly those heads on (MODEL.MASK_ON, MODEL.KEYPOINT_ON). `cascade`: CascadeROIHeads (box
    stages with class-agnostic regression, ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS) instead of StandardROIHeads.
    """
    m = cfg.MODEL
    for key, val, ok in (
        ("MODEL.ROI_HEADS.NAME", m.ROI_HEADS.NAME, ("CascadeROIHeads",) if cascade else ("StandardROIHeads",)),
        ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", m.ROI_BOX_HEAD.POOLER_TYPE, ("ROIAlignV2",)),
        ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG, (cascade,)),
        ("MODEL.PROPOSAL_GENERATOR.NAME", m.PROPOSAL_GENERATOR.NAME, ("RPN",)),
        ("MODEL.RPN.BBOX_REG_WEIGHTS", tuple(m.RPN.BBOX_REG_WEIGHTS), ((1.0, 1.0, 1.0, 1.0),)),
    ):
        if val not in ok:
            raise GraphMismatch(f"{key}={val!r} is not supported by surgery (supported: {ok})")
    for key, on, wanted in (("MODEL.MASK_ON", m.MASK_ON, with_masks),
                            ("MODEL.KEYPOINT_ON", m.KEYPOINT_ON, with_keypoints)):
        if bool(on) != wanted:
            raise GraphMismatch(f"{key}={on} but this family's graph {'has' if wanted else 'has no'} that head: "
                                "model.family and model.config disagree")
    if with_masks and (m.ROI_MASK_HEAD.POOLER_TYPE != "ROIAlignV2" or m.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK):
        raise GraphMismatch("mask head must use ROIAlignV2 pooling and class-specific masks")
    kp = m.ROI_KEYPOINT_HEAD
    if with_keypoints and (kp.POOLER_TYPE != "ROIAlignV2" or kp.NAME != "KRCNNConvDeconvUpsampleHead"):
        raise GraphMismatch(f"keypoint head must be KRCNNConvDeconvUpsampleHead with ROIAlignV2 pooling "
                            f"(config: {kp.NAME}, {kp.POOLER_TYPE})")
    return HeadSpec(
        **spec_fields(cfg, surgery, input_hw, tuple(m.RPN.IN_FEATURES), batch, dynamic),
        roi_in_features=tuple(m.ROI_HEADS.IN_FEATURES),
        rpn_post_nms_topk=int(surgery.rpn.post_nms_topk),
        rpn_iou=float(surgery.rpn.iou_threshold),
        num_classes=int(m.ROI_HEADS.NUM_CLASSES),
        bbox_reg_weights=tuple(float(v) for v in m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
        box_pooler=(int(m.ROI_BOX_HEAD.POOLER_RESOLUTION), int(m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO)),
        mask_pooler=(int(m.ROI_MASK_HEAD.POOLER_RESOLUTION), int(m.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO))
        if with_masks else None,
        keypoint_pooler=(int(kp.POOLER_RESOLUTION), int(kp.POOLER_SAMPLING_RATIO)) if with_keypoints else None,
        num_keypoints=int(kp.NUM_KEYPOINTS) if with_keypoints else 0,
        cascade_bbox_reg_weights=tuple(tuple(float(v) for v in w) for w in m.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS)
        if cascade else (),
    )


def spec_fields(cfg, surgery: SurgeryConfig, input_hw: tuple[int, int], levels: tuple[str, ...], batch: int,
                dynamic: bool) -> dict[str, Any]:
    """The HeadSpec fields every family reads alike: input and preprocessing, the dense head's levels (RPN, or
    RetinaNet's head) with their anchors and per-level top-k, the final NMS, batch and dynamic."""
    m = cfg.MODEL
    return dict(
        input_hw=input_hw,
        pixel_mean=tuple(float(v) for v in m.PIXEL_MEAN),
        pixel_std=tuple(float(v) for v in m.PIXEL_STD),
        input_format=cfg.INPUT.FORMAT,
        rpn_in_features=levels,
        **anchor_facts(cfg, levels, input_hw),
        rpn_pre_nms_topk=int(surgery.rpn.pre_nms_topk),
        score_threshold=float(surgery.nms.score_threshold),
        nms_iou=float(surgery.nms.iou_threshold),
        max_detections=int(surgery.nms.max_detections),
        batch=batch,
        dynamic=dynamic,
    )


class RCNNSurgeon:
    """Rewrites one export; `run()` returns the TensorRT-ready ModelProto and facts for the manifest."""

    def __init__(self, export: onnx.ModelProto, spec: HeadSpec):
        self.spec = spec
        folded = gs.import_onnx(export)
        folded.fold_constants().cleanup()  # makes the export's padding arithmetic static, so shapes infer
        self.graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(folded)))
        self.b = Builder(self.graph, "d2build")
        self.facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ pieces

    def features(self, names: tuple[str, ...]) -> list[gs.Tensor]:
        """FPN outputs by name: p2..p5 are fpn_output{k} convs, p6 the top block's pooling."""
        out = []
        for name in names:
            level = int(name[1:])
            if level <= 5:
                out.append(find_one(self.graph, f"backbone.fpn_output{level}", "Conv").outputs[0])
            else:
                out.append(find_one(self.graph, "backbone.top_block", "MaxPool").outputs[0])
        return out

    def input_and_preprocessing(self) -> gs.Variable:
        s, b = self.spec, self.b
        h, w = ("height", "width") if s.dynamic else s.input_hw
        inp = gs.Variable("input_tensor", np.float32, [s.batch, 3, h, w])
        self.input = inp
        stem = find_one(self.graph, "backbone.bottom_up.stem.conv1", "Conv")
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

    def rpn_levels(self) -> tuple[list[gs.Variable], list[int] | None, Any]:
        """Per RPN level the merged conv's rows [B, L+4, A*H*W]; the levels' anchor counts; the anchor table
        [N, 8] (w, h, w, h, cx, cy, 0, 0) of all levels in the rows' order."""
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
            conv = self._merged_rpn_conv(lvl, levels, o, d)
            rows.append(self.b.op("Reshape", [conv, np.array([s.batch, levels + 4, n], np.int64)],
                                  name=f"rpn_rows_level{lvl}"))
            sizes.append(n)
            anchor_rows.append(self._anchor_rows(s.anchors[lvl], a))
        self.facts["anchors"] = {"per_level": sizes, "total": sum(sizes)}
        return rows, sizes, np.ascontiguousarray(np.concatenate(anchor_rows, axis=1).T)

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
        boxes = self._decode(deltas, whwh, ctr, "rpn")
        wh = b.op("MatMul", [boxes, _CORNERS_TO_WH], name="rpn_box_sizes")
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

    def proposals(self) -> tuple[gs.Variable, gs.Variable]:
        """Detectron2's RPN as static ops and one EfficientNMS_TRT; returns (scores [B,P], boxes [B,P,4]).

        The threshold (logit about -87) keeps every real proposal, which puts EfficientNMS_TRT in its
        "dense" mode: masked candidates are not dropped but sorted last with score -32768 and can fill
        empty output slots, counted in num_detections. Their output score is sigmoid(-32768) = 0,
        while a real proposal's is > 0, so downstream validity is `score > 0`, not `row < num`.
        """
        s, b = self.spec, self.b
        _, scores, boxes, nonempty = self.rpn_candidates()
        scores = b.op("Where", [nonempty, scores, np.float32(-BIG)], name="rpn_drop_empty")
        num, rois, probs, levels_out = plugins.efficient_nms(
            b, boxes, scores, name="rpn_nms", max_output_boxes=s.rpn_post_nms_topk,
            score_threshold=RPN_SCORE_THRESHOLD, iou_threshold=s.rpn_iou, score_activation=1)
        self._nms_outputs(num, rois, probs, levels_out, s.rpn_post_nms_topk)
        return probs, rois

    def _merged_rpn_conv(self, lvl: int, levels: int, obj: gs.Node, dlt: gs.Node) -> gs.Variable:
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

    @staticmethod
    def _anchor_rows(anchors: np.ndarray, a: int) -> np.ndarray:
        """[8, N] rows (w, h, w, h, cx, cy, 0, 0) in (a, loc) order, computed as Detectron2 does."""
        boxes = anchors.reshape(-1, a, 4).transpose(1, 0, 2).reshape(-1, 4)
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + np.float32(0.5) * w
        cy = boxes[:, 1] + np.float32(0.5) * h
        z = np.zeros_like(w)
        return np.stack([w, h, w, h, cx, cy, z, z]).astype(np.float32)

    def clip_limits(self) -> Any:
        """[W, H, W, H] of the input, the clip limits of every box."""
        h, w = self.spec.input_hw
        return np.array([w, h, w, h], np.float32)

    def _decode(self, deltas: gs.Variable, whwh: Any, ctr: Any, tag: str, clip: bool = True) -> gs.Variable:
        """Box2BoxTransform.apply_deltas (weights already applied), then clip to the image (unless `clip` is
        False: RetinaNet's boxes enter NMS unclipped)."""
        b = self.b
        limit = np.array([FLOAT_MAX, FLOAT_MAX, SCALE_CLAMP, SCALE_CLAMP], np.float32)
        clamped = b.op("Min", [deltas, limit], name=f"{tag}_clamp_dwdh")
        grown = b.op("Exp", [clamped], name=f"{tag}_exp")
        u = b.op("Where", [np.array([False, False, True, True]), grown, clamped], name=f"{tag}_dxy_expwh")
        center = b.op("Add", [b.op("Mul", [u, whwh], name=f"{tag}_scale"), ctr], name=f"{tag}_center_size")
        corners = b.op("MatMul", [center, _CENTER_TO_CORNERS], name=f"{tag}_corners")
        return self.clip(corners, tag) if clip else corners

    def clip(self, boxes: gs.Variable, tag: str) -> gs.Variable:
        """Boxes.clip: corners into [0, W] x [0, H] of the input."""
        b = self.b
        low = b.op("Max", [boxes, np.float32(0)], name=f"{tag}_clip_low")
        return b.op("Min", [low, self.clip_limits()], name=f"{tag}_clip_high")

    def _nms_outputs(self, num, boxes, scores, classes, m: int) -> None:
        B = self.spec.batch
        num.dtype, num.shape = np.int32, [B, 1]
        boxes.dtype, boxes.shape = np.float32, [B, m, 4]
        scores.dtype, scores.shape = np.float32, [B, m]
        classes.dtype, classes.shape = np.int32, [B, m]

    def pyramid_roi_align(self, rois: gs.Variable, count: int, pooler: tuple[int, int], tag: str) -> gs.Variable:
        s = self.spec
        feats = self.features(s.roi_in_features)
        if len(feats) != plugins.ROI_ALIGN_LEVELS:
            raise GraphMismatch(f"{plugins.PYRAMID_ROI_ALIGN.op} pools {plugins.ROI_ALIGN_LEVELS} levels; "
                                f"ROI_HEADS.IN_FEATURES has {len(feats)}")
        out = plugins.pyramid_roi_align(self.b, rois, feats, name=f"{tag}_pooler", pooled_size=pooler[0],
                                        image_size=s.input_hw, sampling_ratio=pooler[1],
                                        fpn_scale=s.canonical_box_size)
        channels = feats[0].shape[1] if feats[0].shape else 256
        out.dtype, out.shape = np.float32, [s.batch, count, channels, pooler[0], pooler[0]]
        return out

    def box_stage(self, rois: gs.Variable, stage: BoxStage) -> tuple[gs.Variable, gs.Variable]:
        """One box head on the proposals `rois [B, P, 4]`: (class probabilities [B, P, C+1], decoded and clipped
        boxes [B, P, C+1, 4], or [B, P, 4] for class-agnostic regression)."""
        s, b, g = self.spec, self.b, self.graph
        B, p, c, t = s.batch, s.rpn_post_nms_topk, s.num_classes, stage.tag
        pooled = self.pyramid_roi_align(rois, p, s.box_pooler, f"box{t}")
        fc1 = find_one(g, f"roi_heads.box_head{stage.scope}.fc1", "Gemm")
        channels = pooled.shape[2]
        fc1.inputs[0] = b.op("Reshape", [pooled, np.array([B * p, channels * s.box_pooler[0] ** 2], np.int64)],
                             name=f"box_features{t}")
        cls = find_one(g, f"roi_heads.box_predictor{stage.scope}.cls_score", "Gemm")
        reg = find_one(g, f"roi_heads.box_predictor{stage.scope}.bbox_pred", "Gemm")
        k = self._fold_regression_weights(reg, c, stage)
        probs = b.op("Softmax", [cls.outputs[0]], {"axis": -1}, name=f"class_probs{t}")
        if B > 1 or len(s.box_stages) > 1:  # one stage at batch 1: the Where broadcasts [P, C+1] to [1, P, C+1]
            probs = b.op("Reshape", [probs, np.array([B, p, c + 1], np.int64)], name=f"class_probs_3d{t}")
        deltas = b.op("Reshape", [reg.outputs[0], np.array([B, p, k, 4], np.int64)], name=f"box_deltas{t}")
        params = b.op("MatMul", [b.op("Reshape", [rois, np.array([B, p, 1, 4], np.int64)], name=f"proposals_4d{t}"),
                                 _CORNERS_TO_PARAMS], name=f"proposal_params{t}")
        whwh, ctr = b.op("Split", [params, np.array([4, 4], np.int64)], {"axis": 3}, outputs=2,
                         name=f"proposal_split{t}")
        boxes = self._decode(deltas, whwh, ctr, f"box{t}")
        if stage.agnostic:
            boxes = b.op("Reshape", [boxes, np.array([B, p, 4], np.int64)], name=f"box_agnostic{t}")
        return probs, boxes

    def detections(self, rpn_scores: gs.Variable, rois: gs.Variable) -> list[gs.Variable]:
        """Box stage(s) on the proposals, Detectron2's fast_rcnn_inference as one EfficientNMS_TRT.

        A cascade (CascadeROIHeads._forward_box) runs its stages in turn, each on the previous stage's
        clipped boxes (`_create_proposals_from_boxes`), and scores the last stage's boxes with the mean of
        the stages' class probabilities (summed in stage order, times 1/stages, as Detectron2 does)."""
        s, b = self.spec, self.b
        B, p, c = s.batch, s.rpn_post_nms_topk, s.num_classes
        stages = s.box_stages
        total = boxes = None
        for stage in stages:
            probs, boxes = self.box_stage(rois if boxes is None else boxes, stage)
            total = probs if total is None else b.op("Add", [total, probs], name=f"cascade_score_sum{stage.tag}")
        if len(stages) > 1:
            total = b.op("Mul", [total, np.float32(1.0 / len(stages))], name="cascade_mean_scores")
        real = b.op("Greater", [b.op("Reshape", [rpn_scores, np.array([B, p, 1], np.int64)], name="rpn_scores_3d"),
                                np.float32(0)], name="real_proposals")
        probs = b.op("Where", [real, total, np.float32(0)], name="drop_padding_proposals")  # [B, P, C+1]
        outs = plugins.efficient_nms(b, boxes, probs, name="detection_nms", background_class=c,
                                     max_output_boxes=s.max_detections, score_threshold=s.score_threshold,
                                     iou_threshold=s.nms_iou)
        return self.name_detections(outs)

    def name_detections(self, outs: list[gs.Variable]) -> list[gs.Variable]:
        """The four detection tensors as the graph outputs every family ends in (static shapes)."""
        for v, name in zip(outs, ("num_detections", "detection_boxes", "detection_scores", "detection_classes")):
            v.name = name
        self._nms_outputs(*outs, self.spec.max_detections)
        return list(outs)

    def _fold_regression_weights(self, reg: gs.Node, num_classes: int, stage: BoxStage) -> int:
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

    def masks(self, det_classes: gs.Variable, det_boxes: gs.Variable) -> gs.Variable:
        """Mask head on the final boxes; each detection keeps its own class's mask, as probabilities."""
        s, b, g = self.spec, self.b, self.graph
        assert s.mask_pooler is not None
        B, d, c = s.batch, s.max_detections, s.num_classes
        pooled = self.pyramid_roi_align(det_boxes, d, s.mask_pooler, "mask")
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
        out.name, out.dtype, out.shape = "detection_masks", np.float32, [B, d, m, m]
        return out

    def keypoints(self, det_boxes: gs.Variable) -> gs.Variable:
        """Keypoint head on the final boxes: `detection_heatmaps [1, D, K, 56, 56]`, raw logits.

        The heatmaps leave the graph undecoded: Detectron2 resizes each detection's heatmaps to its
        own box size before the argmax, a data-dependent shape a static TensorRT graph cannot hold
        (a fixed-size stand-in would move keypoints by up to box/56 px). `processing.decode_keypoints`
        reproduces Detectron2's decode for all detections at once.
        """
        s, b, g = self.spec, self.b, self.graph
        assert s.keypoint_pooler is not None
        d, res = s.max_detections, s.keypoint_pooler[0]
        pooled = self.pyramid_roi_align(det_boxes, d, s.keypoint_pooler, "keypoint")
        first = find_one(g, "roi_heads.keypoint_head.conv_fcn1", "Conv")
        B = s.batch
        first.inputs[0] = b.op("Reshape", [pooled, np.array([B * d, pooled.shape[2], res, res], np.int64)],
                               name="keypoint_features")
        upsample = find_one(g, "roi_heads.keypoint_head", "Resize")  # the head's final x2 bilinear upsample
        m = 4 * res  # deconv and upsample double the pooled resolution twice
        out = b.op("Reshape", [upsample.outputs[0], np.array([B, d, s.num_keypoints, m, m], np.int64)],
                   name="keypoint_heatmaps")
        out.name, out.dtype, out.shape = "detection_heatmaps", np.float32, [B, d, s.num_keypoints, m, m]
        return out

    # ------------------------------------------------------------------ whole graph

    def forget_inner_shapes(self) -> None:
        """Shape inference recomputes every inner shape: the export's were traced at batch 1 (and one size)."""
        keep = {t.name for t in (*self.graph.inputs, *self.graph.outputs)}
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Variable) and t.name not in keep:
                t.shape = None

    def outputs(self) -> list[gs.Variable]:
        """The graph outputs: proposals, box stage(s) and detections, then the family's heads."""
        rpn_scores, rois = self.proposals()
        outs = self.detections(rpn_scores, rois)
        if self.spec.mask_pooler is not None:
            outs.append(self.masks(outs[3], outs[1]))
        if self.spec.keypoint_pooler is not None:
            outs.append(self.keypoints(outs[1]))
        return outs

    def run(self) -> tuple[onnx.ModelProto, dict[str, Any]]:
        g = self.graph
        inp = self.input_and_preprocessing()
        g.inputs, g.outputs = [inp], self.outputs()
        g.cleanup().toposort()
        self.forget_inner_shapes()
        self.check_graph()
        g.opset = OPSET
        g.import_domains = [onnx.helper.make_opsetid("", OPSET), *self.extra_domains()]
        model = gs.export_onnx(g)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        self.check_model(model)
        return model, self.facts

    def check_graph(self) -> None:
        """The plugin graph is static: no data-dependent op may be left."""
        left = sorted({n.op for n in self.graph.nodes} & {"If", "Loop", "NonZero", "Scan"})
        if left:
            raise GraphMismatch(f"surgery left data-dependent ops in the graph: {left}")

    def extra_domains(self) -> list[onnx.OperatorSetIdProto]:
        return [onnx.helper.make_opsetid(plugins.DOMAIN, plugins.DOMAIN_VERSION)]

    def check_model(self, model: onnx.ModelProto) -> None:
        """A last check of the exported graph (the standard flavour's: TensorRT can import every op)."""
