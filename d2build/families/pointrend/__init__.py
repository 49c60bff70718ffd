"""PointRend Mask R-CNN (FPN), runtime half: Mask R-CNN with PointRend's mask head, masks at 224x224.

Detectron2's `detectron2.projects.point_rend` (in sal-detectron2; its configs are not, so the recipe
carries one: recipes/detectron2/pointrend_rcnn_R_50_FPN_3x_coco.yaml). The backbone, RPN and box stage
are Mask R-CNN's; the mask head is `PointRendMaskHead`: a coarse head (a 2x2 conv and three FCs on p2
sampled at a regular 14x14 grid of points in each box) predicts 7x7 logits, and a point head (a 1x1
Conv1d MLP on p2's features and the coarse logits at each point) refines them by adaptive subdivision:
a first pass on a regular 28x28 grid, then three steps that upsample x2 and re-predict the 784 most
uncertain cells. The graph runs those steps with static shapes (families/surgery/rcnn.py,
`RCNNSurgeon.point_rend_masks`) and outputs `detection_masks [B, D, 224, 224]` probabilities, which
decode like Mask R-CNN's (Detectron2's paste_masks_in_image of any mask size). Verify compares the
pasted masks with Detectron2's (mean mask IoU, `verify.min_mask_iou`).
"""

from __future__ import annotations

from typing import Any

from d2build.families.mask_rcnn import RCNN_STRUCTURE, MaskRCNN

# Mask R-CNN's structure with PointRend's mask head and point head, as the shipped config writes them.
POINTREND_STRUCTURE: tuple[tuple[str, Any, Any, str], ...] = RCNN_STRUCTURE + (
    ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", ("PointRendMaskHead",), "not PointRend's mask head"),
    ("MODEL.ROI_MASK_HEAD.POINT_HEAD_ON", False, (True,), "PointRend's coarse head without its point head"),
    ("MODEL.ROI_MASK_HEAD.IN_FEATURES", ["p2"], (["p2"],), "a coarse head on other features than p2"),
    ("MODEL.POINT_HEAD.NAME", "StandardPointHead", ("StandardPointHead",), "another point head (implicit PointRend)"),
    ("MODEL.POINT_HEAD.IN_FEATURES", ["p2"], (["p2"],), "a point head on other features than p2"),
    ("MODEL.POINT_HEAD.CLS_AGNOSTIC_MASK", False, (False,), "class-agnostic point-head masks"),
)


class PointRend(MaskRCNN):
    name = "pointrend"
    with_masks = True
    structure = POINTREND_STRUCTURE
    described_as = ("PointRend Mask R-CNN (GeneralizedRCNN, ResNet-FPN, RPN, StandardROIHeads, PointRendMaskHead: "
                    "coarse head and point head by adaptive subdivision)")


FAMILY = PointRend
