"""Mask R-CNN (FPN), runtime half: its outputs, how its masks decode, which Detectron2 configs it builds.

Detectron2's GeneralizedRCNN with FPN and a mask head; Faster, Keypoint and Cascade R-CNN subclass
it. The build half (export, eager comparison, surgery) is build.py beside this file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from d2build.families.base import Family, Outputs
from d2build.processing import paste_masks

# What the R-CNN surgery handles, as (key, Detectron2's default, accepted values, what anything else is).
RCNN_STRUCTURE: tuple[tuple[str, Any, Any, str], ...] = (
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN", ("GeneralizedRCNN",), "another meta-architecture"),
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone", ("build_resnet_fpn_backbone",), "a backbone without FPN (C4/DC5)"),
    ("MODEL.PROPOSAL_GENERATOR.NAME", "RPN", ("RPN",), "not an RPN"),
    ("MODEL.ROI_HEADS.NAME", "Res5ROIHeads", ("StandardROIHeads",), "not the standard FPN ROI heads"),
    ("MODEL.RESNETS.RES5_DILATION", 1, (1,), "a dilated C5 (DC5)"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False] * 4, ([False] * 4,), "deformable convolutions"),
    ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False, (False,), "class-agnostic box regression"),
    ("MODEL.ROI_BOX_HEAD.NAME", "", ("FastRCNNConvFCHead",), "another box head"),
    ("MODEL.ROI_BOX_HEAD.NUM_CONV", 0, (0,), "a box head with convolutions"),
)
#: the 28x28 mask head (PointRend's is another family's)
MASK_HEAD_ROW = ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", ("MaskRCNNConvUpsampleHead",),
                 "another mask head")


class MaskRCNN(Family):
    name = "mask_rcnn"
    with_masks = True
    with_keypoints = False
    head_outputs = (Outputs.MASKS,)
    structure = RCNN_STRUCTURE + (MASK_HEAD_ROW,)
    described_as = "Mask R-CNN (GeneralizedRCNN, ResNet/ResNeXt-FPN, RPN, StandardROIHeads, mask head)"
    test_settings = (("surgery.nms.iou_threshold", "MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5),
                     ("surgery.nms.score_threshold", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05),
                     ("surgery.nms.max_detections", "TEST.DETECTIONS_PER_IMAGE", 100),
                     ("surgery.rpn.pre_nms_topk", "MODEL.RPN.PRE_NMS_TOPK_TEST", 1000),
                     ("surgery.rpn.post_nms_topk", "MODEL.RPN.POST_NMS_TOPK_TEST", 1000),
                     ("surgery.rpn.iou_threshold", "MODEL.RPN.NMS_THRESH", 0.7))

    def decode_heads(self, outputs, image_index, rows, boxes_input, boxes, lb, mask_threshold) -> dict[str, Any]:
        """Masks of the kept detections pasted into the original image (Detectron2's paste_masks_in_image)."""
        if not self.with_masks:
            return {}
        raw = np.asarray(outputs[Outputs.MASKS], dtype=np.float32)[image_index, rows]
        return {"masks": paste_masks(raw, boxes, lb.original_hw, threshold=mask_threshold)}


FAMILY = MaskRCNN
