"""Tests for d2build.reference: EfficientNMS_TRT / PyramidROIAlign_TRT semantics and the ORT executor.

Hand-computed cases pin the plugin rules read from NVIDIA's sources (>= score threshold, >= IoU threshold,
strict level thresholds, clamped samples, ...); torchvision serves as an independent implementation
wherever its semantics coincide with the plugin's.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

from d2build.reference import (
    PluginAttributeError,
    ReferenceSession,
    efficient_nms,
    lower_plugin_nodes,
    plugin_attributes,
    plugin_nodes,
    pyramid_roi_align,
    pyramid_roi_levels,
    register_reference_ops,
)

F32 = np.float32


def _nms(boxes, scores, anchors=None, **kw):
    """efficient_nms on lists; defaults suited to the small hand cases."""
    kw.setdefault("score_threshold", 0.1)
    kw.setdefault("iou_threshold", 0.5)
    kw.setdefault("max_output_boxes", 10)
    a = None if anchors is None else np.asarray(anchors, F32)
    return efficient_nms(np.asarray(boxes, F32), np.asarray(scores, F32), a, **kw)


def _far_boxes(n: int) -> list[list[float]]:
    """n disjoint unit-spaced boxes (no suppression between them)."""
    return [[10.0 * i, 0.0, 10.0 * i + 5.0, 5.0] for i in range(n)]


# --------------------------------------------------------------------------- #
# EfficientNMS_TRT: hand-computed cases
# --------------------------------------------------------------------------- #


def test_score_threshold_is_inclusive():
    below = np.nextafter(F32(0.5), F32(0))
    num, boxes, scores, classes = _nms([_far_boxes(3)], [[[0.5], [below], [0.7]]], score_threshold=0.5)
    assert num.tolist() == [[2]]
    assert scores[0, :2].tolist() == [pytest.approx(0.7), 0.5]
    assert boxes[0, 1].tolist() == _far_boxes(3)[0]


def test_iou_threshold_is_inclusive_and_has_no_plus_one():
    # inter 2, union 4 -> IoU exactly 0.5 (with +1 pixel areas it would be 6/10).
    pair = [[0, 0, 3, 1], [1, 0, 4, 1]]
    num, *_ = _nms([pair], [[[0.9], [0.8]]], iou_threshold=0.5)
    assert num[0, 0] == 1
    num, *_ = _nms([pair], [[[0.9], [0.8]]], iou_threshold=float(np.nextafter(F32(0.5), F32(1))))
    assert num[0, 0] == 2
    # torchvision suppresses only IoU > threshold: the plugin differs exactly here.
    kept = torchvision.ops.nms(torch.tensor(pair, dtype=torch.float32), torch.tensor([0.9, 0.8]), 0.5)
    assert len(kept) == 2


def test_flipped_corners_reordered_for_iou_but_output_as_given():
    flipped = [4, 1, 1, 0]  # same box as [1, 0, 4, 1]
    num, boxes, *_ = _nms([[[0, 0, 3, 1], flipped]], [[[0.8], [0.9]]], iou_threshold=0.5)
    assert num[0, 0] == 1
    assert boxes[0, 0].tolist() == flipped


def test_zero_area_boxes_never_suppress():
    num, *_ = _nms([[[5, 5, 5, 9], [5, 5, 5, 9]]], [[[0.9], [0.8]]], iou_threshold=0.1)
    assert num[0, 0] == 2


def test_per_class_versus_class_agnostic():
    same_box = [[0, 0, 10, 10], [0, 0, 10, 10]]
    scores = [[[0.9, 0.0], [0.0, 0.8]]]  # box 0 -> class 0, box 1 -> class 1
    num, _, _, classes = _nms([same_box], scores)
    assert num[0, 0] == 2 and classes[0, :2].tolist() == [0, 1]
    num, _, _, classes = _nms([same_box], scores, class_agnostic=1)
    assert num[0, 0] == 1 and classes[0, 0] == 0


def test_same_box_suppressed_within_a_class_only():
    # one box scoring in two classes: per class both survive, agnostic only the best.
    num, _, scores, classes = _nms([[[0, 0, 10, 10]]], [[[0.6, 0.7]]])
    assert num[0, 0] == 2 and classes[0, :2].tolist() == [1, 0]
    assert _nms([[[0, 0, 10, 10]]], [[[0.6, 0.7]]], class_agnostic=1)[0][0, 0] == 1


def test_background_class_is_skipped():
    num, _, scores, classes = _nms([_far_boxes(2)], [[[0.95, 0.3], [0.2, 0.9]]], background_class=0)
    assert num[0, 0] == 2
    assert classes[0, :2].tolist() == [1, 1]
    assert scores[0, :2].tolist() == [pytest.approx(0.9), pytest.approx(0.3)]


def test_output_sorted_across_classes_and_zero_padded():
    scores = [[[0.2, 0.0], [0.0, 0.9], [0.5, 0.0]]]
    num, boxes, out_scores, classes = _nms([_far_boxes(3)], scores, max_output_boxes=6)
    assert num[0, 0] == 3
    assert out_scores[0].tolist() == pytest.approx([0.9, 0.5, 0.2, 0, 0, 0])
    assert classes[0].tolist() == [1, 0, 0, 0, 0, 0]
    assert boxes[0, 0].tolist() == _far_boxes(3)[1]
    assert not boxes[0, 3:].any() and not out_scores[0, 3:].any() and not classes[0, 3:].any()
    assert (num.dtype, boxes.dtype, out_scores.dtype, classes.dtype) == (np.int32, F32, F32, np.int32)


def test_ties_keep_element_order():
    num, boxes, _, classes = _nms([_far_boxes(3)], [[[0.5, 0.5], [0.5, 0.0], [0.0, 0.5]]], max_output_boxes=4)
    assert num[0, 0] == 4
    assert classes[0].tolist() == [0, 1, 0, 1]  # elements (0,0), (0,1), (1,0), (2,1)
    assert boxes[0, 2, 0] == 10 and boxes[0, 3, 0] == 20


def test_max_output_boxes_cut():
    num, boxes, scores, _ = _nms([_far_boxes(5)], [[[0.9], [0.8], [0.7], [0.6], [0.5]]], max_output_boxes=2)
    assert num[0, 0] == 2 and boxes.shape == (1, 2, 4)
    assert scores[0].tolist() == pytest.approx([0.9, 0.8])


def test_pre_nms_topk_cut_is_global_across_classes():
    scores = [[[0.9, 0.85], [0.8, 0.1], [0.7, 0.75]]]
    num, _, out_scores, _ = _nms([_far_boxes(3)], scores, pre_nms_topk=3)
    assert num[0, 0] == 3
    assert out_scores[0, :3].tolist() == pytest.approx([0.9, 0.85, 0.8])


def test_pre_nms_topk_happens_before_suppression():
    # the top-2 candidates suppress each other; the third never enters NMS.
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    assert _nms([boxes], [[[0.9], [0.8], [0.7]]], pre_nms_topk=2)[0][0, 0] == 1
    assert _nms([boxes], [[[0.9], [0.8], [0.7]]])[0][0, 0] == 2


def test_score_activation_compares_logits_and_outputs_sigmoid():
    logits = [[[2.0], [0.0], [-0.1]]]
    num, _, scores, _ = _nms([_far_boxes(3)], logits, score_threshold=0.5, score_activation=1)
    assert num[0, 0] == 2  # logit(0.5) == 0 and 0.0 >= 0
    assert scores[0, :2].tolist() == pytest.approx([1 / (1 + math.exp(-2.0)), 0.5], abs=1e-7)
    # a threshold of 0 becomes -32768 in logit space: everything passes.
    num, _, scores, _ = _nms([_far_boxes(2)], [[[-50.0], [-60.0]]], score_threshold=0.0, score_activation=1)
    assert num[0, 0] == 2 and 0 < scores[0, 1] < scores[0, 0] < 1e-20


def test_raw_scores_without_activation():
    num, _, scores, _ = _nms([_far_boxes(2)], [[[0.3], [0.25]]], score_threshold=0.25)
    assert num[0, 0] == 2 and scores[0, :2].tolist() == pytest.approx([0.3, 0.25])


def test_dense_path_pads_with_fill_score():
    # score_threshold < 0.007 switches the plugin to its dense kernel: failing and background elements
    # get score -32768 but still enter NMS and fill remaining output slots.
    num, _, scores, classes = _nms([_far_boxes(2)], [[[0.9, 0.8], [0.004, 0.001]]], score_threshold=0.005,
                                   background_class=1)
    assert num[0, 0] == 4
    assert scores[0].tolist()[:4] == [pytest.approx(0.9), -32768.0, -32768.0, -32768.0]
    # the sparse kernel (threshold >= 0.007) drops them.
    num, *_ = _nms([_far_boxes(2)], [[[0.9, 0.8], [0.004, 0.001]]], score_threshold=0.01, background_class=1)
    assert num[0, 0] == 1


def test_box_coding_center_size_decode_with_anchors():
    anchors = [[[10.0, 20.0, 4.0, 8.0]]]  # cx, cy, w, h
    deltas = [[[0.5, -0.25, math.log(2.0), 0.0]]]
    num, boxes, *_ = _nms(deltas, [[[0.9]]], anchors, box_coding=1)
    assert num[0, 0] == 1
    assert boxes[0, 0].tolist() == pytest.approx([8.0, 14.0, 16.0, 22.0], abs=1e-5)


def test_box_coding_center_size_without_anchors_and_corner_anchors():
    _, boxes, *_ = _nms([[[10.0, 20.0, 4.0, 8.0]]], [[[0.9]]], box_coding=1)
    assert boxes[0, 0].tolist() == [8.0, 16.0, 12.0, 24.0]
    # corner coding with anchors adds the (reordered) anchor corners.
    _, boxes, *_ = _nms([[[1.0, 2.0, -1.0, 3.0]]], [[[0.9]]], [[[0.0, 0.0, 10.0, 10.0]]], box_coding=0)
    assert boxes[0, 0].tolist() == [-1.0, 2.0, 11.0, 13.0]


def test_per_class_boxes_and_batch_anchors():
    boxes = np.zeros((2, 1, 2, 4), F32)
    boxes[0, 0] = [[0, 0, 1, 1], [5, 5, 6, 6]]
    boxes[1, 0] = [[1, 1, 2, 2], [7, 7, 9, 9]]
    scores = np.array([[[0.1, 0.9]], [[0.9, 0.1]]], F32)
    num, out, _, classes = _nms(boxes, scores, score_threshold=0.5)
    assert num.tolist() == [[1], [1]]
    assert out[0, 0].tolist() == [5, 5, 6, 6] and classes[0, 0] == 1
    assert out[1, 0].tolist() == [1, 1, 2, 2] and classes[1, 0] == 0
    anchors = np.array([[[0, 0, 1, 1]], [[10, 10, 20, 20]]], F32)  # per image, corner coding
    _, out, _, _ = _nms(np.zeros((2, 1, 4), F32), np.full((2, 1, 1), 0.9, F32), anchors)
    assert out[:, 0].tolist() == [[0, 0, 1, 1], [10, 10, 20, 20]]


@pytest.mark.parametrize(
    "kw",
    [{"score_threshold": -0.1}, {"iou_threshold": 0.0}, {"max_output_boxes": 0}, {"box_coding": 2},
     {"score_activation": 2}],
)
def test_values_tensorrt_rejects_raise(kw):
    with pytest.raises(ValueError):
        _nms([_far_boxes(1)], [[[0.9]]], **kw)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="boxes must be"):
        _nms([[[0, 0, 1, 1]] * 2], [[[0.9]] * 3])


# --------------------------------------------------------------------------- #
# EfficientNMS_TRT: against torchvision on random data
# --------------------------------------------------------------------------- #


def _random_boxes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    xy = rng.uniform(0, 400, shape + (2,))
    return np.concatenate([xy, xy + rng.uniform(5, 120, shape + (2,))], -1).astype(F32)


@pytest.mark.parametrize("agnostic", [0, 1])
def test_matches_torchvision_batched_nms(agnostic):
    rng = np.random.default_rng(0)
    n, c = 400, 3
    boxes = _random_boxes(rng, (1, n))
    scores = (rng.permutation(n * c).reshape(1, n, c).astype(F32) + 1) / (n * c)  # distinct: no ties
    num, out_boxes, out_scores, out_classes = efficient_nms(
        boxes, scores, score_threshold=0.2, iou_threshold=0.6, max_output_boxes=n * c, class_agnostic=agnostic
    )
    elements = np.flatnonzero(scores[0].reshape(-1) >= F32(0.2))
    anchor, cls = np.divmod(elements, c)
    idxs = torch.zeros(len(elements), dtype=torch.int64) if agnostic else torch.from_numpy(cls)
    keep = torchvision.ops.batched_nms(
        torch.from_numpy(boxes[0, anchor]), torch.from_numpy(scores[0].reshape(-1)[elements]), idxs, 0.6
    ).numpy()
    k = int(num[0, 0])
    assert k == len(keep) > 20
    np.testing.assert_array_equal(out_classes[0, :k], cls[keep])
    np.testing.assert_array_equal(out_boxes[0, :k], boxes[0, anchor[keep]])
    np.testing.assert_array_equal(out_scores[0, :k], scores[0].reshape(-1)[elements[keep]])


# --------------------------------------------------------------------------- #
# PyramidROIAlign_TRT
# --------------------------------------------------------------------------- #


def _linear_pyramid(channels: int = 1) -> list[np.ndarray]:
    """P2 4x4 holding v(y, x) = 4y + x (bilinear sampling of a linear field is exact); tiny P3..P5."""
    p2 = np.broadcast_to(np.arange(16, dtype=F32).reshape(4, 4), (1, channels, 4, 4)).copy()
    smaller = [np.zeros((1, channels, side, side), F32) for side in (2, 1, 1)]
    return [p2, *smaller]


@pytest.mark.parametrize(
    ("transform", "expected"),
    [(2, [[5, 6], [9, 10]]), (0, [[5, 6], [9, 10]]), (1, [[7.5, 8.5], [11.5, 12.5]])],
)
def test_roi_align_hand_computed(transform, expected):
    # image 16x16 -> P2 scale 1/4; ROI (4,4)-(12,12) spans P2 [1, 3] (half pixel: [0.5, 2.5]).
    # transform 2: samples 0.5 + p + 0.5 -> 1, 2; transform 0: 1 + p -> 1, 2; transform 1: 1 + p + 0.5.
    out = pyramid_roi_align([[[4, 4, 12, 12]]], _linear_pyramid(), pooled_size=2, image_size=[16, 16],
                            roi_coords_transform=transform)
    assert out.shape == (1, 1, 1, 2, 2)
    np.testing.assert_allclose(out[0, 0, 0], expected, atol=1e-6)


def test_roi_align_clamps_samples_to_the_map():
    # ROI (0,0)-(4,4): half-pixel span [-0.5, 0.5], samples -0.25 (clamped to 0, not zeroed) and 0.25.
    out = pyramid_roi_align([[[0, 0, 4, 4]]], _linear_pyramid(), pooled_size=2, image_size=[16, 16])
    np.testing.assert_allclose(out[0, 0, 0], [[0, 0.25], [1, 1.25]], atol=1e-6)


def test_roi_align_degenerate_roi_samples_the_edge():
    # Entirely left of the image: clamped to x1 = x2 = 0. The plugin still takes max(1, ceil(0)) = 1
    # sample per axis (x = -0.5 -> clamped 0, y = 8/16*4 - 0.5 = 1.5 -> v = 6); torchvision takes 0 and
    # returns zeros. Zero boxes (EfficientNMS padding) hence pool the map's corner value.
    roi = np.array([[[-5, 8, -1, 8]]], F32)
    out = pyramid_roi_align(roi, _linear_pyramid(), pooled_size=2, image_size=[16, 16])
    np.testing.assert_allclose(out[0, 0, 0], [[6, 6], [6, 6]], atol=1e-6)
    clamped = torch.from_numpy(np.clip(roi[0], 0, 16))
    tv = torchvision.ops.roi_align(torch.from_numpy(_linear_pyramid()[0]), [clamped], 2, 0.25, 0, aligned=True)
    assert not tv.any()


def test_roi_align_swap_normalized_and_flipped_coordinates():
    feats = _linear_pyramid()
    expected = pyramid_roi_align([[[4, 4, 12, 8]]], feats, pooled_size=2, image_size=[16, 16])
    swapped = pyramid_roi_align([[[4, 4, 8, 12]]], feats, pooled_size=2, image_size=[16, 16], roi_coords_swap=1)
    normalized = pyramid_roi_align([[[0.75, 0.5, 0.25, 0.25]]], feats, pooled_size=2, image_size=[16, 16],
                                   roi_coords_absolute=0)
    np.testing.assert_array_equal(swapped, expected)
    np.testing.assert_array_equal(normalized, expected)


def test_roi_align_adaptive_sampling_ratio():
    # ROI (0,0)-(12,12) spans P2 [-0.5, 2.5]: one bin of 3 px -> ceil(3 / 1) = 3 samples per axis.
    # A linear field cannot tell sample counts apart, so use v = x^2.
    p2 = np.zeros((1, 1, 4, 4), F32)
    p2[0, 0] = (np.arange(4, dtype=F32) ** 2)[None, :]
    feats = [p2] + _linear_pyramid()[1:]
    adaptive = pyramid_roi_align([[[0, 0, 12, 12]]], feats, pooled_size=1, image_size=[16, 16])
    single = pyramid_roi_align([[[0, 0, 12, 12]]], feats, pooled_size=1, image_size=[16, 16], sampling_ratio=1)
    # samples x = -0.5 + 3*(i+0.5)/3 -> 0, 1, 2 ; v = x^2 -> mean 5/3. Single sample at x = 1 -> 1.
    assert adaptive[0, 0, 0, 0, 0] == pytest.approx(5 / 3, abs=1e-6)
    assert single[0, 0, 0, 0, 0] == pytest.approx(1.0, abs=1e-6)


def test_level_thresholds_are_strict():
    # image 1024 makes the float32 arithmetic exact: side 112 -> area == threshold -> stays on P2.
    eps = 0.125
    sides = [112, 112 + eps, 224, 224 + eps, 448, 448 + eps]
    rois = np.array([[[0, 0, s, s] for s in sides]], F32)
    assert pyramid_roi_levels(rois, image_size=[1024, 1024]).tolist() == [[0, 1, 1, 2, 2, 3]]


def test_levels_use_the_clamped_roi_and_fpn_scale():
    # 424x224 before clamping (sqrt 308 -> P4), 224x224 visible -> P3.
    assert pyramid_roi_levels(np.array([[[-200, 0, 224, 224]]], F32), image_size=[1024, 1024])[0, 0] == 1
    # fpn_scale 448 halves every size class: side 224 is now the P2/P3 boundary.
    assert pyramid_roi_levels(np.array([[[0, 0, 224, 224]]], F32), image_size=[1024, 1024], fpn_scale=448)[0, 0] == 0
    # plus-one adds a pixel per side to the area.
    assert pyramid_roi_levels(np.array([[[0, 0, 112, 112]]], F32), image_size=[1024, 1024],
                              roi_coords_plusone=1)[0, 0] == 1


def test_levels_match_detectron2_rule_away_from_boundaries():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 400, (1, 300, 2))
    rois = np.concatenate([xy, xy + np.exp(rng.uniform(np.log(8), np.log(900), (1, 300, 2)))], -1).astype(F32)
    side = np.sqrt((rois[0, :, 2] - rois[0, :, 0]) * (rois[0, :, 3] - rois[0, :, 1]))
    d2 = np.clip(np.floor(4 + np.log2(side / 224 + 1e-8)), 2, 5) - 2  # detectron2 assign_boxes_to_levels
    away = np.min(np.abs(side[:, None] - np.array([112, 224, 448])[None]), axis=1) > 0.01
    levels = pyramid_roi_levels(rois, image_size=[1344, 1344])[0]
    np.testing.assert_array_equal(levels[away], d2[away])
    assert len(np.unique(levels)) == 4


@pytest.mark.parametrize("pooled", [7, 14])
def test_roi_align_matches_torchvision_aligned(pooled):
    rng = np.random.default_rng(2)
    size = 512  # power of two: plugin and torchvision compute identical float32 sample positions
    feats = [rng.standard_normal((1, 8, size // s, size // s), dtype=F32) for s in (4, 8, 16, 32)]
    xy = rng.uniform(-20, 500, (1, 200, 2))
    rois = np.concatenate([xy, xy + np.exp(rng.uniform(np.log(2), np.log(500), (1, 200, 2)))], -1).astype(F32)
    out = pyramid_roi_align(rois, feats, pooled_size=pooled, image_size=[size, size], fpn_scale=112)
    levels = pyramid_roi_levels(rois, image_size=[size, size], fpn_scale=112)[0]
    clamped = np.clip(rois[0], 0, size)  # the plugin clamps ROIs to the image first
    # ROIs clamped to zero extent differ by design (see test_roi_align_degenerate_roi_samples_the_edge).
    proper = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
    assert len(np.unique(levels)) == 4 and proper.sum() > 180
    for level, feat in enumerate(feats):
        idx = np.flatnonzero((levels == level) & proper)
        expected = torchvision.ops.roi_align(
            torch.from_numpy(feat), [torch.from_numpy(clamped[idx])], pooled,
            spatial_scale=feat.shape[2] / size, sampling_ratio=0, aligned=True,
        ).numpy()
        np.testing.assert_allclose(out[0, idx], expected, rtol=0, atol=1e-5)


def test_roi_align_batches_and_layout():
    rng = np.random.default_rng(3)
    feats = [rng.standard_normal((2, 3, 64 // s, 48 // s), dtype=F32) for s in (4, 8, 16, 32)]
    rois = np.array([[[0, 0, 10, 20], [5, 5, 40, 60]], [[1, 2, 3, 4], [0, 0, 48, 64]]], F32)
    out = pyramid_roi_align(rois, feats, pooled_size=3, image_size=[64, 48])
    assert out.shape == (2, 2, 3, 3, 3) and out.dtype == F32
    single = pyramid_roi_align(rois[1:], [f[1:] for f in feats], pooled_size=3, image_size=[64, 48])
    np.testing.assert_array_equal(out[1:], single)


def test_roi_align_rejects_bad_inputs():
    with pytest.raises(ValueError, match="4 feature maps"):
        pyramid_roi_align(np.zeros((1, 1, 4), F32), _linear_pyramid()[:3], pooled_size=2, image_size=[16, 16])
    with pytest.raises(ValueError, match="roi_coords_transform"):
        pyramid_roi_align(np.zeros((1, 1, 4), F32), _linear_pyramid(), pooled_size=2, image_size=[16, 16],
                          roi_coords_transform=3)


# --------------------------------------------------------------------------- #
# Executor: ONNX graphs with plugin nodes through ONNX Runtime
# --------------------------------------------------------------------------- #

NMS_ATTRS = dict(plugin_version="1", background_class=-1, max_output_boxes=5, score_threshold=0.3,
                 iou_threshold=0.5, score_activation=0, class_agnostic=0, box_coding=0)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt.plugins", 1)])


def _nms_model(with_anchors: bool = False, **attrs) -> onnx.ModelProto:
    inputs = ["boxes", "scores"] + (["anchors"] if with_anchors else [])
    nms = helper.make_node("EfficientNMS_TRT", inputs, ["num", "det_boxes", "det_scores", "det_classes"],
                           name="nms", domain="trt.plugins", **{**NMS_ATTRS, **attrs})
    double = helper.make_node("Add", ["det_scores", "det_scores"], ["doubled"])
    count = helper.make_node("Cast", ["num"], ["num64"], to=TensorProto.INT64)
    outputs = [("doubled", TensorProto.FLOAT), ("num64", TensorProto.INT64), ("det_boxes", TensorProto.FLOAT),
               ("det_classes", TensorProto.INT32)]
    return _model([nms, double, count], inputs, outputs)


@pytest.mark.parametrize("with_anchors", [False, True])
def test_session_runs_efficient_nms_like_the_function(with_anchors):
    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, (2, 30))
    scores = rng.uniform(0, 1, (2, 30, 3)).astype(F32)
    anchors = _random_boxes(rng, (1, 30))
    feeds = {"boxes": boxes, "scores": scores} | ({"anchors": anchors} if with_anchors else {})
    session = ReferenceSession(_nms_model(with_anchors))
    assert session.input_names == list(feeds) and session.plugin_count == 1
    out = session.run(feeds)
    num, det_boxes, det_scores, det_classes = efficient_nms(
        boxes, scores, anchors if with_anchors else None, score_threshold=0.3, iou_threshold=0.5, max_output_boxes=5
    )
    np.testing.assert_array_equal(out["doubled"], det_scores * 2)
    np.testing.assert_array_equal(out["num64"], num.astype(np.int64))
    np.testing.assert_array_equal(out["det_boxes"], det_boxes)
    np.testing.assert_array_equal(out["det_classes"], det_classes)
    assert set(session.run(feeds, ["num64"])) == {"num64"}


def test_session_runs_pyramid_roi_align_like_the_function():
    rng = np.random.default_rng(5)
    names = ["rois", "p2", "p3", "p4", "p5"]
    attrs = dict(plugin_version="1", fpn_scale=224, pooled_size=4, image_size=[128, 96], roi_coords_absolute=1,
                 roi_coords_swap=0, roi_coords_transform=2, sampling_ratio=0)
    node = helper.make_node("PyramidROIAlign_TRT", names, ["pooled"], domain="trt.plugins", **attrs)
    relu = helper.make_node("Relu", ["pooled"], ["out"])
    model = _model([node, relu], names, [("out", TensorProto.FLOAT)])
    feats = [rng.standard_normal((1, 5, 128 // s, 96 // s), dtype=F32) for s in (4, 8, 16, 32)]
    rois = np.array([[[3, 4, 30, 50], [0, 0, 96, 128], [10, 10, 12, 11]]], F32)
    out = ReferenceSession(model, threads=1).run(dict(zip(names, [rois] + feats)))["out"]
    expected = pyramid_roi_align(rois, feats, pooled_size=4, image_size=[128, 96])
    np.testing.assert_array_equal(out, np.maximum(expected, 0))


def test_float_attributes_reach_the_op_exactly():
    # the PyOp bridge prints floats with 6 significant digits (0.123456789 -> 0.123457 > score);
    # lowering passes the exact float32 value instead.
    threshold = F32(0.123456789)
    scores = np.array([[[threshold], [np.nextafter(threshold, F32(0))]]], F32)
    model = _nms_model(score_threshold=float(threshold))
    out = ReferenceSession(model).run({"boxes": np.array([_far_boxes(2)], F32), "scores": scores})
    assert out["num64"][0, 0] == 1


def test_lowering_copies_and_canonicalises():
    model = _nms_model()
    lowered = lower_plugin_nodes(model)
    assert model.graph.node[0].domain == "trt.plugins"  # source untouched
    node = lowered.graph.node[0]
    assert node.domain == "ai.onnx.contrib" and len(node.input) == 3  # anchors placeholder
    assert {o.domain for o in lowered.opset_import} >= {"ai.onnx.contrib"}
    assert [n.name for n in plugin_nodes(model)] == ["nms"] and plugin_nodes(lowered) == []
    assert plugin_attributes(model.graph.node[0])["score_threshold"] == float(F32(0.3))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"score_threshold": None}, "missing required"),
        ({"iou_threshold": 1}, "ONNX type INT"),
        ({"score_treshold": 0.2}, "unknown attribute 'score_treshold'"),
        ({"plugin_version": "2"}, "plugin_version"),
        ({"box_coding": 3}, "expected 0 or 1"),
        ({"iou_threshold": 0.0}, "requires > 0"),
    ],
)
def test_bad_attributes_give_clear_errors(change, match):
    attrs = {**NMS_ATTRS, **change}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    node = helper.make_node("EfficientNMS_TRT", ["b", "s"], ["n", "bx", "sc", "cl"], domain="trt.plugins", **attrs)
    model = _model([node], ["b", "s"], [("n", TensorProto.INT32)])
    with pytest.raises(PluginAttributeError, match=match):
        ReferenceSession(model)


def test_missing_image_size_warns_and_defaults_apply():
    node = helper.make_node("PyramidROIAlign_TRT", ["r", "a", "b", "c", "d"], ["o"], domain="trt.plugins")
    with pytest.warns(UserWarning, match="1024x1024"):
        values = plugin_attributes(node)
    assert values == {"fpn_scale": 224, "pooled_size": 7, "image_size": (1024, 1024), "roi_coords_absolute": 1,
                      "roi_coords_swap": 0, "roi_coords_plusone": 0, "roi_coords_transform": 2,
                      "sampling_ratio": 0, "legacy": 0}


def test_unsupported_plugin_is_rejected():
    node = helper.make_node("ResizeNearest_TRT", ["x"], ["y"], domain="trt.plugins", scale=2.0)
    with pytest.raises(NotImplementedError, match="ResizeNearest_TRT"):
        ReferenceSession(_model([node], ["x"], [("y", TensorProto.FLOAT)]))


def test_registration_is_idempotent():
    from onnxruntime_extensions._ocos import Opdef

    register_reference_ops()
    register_reference_ops()
    names = [od.op_type for od in Opdef._odlist.values()]
    assert names.count("EfficientNMS_TRT") == 1 and names.count("PyramidROIAlign_TRT") == 1
