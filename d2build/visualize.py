"""Pictures of detections, for people who would rather look than read numbers.

``draw_detections`` renders one detection set over its image;
``side_by_side`` puts the Detectron2 reference and the exported graph next to
each other, optionally marking the detections a ``MatchResult`` left
unmatched, so a failed verification can be judged at a glance.

Pillow only (no matplotlib, no OpenCV drawing), and no torch/detectron2
imports, so drawing saved results is cheap.
"""

from __future__ import annotations

import colorsys
import importlib.util
from collections.abc import Iterable, Sequence
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from d2build.processing import Detections

if TYPE_CHECKING:  # only for annotations; keeps import order free of cycles
    from d2build.compare import MatchResult

__all__ = ["class_color", "stuff_color", "draw_detections", "side_by_side", "HIGHLIGHT_COLOR"]

#: Colour of detections that found no partner; class colours avoid this hue.
HIGHLIGHT_COLOR: tuple[int, int, int] = (255, 0, 255)
_BACKGROUND = (32, 32, 32)
_TEXT_ON_BAR = (240, 240, 240)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


# --------------------------------------------------------------------------- #
# Styling helpers
# --------------------------------------------------------------------------- #


def class_color(class_id: int) -> tuple[int, int, int]:
    """Stable, well-spread RGB colour of a class id.

    Hues step by the golden ratio so neighbouring ids look different; the
    magenta band is skipped because it is reserved for highlighting
    unmatched detections.
    """
    frac = (int(class_id) * 0.6180339887498949 + 0.05) % 1.0
    hue = frac * 0.77  # squeeze into [0, 0.77) ...
    if hue >= 0.72:  # ... and move the part that would be purple-magenta-pink past it
        hue += 0.23  # -> [0.95, 1.0): reds
    sat = 0.70 + 0.25 * ((class_id * 7) % 3) / 2  # vary a little so close hues still differ
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=16)
def _font(size: int) -> Font:
    """A scalable font of ``size`` px: Pillow's bundled one, else DejaVu from matplotlib, else bitmap."""
    try:
        return ImageFont.load_default(size=size)  # FreeType font bundled with Pillow >= 10.1
    except (TypeError, AttributeError, OSError, ImportError):
        pass
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        ttf = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        try:
            return ImageFont.truetype(str(ttf), size)
        except OSError:
            pass
    return ImageFont.load_default()


def _sizes(h: int, w: int) -> tuple[int, int]:
    """Line width and font size that stay readable from 300 px to 1344 px and beyond."""
    long_side = max(h, w)
    return max(2, round(long_side / 450)), max(12, round(long_side / 56))


def _text_wh(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _ink_for(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on ``bg``."""
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _label(class_id: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return f"class {class_id}"


def _wrap(text: str, font: Font, max_width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap so captions fit narrow images."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        trial = word if not current else f"{current} {word}"
        if current and _text_wh(draw, trial, font)[0] > max_width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines


def _with_bar(image: Image.Image, lines: list[str], font: Font, *, top: bool) -> Image.Image:
    """Return ``image`` with a dark text bar added above or below it."""
    probe = ImageDraw.Draw(image)
    pad = max(4, font.size // 3 if hasattr(font, "size") else 4)
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(_wrap(line, font, image.width - 2 * pad, probe))
    line_h = max(_text_wh(probe, "Ag", font)[1], 1) + pad
    bar_h = line_h * len(wrapped) + pad
    out = Image.new("RGB", (image.width, image.height + bar_h), _BACKGROUND)
    out.paste(image, (0, bar_h if top else 0))
    draw = ImageDraw.Draw(out)
    y = pad if top else image.height + pad
    for line in wrapped:
        draw.text((pad, y), line, fill=_TEXT_ON_BAR, font=font)
        y += line_h
    return out


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #


def _blend_masks(
    rgb: np.ndarray, det: Detections, colors: list[tuple[int, int, int]], alpha: float
) -> None:
    """Blend translucent masks into ``rgb`` (float32 [h, w, 3]) in place, with solid outlines.

    Lowest score first so the most confident object ends up on top; work is
    limited to each mask's bounding rectangle so 100 masks on a large image
    stay cheap.
    """
    if det.masks is None or len(det) == 0:
        return
    if det.masks.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"masks are {det.masks.shape[1:]}, image is {rgb.shape[:2]}")
    for k in np.argsort(det.scores, kind="stable"):
        m = det.masks[k]
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(m.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = m[r0:r1, c0:c1]
        region = rgb[r0:r1, c0:c1]
        color = np.asarray(colors[k], dtype=np.float32)
        region[crop] = region[crop] * (1.0 - alpha) + color * alpha
        # Outline: mask pixels with a 4-neighbour outside the mask.
        padded = np.pad(crop, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        region[crop & ~interior] = color


def stuff_color(category_id: int) -> tuple[int, int, int]:
    """A stuff class's colour: class_color's hues, paler, so stuff reads as background to the things."""
    r, g, b = class_color(int(category_id) + 101)
    return (r + 255) // 2, (g + 255) // 2, (b + 255) // 2


def _blend_segments(rgb: np.ndarray, det: Detections, alpha: float) -> list[tuple[str, tuple[float, float], tuple]]:
    """Blend the panoptic segments into ``rgb`` in place (things in their class colour, stuff paler, outlines
    where segments meet); returns each stuff segment's (name, label position, colour) to write on it."""
    seg = det.segmentation
    if seg is None:
        return []
    if seg.panoptic.shape != rgb.shape[:2]:
        raise ValueError(f"panoptic map is {seg.panoptic.shape}, image is {rgb.shape[:2]}")
    palette = np.zeros((len(seg.segments) + 1, 3), np.float32)
    for s in seg.segments:
        palette[s["id"]] = class_color(s["category_id"]) if s["isthing"] else stuff_color(s["category_id"])
    ids = seg.panoptic
    covered = ids > 0
    rgb[covered] = rgb[covered] * (1.0 - alpha) + palette[ids[covered]] * alpha
    edge = np.zeros_like(covered)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    rgb[edge & covered] = palette[ids[edge & covered]]
    labels = []
    for s in seg.segments:
        if s["isthing"]:
            continue
        rows, cols = np.nonzero(ids == s["id"])
        if rows.size:
            labels.append((str(s.get("category", s["category_id"])), (float(np.median(cols)), float(np.median(rows))),
                          stuff_color(s["category_id"])))
    return labels


#: Keypoints scored at or below this are not drawn (Detectron2's Visualizer uses the same 0.05).
KEYPOINT_THRESHOLD = 0.05
_LIMB_PALETTE = ((255, 140, 0), (0, 170, 255), (60, 220, 60), (255, 220, 0), (170, 110, 255))


def _draw_keypoints(draw: ImageDraw.ImageDraw, det: Detections, marked: set[int], line_w: int,
                    skeleton: Sequence[tuple[int, int]]) -> None:
    """Skeletons (limbs as keypoint index pairs) and keypoint dots, lowest score first.

    Only keypoints scored above ``KEYPOINT_THRESHOLD`` are drawn; limbs of unmatched detections
    are drawn in ``HIGHLIGHT_COLOR``.
    """
    if det.keypoints is None or len(det) == 0:
        return
    kps = det.keypoints
    limbs = [(a, b) for a, b in skeleton if a < kps.shape[1] and b < kps.shape[1]]
    radius = max(2, line_w)
    for k in np.argsort(det.scores, kind="stable"):
        visible = kps[k, :, 2] > KEYPOINT_THRESHOLD
        for i, (a, b) in enumerate(limbs):
            if visible[a] and visible[b]:
                color = HIGHLIGHT_COLOR if k in marked else _LIMB_PALETTE[i % len(_LIMB_PALETTE)]
                draw.line([tuple(kps[k, a, :2]), tuple(kps[k, b, :2])], fill=color, width=line_w)
        for x, y in kps[k, visible, :2]:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255),
                         outline=(0, 0, 0))


def draw_detections(
    image_bgr: np.ndarray,
    det: Detections,
    class_names: Sequence[str] | None,
    title: str | None = None,
    *,
    highlight: Iterable[int] | None = None,
    mask_alpha: float = 0.45,
    skeleton: Sequence[tuple[int, int]] = (),
) -> Image.Image:
    """Render detections over their image.

    Boxes and "class score" labels in a per-class colour, masks as
    translucent overlays with solid outlines (or, when ``det.segmentation`` is set, the panoptic
    segments instead: things in their class colour, stuff paler and named), keypoints (when ``det.keypoints``
    is set) as dots joined by the limbs of ``skeleton`` (keypoint index pairs).  Detections whose index is in
    ``highlight`` are drawn in ``HIGHLIGHT_COLOR`` with a thicker, white-edged
    box and an "unmatched" label, so they stand out from any class colour.

    Returns an RGB image of the original size, plus a title bar on top when
    ``title`` is given.
    """
    image_bgr = np.asarray(image_bgr)
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an [h, w, 3] BGR image, got shape {image_bgr.shape}")
    h, w = image_bgr.shape[:2]
    marked = set(int(i) for i in highlight) if highlight is not None else set()
    colors = [
        HIGHLIGHT_COLOR if k in marked else class_color(int(c)) for k, c in enumerate(det.classes)
    ]

    rgb = image_bgr[:, :, ::-1].astype(np.float32)
    if det.segmentation is not None:
        stuff = _blend_segments(rgb, det, mask_alpha)
    else:
        stuff = []
        _blend_masks(rgb, det, colors, mask_alpha)
    canvas = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")

    line_w, font_size = _sizes(h, w)
    font = _font(font_size)
    draw = ImageDraw.Draw(canvas)
    for name, (cx, cy), color in stuff:  # stuff names on their segments, on a tag of their colour
        tw, th = _text_wh(draw, name, font)
        pad = max(2, font_size // 6)
        tx, ty = min(max(cx - tw / 2, 0), max(w - tw - 2 * pad, 0)), min(max(cy - th / 2, 0), max(h - th - 2 * pad, 0))
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=color)
        left, top, _, _ = draw.textbbox((0, 0), name, font=font)
        draw.text((tx + pad - left, ty + pad - top), name, fill=_ink_for(color), font=font)
    _draw_keypoints(draw, det, marked, line_w, skeleton)
    # Highest score drawn last so its label is on top; highlighted ones above all.
    order = sorted(range(len(det)), key=lambda k: (k in marked, float(det.scores[k])))
    for k in order:
        x0, y0, x1, y1 = (float(v) for v in det.boxes[k])
        color = colors[k]
        is_marked = k in marked
        if is_marked:
            lw = line_w * 2
            draw.rectangle((x0 - lw, y0 - lw, x1 + lw, y1 + lw), outline=(255, 255, 255), width=line_w)
            draw.rectangle((x0, y0, x1, y1), outline=color, width=lw)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=color, width=line_w)

        text = f"{_label(int(det.classes[k]), class_names)} {float(det.scores[k]):.2f}"
        if is_marked:
            text = f"unmatched: {text}"
        tw, th = _text_wh(draw, text, font)
        pad = max(2, font_size // 6)
        box_h = th + 2 * pad
        # Above the box when there is room, otherwise just inside its top edge.
        ty = y0 - box_h if y0 - box_h >= 0 else y0
        tx = min(max(x0, 0), max(w - tw - 2 * pad, 0))
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + box_h), fill=color)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_ink_for(color), font=font)

    if title:
        canvas = _with_bar(canvas, [title], font, top=True)
    return canvas


def _caption(
    left: Detections,
    right: Detections,
    titles: tuple[str, str],
    highlight: MatchResult | None,
) -> str:
    """One-line summary of what the two panels show."""
    parts = [f"{titles[0]}: {len(left)} detections", f"{titles[1]}: {len(right)} detections"]
    if highlight is not None:
        r = highlight
        parts.append(f"matched {len(r.pairs)}/{r.n_ref} ({r.recovered:.1%})")
        if r.pairs:
            parts.append(f"mean box IoU {r.mean_box_iou:.4f}")
            if r.mean_mask_iou is not None:
                parts.append(f"mean mask IoU {r.mean_mask_iou:.4f}")
            parts.append(f"max |score diff| {r.max_score_diff:.4f}")
        if not r.all_matched:
            parts.append(
                f"unmatched in magenta: {len(r.unmatched_ref)} left, {len(r.unmatched_got)} right"
            )
    return " | ".join(parts)


def side_by_side(
    image_bgr: np.ndarray,
    left: Detections,
    right: Detections,
    class_names: Sequence[str] | None,
    titles: tuple[str, str] = ("Detectron2", "TensorRT-ready graph"),
    path: str | PathLike[str] | None = None,
    highlight: MatchResult | None = None,
    skeleton: Sequence[tuple[int, int]] = (),
) -> Image.Image:
    """Two panels (``left`` = reference, ``right`` = graph) and a caption; saved as PNG at ``path``.

    With ``highlight`` (the ``MatchResult`` of ``match_detections(left, right)``)
    the unmatched detections of each side are marked in ``HIGHLIGHT_COLOR`` and
    the caption summarises the match.  Returns the composed image.
    """
    marked_left = highlight.unmatched_ref if highlight is not None else None
    marked_right = highlight.unmatched_got if highlight is not None else None
    panel_l = draw_detections(image_bgr, left, class_names, title=titles[0], highlight=marked_left, skeleton=skeleton)
    panel_r = draw_detections(image_bgr, right, class_names, title=titles[1], highlight=marked_right,
                              skeleton=skeleton)

    gap = max(4, panel_l.width // 200)
    both = Image.new("RGB", (panel_l.width + gap + panel_r.width, max(panel_l.height, panel_r.height)), _BACKGROUND)
    both.paste(panel_l, (0, 0))
    both.paste(panel_r, (panel_l.width + gap, 0))

    h, w = np.asarray(image_bgr).shape[:2]
    _, font_size = _sizes(h, w)
    out = _with_bar(both, [_caption(left, right, titles, highlight)], _font(font_size), top=False)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path, format="PNG")
    return out
