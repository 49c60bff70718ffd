"""What a deployed model needs around its graph or engine, with numpy and Pillow only.

Decoding an encoded image the way `d2build infer` reads a file (EXIF orientation, any PIL mode to
RGB, then BGR), the letterboxed input tensor, the family's decode back to original pixels, and the
detections as JSON in `d2build infer`'s per-image format (masks as COCO run-length encodings,
written by `encode_mask` below without pycocotools: the same string pycocotools writes). The Triton
Python-backend model (triton_model.py) and `python -m d2build.deploy` call these; so does anything
that loads a bundle with `load_bundle`.

Nothing here imports torch, torchvision, Detectron2, Hydra or OmegaConf (a test runs it where they
cannot be imported).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from d2build.processing import Detections, Letterbox, apply_exif_orientation, fit_size, letterbox
from d2build.runtime.info import ModelInfo


class ImageError(ValueError):
    """An image that cannot be decoded; the message names it and says what was expected."""


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, name: str = "image") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, BMP, WebP, TIFF, ...) -> uint8 BGR [h, w, 3].

    The same steps as `processing.load_image_bgr` on a file (so `d2build infer` on the file and this
    on its bytes give the same pixels). Anything PIL cannot decode completely -- not an image, a
    truncated file, an empty buffer -- raises ImageError naming `name`; never a partial image."""
    from PIL import Image

    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if not raw:
        raise ImageError(f"{name}: empty (0 bytes); send the encoded image file's bytes (JPEG, PNG, ...)")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # decode everything now: a truncated file fails here, not later
            rgb = np.asarray(apply_exif_orientation(im).convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # PIL names its buffer object
        raise ImageError(f"{name}: cannot be decoded as an image ({type(e).__name__}: {why}); send the encoded "
                         f"file's bytes (JPEG, PNG, BMP, WebP, TIFF), {len(raw)} bytes received") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"{name}: decoded to shape {rgb.shape}, not an [h, w, 3] colour image")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 BGR [h, w, 3]; ImageError naming the file when it cannot be read or decoded."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"{p}: cannot be read ({e.strerror or e})") from None
    return decode_image(data, str(p))


def preprocess(bgr: np.ndarray, info: ModelInfo) -> tuple[np.ndarray, Letterbox]:
    """One image -> the graph's input [1, 3, H, W] float32 BGR 0..255 (letterboxed, padded with the
    pixel mean) and its letterbox; what `runtime.Model.prepare` does for a batch of one."""
    chw, lb = letterbox(bgr, info.input_hw, info.pixel_mean)
    return chw[None], lb


def letterbox_for(original_hw: tuple[int, int], info: ModelInfo) -> Letterbox:
    """The letterbox `preprocess` used for an image of `original_hw`, rebuilt from the size alone
    (post-processing in another process, e.g. Triton's, gets only the size)."""
    h, w = int(original_hw[0]), int(original_hw[1])
    scale, resized = fit_size(h, w, tuple(info.input_hw))
    return Letterbox(original_hw=(h, w), input_hw=tuple(info.input_hw), scale=float(scale), resized_hw=resized)


def postprocess(outputs: Mapping[str, np.ndarray], original_hw: tuple[int, int], info: ModelInfo,
                image_index: int = 0) -> Detections:
    """The graph's (or engine's) outputs for one image -> Detections in original pixels."""
    from d2build.families import family

    return family(info.family).decode(outputs, letterbox_for(original_hw, info), image_index, info.mask_threshold,
                                      info=info)


# ----------------------------------------------------------------------------- masks as COCO RLE


def mask_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary mask in column-major order, starting with a run of zeros (COCO's RLE)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size])))
    return ([0] if flat[0] else []) + runs.tolist()


def counts_to_string(counts: list[int]) -> str:
    """COCO's compressed RLE string: each count (minus the count two before it, from the third on) as
    little-endian 5-bit groups with a continuation bit, offset by 48 ('0')."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        while True:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
            if not more:
                break
    return "".join(out)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """{"size": [h, w], "counts": str}: what pycocotools' `mask.encode` gives (counts decoded to str)."""
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(mask_counts(mask))}


# ----------------------------------------------------------------------------- detections as JSON


def detections_to_dict(name: str, det: Detections, original_hw: tuple[int, int], info: ModelInfo,
                       seconds: float | None = None) -> dict[str, Any]:
    """One image's detections in original pixels, in `d2build infer`'s detections.json format: boxes
    (2 decimals), scores (5 decimals), class ids and names, masks as COCO RLE, keypoints as
    (x, y, score, name)."""
    items = []
    names = info.keypoint_names or ()
    for k in range(len(det)):
        c = int(det.classes[k])
        item: dict[str, Any] = {"box": [round(float(v), 2) for v in det.boxes[k]],
                                "score": round(float(det.scores[k]), 5), "class_id": c, "class": info.class_name(c)}
        if det.masks is not None:
            item["mask"] = encode_mask(det.masks[k])
        if det.keypoints is not None:
            kp_names = names or [f"keypoint{j}" for j in range(det.keypoints.shape[1])]
            item["keypoints"] = [{"x": round(float(x), 2), "y": round(float(y), 2), "score": round(float(s), 5),
                                  "name": kp_names[j]} for j, (x, y, s) in enumerate(det.keypoints[k])]
        items.append(item)
    doc: dict[str, Any] = {"image": name, "height": int(original_hw[0]), "width": int(original_hw[1])}
    if seconds is not None:
        doc["seconds"] = round(seconds, 4)
    doc["detections"] = items
    if det.segmentation is not None:
        doc.update(segmentation_to_dict(det.segmentation))
    return doc


# ----------------------------------------------------------------------------- segmentations as PNG + JSON


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 [h, w] (grey) or [h, w, 3] (RGB) array as PNG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def segmentation_pngs(seg: Any) -> tuple[bytes, bytes]:
    """(the panoptic PNG, the semantic PNG): segment ids as COCO panoptic writes them (RGB, id = R + 256 G +
    256^2 B; 0: no segment), and the semantic class per pixel (8-bit grey; 16-bit values cannot be PNG-8)."""
    ids = np.asarray(seg.panoptic, np.int64)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1)
    return png_bytes(rgb), png_bytes(np.clip(np.asarray(seg.semantic), 0, 255))


def segmentation_to_dict(seg: Any, files: tuple[str, str] | None = None) -> dict[str, Any]:
    """{"panoptic": {png or file_name, segments_info}, "semantic": {png or file_name}} of one image: COCO panoptic
    predictions (segments_info with id, category_id, isthing, category name, area, bbox [x, y, w, h], iscrowd 0,
    and a thing's score). The PNGs inline (base64) or, with `files` (panoptic, semantic file names the caller
    writes `segmentation_pngs` to), by name."""
    import base64

    segments = []
    for s in seg.segments:
        rows, cols = np.nonzero(np.asarray(seg.panoptic) == s["id"])
        bbox = ([int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]
                if rows.size else [0, 0, 0, 0])
        item = {"id": int(s["id"]), "category_id": int(s["category_id"]), "isthing": bool(s["isthing"]),
                "category": s.get("category"), "area": int(rows.size), "bbox": bbox, "iscrowd": 0}
        if "score" in s:
            item["score"] = round(float(s["score"]), 5)
        if "instance_id" in s:
            item["instance_id"] = int(s["instance_id"])
        segments.append(item)
    if files is None:
        pan, sem = (base64.b64encode(b).decode("ascii") for b in segmentation_pngs(seg))
        where = ({"png_base64": pan}, {"png_base64": sem})
    else:
        where = ({"file_name": files[0]}, {"file_name": files[1]})
    return {"panoptic": {**where[0], "segments_info": segments},
            "semantic": {**where[1], "encoding": "8-bit grey PNG: the semantic head's class per pixel"}}
