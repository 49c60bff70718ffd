"""Cascade Mask R-CNN (FPN): Detectron2's GeneralizedRCNN with CascadeROIHeads.

The backbone, RPN, mask head, export (TracingAdapter around `inference(..., do_postprocess=False)`)
and eager comparison are Mask R-CNN's (`MaskRCNN`). What differs is the box stage, which the shared
R-CNN surgeon (families/surgery/rcnn.py, both flavours) builds from `HeadSpec.cascade_bbox_reg_weights`,
following `CascadeROIHeads._forward_box`:

* three box heads and predictors (`roi_heads.box_head.0..2`, `roi_heads.box_predictor.0..2`), each
  with its own ROI pooling, class-agnostic regression and its own `BBOX_REG_WEIGHTS`
  ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)), folded into its bbox_pred;
* stage k > 0 pools the boxes stage k - 1 predicted, clipped to the image
  (`_create_proposals_from_boxes`; at inference nothing is dropped);
* the detection score is the mean of the three stages' softmax probabilities (summed in stage
  order, times 1/3, as Detectron2 computes it), and the boxes are the last stage's, shared by all
  classes: one EfficientNMS_TRT with boxes [B, P, 4], or the standard graph's class-wise
  NonMaxSuppression on the same boxes broadcast over the classes;
* the mask head runs on the final detections, as in Mask R-CNN.
"""

from __future__ import annotations

from d2build.families.mask_rcnn import RCNN_STRUCTURE, MaskRCNN

CASCADE_STAGES = 3


def _three_stage_weights(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == CASCADE_STAGES
            and all(isinstance(w, (list, tuple)) and len(w) == 4 for w in value))


# R-CNN's structure with CascadeROIHeads, class-agnostic regression and three box stages.
CASCADE_STRUCTURE = tuple(
    {"MODEL.ROI_HEADS.NAME": ("MODEL.ROI_HEADS.NAME", "Res5ROIHeads", ("CascadeROIHeads",), "not CascadeROIHeads"),
     "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False, (True,),
                                                  "class-specific box regression (Detectron2's cascade is "
                                                  "class-agnostic)")}.get(row[0], row)
    for row in RCNN_STRUCTURE
) + (
    ("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0],
                                                     [30.0, 30.0, 15.0, 15.0]], _three_stage_weights,
     f"not {CASCADE_STAGES} cascade stages of 4 weights"),
)


class CascadeRCNN(MaskRCNN):
    name = "cascade_rcnn"
    with_masks = True
    structure = CASCADE_STRUCTURE
    described_as = ("Cascade Mask R-CNN (GeneralizedRCNN, ResNet-FPN, RPN, CascadeROIHeads: three box stages with "
                    "class-agnostic regression, mask head)")


FAMILY = CascadeRCNN
