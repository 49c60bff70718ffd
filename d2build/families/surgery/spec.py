"""What surgery needs to know about a model, read once from its Detectron2 config (`HeadSpec`).

The spec is plain data (recorded in the manifest as facts): the input and its preprocessing, the
dense head's levels and anchors (the RPN, or RetinaNet's head), the ROI heads' poolers, the final
NMS, batch and dynamic shapes. Anchors come from Detectron2's own DefaultAnchorGenerator at the
recipe's input size, so no anchor is computed by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2build.graph import GraphMismatch
from d2build.recipe import SurgeryConfig


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
    #: Panoptic FPN: the semantic head's classes (SEM_SEG_HEAD.NUM_CLASSES) and stride; 0: no semantic head
    semantic_classes: int = 0
    semantic_stride: int = 4
    #: PointRend's mask head (instead of the 28x28 mask head); None: none
    point_rend: PointRendSpec | None = None
    #: convolutions of the box head before its fcs (ROI_BOX_HEAD.NUM_CONV; the LSJ and ViTDet "4conv1fc" heads:
    #: 4). Read from the config, never inferred from the export: a 4conv1fc head's fc1 takes C*R*R inputs, exactly
    #: the pooled features' size, so feeding fc1 directly builds a valid graph that skips the convs
    box_head_convs: int = 0

    @property
    def box_stages(self) -> tuple[BoxStage, ...]:
        """The box stages in order: Detectron2's one FastRCNN head, or a cascade's heads `box_head.0`, `.1`, ..."""
        if not self.cascade_bbox_reg_weights:
            return (BoxStage("", self.bbox_reg_weights, agnostic=False),)
        return tuple(BoxStage(f".{k}", tuple(w), agnostic=True, tag=f"_stage{k}")
                     for k, w in enumerate(self.cascade_bbox_reg_weights))


@dataclass(frozen=True)
class PointRendSpec:
    """PointRendMaskHead at inference (Detectron2's `_subdivision_inference`) as static data: every point set and
    grid is computed by Detectron2's own point_features functions here, so the graph holds them as constants."""

    stride: int  # of the feature both heads sample (ROI_MASK_HEAD.IN_FEATURES = POINT_HEAD.IN_FEATURES = [p2])
    pooler_side: int  # the coarse head's regular grid of points per box (ROI_MASK_HEAD.POOLER_RESOLUTION)
    pooler_points: np.ndarray  # [pooler_side^2, 2] box-normalised (x, y) of that grid
    coarse_side: int  # the coarse head's mask side (OUTPUT_SIDE_RESOLUTION)
    init_side: int  # side of the first point-head pass on a regular grid (after Detectron2's step skipping)
    init_points: np.ndarray  # [init_side^2, 2]
    num_points: int  # points refined per subdivision step (SUBDIVISION_NUM_POINTS)
    #: per subdivision step, the (x, y) of every cell of its 2x upsampled grid, row-major: [H*W, 2]
    step_grids: tuple[np.ndarray, ...]
    num_fc: int  # the point head's hidden layers (POINT_HEAD.NUM_FC), then its predictor
    coarse_pred_each_layer: bool

    @property
    def mask_side(self) -> int:
        return self.init_side * 2 ** len(self.step_grids)


def point_rend_spec(cfg) -> PointRendSpec:
    """PointRend's inference facts from the config, with Detectron2's own grid functions."""
    import torch
    from detectron2.projects.point_rend.point_features import (generate_regular_grid_point_coords,
                                                               get_uncertain_point_coords_on_grid)

    m = cfg.MODEL
    mh, ph = m.ROI_MASK_HEAD, m.POINT_HEAD
    for key, val, ok in (("MODEL.ROI_MASK_HEAD.NAME", mh.NAME, ("PointRendMaskHead",)),
                         ("MODEL.ROI_MASK_HEAD.POINT_HEAD_ON", mh.POINT_HEAD_ON, (True,)),
                         ("MODEL.ROI_MASK_HEAD.IN_FEATURES", tuple(mh.IN_FEATURES), (("p2",),)),
                         ("MODEL.POINT_HEAD.NAME", ph.NAME, ("StandardPointHead",)),
                         ("MODEL.POINT_HEAD.IN_FEATURES", tuple(ph.IN_FEATURES), (("p2",),)),
                         ("MODEL.POINT_HEAD.CLS_AGNOSTIC_MASK", ph.CLS_AGNOSTIC_MASK, (False,))):
        if val not in ok:
            raise GraphMismatch(f"{key}={val!r} is not supported by PointRend surgery (supported: {ok})")
    # PointRendMaskHead._init_point_head: a step whose points would cover its whole grid is skipped by doubling
    # the first pass's resolution instead
    init, steps, n = int(mh.OUTPUT_SIDE_RESOLUTION), int(ph.SUBDIVISION_STEPS), int(ph.SUBDIVISION_NUM_POINTS)
    while 4 * init ** 2 <= n:
        init, steps = init * 2, steps - 1
    grids = []
    for k in range(steps):
        side = init * 2 ** (k + 1)
        order = -torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side)  # topk keeps index order
        _, coords = get_uncertain_point_coords_on_grid(order, side * side)
        grids.append(coords[0].numpy().astype(np.float32))
    side = int(mh.POOLER_RESOLUTION)
    return PointRendSpec(
        stride=STRIDES["p2"], pooler_side=side,
        pooler_points=generate_regular_grid_point_coords(1, side, "cpu")[0].numpy().astype(np.float32),
        coarse_side=int(mh.OUTPUT_SIDE_RESOLUTION), init_side=init,
        init_points=generate_regular_grid_point_coords(1, init, "cpu")[0].numpy().astype(np.float32),
        num_points=n, step_grids=tuple(grids), num_fc=int(ph.NUM_FC),
        coarse_pred_each_layer=bool(ph.COARSE_PRED_EACH_LAYER))


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
              with_keypoints: bool = False, batch: int = 1, dynamic: bool = False, cascade: bool = False,
              semantic: bool = False, point_rend: bool = False) -> HeadSpec:
    """Read the config facts surgery needs; generate anchors for this input size with Detectron2's own code.

    `with_masks` / `with_keypoints` say which heads the family's graph carries; the config must
    have exactly those heads on (MODEL.MASK_ON, MODEL.KEYPOINT_ON). `cascade`: CascadeROIHeads (box
    stages with class-agnostic regression, ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS) instead of StandardROIHeads.
    `semantic`: Panoptic FPN's semantic head (SemSegFPNHead) as an output; `point_rend`: PointRend's mask head
    (coarse head + point head by subdivision) instead of the 28x28 one.
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
    if with_masks and not point_rend and (m.ROI_MASK_HEAD.POOLER_TYPE != "ROIAlignV2"
                                          or m.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK):
        raise GraphMismatch("mask head must use ROIAlignV2 pooling and class-specific masks")
    if semantic:
        sh = m.SEM_SEG_HEAD
        if sh.NAME != "SemSegFPNHead" or tuple(sh.IN_FEATURES) != ("p2", "p3", "p4", "p5") or sh.COMMON_STRIDE != 4:
            raise GraphMismatch(f"semantic head must be SemSegFPNHead on p2..p5 at stride 4 (config: {sh.NAME} on "
                                f"{list(sh.IN_FEATURES)}, stride {sh.COMMON_STRIDE})")
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
        if with_masks and not point_rend else None,
        point_rend=point_rend_spec(cfg) if point_rend else None,
        semantic_classes=int(m.SEM_SEG_HEAD.NUM_CLASSES) if semantic else 0,
        keypoint_pooler=(int(kp.POOLER_RESOLUTION), int(kp.POOLER_SAMPLING_RATIO)) if with_keypoints else None,
        num_keypoints=int(kp.NUM_KEYPOINTS) if with_keypoints else 0,
        cascade_bbox_reg_weights=tuple(tuple(float(v) for v in w) for w in m.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS)
        if cascade else (),
        box_head_convs=int(m.ROI_BOX_HEAD.NUM_CONV) if m.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead" else 0,
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
