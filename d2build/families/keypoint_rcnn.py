"""Keypoint R-CNN (FPN): what d2build knows about Detectron2's person-keypoint family.

The same GeneralizedRCNN as Mask R-CNN (backbone, RPN, box head: `MaskRCNN` supplies all of
that) with a keypoint head instead of a mask head. Three things are specific:

* Export. Detectron2's keypoint head ends in `keypoint_rcnn_inference` -> `heatmaps_to_keypoints`,
  a per-detection loop of data-dependent bicubic resizes that the TorchScript exporter cannot trace
  (`aten::index ... unknown rank`). During tracing only, `keypoint_rcnn_inference` is replaced by a
  function that attaches the raw heatmaps as `pred_keypoint_heatmaps` (the field Detectron2 itself
  sets next to `pred_keypoints`). Everything else runs Detectron2's own inference path unchanged, so
  the export is the model up to the decode; re-assembling the ROI heads by hand instead would
  duplicate Detectron2's control flow (and its private `_forward_box`) and could drift from it.
* Graph. Surgery adds the keypoint pooler (PyramidROIAlign_TRT, 14x14) and the keypoint head on
  the final detection boxes; the graph outputs `detection_heatmaps [1, 100, 17, 56, 56]` in the
  detections' order (see `rcnn_graph.RCNNSurgeon.keypoints` for why the decode is not in the graph).
* Decode and verify. `processing.decode_keypoints` turns heatmaps into (x, y, score) exactly as
  `heatmaps_to_keypoints` does, for all detections at once; verify compares the keypoints of
  matched detections with Detectron2's (`verify.keypoint_median_px`, `verify.keypoint_p95_px`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from d2build.families.mask_rcnn import MaskRCNN

EXPORT_OUTPUTS = ("pred_boxes", "pred_classes", "pred_keypoint_heatmaps", "scores", "image_size")


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


class KeypointRCNN(MaskRCNN):
    name = "keypoint_rcnn"
    with_masks = False
    with_keypoints = True
    export_outputs = EXPORT_OUTPUTS

    def export(self, model, image_chw: np.ndarray, path: Path) -> dict[str, np.ndarray]:
        with raw_heatmaps():
            return super().export(model, image_chw, path)

    @staticmethod
    def verify_extra(ref, got, match, verify: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Keypoints of matched detections: distance to Detectron2's in original pixels, score agreement."""
        stats = keypoint_agreement(ref, got, match.pairs)
        problems = []
        if stats["keypoint_median_px"] is None:
            return stats, problems
        if stats["keypoint_median_px"] > verify["keypoint_median_px"]:
            problems.append(f"median keypoint distance {stats['keypoint_median_px']:.2f} px "
                            f"(> verify.keypoint_median_px={verify['keypoint_median_px']})")
        if stats["keypoint_p95_px"] > verify["keypoint_p95_px"]:
            problems.append(f"95th percentile keypoint distance {stats['keypoint_p95_px']:.2f} px "
                            f"(> verify.keypoint_p95_px={verify['keypoint_p95_px']})")
        return stats, problems


def keypoint_agreement(ref, got, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Distances between paired detections' keypoints (x, y) and their largest score difference."""
    if ref.keypoints is None or got.keypoints is None:
        raise ValueError("keypoints are missing on one side: Detectron2 "
                         f"{'has' if ref.keypoints is not None else 'lacks'} them, the graph "
                         f"{'has' if got.keypoints is not None else 'lacks'} them")
    if not pairs:
        return {"keypoints": 0, "keypoint_median_px": None, "keypoint_p95_px": None,
                "keypoint_max_px": None, "keypoint_max_score_diff": None}
    i, j = (np.array(v) for v in zip(*pairs, strict=True))
    a, b = ref.keypoints[i], got.keypoints[j]
    dist = np.hypot(a[..., 0] - b[..., 0], a[..., 1] - b[..., 1]).reshape(-1)
    return {
        "keypoints": int(dist.size),
        "keypoint_median_px": float(np.median(dist)),
        "keypoint_p95_px": float(np.percentile(dist, 95)),
        "keypoint_max_px": float(dist.max()),
        "keypoint_max_score_diff": float(np.abs(a[..., 2] - b[..., 2]).max()),
    }
