"""Comparing two detection sets as sets.

An exported graph is correct when it finds the same objects as Detectron2:
same class, practically the same box, practically the same score and mask.
Row order is not part of that contract (NMS implementations order ties
differently, and TensorRT's top-k is not stable), so detections are matched
one-to-one instead of compared row by row, and whatever stays unmatched is
reported by name so a failing verification says *which* detections differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2build.processing import Detections

__all__ = ["box_iou", "mask_iou", "MatchResult", "match_detections", "describe_mismatches"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M] float64.

    Computed in float64 so a threshold like 0.98 is not decided by float32
    rounding; degenerate boxes (zero area) have IoU 0 with everything,
    including themselves.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired masks: a[i] against b[i], both [N, h, w] bool -> [N] float64.

    Two empty masks count as identical (IoU 1): both models agree the object
    has no pixels, which is agreement, not a failure.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired masks must have the same shape, got {a.shape} and {b.shape}")
    idx = np.arange(len(a))
    return _paired_mask_iou(a, b, idx, idx)


def _paired_mask_iou(a: np.ndarray, b: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """IoU of a[ii[k]] and b[jj[k]] for each k, one pair at a time.

    A pair at a time on views (no fancy-indexed copies of whole mask stacks):
    100 full-resolution 1344 x 1344 masks are 180 MB per stack, and copying
    and combining them wholesale took seconds where this takes tens of ms.
    """
    out = np.empty(len(ii), dtype=np.float64)
    for k, (i, j) in enumerate(zip(ii, jj, strict=True)):
        ma, mb = a[i], b[j]
        inter = np.count_nonzero(np.logical_and(ma, mb))
        union = np.count_nonzero(ma) + np.count_nonzero(mb) - inter
        out[k] = inter / union if union > 0 else 1.0
    return out


def _nan_to_none(x: float | None) -> float | None:
    """JSON has no NaN; undefined statistics are written as null."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@dataclass
class MatchResult:
    """Outcome of ``match_detections``.

    Attributes:
        pairs: (i_ref, j_got) for each matched detection, best IoU first.
        unmatched_ref: reference detections the other side does not have.
        unmatched_got: detections only the other side has.
        box_ious: box IoU of each pair.
        score_diffs: signed ``got - ref`` score of each pair.
        mask_ious: mask IoU of each pair, or None when either side has no masks.
        n_ref, n_got: sizes of the two sets.
        iou_min, score_tol: the thresholds used (kept for reports).
    """

    pairs: list[tuple[int, int]]
    unmatched_ref: list[int]
    unmatched_got: list[int]
    box_ious: list[float]
    score_diffs: list[float]
    mask_ious: list[float] | None
    n_ref: int
    n_got: int
    iou_min: float = 0.98
    score_tol: float = 0.01

    @property
    def recovered(self) -> float:
        """Fraction of reference detections found: matched / len(ref).

        With an empty reference it is 1.0 when the other side is empty too and
        0.0 otherwise, so spurious detections on an empty image do not read as
        a perfect result.
        """
        if self.n_ref == 0:
            return 1.0 if self.n_got == 0 else 0.0
        return len(self.pairs) / self.n_ref

    @property
    def precision(self) -> float:
        """Fraction of the other side's detections that match: matched / len(got)."""
        if self.n_got == 0:
            return 1.0 if self.n_ref == 0 else 0.0
        return len(self.pairs) / self.n_got

    @property
    def all_matched(self) -> bool:
        """True when every detection on both sides found its partner."""
        return not self.unmatched_ref and not self.unmatched_got

    def _mean(self, values: Sequence[float] | None) -> float:
        if values:
            return float(np.mean(values))
        # No pairs: perfect agreement if both sides are empty, undefined otherwise.
        return 1.0 if self.n_ref == 0 and self.n_got == 0 else float("nan")

    @property
    def mean_box_iou(self) -> float:
        """Mean box IoU over pairs (1.0 if both sets are empty, NaN if nothing matched)."""
        return self._mean(self.box_ious)

    @property
    def mean_mask_iou(self) -> float | None:
        """Mean mask IoU over pairs, None when masks were not compared."""
        if self.mask_ious is None:
            return None
        return self._mean(self.mask_ious)

    @property
    def min_mask_iou(self) -> float | None:
        """Worst mask IoU of any pair (None when masks were not compared or no pairs)."""
        return float(min(self.mask_ious)) if self.mask_ious else None

    @property
    def max_score_diff(self) -> float:
        """Largest |score difference| over pairs (0.0 when nothing matched)."""
        return float(max((abs(d) for d in self.score_diffs), default=0.0))

    @property
    def mean_score_diff(self) -> float:
        """Mean |score difference| over pairs (0.0 when nothing matched)."""
        return float(np.mean(np.abs(self.score_diffs))) if self.score_diffs else 0.0

    @property
    def mean_score_shift(self) -> float:
        """Mean signed score difference (graph - reference) over pairs (0.0 when nothing matched)."""
        return float(np.mean(self.score_diffs)) if self.score_diffs else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready summary plus per-pair details (NaN written as null)."""
        return {
            "n_ref": self.n_ref,
            "n_got": self.n_got,
            "matched": len(self.pairs),
            "recovered": self.recovered,
            "precision": self.precision,
            "all_matched": self.all_matched,
            "mean_box_iou": _nan_to_none(self.mean_box_iou),
            "mean_mask_iou": _nan_to_none(self.mean_mask_iou),
            "min_mask_iou": self.min_mask_iou,
            "max_score_diff": self.max_score_diff,
            "mean_score_diff": self.mean_score_diff,
            "iou_min": self.iou_min,
            "score_tol": self.score_tol,
            "pairs": [[int(i), int(j)] for i, j in self.pairs],
            "unmatched_ref": [int(i) for i in self.unmatched_ref],
            "unmatched_got": [int(j) for j in self.unmatched_got],
            "box_ious": [float(x) for x in self.box_ious],
            "score_diffs": [float(x) for x in self.score_diffs],
            "mask_ious": None if self.mask_ious is None else [float(x) for x in self.mask_ious],
        }


def match_detections(
    ref: Detections,
    got: Detections,
    *,
    iou_min: float = 0.98,
    score_tol: float = 0.01,
) -> MatchResult:
    """Match two detection sets one-to-one.

    A pair is admissible when both detections have the same class, box IoU
    ``>= iou_min`` and ``|score difference| <= score_tol``.  Admissible pairs are
    taken greedily by descending IoU (ties: smaller score difference, then
    lower indices), each detection used at most once.  Greedy is not an optimal
    assignment in general, but with thresholds this tight a detection rarely
    has two admissible partners, and when it does the closer one is the right
    answer -- at a fraction of the code and cost of Hungarian matching.

    Masks of matched pairs are compared (IoU) when both sides carry masks.
    """
    n_ref, n_got = len(ref), len(got)
    ious = box_iou(ref.boxes, got.boxes)
    sdiff = got.scores[None, :].astype(np.float64) - ref.scores[:, None].astype(np.float64)
    same_class = ref.classes[:, None] == got.classes[None, :]
    # Small epsilon: a score difference of exactly score_tol computed in float32
    # must not fail on the 1e-9 noise of float64 subtraction.
    ok = same_class & (ious >= iou_min) & (np.abs(sdiff) <= score_tol + 1e-9)

    cand_i, cand_j = np.nonzero(ok)
    order = np.lexsort((cand_j, cand_i, np.abs(sdiff[cand_i, cand_j]), -ious[cand_i, cand_j]))
    used_ref = np.zeros(n_ref, dtype=bool)
    used_got = np.zeros(n_got, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for k in order:
        i, j = int(cand_i[k]), int(cand_j[k])
        if used_ref[i] or used_got[j]:
            continue
        used_ref[i] = used_got[j] = True
        pairs.append((i, j))

    mask_ious: list[float] | None = None
    if ref.masks is not None and got.masks is not None:
        if pairs:
            if ref.masks.shape[1:] != got.masks.shape[1:]:
                raise ValueError(f"mask sizes differ: {ref.masks.shape[1:]} vs {got.masks.shape[1:]}")
            ii = [p[0] for p in pairs]
            jj = [p[1] for p in pairs]
            mask_ious = [float(x) for x in _paired_mask_iou(ref.masks, got.masks, ii, jj)]
        else:
            mask_ious = []

    return MatchResult(
        pairs=pairs,
        unmatched_ref=[int(i) for i in np.nonzero(~used_ref)[0]],
        unmatched_got=[int(j) for j in np.nonzero(~used_got)[0]],
        box_ious=[float(ious[i, j]) for i, j in pairs],
        score_diffs=[float(sdiff[i, j]) for i, j in pairs],
        mask_ious=mask_ious,
        n_ref=n_ref,
        n_got=n_got,
        iou_min=float(iou_min),
        score_tol=float(score_tol),
    )


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c])
    return f"class {c}"


def _fmt_box(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def _explain_one(
    k: int,
    side: Detections,
    other: Detections,
    ious_row: np.ndarray,
    other_used: set[int],
    result: MatchResult,
    class_names: Sequence[str] | None,
    label: str,
    other_label: str,
) -> str:
    """One line: the unmatched detection, its best candidate on the other side and why it failed."""
    c = int(side.classes[k])
    head = (
        f"{label} #{k}: {_class_name(c, class_names)} box {_fmt_box(side.boxes[k])} "
        f"score {float(side.scores[k]):.3f}"
    )
    if len(other) == 0:
        return f"{head}; {other_label} has no detections"
    # Prefer a same-class candidate; fall back to any class so a class swap is visible.
    same = other.classes == c
    pool = np.nonzero(same)[0] if same.any() else np.arange(len(other))
    j = int(pool[np.argmax(ious_row[pool])])
    iou = float(ious_row[j])
    ds = float(other.scores[j]) - float(side.scores[k])
    reasons = []
    if int(other.classes[j]) != c:
        reasons.append(f"class differs ({_class_name(int(other.classes[j]), class_names)})")
    if iou < result.iou_min:
        reasons.append(f"IoU {iou:.3f} < {result.iou_min:g}")
    if abs(ds) > result.score_tol:
        reasons.append(f"|score diff| {abs(ds):.3f} > {result.score_tol:g}")
    if not reasons and j in other_used:
        reasons.append("already matched to another detection")
    return (
        f"{head}; best {other_label} candidate #{j} "
        f"({_class_name(int(other.classes[j]), class_names)}, IoU {iou:.3f}, score {float(other.scores[j]):.3f})"
        + (f": {', '.join(reasons)}" if reasons else "")
    )


def describe_mismatches(
    result: MatchResult,
    ref: Detections,
    got: Detections,
    class_names: Sequence[str] | None = None,
    limit: int = 10,
    *,
    ref_label: str = "reference",
    got_label: str = "graph",
    mask_iou_min: float | None = None,
) -> list[str]:
    """Human-readable lines naming the detections that did not match.

    Reference detections missing from ``got`` come first (highest score first,
    since those matter most), then extra detections in ``got``; each line gives
    class, box, score and the nearest candidate on the other side with the
    reason it was rejected.  With ``mask_iou_min``, matched pairs whose masks
    agree less than that are listed too.  At most ``limit`` lines plus one
    "... and N more" line.
    """
    ious = box_iou(ref.boxes, got.boxes)
    used_ref = {i for i, _ in result.pairs}
    used_got = {j for _, j in result.pairs}
    lines: list[str] = []

    missing = sorted(result.unmatched_ref, key=lambda i: -float(ref.scores[i]))
    extra = sorted(result.unmatched_got, key=lambda j: -float(got.scores[j]))
    for i in missing:
        lines.append(
            "missing: "
            + _explain_one(i, ref, got, ious[i], used_got, result, class_names, ref_label, got_label)
        )
    for j in extra:
        lines.append(
            "extra: "
            + _explain_one(j, got, ref, ious[:, j], used_ref, result, class_names, got_label, ref_label)
        )
    if mask_iou_min is not None and result.mask_ious:
        for (i, j), m in sorted(zip(result.pairs, result.mask_ious, strict=True), key=lambda t: t[1]):
            if m < mask_iou_min:
                lines.append(
                    f"mask: {ref_label} #{i} / {got_label} #{j} "
                    f"{_class_name(int(ref.classes[i]), class_names)} mask IoU {m:.3f} < {mask_iou_min:g}"
                )

    if len(lines) > limit:
        rest = len(lines) - limit
        lines = lines[:limit] + [f"... and {rest} more"]
    return lines
