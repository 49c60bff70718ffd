"""Keypoint R-CNN (FPN): what d2build knows about Detectron2's person-keypoint family.

The same GeneralizedRCNN as Mask R-CNN (backbone, RPN, box head: `MaskRCNN` supplies all of
that) with a keypoint head instead of a mask head. Three things are specific:

* Export (build.py). Detectron2's keypoint head ends in `keypoint_rcnn_inference` -> `heatmaps_to_keypoints`,
  a per-detection loop of data-dependent bicubic resizes that the TorchScript exporter cannot trace
  (`aten::index ... unknown rank`). During tracing only, `keypoint_rcnn_inference` is replaced by a
  function that attaches the raw heatmaps as `pred_keypoint_heatmaps` (the field Detectron2 itself
  sets next to `pred_keypoints`). Everything else runs Detectron2's own inference path unchanged, so
  the export is the model up to the decode; re-assembling the ROI heads by hand instead would
  duplicate Detectron2's control flow (and its private `_forward_box`) and could drift from it.
* Graph. Surgery adds the keypoint pooler (PyramidROIAlign_TRT, 14x14) and the keypoint head on
  the final detection boxes; the graph outputs `detection_heatmaps [1, 100, 17, 56, 56]` in the
  detections' order (see `rcnn_graph.RCNNSurgeon.keypoints` for why the decode is not in the graph).
* Decode and verify. `decode_keypoints` (below) turns heatmaps into (x, y, score) exactly as
  `heatmaps_to_keypoints` does, for all detections at once; verify compares the keypoints of
  matched detections with Detectron2's (`verify.keypoint_median_px`, `verify.keypoint_p95_px`).

Also here: COCO's person keypoint names and skeleton (the default for a 17-keypoint model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from d2build.families.base import Outputs
from d2build.families.mask_rcnn import MaskRCNN
from d2build.processing import keypoints_to_original


# COCO person keypoints in Detectron2's order, and the limbs Detectron2 connects (0-based).
COCO_KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                       "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
                       "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (3, 1), (4, 2), (1, 0), (0, 2), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (11, 12), (11, 13), (12, 14), (13, 15), (14, 16), (5, 11), (6, 12),
)
# COCO's per-keypoint OKS sigmas (pycocotools' defaults for person keypoints)
COCO_OKS_SIGMAS = (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)


class KeypointRCNN(MaskRCNN):
    name = "keypoint_rcnn"
    with_masks = False
    with_keypoints = True
    head_outputs = (Outputs.HEATMAPS,)
    described_as = "Keypoint R-CNN (GeneralizedRCNN, ResNet-FPN, RPN, StandardROIHeads, keypoint head)"

    def decode_heads(self, outputs, image_index, rows, boxes_input, boxes, lb, mask_threshold) -> dict[str, Any]:
        """Keypoints of the kept detections, decoded against their boxes in input pixels (as Detectron2
        decodes them) and mapped to the original image."""
        maps = np.asarray(outputs[Outputs.HEATMAPS])[image_index, rows]
        return {"keypoints": keypoints_to_original(decode_keypoints(maps, boxes_input), lb)}

    def verify_extra(self, ref, got, match, verify) -> tuple[dict[str, Any], list[str]]:
        """Keypoints of matched detections: distance to Detectron2's in original pixels, score agreement."""
        stats = keypoint_agreement(ref, got, match.pairs)
        problems = []
        if stats["keypoint_median_px"] is None:
            return stats, problems
        if stats["keypoint_median_px"] > verify.keypoint_median_px:
            problems.append(f"median keypoint distance {stats['keypoint_median_px']:.2f} px "
                            f"(> verify.keypoint_median_px={verify.keypoint_median_px})")
        if stats["keypoint_p95_px"] > verify.keypoint_p95_px:
            problems.append(f"95th percentile keypoint distance {stats['keypoint_p95_px']:.2f} px "
                            f"(> verify.keypoint_p95_px={verify.keypoint_p95_px})")
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


# ---------------------------------------------------------------------------------------------
# Decoding heatmaps (Detectron2's heatmaps_to_keypoints, all detections at once)
# ---------------------------------------------------------------------------------------------

_CUBIC_A = np.float32(-0.75)  # torch's bicubic (Keys) kernel parameter
# Largest |weight| an outer bicubic tap can get (at distance 4/3: 1/9); with a little slack.
_OUTER_TAP_MAX = np.float32(1.0 / 9.0 + 1e-6)
_EVAL_BUDGET = 8_000_000  # heatmap pixels evaluated per batch in decode_keypoints (bounds memory)


def _cubic_axis(sizes: np.ndarray, m: int) -> dict[str, np.ndarray]:
    """Bicubic taps of ``F.interpolate(mode="bicubic", align_corners=False)`` along one ragged axis.

    ROI ``n`` has ``sizes[n]`` output positions resampled from ``m`` input cells; positions of all
    ROIs are concatenated (ROI-major).  For each position: its ROI, its index, the four clamped
    input indices and weights, and its *cell* -- ``floor`` of the source coordinate (-1..m-1), the
    input interval whose four neighbours it reads.  Same float32 arithmetic as torch's CPU kernel
    (``area_pixel_compute_source_index``, ``guard_index_and_lambda``,
    ``get_cubic_upsample_coefficients``).
    """
    sizes = sizes.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    pos = np.arange(int(sizes.sum()), dtype=np.int64) - starts[owner]
    scale = (np.float32(m) / sizes.astype(np.float32))[owner]
    src = scale * (pos.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    cell = np.minimum(np.floor(src).astype(np.int64), m - 1)
    t = np.clip(src - cell.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    a = _CUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + np.float32(1)

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

    u = np.float32(1) - t
    weights = np.stack([far(t + np.float32(1)), near(t), near(u), far(u + np.float32(1))], axis=1)
    index = np.clip(cell[:, None] + np.arange(-1, 3), 0, m - 1)
    return {"owner": owner, "pos": pos, "starts": starts, "cell": cell, "index": index,
            "weights": weights.astype(np.float32)}


def _cell_ranges(axis: dict[str, np.ndarray], n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, m + 1] first and end positions (concatenated indexing) of each ROI's cells -1..m-1.

    Cells grow with the position, so each (ROI, cell) is one contiguous run; empty cells (a ROI
    smaller than ``m`` skips some) get start == end.
    """
    key = axis["owner"] * (m + 1) + axis["cell"] + 1  # non-decreasing
    grid = np.arange(n * (m + 1))
    lo = np.searchsorted(key, grid, side="left").reshape(n, m + 1)
    hi = np.searchsorted(key, grid, side="right").reshape(n, m + 1)
    return lo, hi


def decode_keypoints(heatmaps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Keypoints (x, y, score) from keypoint-head heatmaps, as Detectron2's ``heatmaps_to_keypoints``.

    Detectron2 resizes each ROI's [K, 56, 56] logits bicubically to the box's ceil'ed size, takes
    the argmax per keypoint, maps it back with the ``+ 0.5`` pixel-centre convention and the
    ``width / ceil(width)`` correction, and scores it ``1 / sum(exp(heatmap - max))`` (the
    softmax normalised over the 56x56 map).  It does that in a Python loop, one
    ``F.interpolate`` per ROI: 100 detections of a few hundred pixels each are ~10^8 resized
    values, nearly all of them far below the peak.

    Here all ROIs are decoded together and only where the maximum can be.  Bicubic resizing is
    separable: first every ROI's columns are resampled to its width (one gather over the
    concatenated columns of all ROIs: ``A [sum(W), K, 56]``), then rows.  An output pixel in row
    cell ``j`` (its source row lies in input interval ``j``) is ``w0 t0 + w1 t1 + w2 t2 + w3 t3``
    over four rows of ``A`` with ``w1, w2 >= 0`` and outer weights in ``[-1/9, 0]`` summing to 1,
    so it is at most ``max(t1, t2) + (1/9)(relu(max - t0) + relu(max - t3))``.  Taken per cell of
    rows x columns, that bounds every output pixel of the cell.  The cell with the highest bound
    is evaluated exactly, which gives a value the maximum reaches; then every cell whose bound
    reaches that value is evaluated exactly too, and the first maximum in row-major order wins
    (torch's argmax).  The result is Detectron2's, up to float rounding, for any number of ROIs,
    while evaluating a few cells per keypoint instead of every pixel.

    Args:
        heatmaps: [N, K, S, S] logits (the graph's ``detection_heatmaps`` rows, Detectron2's
            ``pred_keypoint_heatmaps``).
        boxes: [N, 4] x1, y1, x2, y2 in the pixels the keypoints should come out in (the network
            input for both Detectron2 and the graph); may extend past the image.

    Returns:
        float32 [N, K, 3]: x, y (same pixels as ``boxes``), score.
    """
    maps = np.ascontiguousarray(heatmaps, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if maps.ndim != 4 or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"heatmaps must be [N, K, S, S], got {maps.shape}")
    n, k, m, _ = maps.shape
    if len(boxes) != n:
        raise ValueError(f"{n} heatmaps but {len(boxes)} boxes")
    if n == 0 or k == 0:
        return np.zeros((n, k, 3), np.float32)
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], np.float32(1))
    heights = np.maximum(boxes[:, 3] - boxes[:, 1], np.float32(1))
    wc, hc = np.ceil(widths), np.ceil(heights)
    cols, rows = _cubic_axis(wc.astype(np.int64), m), _cubic_axis(hc.astype(np.int64), m)

    # Columns of every ROI resampled to its width: A[p, k, r] (p = concatenated column, r = input row).
    by_col = maps.transpose(0, 3, 1, 2)  # [N, S(col), K, S(row)]
    a = by_col[cols["owner"], cols["index"][:, 0]] * cols["weights"][:, 0, None, None]
    for tap in range(1, 4):
        a += by_col[cols["owner"], cols["index"][:, tap]] * cols["weights"][:, tap, None, None]

    # Upper bound of the output pixels of each (ROI, column cell, keypoint, row cell).
    col_lo, col_hi = _cell_ranges(cols, n, m)
    row_lo, row_hi = _cell_ranges(rows, n, m)
    nonempty = col_hi > col_lo
    starts = col_lo[nonempty]
    a_max = np.pad(np.maximum.reduceat(a, starts, axis=0), ((0, 0), (0, 0), (2, 2)), mode="edge")
    a_min = np.pad(np.minimum.reduceat(a, starts, axis=0), ((0, 0), (0, 0), (2, 2)), mode="edge")
    # row cell j (-1..m-1) reads input rows j-1..j+2, at padded positions j+1..j+4
    top = np.maximum(a_max[:, :, 1:m + 2], a_max[:, :, 2:m + 3])
    bound = top + _OUTER_TAP_MAX * (np.maximum(top - a_min[:, :, 0:m + 1], 0)
                                    + np.maximum(top - a_min[:, :, 3:m + 4], 0))
    bound += np.float32(1e-5) * (np.abs(top) + np.float32(1))  # float rounding of both sides
    upper = np.full((n, m + 1, k, m + 1), -np.inf, np.float32)  # [ROI, col cell, K, row cell]
    upper[nonempty] = bound
    upper = np.where((row_hi > row_lo)[:, None, None, :], upper, -np.inf).transpose(0, 2, 1, 3)
    upper = upper.reshape(n, k, -1)  # cell id = col cell * (m + 1) + row cell

    ctx = (a, maps.shape, cols, rows, col_lo, col_hi, row_lo, row_hi, wc.astype(np.int64))
    roi, kp = np.divmod(np.arange(n * k), k)
    first = upper.reshape(n * k, -1).argmax(axis=1)
    best, where = _eval_cells(roi, kp, first, ctx)
    cand = upper >= best.reshape(n, k, 1)
    cand.reshape(n * k, -1)[np.arange(n * k), first] = False
    c_roi, c_kp, c_cell = np.nonzero(cand)
    if len(c_roi):
        val, lin = _eval_cells(c_roi, c_kp, c_cell, ctx)
        flat = c_roi * k + c_kp
        order = np.lexsort((lin, -val, flat))  # per keypoint: highest value, then first in row-major
        flat, val, lin = flat[order], val[order], lin[order]
        head = np.ones(len(flat), bool)
        head[1:] = flat[1:] != flat[:-1]
        flat, val, lin = flat[head], val[head], lin[head]
        better = (val > best[flat]) | ((val == best[flat]) & (lin < where[flat]))
        best[flat[better]], where[flat[better]] = val[better], lin[better]

    best, where = best.reshape(n, k), where.reshape(n, k)
    w_int = wc.astype(np.int64)[:, None]
    x_int, y_int = where % w_int, where // w_int
    x = (x_int.astype(np.float32) + np.float32(0.5)) * (widths / wc)[:, None] + boxes[:, 0, None]
    y = (y_int.astype(np.float32) + np.float32(0.5)) * (heights / hc)[:, None] + boxes[:, 1, None]
    score = np.float32(1) / np.exp(maps - best[:, :, None, None]).sum(axis=(2, 3), dtype=np.float32)
    return np.stack([x, y, score], axis=-1).astype(np.float32)


def _eval_cells(roi: np.ndarray, kp: np.ndarray, cell: np.ndarray, ctx: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Exact bicubic values over whole cells: per cell its maximum and first argmax (y * W + x)."""
    a, shape, cols, rows, col_lo, col_hi, row_lo, row_hi, w_int = ctx
    _, k, m, _ = shape
    ci, cj = np.divmod(cell, m + 1)
    c0, c1 = col_lo[roi, ci], col_hi[roi, ci]
    r0, r1 = row_lo[roi, cj], row_hi[roi, cj]
    count = (c1 - c0) * (r1 - r0)
    best = np.empty(len(cell), np.float32)
    where = np.empty(len(cell), np.int64)
    # batches of whole cells, so a pathological number of candidates cannot exhaust memory
    ends = np.cumsum(count)
    batch_of = ends // _EVAL_BUDGET
    for b in np.unique(batch_of):
        sel = np.nonzero(batch_of == b)[0]
        cnt = count[sel]
        owner = np.repeat(np.arange(len(sel)), cnt)
        local = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        width = (c1 - c0)[sel][owner]
        q = r0[sel][owner] + local // width  # concatenated row position
        p = c0[sel][owner] + local % width  # concatenated column position
        kk = kp[sel][owner]
        base = (p * k + kk) * m
        flat_a = a.reshape(-1)
        idx, wts = rows["index"][q], rows["weights"][q]
        val = flat_a[base + idx[:, 0]] * wts[:, 0]
        for tap in range(1, 4):
            val += flat_a[base + idx[:, tap]] * wts[:, tap]
        starts = np.cumsum(cnt) - cnt
        top = np.maximum.reduceat(val, starts)
        lin = rows["pos"][q] * w_int[roi[sel][owner]] + cols["pos"][p]
        lin = np.where(val == top[owner], lin, np.iinfo(np.int64).max)
        best[sel] = top
        where[sel] = np.minimum.reduceat(lin, starts)
    return best, where


FAMILY = KeypointRCNN
