"""Pre- and post-processing shared by every d2build command.

One implementation of the geometry between an original photograph and the
fixed ``H x W`` input a TensorRT-ready graph takes (letterboxing), and of the
way back (box mapping, mask pasting).  Both sides of a verification -- the
Detectron2 reference and the exported graph -- go through the same functions
here, so any difference a comparison reports comes from the models, not from
two slightly different copies of the glue code.

Semantics follow Detectron2 (the installed package is the reference):

* resizing is Detectron2's ``ResizeTransform`` on uint8 images: PIL bilinear,
  output size rounded half up as ``ResizeShortestEdge`` does;
* padding is bottom/right, like ``ImageList.from_tensors``; callers pass the
  model's ``PIXEL_MEAN`` so the padded area normalises to exactly 0;
* boxes go back to the original image the way ``detector_postprocess`` does
  (per-axis ``resized / original`` ratio, then clip);
* masks are pasted like ``paste_masks_in_image`` (bilinear ``grid_sample``,
  ``align_corners=False``, zero outside the mask, ``>= threshold``).

Nothing here imports torch or detectron2 at module level, so light commands
(listing, drawing, comparing saved outputs) stay fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "Letterbox",
    "letterbox",
    "resize_shortest_edge",
    "shortest_edge_size",
    "load_image_bgr",
    "Detections",
    "Segmentation",
    "semantic_to_original",
    "boxes_to_original",
    "boxes_to_input",
    "paste_masks",
    "keypoints_to_original",
    "nonempty",
    "detections_from_instances",
]


# --------------------------------------------------------------------------- #
# Letterboxing
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterboxed image.

    Attributes:
        original_hw: (h, w) of the photograph as loaded.
        input_hw: (H, W) of the network input the image was pasted into.
        scale: ``min(H / h, W / w)``, the nominal resize factor.
        resized_hw: (round(h * scale), round(w * scale)), the area at the
            top-left of the input that holds image content; the rest is padding.
    """

    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale: float
    resized_hw: tuple[int, int]

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Effective per-axis scale (resized / original).

        Rounding the resized size to whole pixels makes the true x and y
        factors differ from ``scale`` by up to half a pixel over the image;
        PIL resamples with exactly these factors and Detectron2's
        ``detector_postprocess`` maps boxes back with them, so we do too.
        """
        (h, w), (rh, rw) = self.original_hw, self.resized_hw
        return rw / w, rh / h

    @property
    def padding_hw(self) -> tuple[int, int]:
        """Rows added at the bottom and columns added at the right."""
        return self.input_hw[0] - self.resized_hw[0], self.input_hw[1] - self.resized_hw[1]


def fit_size(h: int, w: int, size: tuple[int, int]) -> tuple[float, tuple[int, int]]:
    """Scale and rounded size that fit (h, w) inside ``size``, keeping aspect.

    Rounds half up (``int(x + 0.5)``) like Detectron2's
    ``ResizeShortestEdge.get_output_shape`` rather than Python's banker's
    ``round``, and never exceeds the target.
    """
    H, W = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or H <= 0 or W <= 0:
        raise ValueError(f"bad sizes: image {(h, w)}, target {(H, W)}")
    scale = min(H / h, W / w)
    rh = min(H, max(1, int(h * scale + 0.5)))
    rw = min(W, max(1, int(w * scale + 0.5)))
    return scale, (rh, rw)


def letterbox(
    image_bgr: np.ndarray,
    size: tuple[int, int],
    pad_value: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, Letterbox]:
    """Resize an image to fit inside ``size`` (H, W) and pad it to exactly that size.

    Args:
        image_bgr: uint8 array [h, w, 3] in BGR order (as ``load_image_bgr`` and
            OpenCV give it).
        size: (H, W) of the network input.
        pad_value: one value per channel (BGR) for the padded area.  Pass the
            model's ``PIXEL_MEAN`` so padding becomes 0 after normalisation, as
            Detectron2's ``ImageList`` padding (done after normalisation) is.

    Returns:
        ``(chw, lb)``: float32 [3, H, W], BGR, values 0..255 with the image at the
        top-left; and the ``Letterbox`` needed to map results back.
    """
    image_bgr = np.asarray(image_bgr)
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an [h, w, 3] image, got shape {image_bgr.shape}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image_bgr.dtype}")
    pad = np.asarray(pad_value, dtype=np.float32).reshape(-1)
    if pad.size != 3:
        raise ValueError(f"pad_value needs 3 values (one per channel), got {pad_value!r}")

    h, w = image_bgr.shape[:2]
    H, W = int(size[0]), int(size[1])
    scale, (rh, rw) = fit_size(h, w, (H, W))

    # Detectron2's ResizeTransform: PIL bilinear on the uint8 array.  PIL treats
    # the BGR array as "RGB" but resamples each channel independently, so the
    # channel order does not matter.
    return _paste(image_bgr, (rh, rw), (H, W), pad), Letterbox((h, w), (H, W), float(scale), (rh, rw))


def _paste(image_bgr: np.ndarray, resized_hw: tuple[int, int], canvas_hw: tuple[int, int],
           pad: np.ndarray) -> np.ndarray:
    """The image resized to `resized_hw` (PIL bilinear on uint8) at the top-left of a `pad`-filled canvas."""
    rh, rw = resized_hw
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(image_bgr)).resize((rw, rh), Image.Resampling.BILINEAR)
    )
    chw = np.empty((3, *canvas_hw), dtype=np.float32)
    chw[:] = pad[:, None, None]
    chw[:, :rh, :rw] = resized.transpose(2, 0, 1)
    return chw


def shortest_edge_size(h: int, w: int, short: int, longest: int) -> tuple[int, int]:
    """Detectron2's ResizeShortestEdge output size: the short side to `short`, the long side at most
    `longest`, then rounded half up (same float arithmetic as ``get_output_shape``)."""
    size = short * 1.0
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > longest:
        scale = longest * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_shortest_edge(
    image_bgr: np.ndarray,
    short: int,
    longest: int,
    divisibility: int = 32,
    pad_value: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, Letterbox]:
    """Resize as Detectron2's test-time ResizeShortestEdge does, then pad (bottom/right, with ``pad_value``)
    to a multiple of ``divisibility`` as its ImageList does: the input Detectron2 itself runs the model on.

    Returns ``(chw, lb)`` like ``letterbox``: ``lb.input_hw`` is the padded size.
    """
    image_bgr = np.asarray(image_bgr)
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [h, w, 3] image, got {image_bgr.dtype} {image_bgr.shape}")
    h, w = image_bgr.shape[:2]
    rh, rw = shortest_edge_size(h, w, short, longest)
    H, W = (-(-rh // divisibility) * divisibility, -(-rw // divisibility) * divisibility)
    pad = np.asarray(pad_value, dtype=np.float32).reshape(3)
    return _paste(image_bgr, (rh, rw), (H, W), pad), Letterbox((h, w), (H, W), rh / h, (rh, rw))


def load_image_bgr(path: str | PathLike[str]) -> np.ndarray:
    """Load an image file as uint8 BGR [h, w, 3], like ``read_image(path, "BGR")``.

    Applies the EXIF orientation (phone photos are stored sideways) and
    converts any PIL mode (grayscale, palette, RGBA, CMYK...) to RGB first;
    alpha is dropped rather than composited, exactly as Detectron2 does.
    """
    with Image.open(path) as im:
        rgb = np.asarray(apply_exif_orientation(im).convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def image_file_hw(path: str | PathLike[str]) -> tuple[int, int]:
    """The [h, w] ``load_image_bgr`` returns for a file, from its header alone (EXIF orientation applied,
    no pixels decoded): what a size check needs before any image is read."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG)
        except Exception:  # broken EXIF is ignored, as in _apply_exif_orientation
            orientation = None
    turned = _EXIF_TRANSPOSE.get(orientation) in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                                                  Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)
    return (w, h) if turned else (h, w)


_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; broken EXIF is ignored.

    Same table and the same tolerance of unreadable EXIF as Detectron2's
    ``apply_exif_orientation`` (``ImageOps.exif_transpose`` raises on some files).
    """
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:
        return image
    method = _EXIF_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


# --------------------------------------------------------------------------- #
# Detections and box mapping
# --------------------------------------------------------------------------- #


@dataclass
class Segmentation:
    """One image's semantic and panoptic segmentation, in ORIGINAL image pixels.

    Attributes:
        semantic: int32 [h, w], the semantic head's contiguous class per pixel (for Panoptic FPN: 0 is
            "things", 1.. the stuff classes).
        panoptic: int32 [h, w], the segment id per pixel (0: no segment).
        segments: one dict per segment id, in id order: ``id``, ``isthing``, ``category_id`` (a thing's
            contiguous class, or a stuff class of ``semantic``), ``category`` (its name), ``area`` (pixels),
            and for things ``score`` and ``instance_id`` (its row in the Detections).
    """

    semantic: np.ndarray
    panoptic: np.ndarray
    segments: list[dict[str, Any]]


@dataclass
class Detections:
    """Detections of one image, in ORIGINAL image pixels.

    Attributes:
        boxes: float32 [N, 4], x1, y1, x2, y2.
        scores: float32 [N].
        classes: int64 [N], contiguous class ids of the model.
        masks: bool [N, h, w] pasted at original size, or None for box-only output.
        keypoints: float32 [N, K, 3] (x, y, score), or None.
        segmentation: the image's semantic and panoptic maps (Panoptic FPN), or None. It belongs to the
            image, not to rows: `subset` keeps it whole.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    segmentation: Segmentation | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.scores) != n or len(self.classes) != n:
            raise ValueError(
                f"inconsistent lengths: boxes {n}, scores {len(self.scores)}, classes {len(self.classes)}"
            )
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)
            if self.masks.ndim != 3 or len(self.masks) != n:
                raise ValueError(f"masks must be [N={n}, h, w], got {self.masks.shape}")
        if self.keypoints is not None:
            self.keypoints = np.asarray(self.keypoints, dtype=np.float32)
            if self.keypoints.ndim != 3 or len(self.keypoints) != n:
                raise ValueError(f"keypoints must be [N={n}, K, 3], got {self.keypoints.shape}")

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, index: Any) -> Detections:
        """Detections selected by a numpy index (mask, indices or slice)."""
        return Detections(
            boxes=self.boxes[index],
            scores=self.scores[index],
            classes=self.classes[index],
            masks=None if self.masks is None else self.masks[index],
            keypoints=None if self.keypoints is None else self.keypoints[index],
            segmentation=self.segmentation,
        )

    @classmethod
    def empty(cls, image_hw: tuple[int, int] | None = None) -> Detections:
        """No detections; with ``image_hw`` it carries an empty [0, h, w] mask array."""
        masks = None if image_hw is None else np.zeros((0, *image_hw), dtype=bool)
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), masks)


def boxes_to_original(boxes_input_xyxy: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Map xyxy boxes from network-input pixels to original-image pixels.

    Divides by the effective per-axis scale (``lb.scale_xy``, equal to
    ``lb.scale`` up to pixel rounding) and clips to the original image, which is
    what ``detector_postprocess`` does with ``Boxes.scale`` + ``Boxes.clip``.
    Boxes are not dropped when clipping leaves them empty; both sides of a
    comparison use this function, so they stay aligned row for row.
    """
    boxes = np.asarray(boxes_input_xyxy, dtype=np.float32).reshape(-1, 4)
    sx, sy = lb.scale_xy
    h, w = lb.original_hw
    out = boxes / np.array([sx, sy, sx, sy], dtype=np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0.0, float(w))
    out[:, 1::2] = np.clip(out[:, 1::2], 0.0, float(h))
    return out.astype(np.float32, copy=False)


def boxes_to_input(boxes_original_xyxy: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Inverse of ``boxes_to_original`` (without clipping): original -> input pixels."""
    boxes = np.asarray(boxes_original_xyxy, dtype=np.float32).reshape(-1, 4)
    sx, sy = lb.scale_xy
    return (boxes * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32, copy=False)


def keypoints_to_original(keypoints: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Scale keypoint x, y back to the original image (not clipped, like Detectron2)."""
    kp = np.array(keypoints, dtype=np.float32, copy=True)
    sx, sy = lb.scale_xy
    kp[..., 0] /= sx
    kp[..., 1] /= sy
    return kp


# --------------------------------------------------------------------------- #
# Semantic maps
# --------------------------------------------------------------------------- #


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis:
    source ``(o + 0.5) * n_in / n_out - 0.5`` clamped at 0, its two neighbours (the upper one clamped to the
    last cell) weighted by distance, in float32 as torch computes them."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                     np.float32(0))
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def _taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse resampling matrix as (index [n_out, K], weight [n_out, K] float32), K its most nonzeros."""
    k = max(1, int((m != 0).sum(axis=1).max()))
    idx = np.argsort(m == 0, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(m, idx, axis=1).astype(np.float32)


def semantic_to_original(logits: np.ndarray, lb: Letterbox, band: int = 64) -> np.ndarray:
    """A semantic head's per-class logits over the input canvas at 1/stride -> the class per ORIGINAL pixel.

    What Detectron2 does to ``SemSegFPNHead``'s predictor output, as one resampling: the head's x stride
    bilinear upsample to the input canvas (``F.interpolate(scale_factor=stride)``), then
    ``sem_seg_postprocess``: the image's region of the canvas (``lb.resized_hw``, top-left) bilinearly
    resized to the original size, then the argmax over classes (first maximum on ties, as torch). Both
    resamplings are linear and separable, so each axis is one composed map of at most four taps; rows are
    done in bands of ``band`` so memory stays [C, band, w].

    Args:
        logits: [C, H / stride, W / stride] float (the graph's ``semantic_logits`` of one image).
        lb: the image's letterbox (its input canvas is H x W).

    Returns:
        int32 [h, w].
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ValueError(f"semantic logits must be [C, h, w], got {logits.shape}")
    c, fh, fw = logits.shape
    (H, W), (rh, rw), (h, w) = lb.input_hw, lb.resized_hw, lb.original_hw
    if H % fh or W % fw or H // fh != W // fw:
        raise ValueError(f"semantic logits {fh}x{fw} are not the input {H}x{W} at one stride")
    rows = _bilinear_matrix(rh, h) @ _bilinear_matrix(fh, H)[:rh]  # [h, fh]
    cols = _bilinear_matrix(rw, w) @ _bilinear_matrix(fw, W)[:rw]  # [w, fw]
    ri, rwt = _taps(rows)
    ci, cwt = _taps(cols)
    by_cols = logits[:, :, ci[:, 0]] * cwt[:, 0]  # [C, fh, w]
    for k in range(1, ci.shape[1]):
        by_cols += logits[:, :, ci[:, k]] * cwt[:, k]
    out = np.empty((h, w), np.int32)
    for start in range(0, h, band):
        stop = min(start + band, h)
        acc = by_cols[:, ri[start:stop, 0], :] * rwt[start:stop, 0, None]  # [C, band, w]
        for k in range(1, ri.shape[1]):
            acc += by_cols[:, ri[start:stop, k], :] * rwt[start:stop, k, None]
        out[start:stop] = acc.argmax(axis=0)
    return out


# --------------------------------------------------------------------------- #
# Mask pasting
# --------------------------------------------------------------------------- #


_MASK_PAD = 2  # zero cells around each mask so out-of-range taps read 0 without branching


def _axis_taps(
    start: int, stop: int, lo: np.float32, hi: np.float32, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps for image pixels ``start..stop-1`` along one axis of an ``m``-cell mask.

    Replays what ``grid_sample(align_corners=False, padding_mode="zeros")``
    does for the grid Detectron2 builds: pixel centre ``p + 0.5`` is
    normalised to the box as ``(p + 0.5 - lo) / (hi - lo) * 2 - 1``, then
    unnormalised to a mask coordinate ``((g + 1) * m - 1) / 2``; the two
    neighbouring cells get weights ``1 - frac`` and ``frac``.  All float32, in
    the same order of operations, so the result agrees with Detectron2 to the
    last bit nearly everywhere.

    Returns ``(index, w0, w1)``: ``index`` is the first tap's position in a mask
    padded by ``_MASK_PAD`` zero cells, clipped so both taps land on padding
    when they fall outside the mask (grid_sample's zero padding).
    """
    p = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    g = (p - lo) / (hi - lo) * np.float32(2) - np.float32(1)
    coord = ((g + np.float32(1)) * np.float32(m) - np.float32(1)) / np.float32(2)
    first = np.floor(coord)
    w1 = coord - first
    w0 = np.float32(1) - w1
    index = np.clip(first, -_MASK_PAD, m).astype(np.intp) + _MASK_PAD
    return index, w0, w1


def paste_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float = 0.5,
) -> np.ndarray:
    """Paste fixed-size mask probabilities into the image, one per box.

    Reproduces ``detectron2.layers.mask_ops.paste_masks_in_image`` (its CPU
    path): each mask is bilinearly resampled onto the image pixels of its box
    plus a one-pixel border (clamped to the image) and binarised with
    ``>= threshold``; pixels further out stay False.

    The sampling grid's x depends only on the column and y only on the row,
    so bilinear sampling is separable: first interpolate the mask's columns to
    the box's pixel columns (a tiny [M, cols] array), then interpolate rows by
    gathering whole rows of that.  That touches each output pixel a handful of
    times, needs no ``grid_sample`` grid, and uses plain numpy element-wise
    ops rather than BLAS: multi-threaded BLAS on these small products was no
    faster and its spinning worker threads slowed the torch model running
    next to it severalfold on a 2-core machine.

    Args:
        masks: [N, M, M] (or [N, 1, M, M]) float probabilities in [0, 1]
            (rectangular masks work too).
        boxes: [N, 4] xyxy in the pixels of ``image_hw``; may extend past the image.
        image_hw: (h, w) of the image to paste into.
        threshold: pixels with probability ``>= threshold`` are set.

    Returns:
        bool [N, h, w].
    """
    masks = np.asarray(masks, dtype=np.float32)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, M, M] or [N, 1, M, M], got {masks.shape}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(boxes)} boxes")
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    n, mh, mw = masks.shape
    out = np.zeros((n, img_h, img_w), dtype=bool)
    padded = np.pad(masks, ((0, 0), (_MASK_PAD, _MASK_PAD), (_MASK_PAD, _MASK_PAD)))
    thr = np.float32(threshold)

    for i in range(n):
        x0, y0, x1, y1 = boxes[i]
        if not (x1 > x0 and y1 > y0):  # degenerate (or NaN) box: nothing sensible to paste
            continue
        # Same extent as Detectron2's skip_empty region, also clamped on the
        # far sides so boxes entirely outside the image paste nothing.
        c0 = max(int(math.floor(x0)) - 1, 0)
        r0 = max(int(math.floor(y0)) - 1, 0)
        c1 = min(int(math.ceil(x1)) + 1, img_w)
        r1 = min(int(math.ceil(y1)) + 1, img_h)
        if c1 <= c0 or r1 <= r0:
            continue
        ri, ry0, ry1 = _axis_taps(r0, r1, y0, y1, mh)
        ci, cx0, cx1 = _axis_taps(c0, c1, x0, x1, mw)
        cols = padded[i][:, ci] * cx0 + padded[i][:, ci + 1] * cx1  # [M + pad, cols]
        top = cols[ri]
        top *= ry0[:, None]
        bottom = cols[ri + 1]
        bottom *= ry1[:, None]
        top += bottom
        np.greater_equal(top, thr, out=out[i, r0:r1, c0:c1])
    return out


# --------------------------------------------------------------------------- #
# Detectron2 Instances
# --------------------------------------------------------------------------- #


def nonempty(boxes_original: np.ndarray) -> np.ndarray:
    """Boxes with some area left after mapping to the original image and clipping.

    Detectron2's ``detector_postprocess`` drops the others (``Boxes.nonempty()``): they lie in the
    letterbox padding, outside the photograph. Both sides of a comparison drop them the same way.
    """
    wh = boxes_original[:, 2:] - boxes_original[:, :2]
    return (wh > 0).all(axis=1)


def detections_from_instances(instances: Any, lb: Letterbox, mask_threshold: float = 0.5) -> Detections:
    """Turn Detectron2 ``Instances`` (from ``inference(..., do_postprocess=False)``) into ``Detections``.

    This is the reference side of a verification, so masks are pasted with
    Detectron2's own ``paste_masks_in_image`` rather than ``paste_masks``; the
    box mapping is the shared ``boxes_to_original`` so both sides agree on
    geometry, and boxes left empty by the clipping are dropped as in
    ``decode_outputs``.  Instances must have been computed on the letterboxed
    H x W input.
    """
    import torch
    from detectron2.layers.mask_ops import paste_masks_in_image

    def _np(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)

    pred_boxes = instances.pred_boxes
    boxes_in = _np(getattr(pred_boxes, "tensor", pred_boxes))
    boxes = boxes_to_original(boxes_in, lb)
    keep = nonempty(boxes)
    boxes = boxes[keep]
    scores = _np(instances.scores).astype(np.float32)[keep]
    classes = _np(instances.pred_classes).astype(np.int64)[keep]

    masks = None
    if instances.has("pred_masks"):
        pm = instances.pred_masks
        pm = pm if isinstance(pm, torch.Tensor) else torch.as_tensor(np.asarray(pm))
        if pm.dim() == 4:
            pm = pm[:, 0]
        pm = pm[torch.from_numpy(keep)]
        pasted = paste_masks_in_image(
            pm.detach().float().cpu(), torch.from_numpy(boxes), lb.original_hw, threshold=mask_threshold
        )
        masks = _np(pasted).astype(bool)  # [N, h, w]; also for N == 0

    keypoints = None
    if instances.has("pred_keypoints"):
        keypoints = keypoints_to_original(_np(instances.pred_keypoints)[keep], lb)

    return Detections(boxes=boxes, scores=scores, classes=classes, masks=masks, keypoints=keypoints)
