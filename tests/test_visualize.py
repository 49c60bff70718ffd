"""Tests for d2build.visualize: sizes, that drawing changes the right pixels, highlighting, PNG output."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image
from skimage import data

from d2build.compare import match_detections
from d2build.processing import Detections, paste_masks
from d2build.visualize import HIGHLIGHT_COLOR, class_color, draw_detections, side_by_side

NAMES = ["cup", "bowl", "dining table"]


def _coffee_scene() -> tuple[np.ndarray, Detections]:
    img = np.ascontiguousarray(data.coffee()[:, :, ::-1])  # 400 x 600 BGR
    boxes = np.array([[80, 50, 520, 380], [200, 10, 420, 120], [20, 300, 200, 399]], np.float32)
    probs = np.zeros((3, 28, 28), np.float32)
    probs[:, 4:24, 4:24] = 0.9
    det = Detections(boxes, [0.98, 0.76, 0.55], [0, 1, 2], paste_masks(probs, boxes, (400, 600)))
    return img, det


def _magenta(rgb: np.ndarray) -> np.ndarray:
    return np.all(rgb == np.array(HIGHLIGHT_COLOR, np.uint8), axis=-1)


def test_draw_detections_size_and_changed_pixels():
    img, det = _coffee_scene()
    pic = draw_detections(img, det, NAMES)
    assert isinstance(pic, Image.Image) and pic.mode == "RGB" and pic.size == (600, 400)
    arr = np.asarray(pic)
    plain = img[:, :, ::-1]

    # Box outlines are drawn in the class colour.
    x0, y0, x1, y1 = det.boxes[0].astype(int)
    assert tuple(arr[(y0 + y1) // 2, x0]) == class_color(0)
    assert tuple(arr[y1, (x0 + x1) // 2]) == class_color(0)
    # Inside every box the picture differs from the photo (mask overlay), substantially.
    for k, (bx0, by0, bx1, by1) in enumerate(det.boxes.astype(int)):
        inside = det.masks[k, by0:by1, bx0:bx1]
        diff = np.abs(arr[by0:by1, bx0:bx1].astype(int) - plain[by0:by1, bx0:bx1].astype(int)).sum(-1)
        assert (diff[inside] > 0).mean() > 0.95
    # Far from any detection nothing changes.
    np.testing.assert_array_equal(arr[5:40, 440:590], plain[5:40, 440:590])

    titled = draw_detections(img, det, NAMES, title="Detectron2")
    assert titled.width == 600 and titled.height > 400
    np.testing.assert_array_equal(np.asarray(titled)[titled.height - 400 :], arr)


def test_draw_detections_empty_and_unknown_names():
    img, det = _coffee_scene()
    pic = draw_detections(img, Detections.empty((400, 600)), NAMES)
    np.testing.assert_array_equal(np.asarray(pic), img[:, :, ::-1])
    det.classes[:] = 99  # no name for it: falls back to "class 99" without failing
    assert draw_detections(img, det, NAMES).size == (600, 400)
    assert draw_detections(img, det, None).size == (600, 400)


def test_class_colors_are_stable_distinct_and_not_highlight():
    assert class_color(7) == class_color(7)
    colors = [class_color(c) for c in range(80)]
    assert len(set(colors)) == 80
    for c in colors:
        hue = colorsys.rgb_to_hsv(*(v / 255 for v in c))[0]
        assert not 0.74 <= hue <= 0.94, (c, hue)  # purple..pink is reserved for highlighting


def test_side_by_side_png_with_highlight(tmp_path):
    img, det = _coffee_scene()
    got = det.subset([0, 1])  # the dining table is missing on the right
    result = match_detections(det, got)
    assert result.unmatched_ref == [2]

    path = tmp_path / "sub" / "cmp.png"
    out = side_by_side(img, det, got, NAMES, path=path, highlight=result)
    assert path.exists()
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.size == out.size
    w, h = out.size
    assert 1200 <= w <= 1220 and h > 400 + 30  # two 600 px panels + gap; title bars + caption

    arr = np.asarray(saved.convert("RGB"))
    title_h = draw_detections(img, det, NAMES, title="Detectron2").height - 400  # panels start below it
    left_panel = arr[:, :600]
    right_panel = arr[:, w - 600 :]
    x0, y0, x1, y1 = det.boxes[2].astype(int)
    # The unmatched detection is outlined in the highlight colour on the left only.
    band = _magenta(left_panel[title_h : title_h + 420, max(x0 - 10, 0) : x1 + 10])
    assert band.sum() > 500
    assert _magenta(right_panel).sum() == 0

    # Without a match result nothing is highlighted.
    plain = np.asarray(side_by_side(img, det, got, NAMES))
    assert _magenta(plain).sum() == 0 and plain.shape[1] == w


def test_side_by_side_large_image_fast(tmp_path):
    rng = np.random.default_rng(0)
    img = np.ascontiguousarray(np.asarray(Image.fromarray(data.astronaut()).resize((1344, 1344)))[:, :, ::-1])
    n = 100
    cx, cy = rng.uniform(0, 1344, (2, n))
    bw, bh = np.exp(rng.uniform(np.log(20), np.log(900), (2, n)))
    boxes = np.clip(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1), 0, 1344)
    masks = paste_masks(rng.uniform(0.4, 1, (n, 28, 28)), boxes, (1344, 1344))
    det = Detections(boxes, rng.uniform(0.05, 1, n), rng.integers(0, 80, n), masks)
    out = side_by_side(img, det, det.subset(np.arange(5, n)), None, path=tmp_path / "big.png",
                       highlight=match_detections(det, det.subset(np.arange(5, n))))
    assert out.width == 2 * 1344 + max(4, 1344 // 200)
