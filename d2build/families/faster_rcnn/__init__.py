"""Faster R-CNN (FPN): Detectron2's GeneralizedRCNN with the box head only.

Export, eager comparison and the RPN / box-stage surgery are Mask R-CNN's (`MaskRCNN`) without the
mask head: the graph ends at the final NMS (`num_detections`, `detection_boxes`, `detection_scores`,
`detection_classes`), and verify compares boxes, classes and scores.
"""

from __future__ import annotations

from d2build.families.mask_rcnn import MaskRCNN


class FasterRCNN(MaskRCNN):
    name = "faster_rcnn"
    with_masks = False
    head_outputs = ()
    described_as = "Faster R-CNN (GeneralizedRCNN, ResNet/ResNeXt-FPN, RPN, StandardROIHeads, no mask or keypoint head)"


FAMILY = FasterRCNN
