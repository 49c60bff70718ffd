"""Tests for d2build.processing: letterbox geometry, image loading, box mapping, mask pasting, decoding.

Detectron2 is the reference wherever it has an equivalent (ResizeTransform,
read_image, detector_postprocess, paste_masks_in_image).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from d2build.families import family
from d2build.processing import (
    Detections,
    Letterbox,
    boxes_to_input,
    boxes_to_original,
    detections_from_instances,
    letterbox,
    load_image_bgr,
    paste_masks,
)

PIXEL_MEAN = (103.53, 116.28, 123.675)  # Detectron2's default BGR mean
PIXEL_STD = (57.375, 57.12, 58.395)
REPO = Path(__file__).resolve().parents[1]


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _smooth_masks(rng: np.random.Generator, n: int, m: int = 28) -> np.ndarray:
    """Mask-head-like probabilities: smooth blobs, mostly near 0 or 1, some in between."""
    coarse = rng.normal(size=(n, 6, 6)).astype(np.float32)
    fine = np.stack([np.asarray(Image.fromarray(c, "F").resize((m, m), Image.Resampling.BICUBIC)) for c in coarse])
    return (1.0 / (1.0 + np.exp(-4.0 * fine))).astype(np.float32)


def _random_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Boxes of all sizes (sub-pixel to larger than the image); every box overlaps the image,
    many stick out of it (Detectron2's paster cannot handle boxes entirely outside)."""
    cx = rng.uniform(0, w, n)
    cy = rng.uniform(0, h, n)
    bw = np.exp(rng.uniform(np.log(0.5), np.log(1.5 * w), n))
    bh = np.exp(rng.uniform(np.log(0.5), np.log(1.5 * h), n))
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)


def _d2_paste(masks: np.ndarray, boxes: np.ndarray, hw: tuple[int, int], thr: float = 0.5) -> np.ndarray:
    from detectron2.layers.mask_ops import paste_masks_in_image

    return paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes), hw, threshold=thr).numpy()


def _iou_per_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# --------------------------------------------------------------------------- #
# letterbox
# --------------------------------------------------------------------------- #


def test_letterbox_landscape_photo_matches_detectron2_resize_and_pads_with_mean():
    from detectron2.data.transforms import ResizeTransform

    img = _bgr(data.coffee())  # 400 x 600
    chw, lb = letterbox(img, (800, 800), PIXEL_MEAN)

    assert lb.original_hw == (400, 600)
    assert lb.input_hw == (800, 800)
    assert lb.scale == pytest.approx(800 / 600)
    assert lb.resized_hw == (533, 800)  # 400 * 4/3 = 533.33
    assert lb.padding_hw == (267, 0)
    assert chw.shape == (3, 800, 800) and chw.dtype == np.float32

    expected = ResizeTransform(400, 600, 533, 800).apply_image(img)  # Detectron2's own resize
    np.testing.assert_array_equal(chw[:, :533, :], expected.transpose(2, 0, 1).astype(np.float32))
    # Channel order is kept: plane 0 is blue.
    assert np.array_equal(chw[0, :533], expected[:, :, 0].astype(np.float32))
    for c in range(3):
        assert np.all(chw[c, 533:, :] == np.float32(PIXEL_MEAN[c]))

    # Padding normalises to exactly zero, like ImageList padding after normalisation.
    mean = np.array(PIXEL_MEAN, np.float32)[:, None, None]
    std = np.array(PIXEL_STD, np.float32)[:, None, None]
    assert np.all(((chw - mean) / std)[:, 533:, :] == 0.0)
    assert np.abs((chw - mean) / std)[:, :533, :].max() > 1.0  # content is not padding


def test_letterbox_nonsquare_target_pads_right():
    img = _bgr(data.chelsea())  # 300 x 451
    chw, lb = letterbox(img, (640, 1024), (1.0, 2.0, 3.0))
    assert lb.scale == pytest.approx(640 / 300)
    assert lb.resized_hw == (640, 962)  # 451 * 2.1333 = 962.13
    assert lb.padding_hw == (0, 62)
    assert np.all(chw[:, :, 962:] == np.array([1.0, 2.0, 3.0], np.float32)[:, None, None])
    # The image content reaches the last resized column (it is not padding).
    assert not np.all(chw[:, :, 961] == np.array([1.0, 2.0, 3.0], np.float32)[:, None])


def test_letterbox_upscales_exactly_and_rounds_half_up():
    img = _bgr(data.astronaut())  # 512 x 512
    chw, lb = letterbox(img, (1344, 1344), PIXEL_MEAN)
    assert lb.scale == 2.625 and lb.resized_hw == (1344, 1344) and lb.padding_hw == (0, 0)
    assert lb.scale_xy == (2.625, 2.625)

    # 5 x 8 into 10 x 4: scale 0.5, 2.5 rows -> 3 (Detectron2's int(x + 0.5), not banker's round).
    _, lb = letterbox(np.zeros((5, 8, 3), np.uint8), (10, 4), PIXEL_MEAN)
    assert lb.resized_hw == (3, 4)


def test_letterbox_rejects_bad_input():
    with pytest.raises(ValueError):
        letterbox(np.zeros((4, 4, 3), np.float32), (8, 8), PIXEL_MEAN)
    with pytest.raises(ValueError):
        letterbox(np.zeros((4, 4), np.uint8), (8, 8), PIXEL_MEAN)
    with pytest.raises(ValueError):
        letterbox(np.zeros((4, 4, 3), np.uint8), (8, 8), (0.0, 0.0))


# --------------------------------------------------------------------------- #
# load_image_bgr
# --------------------------------------------------------------------------- #


def test_load_image_bgr_rgb_gray_rgba(tmp_path):
    rgb = data.astronaut()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = load_image_bgr(tmp_path / "rgb.png")
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb[:, :, ::-1])

    gray = data.camera()
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = load_image_bgr(tmp_path / "gray.png")
    assert out.shape == gray.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)

    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image_bgr(tmp_path / "rgba.png"), rgb[:, :, ::-1])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_load_image_bgr_applies_exif_orientation_like_detectron2(tmp_path, orientation):
    from detectron2.data.detection_utils import read_image

    rgb = data.chelsea()  # 300 x 451, not square, so rotations show in the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)

    ours = load_image_bgr(path)
    ref = read_image(str(path), format="BGR")
    np.testing.assert_array_equal(ours, ref)
    expected_shape = (451, 300, 3) if orientation in (6, 8) else (300, 451, 3)
    assert ours.shape == expected_shape


# --------------------------------------------------------------------------- #
# boxes
# --------------------------------------------------------------------------- #


def test_boxes_round_trip_and_clip():
    lb = Letterbox(original_hw=(300, 451), input_hw=(640, 1024), scale=640 / 300, resized_hw=(640, 962))
    rng = np.random.default_rng(1)
    xy = rng.uniform([0, 0], [451, 300], size=(50, 2))
    wh = rng.uniform(1, 100, size=(50, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [451, 300])], 1).astype(np.float32)

    back = boxes_to_original(boxes_to_input(boxes, lb), lb)
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    assert back.dtype == np.float32

    # Boxes reaching into the padding or beyond the input are clipped to the original image.
    out = boxes_to_original(np.array([[-10, -5, 1000, 700], [950, 10, 1020, 20]], np.float32), lb)
    np.testing.assert_allclose(out[0], [0, 0, 451, 300])
    assert out[1, 2] == 451 and out[1, 0] == pytest.approx(950 * 451 / 962, rel=1e-6)


def test_boxes_to_original_matches_detector_postprocess():
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    _, lb = letterbox(_bgr(data.chelsea()), (640, 1024), PIXEL_MEAN)
    rng = np.random.default_rng(2)
    xy = rng.uniform([-20, -20], [900, 600], size=(40, 2))
    boxes_in = np.concatenate([xy, xy + rng.uniform(30, 300, size=(40, 2))], 1).astype(np.float32)
    inst = Instances(lb.resized_hw, pred_boxes=Boxes(torch.from_numpy(boxes_in.copy())))
    ref = detector_postprocess(inst, *lb.original_hw).pred_boxes.tensor.numpy()
    assert len(ref) == 40
    np.testing.assert_allclose(boxes_to_original(boxes_in, lb), ref, atol=1e-4)


# --------------------------------------------------------------------------- #
# paste_masks
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_paste_masks_matches_detectron2_on_smooth_masks(threshold):
    rng = np.random.default_rng(3)
    hw = (317, 450)
    masks = _smooth_masks(rng, 80)
    boxes = _random_boxes(rng, 80, *hw)
    assert (boxes[:, 0] < 0).any() and (boxes[:, 2] > hw[1]).any()  # some stick out
    assert ((boxes[:, 2] - boxes[:, 0]) < 2).any()  # some are tiny

    ours = paste_masks(masks, boxes, hw, threshold=threshold)
    ref = _d2_paste(masks, boxes, hw, threshold)
    assert ours.shape == ref.shape == (80, *hw) and ours.dtype == bool
    ious = _iou_per_mask(ours, ref)
    assert ious.mean() >= 0.99
    assert (ours == ref).mean() >= 0.99999
    assert ref.sum() > 10_000  # the comparison is not between two empty stacks


def test_paste_masks_matches_detectron2_on_noise_masks():
    # Uniform noise puts many values near the threshold: the hardest case for exact agreement.
    rng = np.random.default_rng(4)
    hw = (200, 300)
    masks = rng.uniform(size=(50, 28, 28)).astype(np.float32)
    boxes = _random_boxes(rng, 50, *hw)
    ours = paste_masks(masks[:, None], boxes, hw)  # [N, 1, M, M] accepted too
    ref = _d2_paste(masks, boxes, hw)
    assert _iou_per_mask(ours, ref).mean() >= 0.99
    assert (ours == ref).mean() >= 0.9999


def test_paste_masks_edge_cases():
    hw = (40, 60)
    assert paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4)), hw).shape == (0, 40, 60)
    ones = np.ones((3, 28, 28), np.float32)
    boxes = np.array([[10, 10, 10, 20], [100, 100, 120, 130], [-30, -30, -5, -5]], np.float32)
    # Degenerate and fully-outside boxes paste nothing (and do not crash).
    assert not paste_masks(ones, boxes, hw).any()

    # An all-ones mask fills exactly the pixels whose centres are inside the box.
    out = paste_masks(ones[:1], np.array([[5, 8, 25, 30]], np.float32), hw)[0]
    expected = np.zeros(hw, bool)
    expected[8:30, 5:25] = True
    np.testing.assert_array_equal(out, expected)

    # Box edges on pixel centres sample exactly 0.5 on the edge (kept: ">= threshold")
    # and 0.25 in the corners (dropped), as in Detectron2.
    box = np.array([[4.5, 7.5, 24.5, 29.5]], np.float32)
    out = paste_masks(ones[:1], box, hw)[0]
    np.testing.assert_array_equal(out, _d2_paste(ones[:1], box, hw)[0])
    assert out[7, 10] and out[15, 4] and out[29, 10] and out[15, 24]
    assert not out[7, 4] and not out[29, 24] and not out[6, 10]
    with pytest.raises(ValueError):
        paste_masks(ones, boxes[:2], hw)


def test_paste_100_masks_on_1344_matches_detectron2():
    rng = np.random.default_rng(5)
    hw = (1344, 1344)
    masks = _smooth_masks(rng, 100)
    # Realistic detections: 8 px .. 90 % of the image.
    cx, cy = rng.uniform(0, 1344, (2, 100))
    bw, bh = np.exp(rng.uniform(np.log(8), np.log(1200), (2, 100)))
    boxes = np.clip(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1), 0, 1344).astype(np.float32)
    out = paste_masks(masks, boxes, hw)  # one vectorised call for all 100 (speed: a benchmark, not a test)
    assert out.shape == (100, *hw) and out.any(axis=(1, 2)).all()
    # Detectron2 itself needs seconds for all 100 on CPU; a sample is enough here.
    some = slice(0, 100, 5)
    assert _iou_per_mask(out[some], _d2_paste(masks[some], boxes[some], hw)).mean() >= 0.999


MASK_RCNN = family("mask_rcnn")


# --------------------------------------------------------------------------- #
# Family.decode / detections_from_instances
# --------------------------------------------------------------------------- #


def _fake_outputs(rng: np.random.Generator, lb: Letterbox, counts: list[int], max_det: int = 10):
    """Graph outputs for len(counts) images; rows past each count are garbage padding."""
    b = len(counts)
    rh, rw = lb.resized_hw
    xy = rng.uniform(0, [rw * 0.8, rh * 0.8], size=(b, max_det, 2))
    wh = rng.uniform(10, [rw * 0.5, rh * 0.5], size=(b, max_det, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    scores = np.sort(rng.uniform(0.05, 1, (b, max_det)), axis=1)[:, ::-1].astype(np.float32)
    classes = rng.integers(0, 80, (b, max_det)).astype(np.int32)
    masks = _smooth_masks(rng, b * max_det).reshape(b, max_det, 28, 28)
    for i, n in enumerate(counts):
        boxes[i, n:] = -1.0
        scores[i, n:] = -1.0
        classes[i, n:] = -1
    return {
        "num_detections": np.array(counts, np.int32).reshape(b, 1),
        "detection_boxes": boxes,
        "detection_scores": scores,
        "detection_classes": classes,
        "detection_masks": masks,
    }


def test_decode_keeps_valid_rows_and_maps_to_original():
    _, lb = letterbox(_bgr(data.coffee()), (800, 800), PIXEL_MEAN)
    out = _fake_outputs(np.random.default_rng(6), lb, [4, 7])

    for b, n in enumerate([4, 7]):
        det = MASK_RCNN.decode(out, lb, image_index=b)
        assert len(det) == n
        assert det.boxes.dtype == np.float32 and det.scores.dtype == np.float32
        assert det.classes.dtype == np.int64
        np.testing.assert_array_equal(det.classes, out["detection_classes"][b, :n])
        np.testing.assert_array_equal(det.scores, out["detection_scores"][b, :n])
        np.testing.assert_allclose(det.boxes, boxes_to_original(out["detection_boxes"][b, :n], lb))
        assert det.boxes[:, 2].max() <= 600 and det.boxes[:, 3].max() <= 400
        assert det.masks.shape == (n, 400, 600) and det.masks.dtype == bool
        np.testing.assert_array_equal(
            det.masks, paste_masks(out["detection_masks"][b, :n], det.boxes, (400, 600))
        )
        assert det.masks.any(axis=(1, 2)).all()

    no_masks = {k: v for k, v in out.items() if k != "detection_masks"}
    assert family("faster_rcnn").decode(no_masks, lb).masks is None

    empty = dict(out, num_detections=np.zeros((2, 1), np.int32))
    det = MASK_RCNN.decode(empty, lb, image_index=1)
    assert len(det) == 0 and det.masks.shape == (0, 400, 600)


def test_detections_from_instances_agrees_with_decode_and_detector_postprocess():
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    _, lb = letterbox(_bgr(data.rocket()), (640, 640), PIXEL_MEAN)
    n = 9
    out = _fake_outputs(np.random.default_rng(7), lb, [n])
    inst = Instances(
        lb.input_hw,
        pred_boxes=Boxes(torch.from_numpy(out["detection_boxes"][0, :n].copy())),
        scores=torch.from_numpy(out["detection_scores"][0, :n].copy()),
        pred_classes=torch.from_numpy(out["detection_classes"][0, :n].astype(np.int64)),
        pred_masks=torch.from_numpy(out["detection_masks"][0, :n, None].copy()),
    )
    ref = detections_from_instances(inst, lb)
    got = MASK_RCNN.decode(out, lb)
    np.testing.assert_array_equal(ref.boxes, got.boxes)
    np.testing.assert_array_equal(ref.scores, got.scores)
    np.testing.assert_array_equal(ref.classes, got.classes)
    assert ref.masks.shape == got.masks.shape == (n, *lb.original_hw)
    assert (ref.masks == got.masks).mean() >= 0.99999

    # The reference side equals Detectron2's own postprocessing (which sees the
    # resized, unpadded size as the instances' image size).
    inst_resized = Instances(lb.resized_hw, **inst.get_fields())
    d2 = detector_postprocess(inst_resized, *lb.original_hw)
    assert len(d2) == n
    np.testing.assert_allclose(ref.boxes, d2.pred_boxes.tensor.numpy(), atol=1e-4)
    np.testing.assert_array_equal(ref.masks, d2.pred_masks.numpy())


def test_detections_container():
    det = Detections(np.zeros((2, 4)), [0.9, 0.8], np.array([1, 2], np.int32))
    assert len(det) == 2 and det.classes.dtype == np.int64 and det.boxes.dtype == np.float32
    assert len(det.subset(det.scores > 0.85)) == 1
    assert len(Detections.empty((5, 6))) == 0
    with pytest.raises(ValueError):
        Detections(np.zeros((2, 4)), [0.9], [1, 2])


def test_import_does_not_pull_in_detectron2_or_torch():
    code = (
        "import sys; import d2build.processing, d2build.compare, d2build.visualize; "
        "bad = [m for m in ('detectron2', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
