"""Mask R-CNN (FPN): everything d2build knows about this Detectron2 family, in one place.

How to export it (TracingAdapter around `inference(..., do_postprocess=False)`), what the export's
outputs mean, how Detectron2 eager is run for comparison (same letterboxed input, the recipe's
thresholds), and which surgery turns the export into the TensorRT-ready graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from d2build.families.base import Family
from d2build.recipe import GraphSpec, SurgeryConfig
from d2build.processing import paste_masks

EXPORT_OUTPUTS = ("pred_boxes", "pred_classes", "pred_masks", "scores", "image_size")

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


class MaskRCNN(Family):
    """Detectron2's GeneralizedRCNN with FPN and a mask head; Faster and Keypoint R-CNN subclass it."""

    name = "mask_rcnn"
    with_masks = True
    with_keypoints = False
    export_outputs = EXPORT_OUTPUTS
    head_outputs = ("detection_masks",)
    structure = RCNN_STRUCTURE
    described_as = "Mask R-CNN (GeneralizedRCNN, ResNet/ResNeXt-FPN, RPN, StandardROIHeads, mask head)"
    #: CascadeROIHeads instead of StandardROIHeads (cascade_rcnn.py)
    cascade = False

    def eager_overrides(self, surgery: SurgeryConfig) -> dict[str, Any]:
        """The recipe's thresholds as Detectron2 config keys, so eager runs what the graph runs."""
        return {
            "MODEL.ROI_HEADS.NMS_THRESH_TEST": surgery.nms.iou_threshold,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": surgery.nms.score_threshold,
            "TEST.DETECTIONS_PER_IMAGE": surgery.nms.max_detections,
            "MODEL.RPN.PRE_NMS_TOPK_TEST": surgery.rpn.pre_nms_topk,
            "MODEL.RPN.POST_NMS_TOPK_TEST": surgery.rpn.post_nms_topk,
            "MODEL.RPN.NMS_THRESH": surgery.rpn.iou_threshold,
        }

    def inference(self, model, inputs):
        """GeneralizedRCNN.inference without post-processing: boxes in input pixels, 28x28 mask probabilities."""
        return model.inference(inputs, do_postprocess=False)

    def decode_heads(self, outputs, image_index, rows, boxes_input, boxes, lb, mask_threshold) -> dict[str, Any]:
        """Masks of the kept detections pasted into the original image (Detectron2's paste_masks_in_image)."""
        if not self.with_masks:
            return {}
        raw = np.asarray(outputs["detection_masks"], dtype=np.float32)[image_index, rows]
        return {"masks": paste_masks(raw, boxes, lb.original_hw, threshold=mask_threshold)}

    def surgery(self, export_model, cfg, graph: GraphSpec):
        """The TensorRT-ready graph: plugin nodes (`surgery.ops=plugins`) or standard ONNX ops (`standard`,
        which may also take inputs of any size: the schema refuses model.dynamic with plugins)."""
        from d2build.families.rcnn_graph import RCNNSurgeon, head_spec
        from d2build.families.rcnn_standard import StandardSurgeon

        spec = head_spec(cfg, graph.surgery, graph.input, with_masks=self.with_masks, with_keypoints=self.with_keypoints,
                         batch=graph.batch, dynamic=graph.dynamic is not None, cascade=self.cascade)
        surgeon = StandardSurgeon if graph.ops == "standard" else RCNNSurgeon
        return surgeon(export_model, spec).run()

