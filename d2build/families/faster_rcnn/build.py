"""Faster R-CNN (FPN), build half: Mask R-CNN's without the mask head."""

from __future__ import annotations

from d2build.families.faster_rcnn import FasterRCNN
from d2build.families.mask_rcnn.build import MaskRCNNBuild


class FasterRCNNBuild(MaskRCNNBuild):
    family_class = FasterRCNN
    export_outputs = ("pred_boxes", "pred_classes", "scores", "image_size")


BUILD = FasterRCNNBuild
