"""Tests for d2build.compare: IoUs, one-to-one matching on constructed cases, mismatch reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from d2build.compare import box_iou, describe_mismatches, mask_iou, match_detections
from d2build.processing import Detections

NAMES = ["person", "bicycle", "car", "motorcycle"]


def _det(boxes, scores, classes, masks=None) -> Detections:
    return Detections(np.asarray(boxes, np.float32), np.asarray(scores, np.float32), classes, masks)


def _shifted(dx: float) -> list[float]:
    return [dx, 0.0, 100.0 + dx, 100.0]


# --------------------------------------------------------------------------- #
# IoUs
# --------------------------------------------------------------------------- #


def test_box_iou_known_values():
    a = np.array([[0, 0, 2, 2], [0, 0, 10, 10], [5, 5, 5, 9]], np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    iou = box_iou(a, b)
    assert iou.shape == (3, 3)
    assert iou[0, 0] == pytest.approx(1 / 7)
    assert iou[1, 1] == 1.0
    assert iou[1, 0] == pytest.approx(4 / 100)
    assert iou[1, 2] == 0.0
    assert np.all(iou[2] == 0.0)  # zero-area box overlaps nothing
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_mask_iou_pairs():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2] = True  # 8 px
    b[0, :1] = True  # 4 px inside a
    a[1, 0, 0] = True  # disjoint
    b[1, 3, 3] = True
    # pair 2: both empty
    np.testing.assert_allclose(mask_iou(a, b), [0.5, 0.0, 1.0])
    with pytest.raises(ValueError):
        mask_iou(a, b[:2])


# --------------------------------------------------------------------------- #
# matching
# --------------------------------------------------------------------------- #


def test_identical_sets_in_different_order_match_perfectly():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 80, (12, 2))], 1)
    scores = rng.uniform(0.1, 1, 12)
    classes = rng.integers(0, 4, 12)
    masks = rng.uniform(size=(12, 40, 40)) > 0.5
    ref = _det(boxes, scores, classes, masks)
    perm = rng.permutation(12)
    got = ref.subset(perm)

    r = match_detections(ref, got)
    assert r.all_matched and r.recovered == 1.0 and r.precision == 1.0
    assert sorted(r.pairs) == sorted((int(perm[j]), j) for j in range(12))
    assert r.mean_box_iou == 1.0 and r.mean_mask_iou == 1.0 and r.min_mask_iou == 1.0
    assert r.max_score_diff == 0.0 and r.mean_score_diff == 0.0
    assert describe_mismatches(r, ref, got, NAMES) == []


def test_class_mismatch_is_not_matched_and_is_named():
    ref = _det([[10, 10, 50, 50]], [0.9], [0])
    got = _det([[10, 10, 50, 50]], [0.9], [2])
    r = match_detections(ref, got)
    assert r.pairs == [] and r.unmatched_ref == [0] and r.unmatched_got == [0]
    assert r.recovered == 0.0 and math.isnan(r.mean_box_iou)
    lines = describe_mismatches(r, ref, got, NAMES)
    assert len(lines) == 2
    assert lines[0].startswith("missing: reference #0: person")
    assert "class differs (car)" in lines[0] and "IoU 1.000" in lines[0]
    assert lines[1].startswith("extra: graph #0: car") and "class differs (person)" in lines[1]


def test_iou_threshold_boundary():
    # IoU of [dx, 0, 100 + dx, 100] with [0, 0, 100, 100] is (100 - dx) / (100 + dx); 0.98 at dx ~ 1.0101.
    ref = _det([_shifted(0)], [0.8], [1])
    below = _det([_shifted(1.05)], [0.8], [1])  # IoU 0.9795
    above = _det([_shifted(0.95)], [0.8], [1])  # IoU 0.9812
    r = match_detections(ref, below)
    assert r.pairs == [] and r.recovered == 0.0
    lines = describe_mismatches(r, ref, below, NAMES)
    assert "IoU 0.980 < 0.98" in lines[0] or "IoU 0.979 < 0.98" in lines[0]
    r = match_detections(ref, above)
    assert r.pairs == [(0, 0)] and r.box_ious[0] == pytest.approx(99.05 / 100.95, rel=1e-6)
    # The threshold is a parameter.
    assert match_detections(ref, below, iou_min=0.97).pairs == [(0, 0)]


def test_score_tolerance_boundary():
    ref = _det([_shifted(0)], [0.5], [3])
    assert match_detections(ref, _det([_shifted(0)], [0.511], [3])).pairs == []
    assert match_detections(ref, _det([_shifted(0)], [0.489], [3])).pairs == []
    r = match_detections(ref, _det([_shifted(0)], [0.509], [3]))
    assert r.pairs == [(0, 0)]
    assert r.score_diffs[0] == pytest.approx(0.009, abs=1e-6)  # signed got - ref
    assert r.max_score_diff == pytest.approx(0.009, abs=1e-6)
    # Exactly at the tolerance (both values exact in float32) is accepted.
    assert match_detections(ref, _det([_shifted(0)], [0.5078125], [3]), score_tol=0.0078125).pairs == [(0, 0)]
    r = match_detections(ref, _det([_shifted(0)], [0.6], [3]))
    assert "|score diff| 0.100 > 0.01" in describe_mismatches(r, ref, _det([_shifted(0)], [0.6], [3]))[0]


def test_duplicates_are_matched_one_to_one_best_iou_first():
    # Two identical reference detections, one on the other side: one stays unmatched.
    ref = _det([_shifted(0), _shifted(0)], [0.9, 0.9], [0, 0])
    got = _det([_shifted(0)], [0.9], [0])
    r = match_detections(ref, got)
    assert len(r.pairs) == 1 and len(r.unmatched_ref) == 1 and r.unmatched_got == []
    assert r.recovered == 0.5 and r.precision == 1.0
    assert "already matched" in describe_mismatches(r, ref, got, NAMES)[0]

    # The other way round: the extra one is reported as extra.
    r = match_detections(got, ref)
    assert len(r.pairs) == 1 and r.unmatched_ref == [] and len(r.unmatched_got) == 1
    assert r.recovered == 1.0 and r.precision == 0.5

    # With two candidates, the closer box wins even if it comes second.
    ref = _det([_shifted(0)], [0.9], [0])
    got = _det([_shifted(0.5), _shifted(0.1)], [0.9, 0.9], [0, 0])
    r = match_detections(ref, got)
    assert r.pairs == [(0, 1)] and r.unmatched_got == [0]

    # Greedy order: a pair with higher IoU claims its partner first.
    ref = _det([_shifted(0), _shifted(0.6)], [0.9, 0.9], [0, 0])
    got = _det([_shifted(0.55)], [0.9], [0])
    r = match_detections(ref, got)
    assert r.pairs == [(1, 0)] and r.unmatched_ref == [0]


def test_empty_sets():
    empty = Detections.empty()
    one = _det([_shifted(0)], [0.9], [0])

    r = match_detections(empty, empty)
    assert r.recovered == 1.0 and r.all_matched and r.mean_box_iou == 1.0 and r.max_score_diff == 0.0
    assert r.mean_mask_iou is None
    json.dumps(r.to_dict(), allow_nan=False)

    r = match_detections(empty, one)
    assert r.recovered == 0.0 and r.unmatched_got == [0]
    assert describe_mismatches(r, empty, one, NAMES) == [
        "extra: graph #0: person box [0.0, 0.0, 100.0, 100.0] score 0.900; reference has no detections"
    ]

    r = match_detections(one, empty)
    assert r.recovered == 0.0 and r.unmatched_ref == [0]
    d = r.to_dict()
    assert d["mean_box_iou"] is None and d["matched"] == 0
    json.dumps(d, allow_nan=False)


def test_masks_compared_for_pairs_and_reported():
    hw = (20, 20)
    m_ref = np.zeros((2, *hw), bool)
    m_got = np.zeros((2, *hw), bool)
    m_ref[0, 2:10, 2:10] = True
    m_got[0, 2:10, 2:10] = True
    m_ref[1, 0:10, 0:10] = True  # 100 px
    m_got[1, 0:5, 0:10] = True  # 50 px, inside: IoU 0.5
    ref = _det([_shifted(0), [200, 200, 300, 300]], [0.9, 0.8], [0, 1], m_ref)
    got = _det([_shifted(0), [200, 200, 300, 300]], [0.9, 0.8], [0, 1], m_got)
    r = match_detections(ref, got)
    assert r.pairs == [(0, 0), (1, 1)]
    assert r.mask_ious == [1.0, 0.5] and r.mean_mask_iou == 0.75 and r.min_mask_iou == 0.5
    lines = describe_mismatches(r, ref, got, NAMES, mask_iou_min=0.9)
    assert lines == ["mask: reference #1 / graph #1 bicycle mask IoU 0.500 < 0.9"]

    # One side without masks: nothing to compare.
    r = match_detections(ref, _det(got.boxes, got.scores, got.classes))
    assert r.mask_ious is None and r.mean_mask_iou is None and len(r.pairs) == 2


def test_to_dict_is_json_ready():
    ref = _det([_shifted(0), _shifted(300)], [0.9, 0.7], [0, 5])
    got = _det([_shifted(0.2)], [0.905], [0])
    r = match_detections(ref, got)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["matched"] == 1 and d["n_ref"] == 2 and d["recovered"] == 0.5
    assert d["pairs"] == [[0, 0]] and d["unmatched_ref"] == [1] and d["unmatched_got"] == []
    assert d["score_diffs"][0] == pytest.approx(0.005, abs=1e-6)
    assert d["mean_box_iou"] == pytest.approx(99.8 / 100.2, rel=1e-6)
    # Unknown class ids fall back to a generic name.
    assert describe_mismatches(r, ref, got, NAMES)[0].startswith("missing: reference #1: class 5")


def test_describe_mismatches_limit_and_order():
    ref = _det([[i * 10, 0, i * 10 + 5, 5] for i in range(15)], np.linspace(0.2, 0.9, 15), [0] * 15)
    lines = describe_mismatches(match_detections(ref, Detections.empty()), ref, Detections.empty(), NAMES)
    assert len(lines) == 11 and lines[-1] == "... and 5 more"
    assert lines[0].startswith("missing: reference #14:")  # highest score first
