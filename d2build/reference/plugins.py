"""CPU reference implementations of the TensorRT plugins ``EfficientNMS_TRT`` and ``PyramidROIAlign_TRT``.

Why this module exists: the graphs d2build emits for TensorRT contain plugin nodes that no CPU runtime
knows. To check a graph numerically before (or without) building an engine we need the plugins' exact
semantics on the CPU. Everything here follows NVIDIA's plugin sources (TensorRT OSS, ``plugin/``):

* ``efficientNMSPlugin/efficientNMSInference.cu`` / ``.cuh`` (filter, sort, NMS kernels, box structs),
  ``efficientNMSPlugin.cpp`` (attributes, shapes, ``initialize()`` raising the pre-NMS top-k to 5000),
  ``efficientNMSParameters.h`` (defaults);
* ``pyramidROIAlignPlugin/pyramidROIAlignPlugin.cpp`` (attributes, level threshold) and
  ``common/kernels/maskRCNNKernels.cu`` (``roiAlign_kernel``, ``interpolateBilinear``).

Arithmetic that decides discrete outcomes (score threshold, level thresholds, IoU, sort keys) is done in
float32 in the same order as the CUDA code, so boundary cases land on the same side as on the GPU up to
FMA contraction and ``__expf``. The code is our own; nothing is copied from those sources.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from .. import plugins as contract

__all__ = [
    "DEFAULT_PRE_NMS_TOPK",
    "efficient_nms",
    "pyramid_roi_align",
    "pyramid_roi_levels",
]

_F32 = np.float32

# --------------------------------------------------------------------------------------------------
# EfficientNMS_TRT
# --------------------------------------------------------------------------------------------------

#: ``EfficientNMSParameters::numSelectedBoxes`` is 4096 in the header, but ``EfficientNMSPlugin::initialize()``
#: sets it to 5000 on every GPU with >= 64K registers per block (all desktop/datacenter GPUs; 2000 on TX1/TX2).
DEFAULT_PRE_NMS_TOPK = contract.PRE_NMS_TOPK

#: ``EfficientNMSFilterLauncher`` switches to the dense kernel below this (probability-space) threshold.
_DENSE_KERNEL_THRESHOLD = _F32(contract.DENSE_MODE_BELOW)
#: Score the dense kernel writes over below-threshold and background entries: ``-(1 << 15)``.
_DENSE_FILL_SCORE = _F32(contract.DENSE_FILL_SCORE)


def _logit32(p: np.float32) -> np.float32:
    """``logf(p / (1 - p))`` in float32, as the launcher converts a probability threshold to logit space."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _F32(np.log(_F32(p) / (_F32(1) - _F32(p))))


def _score_thresholds(score_threshold: float, score_activation: int) -> tuple[np.float32, np.float32]:
    """Return (threshold compared with the raw input scores, threshold that selects the dense kernel).

    With ``score_activation`` the plugin never applies the sigmoid before filtering: it converts the
    threshold to logit space instead (``<= 0`` becomes ``-32768``, i.e. everything passes), and only the
    scores written to the output go through the sigmoid.
    """
    threshold = _F32(score_threshold)
    select = _DENSE_KERNEL_THRESHOLD
    if score_activation:
        threshold = _DENSE_FILL_SCORE if threshold <= 0 else _logit32(threshold)
        select = _logit32(select)
    return threshold, select


def _descending_order(keys: np.ndarray) -> np.ndarray:
    """Indices sorting float32 ``keys`` like ``cub::DeviceSegmentedRadixSort::SortPairsDescending``.

    CUB radix-sorts the IEEE bit pattern (negative floats bit-flipped, positive ones sign-flipped), so the
    order is total (-0.0 below +0.0, +NaN above +inf) and stable: equal keys keep their input order.
    """
    bits = np.ascontiguousarray(keys, dtype=np.float32).view(np.uint32)
    ascending_key = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    return np.argsort(~ascending_key, kind="stable")


def _select_candidates(
    scores: np.ndarray, threshold: np.float32, dense: bool, num_classes: int, background_class: int, topk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Filter + sort one image's flattened ``[N*C]`` scores; return (element indices, sort keys), best first.

    Sparse path (``EfficientNMSFilter``): keep ``score >= threshold`` outside the background class.
    Dense path (``EfficientNMSDenseIndex``, threshold below 0.007): keep *every* element, but overwrite the
    failing and background scores with -32768. Those entries still enter NMS and can fill the output when
    fewer than ``max_output_boxes`` real detections exist -- a documented quirk of the plugin that we keep.
    """
    element_class = np.arange(scores.size) % num_classes
    if dense:
        keys = scores.copy()
        keys[(scores < threshold) | (element_class == background_class)] = _DENSE_FILL_SCORE
        elements = np.arange(scores.size)
    else:
        elements = np.flatnonzero((scores >= threshold) & (element_class != background_class))
        keys = scores[elements]
    order = _descending_order(keys)[:topk]
    return elements[order], keys[order]


def _reorder_corners(boxes: np.ndarray) -> np.ndarray:
    """``BoxCorner::reorder``: swap flipped corner pairs with the kernel's add/sub swap (not exact in float32)."""
    out = boxes.copy()
    for lo, hi in ((0, 2), (1, 3)):
        a, b = boxes[:, lo], boxes[:, hi]
        flipped = a > b
        d = a - b
        new_hi = d + b
        new_lo = new_hi - d
        out[:, lo] = np.where(flipped, new_lo, a)
        out[:, hi] = np.where(flipped, new_hi, b)
    return out


def _center_size_to_corners(boxes: np.ndarray) -> np.ndarray:
    """``BoxCenterSize -> BoxCorner``: (c0, c1, s0, s1) -> (c0 - s0/2, c1 - s1/2, c0 + s0/2, c1 + s1/2)."""
    half0 = boxes[:, 2] * _F32(0.5)
    half1 = boxes[:, 3] * _F32(0.5)
    c0, c1 = boxes[:, 0], boxes[:, 1]
    return np.stack([c0 - half0, c1 - half1, c0 + half0, c1 + half1], axis=1)


def _decode_boxes(raw: np.ndarray, anchors: np.ndarray | None, box_coding: int) -> np.ndarray:
    """Turn gathered box inputs into corner boxes exactly as ``DecodeBoxes`` does.

    Without anchors: corner boxes pass through untouched (flipped corners stay flipped in the output),
    center-size boxes are converted to corners. With anchors (fused decoder): corner coding *adds* the
    reordered anchor corners to the reordered box; center-size coding computes
    ``c = d_c * anchor_size + anchor_c`` and ``size = anchor_size * exp(d_size)`` -- no variances,
    no exp clamp, no clipping.
    """
    if anchors is None:
        return raw.copy() if box_coding == 0 else _center_size_to_corners(raw)
    if box_coding == 0:
        return _reorder_corners(raw) + _reorder_corners(anchors)
    with np.errstate(over="ignore"):
        decoded = np.stack(
            [
                raw[:, 0] * anchors[:, 2] + anchors[:, 0],
                raw[:, 1] * anchors[:, 3] + anchors[:, 1],
                anchors[:, 2] * np.exp(raw[:, 2]),
                anchors[:, 3] * np.exp(raw[:, 3]),
            ],
            axis=1,
        ).astype(np.float32)
    return _center_size_to_corners(decoded)


def _clamped_area(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``BoxCorner::area``: zero when either side is <= 0, else ``h * w`` in float32."""
    return np.where((h <= 0) | (w <= 0), _F32(0), h * w)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one reordered corner box against many, as the kernel's ``IOU``: no +1, zero-area boxes give 0."""
    inter = _clamped_area(
        np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]),
        np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]),
    )
    area_a = _clamped_area(box[2:3] - box[0:1], box[3:4] - box[1:2])
    area_b = _clamped_area(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    union = (area_a + area_b) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((inter <= 0) | (union <= 0), _F32(0), iou)


def _greedy_keep(boxes: np.ndarray, keys: np.ndarray, iou_threshold: np.float32, limit: int) -> list[int]:
    """Greedy NMS over score-sorted candidates of one suppression group; at most ``limit`` positions.

    A later box is dropped when ``iou >= iou_threshold`` with an earlier *kept* box and its score is
    ``<=`` that box's (always true after the sort except for NaN keys).
    """
    suppressed = np.zeros(len(keys), dtype=bool)
    keep: list[int] = []
    for i in range(len(keys)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        rest = slice(i + 1, None)
        hit = (_iou_one_to_many(boxes[i], boxes[rest]) >= iou_threshold) & (keys[rest] <= keys[i])
        suppressed[rest] |= hit
    return keep


def _nms_keep(
    corners: np.ndarray, keys: np.ndarray, classes: np.ndarray, iou_threshold: np.float32, limit: int, agnostic: bool
) -> np.ndarray:
    """Positions (into the sorted candidates) the kernel keeps, in output order.

    The kernel walks all classes in one global score order and only compares boxes of the same class
    (unless ``class_agnostic``), stopping after ``max_output_boxes`` keeps. Per-class greedy NMS followed
    by a merge in global order and a cut at ``limit`` gives the same result and is far cheaper.
    """
    groups = [np.arange(len(keys))] if agnostic else [np.flatnonzero(classes == c) for c in np.unique(classes)]
    kept: list[np.ndarray] = []
    for group in groups:
        local = _greedy_keep(corners[group], keys[group], iou_threshold, limit)
        kept.append(group[local])
    return np.sort(np.concatenate(kept))[:limit] if kept else np.zeros(0, dtype=np.int64)


def _check_nms_inputs(boxes: np.ndarray, scores: np.ndarray, anchors: np.ndarray | None) -> None:
    """Validate the shapes ``EfficientNMSPlugin::configurePlugin`` accepts; raise with the expected layout."""
    if scores.ndim != 3:
        raise ValueError(
            f"EfficientNMS scores must be [batch, boxes, classes] (or [..., 1]); got shape {scores.shape}"
        )
    b, n, c = scores.shape
    shared = boxes.ndim == 3 and boxes.shape == (b, n, 4)
    per_class = boxes.ndim == 4 and boxes.shape[:2] == (b, n) and boxes.shape[2] in (1, c) and boxes.shape[3] == 4
    if not (shared or per_class):
        raise ValueError(
            f"EfficientNMS boxes must be [{b}, {n}, 4], [{b}, {n}, 1, 4] or [{b}, {n}, {c}, 4] to match "
            f"scores {scores.shape}; got {boxes.shape}"
        )
    if anchors is not None and not (anchors.ndim == 3 and anchors.shape[0] in (1, b) and anchors.shape[1:] == (n, 4)):
        raise ValueError(f"EfficientNMS anchors must be [1, {n}, 4] or [{b}, {n}, 4]; got {anchors.shape}")


def _check_nms_attributes(
    score_threshold: float, iou_threshold: float, max_output_boxes: int, flags: dict[str, int], pre_nms_topk: int
) -> None:
    """Reject the values ``EfficientNMSPluginCreator::createPlugin`` refuses (TensorRT >= 8.5)."""
    if not score_threshold >= 0:
        raise ValueError(f"score_threshold must be >= 0 (TensorRT rejects it otherwise); got {score_threshold}")
    if not iou_threshold > 0:
        raise ValueError(f"iou_threshold must be > 0 (TensorRT rejects it otherwise); got {iou_threshold}")
    if max_output_boxes < 1:
        raise ValueError(f"max_output_boxes must be >= 1; got {max_output_boxes}")
    for name, value in flags.items():
        if value not in (0, 1):
            raise ValueError(f"{name} must be 0 or 1; got {value}")
    if pre_nms_topk < 1:
        raise ValueError(f"pre_nms_topk must be >= 1; got {pre_nms_topk}")


def efficient_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    anchors: np.ndarray | None = None,
    *,
    score_threshold: float,
    iou_threshold: float,
    max_output_boxes: int,
    background_class: int = -1,
    score_activation: int = 0,
    class_agnostic: int = 0,
    box_coding: int = 0,
    pre_nms_topk: int = DEFAULT_PRE_NMS_TOPK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run ``EfficientNMS_TRT`` (plugin version 1) on the CPU.

    Args:
        boxes: ``[B, N, 4]`` shared by all classes, ``[B, N, 1, 4]``, or ``[B, N, C, 4]`` per class. Corner
            (``box_coding=0``, x1,y1,x2,y2 or y1,x1,y2,x2) or center-size (``box_coding=1``) coordinates;
            raw deltas when ``anchors`` is given.
        scores: ``[B, N, C]`` (``[B, N, C, 1]`` accepted). Probabilities, or logits with ``score_activation=1``.
        anchors: optional ``[1, N, 4]`` or ``[B, N, 4]`` in the same coding as ``boxes``; enables the fused decoder.
        score_threshold: a score passes when ``score >= score_threshold``; in logit space when
            ``score_activation=1`` (``<= 0`` then lets everything pass).
        iou_threshold: a box is suppressed when ``IoU >= iou_threshold`` with a kept box of its class.
        max_output_boxes: ``M``, detections per image.
        background_class: class index never selected (``-1``: none).
        score_activation: 1 applies the sigmoid to the *output* scores only.
        class_agnostic: 1 suppresses across classes.
        box_coding: 0 corners, 1 center-size.
        pre_nms_topk: candidates entering NMS after the global sort (5000 on desktop GPUs, 2000 on TX1/TX2).

    Returns:
        ``num_detections [B, 1] int32``, ``detection_boxes [B, M, 4] float32`` (corners),
        ``detection_scores [B, M] float32``, ``detection_classes [B, M] int32``; zero past ``num_detections``,
        ordered by descending score across classes.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim == 4 and scores.shape[3] == 1:
        scores = scores[..., 0]
    anchors = None if anchors is None else np.asarray(anchors, dtype=np.float32)
    _check_nms_inputs(boxes, scores, anchors)
    flags = {"score_activation": score_activation, "class_agnostic": class_agnostic, "box_coding": box_coding}
    _check_nms_attributes(score_threshold, iou_threshold, max_output_boxes, flags, pre_nms_topk)

    batch, _, num_classes = scores.shape
    if boxes.ndim == 4 and boxes.shape[2] == 1:
        boxes = boxes[:, :, 0]
    per_class_boxes = boxes.ndim == 4
    threshold, select = _score_thresholds(score_threshold, score_activation)
    dense = bool(threshold < select)
    iou_thr = _F32(iou_threshold)

    num_detections = np.zeros((batch, 1), dtype=np.int32)
    out_boxes = np.zeros((batch, max_output_boxes, 4), dtype=np.float32)
    out_scores = np.zeros((batch, max_output_boxes), dtype=np.float32)
    out_classes = np.zeros((batch, max_output_boxes), dtype=np.int32)
    for b in range(batch):
        if scores[b].size == 0:
            continue
        elements, keys = _select_candidates(
            scores[b].reshape(-1), threshold, dense, num_classes, background_class, pre_nms_topk
        )
        anchor_idx, classes = np.divmod(elements, num_classes)
        raw = boxes[b, anchor_idx, classes] if per_class_boxes else boxes[b, anchor_idx]
        anchor_rows = None if anchors is None else anchors[0 if anchors.shape[0] == 1 else b, anchor_idx]
        decoded = _decode_boxes(raw, anchor_rows, box_coding)
        keep = _nms_keep(
            _reorder_corners(decoded), keys, classes, iou_thr, max_output_boxes, agnostic=bool(class_agnostic)
        )
        k = len(keep)
        num_detections[b, 0] = k
        out_boxes[b, :k] = decoded[keep]
        if score_activation:
            with np.errstate(over="ignore"):
                out_scores[b, :k] = _F32(1) / (_F32(1) + np.exp(-keys[keep]))
        else:
            out_scores[b, :k] = keys[keep]
        out_classes[b, :k] = classes[keep]
    return num_detections, out_boxes, out_scores, out_classes


# --------------------------------------------------------------------------------------------------
# PyramidROIAlign_TRT
# --------------------------------------------------------------------------------------------------

#: ``MaskRCNNConfig::IMAGE_SHAPE`` (plugin/common/mrcnn_config.h); only used by ``legacy=1``.
_LEGACY_IMAGE_SIZE = contract.ROI_ALIGN_LEGACY_IMAGE_SIZE
_VALID_TRANSFORMS = (-1, 0, 1, 2)


def _first_level_threshold(fpn_scale: int, image_size: Sequence[int], legacy: int) -> np.float32:
    """Normalised ROI area above which the plugin leaves P2 (x4 per further level), as computed on the host.

    ``normScale = sqrtf(fpn^2 / (H*W))``, threshold ``normScale^2 / 4``: with fpn 224 that is
    ``sqrt(area_px) > 112`` -> P3, ``> 224`` -> P4, ``> 448`` -> P5 (strict). Legacy mode ignores both
    arguments and uses ``(224*224*2 / (1024*1024)) / 16``.
    """
    if legacy:
        area = _F32(_LEGACY_IMAGE_SIZE[0] * _LEGACY_IMAGE_SIZE[1])
        return _F32(_F32(_F32(224 * 224) * _F32(2)) / area) / _F32(16)
    scale = _F32(fpn_scale)
    norm = _F32(np.sqrt(_F32(scale * scale) / _F32(int(image_size[0]) * int(image_size[1]))))
    return _F32(norm * norm) / _F32(4)


def _normalized_rois(
    rois: np.ndarray, image_size: Sequence[int], absolute: int, swap: int, plus_one: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ([..., 4] normalised y1, x1, y2, x2 clamped to [0, 1], normalised area ``hw``) like the kernel.

    Corners are re-ordered with min/max, absolute coordinates are clamped to the image *before* normalising
    (so the level is chosen from the visible part of the ROI), and ``plus_one`` adds one pixel per side.
    """
    r = np.asarray(rois, dtype=np.float32)
    a, b, c, d = r[..., 0], r[..., 1], r[..., 2], r[..., 3]
    if swap:
        y1, x1, y2, x2 = np.minimum(a, c), np.minimum(b, d), np.maximum(a, c), np.maximum(b, d)
    else:
        x1, y1, x2, y2 = np.minimum(a, c), np.minimum(b, d), np.maximum(a, c), np.maximum(b, d)
    height, width = _F32(image_size[0]), _F32(image_size[1])
    if absolute:
        y1, y2 = (np.clip(v, _F32(0), height) / height for v in (y1, y2))
        x1, x2 = (np.clip(v, _F32(0), width) / width for v in (x1, x2))
    else:
        y1, x1, y2, x2 = (np.clip(v, _F32(0), _F32(1)) for v in (y1, x1, y2, x2))
    if plus_one:
        hw = (y2 - y1 + _F32(1) / height) * (x2 - x1 + _F32(1) / width)
    else:
        hw = (y2 - y1) * (x2 - x1)
    return np.stack([y1, x1, y2, x2], axis=-1).astype(np.float32), hw.astype(np.float32)


def _levels_from_area(hw: np.ndarray, first_threshold: np.float32) -> np.ndarray:
    """0..3 for P2..P5: one level up for each strict ``hw > threshold`` test, threshold x4 each time."""
    t = _F32(first_threshold)
    return (hw > t).astype(np.int64) + (hw > t * _F32(4)) + (hw > t * _F32(16))


def _resolve_roi_align_mode(
    transform: int, absolute: int, swap: int, plus_one: int, sampling_ratio: int, legacy: int
) -> tuple[int, int, int, int, int]:
    """``legacy=1`` overrides the coordinate attributes exactly as ``PyramidROIAlign::enqueue`` does."""
    if legacy:
        return -1, 0, 1, 0, 1
    return transform, absolute, swap, plus_one, sampling_ratio


def pyramid_roi_levels(
    rois: np.ndarray,
    *,
    image_size: Sequence[int],
    fpn_scale: int = 224,
    roi_coords_absolute: int = 1,
    roi_coords_swap: int = 0,
    roi_coords_plusone: int = 0,
    legacy: int = 0,
) -> np.ndarray:
    """FPN level (0..3 for P2..P5) ``PyramidROIAlign_TRT`` samples each ROI of ``rois [..., 4]`` from.

    Differs from Detectron2's ``assign_boxes_to_levels`` at exact boundaries (the plugin uses strict ``>``,
    so ``sqrt(area) == 112`` stays on P2) and for ROIs leaving the image (the plugin clamps first).
    """
    _, absolute, swap, plus_one, _ = _resolve_roi_align_mode(
        2, roi_coords_absolute, roi_coords_swap, roi_coords_plusone, 0, legacy
    )
    _, hw = _normalized_rois(rois, image_size, absolute, swap, plus_one)
    return _levels_from_area(hw, _first_level_threshold(fpn_scale, image_size, legacy))


def _axis_weights(
    start: np.ndarray,
    end: np.ndarray,
    size: int,
    pooled: int,
    sampling_ratio: int,
    sample_offset: np.float32,
    legacy_transform: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling of one axis for many ROIs as separable weights.

    The kernel averages ``ratio_y * ratio_x`` bilinear samples per output cell; the sample rows depend only
    on the output row and the sample columns only on the output column, so the average factorises into
    ``Wy @ F @ Wx.T``. Returns (window start ``lo [n]``, window length ``span [n]``,
    ``W [n, pooled, max span]`` with W[r, p, k] = weight of input index ``lo[r] + k`` for output ``p``).
    """
    n = len(start)
    extent = end - start
    delta = extent / _F32(pooled - 1 if legacy_transform else pooled)
    if sampling_ratio > 0:
        ratio = np.full(n, sampling_ratio, dtype=np.int64)
    else:
        ratio = np.maximum(1, np.ceil(extent / _F32(pooled)).astype(np.int64))
    max_ratio = int(ratio.max()) if n else 1
    p = np.arange(pooled, dtype=np.float32)[None, :, None]
    i = np.arange(max_ratio, dtype=np.float32)[None, None, :]
    d = delta[:, None, None]
    pos = (start[:, None, None] + d * p) + (d * (i + sample_offset)) / ratio[:, None, None].astype(np.float32)
    pos = np.clip(pos, _F32(0), _F32(size - 1))
    valid = np.broadcast_to(np.arange(max_ratio)[None, None, :] < ratio[:, None, None], pos.shape)
    low = pos.astype(np.int64)  # pos >= 0, so truncation is floor
    alpha = pos - low.astype(np.float32)
    high = low + (alpha > 0)
    lo = np.where(valid, low, np.iinfo(np.int64).max).min(axis=(1, 2))
    hi = np.where(valid, high, -1).max(axis=(1, 2))
    span = hi - lo + 1
    width = int(span.max()) if n else 1
    scale = (_F32(1) / ratio.astype(np.float32))[:, None, None]
    rows = np.arange(n)[:, None, None] * (pooled * width) + np.arange(pooled)[None, :, None] * width
    flat = np.concatenate([(rows + low - lo[:, None, None])[valid], (rows + high - lo[:, None, None])[valid]])
    weights = np.concatenate([((_F32(1) - alpha) * scale)[valid], (alpha * scale)[valid]])
    table = np.bincount(flat, weights=weights, minlength=n * pooled * width)
    return lo, span, table.astype(np.float32).reshape(n, pooled, width)


def _level_start_end(coords: np.ndarray, size: int, transform: int) -> tuple[np.ndarray, np.ndarray]:
    """Map normalised ROI coordinates to feature-map coordinates: ``start = c * size - offset``.

    Offsets: transform 2 (half pixel, ROIAlignV2 / ``aligned=True``) subtracts 0.5; 0 and 1 subtract
    nothing; -1 (legacy) scales by ``size - 1``. The map's own size, not a stride, sets the scale.
    """
    if transform == -1:
        return coords[:, 0] * _F32(size - 1), coords[:, 1] * _F32(size - 1)
    offset = _F32(0.5) if transform == 2 else _F32(0)
    return coords[:, 0] * _F32(size) - offset, coords[:, 1] * _F32(size) - offset


# OpenBLAS entry points that cap its threads, most specific first: the thread-local setter (0.3.27+,
# affects only the calling thread), then the process-wide one under the names numpy's wheels
# (scipy-openblas, 64-bit interface) and distribution builds export.
_BLAS_SETTERS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads", "openblas_set_num_threads64_", "openblas_set_num_threads")
_BLAS_GETTERS = {"scipy_openblas_set_num_threads64_": "scipy_openblas_get_num_threads64_",
                 "scipy_openblas_set_num_threads": "scipy_openblas_get_num_threads",
                 "openblas_set_num_threads64_": "openblas_get_num_threads64_",
                 "openblas_set_num_threads": "openblas_get_num_threads"}
_blas_lock = threading.Lock()
_blas_api: list[tuple[str, object, object]] | None = None


def _openblas_libraries() -> list[str]:
    """Paths of the OpenBLAS libraries this process has loaded (Linux: /proc/self/maps), then numpy's own."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "openblas" in os.path.basename(path).lower() and ".so" in path and path not in found:
                    found.append(path)
    except OSError:
        pass
    wheel_libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    return found + [p for p in sorted(glob.glob(os.path.join(wheel_libs, "*openblas*.so*"))) if p not in found]


def _blas_thread_api() -> list[tuple[str, object, object]]:
    """[(name, setter, getter or None)] for the loaded OpenBLAS, found once; [] where there is none
    (numpy on MKL or Accelerate: then nothing is capped, which costs speed, never correctness)."""
    global _blas_api
    with _blas_lock:
        if _blas_api is None:
            _blas_api = []
            for path in _openblas_libraries():
                try:
                    lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                for name in _BLAS_SETTERS:
                    setter = getattr(lib, name, None)
                    if setter is None:
                        continue
                    getter = getattr(lib, _BLAS_GETTERS[name], None) if name in _BLAS_GETTERS else None
                    if getter is not None:
                        getter.restype = ctypes.c_int
                    setter.restype = ctypes.c_int if name.endswith("_local") else None
                    setter.argtypes = [ctypes.c_int]
                    _blas_api.append((name, setter, getter))
                    break
                if _blas_api:
                    break
        return _blas_api


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run OpenBLAS single-threaded for the duration (restoring the previous setting).

    The per-ROI matrix products are tiny, but big enough (m*n*k > 2^18) for OpenBLAS to split them
    over its thread pool; on a loaded 2-core machine each split costs a scheduler quantum (the same
    effect made torch's version of this loop take 23 s for 1000 ROIs with 2 threads against 0.4 s
    with 1). Where OpenBLAS has the thread-local setter only this thread is affected; otherwise the
    process-wide count is lowered and restored, as ``torch.set_num_threads`` did before.
    """
    api = _blas_thread_api()
    if not api:
        yield
        return
    name, setter, getter = api[0]
    if name.endswith("_local"):
        previous = setter(1)
        try:
            yield
        finally:
            setter(previous)
        return
    previous = getter() if getter is not None else None
    if previous == 1:
        yield
        return
    setter(1)
    try:
        yield
    finally:
        if previous is not None:
            setter(previous)


def _align_level(
    feature: np.ndarray, coords: np.ndarray, pooled: int, sampling_ratio: int, transform: int
) -> np.ndarray:
    """ROIAlign of ``coords [n, 4]`` (normalised y1, x1, y2, x2) on one ``[C, H, W]`` map -> ``[n, C, P, P]``.

    Per ROI two matrix products over its window only: ``Wy [P, ny] @ window [ny, C*nx]``, then
    ``[P*C, nx] @ Wx.T [nx, P]`` (rows first, then columns, each a single float32 GEMM).
    """
    channels, height, width = feature.shape
    sample_offset = _F32(0.5) if transform in (1, 2) else _F32(0)
    y_start, y_end = _level_start_end(coords[:, [0, 2]], height, transform)
    x_start, x_end = _level_start_end(coords[:, [1, 3]], width, transform)
    y_lo, y_span, wy = _axis_weights(y_start, y_end, height, pooled, sampling_ratio, sample_offset, transform == -1)
    x_lo, x_span, wx = _axis_weights(x_start, x_end, width, pooled, sampling_ratio, sample_offset, transform == -1)
    out = np.empty((len(coords), channels, pooled, pooled), dtype=np.float32)
    rows_first = feature.transpose(1, 0, 2)  # [H, C, W]: a window's rows as one [ny, C*nx] matrix (after a copy)
    with _single_threaded_blas():
        for r in range(len(coords)):
            y0, ny, x0, nx = int(y_lo[r]), int(y_span[r]), int(x_lo[r]), int(x_span[r])
            window = rows_first[y0 : y0 + ny, :, x0 : x0 + nx].reshape(ny, channels * nx)
            pooled_rows = np.matmul(wy[r, :, :ny], window).reshape(pooled * channels, nx)
            out[r] = np.matmul(pooled_rows, wx[r, :, :nx].T).reshape(pooled, channels, pooled).transpose(1, 0, 2)
    return out


def _check_roi_align_inputs(
    rois: np.ndarray, features: Sequence[np.ndarray], pooled_size: int, image_size: Sequence[int]
) -> None:
    """Validate shapes and attribute ranges the plugin (creator, ``check_valid_inputs``) relies on."""
    if rois.ndim != 3 or rois.shape[2] != 4:
        raise ValueError(f"PyramidROIAlign rois must be [batch, rois, 4]; got {rois.shape}")
    if len(features) != 4:
        raise ValueError(f"PyramidROIAlign needs exactly 4 feature maps (P2, P3, P4, P5); got {len(features)}")
    for level, f in enumerate(features):
        if f.ndim != 4 or f.shape[0] != rois.shape[0] or f.shape[1] != features[0].shape[1]:
            raise ValueError(
                f"feature map P{level + 2} must be [batch={rois.shape[0]}, C={features[0].shape[1]}, H, W]; "
                f"got {f.shape}"
            )
    if pooled_size < 1:
        raise ValueError(f"pooled_size must be >= 1; got {pooled_size}")
    if len(image_size) != 2 or min(int(v) for v in image_size) < 1:
        raise ValueError(f"image_size must be [height, width] with positive entries; got {list(image_size)}")


def pyramid_roi_align(
    rois: np.ndarray,
    features: Sequence[np.ndarray],
    *,
    pooled_size: int,
    image_size: Sequence[int],
    fpn_scale: int = 224,
    sampling_ratio: int = 0,
    roi_coords_absolute: int = 1,
    roi_coords_swap: int = 0,
    roi_coords_transform: int = 2,
    roi_coords_plusone: int = 0,
    legacy: int = 0,
) -> np.ndarray:
    """Run ``PyramidROIAlign_TRT`` (plugin version 1) on the CPU.

    Args:
        rois: ``[B, R, 4]``; x1,y1,x2,y2 (``roi_coords_swap=1``: y1,x1,y2,x2), in pixels of ``image_size``
            (``roi_coords_absolute=0``: normalised to [0, 1]). Flipped corners are re-ordered, ROIs clamped.
        features: ``[P2, P3, P4, P5]``, each ``[B, C, H_l, W_l]`` float32.
        pooled_size: output side ``P``.
        image_size: ``[H, W]`` of the network input; level ``l`` is sampled with scale ``H_l / H``.
        fpn_scale: canonical size selecting P4 (``sqrt(area) > fpn/2`` -> P3, ``> fpn`` -> P4, ``> 2 fpn`` -> P5).
        sampling_ratio: samples per bin and axis; 0 = ``max(1, ceil(roi_extent / P))`` per ROI and axis.
        roi_coords_transform: 2 half pixel (Detectron2 ROIAlignV2), 1 half pixel on samples only,
            0 none (note: unlike torchvision ``aligned=False`` no minimum ROI size of 1), -1 legacy.
        roi_coords_plusone: add one pixel per side when computing the level area only.
        legacy: 1 forces transform -1, swap 1, absolute 0, plus-one 0, sampling 1 and the legacy threshold.

    Returns:
        ``[B, R, C, P, P]`` float32. Samples are clamped to the map (never zero), matching torchvision
        ``roi_align(aligned=True)`` for ROIs inside the image.
    """
    rois = np.asarray(rois, dtype=np.float32)
    feats = [np.ascontiguousarray(f, dtype=np.float32) for f in features]
    _check_roi_align_inputs(rois, feats, pooled_size, image_size)
    transform, absolute, swap, plus_one, ratio = _resolve_roi_align_mode(
        roi_coords_transform, roi_coords_absolute, roi_coords_swap, roi_coords_plusone, sampling_ratio, legacy
    )
    if transform not in _VALID_TRANSFORMS:
        raise ValueError(f"roi_coords_transform must be one of {_VALID_TRANSFORMS}; got {transform}")
    if ratio < 0:
        raise ValueError(f"sampling_ratio must be >= 0; got {ratio}")
    if fpn_scale < 1:
        raise ValueError(f"fpn_scale must be >= 1; got {fpn_scale}")
    if transform == -1 and pooled_size == 1:
        raise ValueError("roi_coords_transform=-1 (legacy) divides by pooled_size - 1; pooled_size must be > 1")

    coords, hw = _normalized_rois(rois, image_size, absolute, swap, plus_one)
    levels = _levels_from_area(hw, _first_level_threshold(fpn_scale, image_size, legacy))
    batch, num_rois = rois.shape[:2]
    channels = feats[0].shape[1]
    out = np.zeros((batch, num_rois, channels, pooled_size, pooled_size), dtype=np.float32)
    for b in range(batch):
        for level, feat in enumerate(feats):
            idx = np.flatnonzero(levels[b] == level)
            if len(idx):
                out[b, idx] = _align_level(feat[b], coords[b, idx], pooled_size, ratio, transform)
    return out
