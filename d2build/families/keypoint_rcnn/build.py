"""Keypoint R-CNN (FPN), build half: Mask R-CNN's, exported with the keypoint head's raw heatmaps.

Why the heatmaps leave the graph undecoded: see this package's __init__.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from d2build.families.keypoint_rcnn import KeypointRCNN
from d2build.families.mask_rcnn.build import MaskRCNNBuild


@contextlib.contextmanager
def raw_heatmaps() -> Iterator[None]:
    """While active, Detectron2's keypoint head returns heatmaps instead of decoding them."""
    from unittest import mock

    from detectron2.modeling.roi_heads import keypoint_head

    def attach(pred_keypoint_logits, pred_instances) -> None:
        counts = [len(i) for i in pred_instances]
        for inst, maps in zip(pred_instances, pred_keypoint_logits.split(counts, dim=0), strict=True):
            inst.pred_keypoint_heatmaps = maps

    with mock.patch.object(keypoint_head, "keypoint_rcnn_inference", attach):
        yield


class KeypointRCNNBuild(MaskRCNNBuild):
    family_class = KeypointRCNN
    export_outputs = ("pred_boxes", "pred_classes", "pred_keypoint_heatmaps", "scores", "image_size")

    def export(self, model, image_chw: np.ndarray, path: Path) -> dict[str, np.ndarray]:
        with raw_heatmaps():
            return super().export(model, image_chw, path)


BUILD = KeypointRCNNBuild
