"""The keypoint family's decode_keypoints against Detectron2's heatmaps_to_keypoints, and that it is one vectorised pass.

Detectron2 is the reference: for each ROI it bicubically resizes the [K, 56, 56] logits to the box's
ceil'ed size, takes the argmax and scores it against the 56x56 map. decode_keypoints must give the
same (x, y, score) for every detection at once, whatever the box sizes, including boxes smaller
than the heatmap, sub-pixel boxes and boxes sticking out of the image.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2build.families import family
from d2build.families.keypoint_rcnn import decode_keypoints
from d2build.processing import Letterbox

K, S = 17, 56


def _d2_decode(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    from detectron2.structures.keypoints import heatmaps_to_keypoints

    out = heatmaps_to_keypoints(torch.from_numpy(maps), torch.from_numpy(boxes))
    return out[:, :, [0, 1, 3]].numpy()  # (x, y, score), as keypoint_rcnn_inference keeps them


def _boxes(rng: np.random.Generator, n: int, lo: float, hi: float, hw=(800, 1000)) -> np.ndarray:
    """Boxes with sides log-uniform in [lo, hi], centres anywhere in the image: many stick out of it."""
    h, w = hw
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w, n), rng.uniform(-0.1 * h, 1.1 * h, n)
    bw, bh = np.exp(rng.uniform(np.log(lo), np.log(hi), (2, n)))
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)


def _heatmaps(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """'smooth': like the keypoint head (a x2 bilinear upsample of a coarser map); 'noise': worst case."""
    if kind == "noise":
        return (3 * rng.normal(size=(n, K, S, S))).astype(np.float32)
    coarse = torch.from_numpy((4 * rng.normal(size=(n, K, S // 4, S // 4))).astype(np.float32))
    return F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False).numpy()


def _assert_same(ref: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32
    dist = np.hypot(ref[..., 0] - got[..., 0], ref[..., 1] - got[..., 1])
    # Bounds of the issue: median <= 1 px, p95 <= 3 px. The decode is exact, so ask for far more:
    # only float rounding (exact ties between pixels) may pick a neighbouring pixel.
    assert np.median(dist) <= 1e-3 and np.percentile(dist, 95) <= 1e-3, (np.median(dist), np.percentile(dist, 95))
    assert (dist <= 1e-3).mean() >= 0.998, f"{(dist > 1e-3).sum()} of {dist.size} keypoints differ, max {dist.max()}"
    np.testing.assert_allclose(got[..., 2], ref[..., 2], rtol=1e-4)


@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize("sides", [(0.3, 60.0), (20.0, 400.0), (200.0, 800.0)], ids=["small", "people", "large"])
def test_decode_matches_detectron2(kind, sides):
    rng = np.random.default_rng([len(kind), int(sides[0] * 10), int(sides[1])])
    n = 60
    boxes = _boxes(rng, n, *sides)
    maps = _heatmaps(rng, n, kind)
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > 1000) | (boxes[:, 3] > 800)
    assert outside.sum() >= 5  # boxes partly outside the image are part of the test
    _assert_same(_d2_decode(maps, boxes), decode_keypoints(maps, boxes))


def test_decode_edge_cases_match_detectron2():
    rng = np.random.default_rng(7)
    maps = _heatmaps(rng, 8, "smooth")
    maps[1] = 0.0  # a flat map: every pixel ties, the first one wins (torch's argmax)
    maps[2, :, 10, 20] = 50.0  # one sharp peak
    boxes = np.array([
        [10, 10, 66, 66],  # exactly 56 x 56: no resampling
        [0, 0, 100, 80],
        [-30.5, -20.25, 40.75, 90.5],  # partly outside, fractional
        [5, 5, 5.2, 5.4],  # sub-pixel: clamped to 1 x 1
        [100, 100, 99, 98],  # inverted: clamped to 1 x 1
        [0, 0, 1344, 1344],  # as large as a 1344 input
        [3.3, 7.7, 3.3 + 112, 7.7 + 28],  # exact multiples of the map size
        [990, 790, 1400, 1200],  # mostly outside
    ], np.float32)
    _assert_same(_d2_decode(maps, boxes), decode_keypoints(maps, boxes))


def test_decode_empty_and_shape_errors():
    assert decode_keypoints(np.zeros((0, K, S, S), np.float32), np.zeros((0, 4), np.float32)).shape == (0, K, 3)
    with pytest.raises(ValueError, match="heatmaps must be"):
        decode_keypoints(np.zeros((2, K, S, 28), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="2 heatmaps but 3 boxes"):
        decode_keypoints(np.zeros((2, K, S, S), np.float32), np.zeros((3, 4), np.float32))


def _python_calls(fn, *args) -> int:
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return calls


def test_decode_is_one_vectorised_pass():
    """100 detections cost the same Python work as 10: no loop per ROI (the speed-up itself is a benchmark)."""
    rng = np.random.default_rng(3)
    maps, boxes = _heatmaps(rng, 100, "smooth"), _boxes(rng, 100, 40.0, 400.0)
    decode_keypoints(maps[:2], boxes[:2])  # warm caches and lazy imports
    assert _python_calls(decode_keypoints, maps[:10], boxes[:10]) == _python_calls(decode_keypoints, maps, boxes)
    _assert_same(_d2_decode(maps, boxes), decode_keypoints(maps, boxes))


def test_family_decode_decodes_heatmaps_and_maps_keypoints_to_original():
    rng = np.random.default_rng(11)
    m = 100
    lb = Letterbox(original_hw=(400, 600), input_hw=(640, 640), scale=640 / 600, resized_hw=(427, 640))
    boxes_in = _boxes(rng, m, 30.0, 300.0, hw=lb.resized_hw).clip(0, 640)  # graph boxes: clipped to the input
    boxes_in[:, 2:] = np.maximum(boxes_in[:, 2:], boxes_in[:, :2] + 1)
    boxes_in[:, 1] = np.minimum(boxes_in[:, 1], 420)  # every box reaches into the photograph ...
    boxes_in[5] = [100, 500, 200, 600]  # ... but one, entirely in the padding: dropped, as Detectron2 does
    maps = _heatmaps(rng, m, "smooth")
    outputs = {
        "num_detections": np.array([[57]], np.int32),
        "detection_boxes": boxes_in[None],
        "detection_scores": np.linspace(0.9, 0.1, m, dtype=np.float32)[None],
        "detection_classes": np.zeros((1, m), np.int32),
        "detection_heatmaps": maps[None],
    }
    det = family("keypoint_rcnn").decode(outputs, lb)
    assert len(det) == 56 and det.keypoints.shape == (56, K, 3) and det.masks is None
    kept = np.r_[0:5, 6:57]
    np.testing.assert_array_equal(det.scores, outputs["detection_scores"][0, kept])
    ref = _d2_decode(maps[kept], boxes_in[kept])
    sx, sy = lb.scale_xy
    ref[..., 0] /= sx
    ref[..., 1] /= sy
    _assert_same(ref, det.keypoints)

    # Detectron2's side (Instances with its own decode) goes through the same mapping and dropping.
    from detectron2.structures import Boxes, Instances

    from d2build.processing import detections_from_instances

    inst = Instances(lb.input_hw, pred_boxes=Boxes(torch.from_numpy(boxes_in[:57].copy())),
                     scores=torch.from_numpy(outputs["detection_scores"][0, :57].copy()),
                     pred_classes=torch.zeros(57, dtype=torch.int64),
                     pred_keypoints=torch.from_numpy(_d2_decode(maps[:57], boxes_in[:57])))
    d2 = detections_from_instances(inst, lb)
    np.testing.assert_array_equal(d2.boxes, det.boxes)
    _assert_same(d2.keypoints, det.keypoints)
