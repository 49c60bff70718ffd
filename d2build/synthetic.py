"""Deterministic synthetic detection data sets (no downloads): ``shapes`` and ``houses``.

``shapes``: instance segmentation, 3 classes (circle, square, triangle; squares and triangles
rotated). ``houses``: 1 class (house: a rectangle base with a triangular roof, rotated within
+-20 degrees) with 5 keypoints and a skeleton, COCO person-keypoint style.

Every image is a pure function of (dataset, index, seed): the same bytes on any machine. Only
numpy and OpenCV are used (integer rasterisation, no anti-aliasing, elementwise float64
arithmetic, no BLAS), and no torch / Detectron2 is imported, so the module can be used by tests,
by a Detectron2 DatasetMapper in training workers and by the project's evaluation alike.

Image sizes (H, W) cycle with the index through :data:`IMAGE_SIZES` (square, landscape, portrait,
wide). Objects never overlap (their boxes keep a margin), so polygons describe the drawn pixels
exactly. Coordinates follow Detectron2/COCO conventions: a drawn pixel ``(i, j)`` covers
``[j, j+1) x [i, i+1)``; a polygon vertex drawn at integer pixel ``(x, y)`` is annotated at the
pixel centre ``(x + 0.5, y + 0.5)``; COCO keypoints are pixel indices ``(x, y)`` (Detectron2's
COCO loader adds 0.5), Detectron2 records carry ``(x + 0.5, y + 0.5)``.

    image, anns = render("shapes", index, seed_for("shapes", "val", index))
    records = detectron2_dicts("houses", "train", 40000, annotations=False)
    json_path = write_coco("shapes", "val", 200, "/tmp/shapes_val")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

DATASETS = ("shapes", "houses")
SPLITS = ("train", "val", "test")
IMAGE_SIZES = ((512, 512), (480, 640), (640, 480), (384, 704))  # (H, W), cycled by index

SHAPES_CLASSES = ("circle", "square", "triangle")
HOUSE_CLASSES = ("house",)
HOUSE_KEYPOINTS = ("apex", "left_eave", "right_eave", "right_base", "left_base")
HOUSE_SKELETON = (
    ("apex", "left_eave"),
    ("apex", "right_eave"),
    ("left_eave", "right_eave"),
    ("left_eave", "left_base"),
    ("right_eave", "right_base"),
    ("left_base", "right_base"),
)
HOUSE_KEYPOINT_FLIP_MAP = (("left_eave", "right_eave"), ("left_base", "right_base"))
HOUSE_OKS_SIGMAS = (0.05,) * len(HOUSE_KEYPOINTS)  # per keypoint, as COCO's (cfg.TEST.KEYPOINT_OKS_SIGMAS)

CLASSES = {"shapes": SHAPES_CLASSES, "houses": HOUSE_CLASSES}
OBJECTS_PER_IMAGE = {"shapes": (2, 8), "houses": (1, 6)}
OBJECT_SIZE = (24, 220)  # px, the larger side of an object's box (before rotation effects)
BBOX_MODE_XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS

_DATASET_TAG = {"shapes": 0x5A9E5, "houses": 0x40057}
_SPLIT_BASE = {"train": 1, "val": 2, "test": 3}
_SPLIT_STRIDE = 10_000_000  # indices per split: seeds of different splits never collide
_MARGIN = 4  # px between object boxes, and from the image border


def _check(dataset: str, split: str | None = None) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown synthetic dataset {dataset!r}; expected one of {DATASETS}")
    if split is not None and split not in _SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def seed_for(dataset: str, split: str, index: int) -> int:
    """The seed of image ``index`` of a split; splits are disjoint (train 1e7+i, val 2e7+i, ...)."""
    _check(dataset, split)
    if not 0 <= index < _SPLIT_STRIDE:
        raise ValueError(f"index {index} out of range [0, {_SPLIT_STRIDE})")
    return _SPLIT_BASE[split] * _SPLIT_STRIDE + int(index)


def image_size(index: int) -> tuple[int, int]:
    """(H, W) of image ``index``."""
    return IMAGE_SIZES[int(index) % len(IMAGE_SIZES)]


def metadata(dataset: str) -> dict:
    """Plain-Python metadata for ``MetadataCatalog.get(name).set(**metadata(dataset))``."""
    _check(dataset)
    classes = CLASSES[dataset]
    meta = {
        "thing_classes": list(classes),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(classes))},
    }
    if dataset == "houses":
        meta["keypoint_names"] = list(HOUSE_KEYPOINTS)
        meta["keypoint_flip_map"] = [list(p) for p in HOUSE_KEYPOINT_FLIP_MAP]
        meta["keypoint_connection_rules"] = [(a, b, (0, 255, 255)) for a, b in HOUSE_SKELETON]
    return meta


# ----------------------------------------------------------------------------------- geometry


def _rng(dataset: str, seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_DATASET_TAG[dataset], int(seed), stream])))


def _rotate(points: list[tuple[float, float]], angle: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[round(cx + c * x - s * y), round(cy + s * x + c * y)] for x, y in points], dtype=np.int32)


def _background_params(rng: np.random.Generator, h: int, w: int) -> dict:
    c0 = rng.integers(0, 256, 3)
    c1 = rng.integers(0, 256, 3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return {"c0": c0.astype(np.float64), "c1": c1.astype(np.float64),
            "dx": math.cos(angle) / max(h, w), "dy": math.sin(angle) / max(h, w)}


def _background_at(bg: dict, x: float, y: float, h: int, w: int) -> np.ndarray:
    t = 0.5 + (x - w / 2) * bg["dx"] + (y - h / 2) * bg["dy"]
    return bg["c0"] + (bg["c1"] - bg["c0"]) * t


def _colour(rng: np.random.Generator, against: list[np.ndarray]) -> np.ndarray:
    """A random colour that differs enough from each of ``against`` (sum of |channel| >= 150)."""
    for _ in range(64):
        c = rng.integers(0, 256, 3)
        if all(np.abs(c - a).sum() >= 150 for a in against):
            return c
    return np.where(np.mean(against[0]) > 127, 0, 255) * np.ones(3, dtype=np.int64)


def _shape_polygon(rng: np.random.Generator, cls: int, size: float) -> list[tuple[float, float]]:
    r = size / 2.0
    if cls == 0:  # circle
        n = 32
        return [(r * math.cos(2 * math.pi * k / n), r * math.sin(2 * math.pi * k / n)) for k in range(n)]
    if cls == 1:  # square inscribed in the circle (half diagonal r), so any rotation fits
        return [(r * math.cos(math.pi / 4 + k * math.pi / 2), r * math.sin(math.pi / 4 + k * math.pi / 2)) for k in range(4)]
    # triangle: equilateral inscribed in the circle, each vertex jittered by up to 8% of r
    pts = []
    for k in range(3):
        phi = -math.pi / 2 + 2 * math.pi * k / 3
        jr = r * (1.0 + rng.uniform(-0.08, 0.08))
        pts.append((jr * math.cos(phi), jr * math.sin(phi)))
    return pts


def _house_points(rng: np.random.Generator, size: float) -> tuple[list[tuple[float, float]], float, float]:
    """Local keypoints (apex, left_eave, right_eave, right_base, left_base) fitting ``size``."""
    base_h = rng.uniform(0.45, 1.0)  # relative to width
    roof_h = rng.uniform(0.3, 0.75)
    w = 1.0
    scale = size / max(w, base_h + roof_h)
    w, hb, hr = w * scale, base_h * scale, roof_h * scale
    top = -(hb + hr) / 2  # centre the whole house on (0, 0)
    eave = top + hr
    pts = [(0.0, top), (-w / 2, eave), (w / 2, eave), (w / 2, eave + hb), (-w / 2, eave + hb)]
    return pts, w, hb + hr


def _layout(dataset: str, index: int, seed: int) -> tuple[dict, list[dict]]:
    """Background parameters and the objects of an image (no pixels): cheap."""
    h, w = image_size(index)
    rng = _rng(dataset, seed, 0)
    bg = _background_params(rng, h, w)
    lo, hi = OBJECTS_PER_IMAGE[dataset]
    target = int(rng.integers(lo, hi + 1))
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[dict] = []
    max_size = min(OBJECT_SIZE[1], min(h, w) * 0.45)
    for _ in range(target * 30):
        if len(objects) >= target:
            break
        size = math.exp(rng.uniform(math.log(OBJECT_SIZE[0]), math.log(max_size)))
        if dataset == "shapes":
            cls = int(rng.integers(0, 3))
            local = _shape_polygon(rng, cls, size)
            angle = 0.0 if cls == 0 else rng.uniform(0.0, 2 * math.pi)
        else:
            cls = 0
            local, _, _ = _house_points(rng, size)
            angle = math.radians(rng.uniform(-20.0, 20.0))
        half = size * 0.75
        cx = rng.uniform(_MARGIN + half, w - _MARGIN - half) if w - 2 * (_MARGIN + half) > 0 else w / 2
        cy = rng.uniform(_MARGIN + half, h - _MARGIN - half) if h - 2 * (_MARGIN + half) > 0 else h / 2
        pts = _rotate(local, angle, cx, cy)
        x0, y0 = int(pts[:, 0].min()), int(pts[:, 1].min())
        x1, y1 = int(pts[:, 0].max()), int(pts[:, 1].max())
        if x0 < _MARGIN or y0 < _MARGIN or x1 >= w - _MARGIN or y1 >= h - _MARGIN:
            continue
        if any(x0 <= bx1 + _MARGIN and bx0 <= x1 + _MARGIN and y0 <= by1 + _MARGIN and by0 <= y1 + _MARGIN
               for bx0, by0, bx1, by1 in boxes):
            continue
        ground = [_background_at(bg, x, y, h, w) for x, y in ((cx, cy), (x0, y0), (x1, y1))]
        colour = _colour(rng, ground)
        obj = {"class": cls, "points": pts, "colour": colour}
        if dataset == "houses":
            obj["roof_colour"] = _colour(rng, ground + [colour.astype(np.float64)])
        boxes.append((x0, y0, x1, y1))
        objects.append(obj)
    return bg, objects


def _annotation(dataset: str, obj: dict) -> dict:
    pts = obj["points"]
    poly = pts.astype(np.float64) + 0.5
    if dataset == "houses":  # pentagon: apex, right_eave, right_base, left_base, left_eave
        poly = poly[[0, 2, 3, 4, 1]]
    x, y = poly[:, 0], poly[:, 1]
    ann = {
        "category_id": obj["class"],
        "polygon": [float(v) for v in poly.reshape(-1)],
        "bbox": [float(x.min()), float(y.min()), float(x.max()), float(y.max())],
        "area": float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2.0),
    }
    if dataset == "houses":
        ann["keypoints"] = [[int(px), int(py), 2] for px, py in pts]  # COCO pixel indices
    return ann


def annotations(dataset: str, index: int, seed: int) -> list[dict]:
    """The annotations of :func:`render` without drawing the image."""
    _check(dataset)
    return _annotations_from_layout(dataset, index, seed)


# ------------------------------------------------------------------------------------- pixels


def _draw_background(rng: np.random.Generator, bg: dict, h: int, w: int) -> np.ndarray:
    ys = np.arange(h, dtype=np.float64)[:, None]
    xs = np.arange(w, dtype=np.float64)[None, :]
    t = 0.5 + (xs - w / 2) * bg["dx"] + (ys - h / 2) * bg["dy"]  # (h, w)
    img = bg["c0"][None, None, :] + (bg["c1"] - bg["c0"])[None, None, :] * t[:, :, None]
    # smooth low-frequency blotches: bilinear upsampling of a coarse grid (elementwise only)
    gh, gw = h // 64 + 2, w // 64 + 2
    coarse = rng.uniform(-18.0, 18.0, (gh, gw, 3))
    fy = ys[:, 0] / 64.0
    fx = xs[0, :] / 64.0
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    wy, wx = (fy - iy)[:, None, None], (fx - ix)[None, :, None]
    top = coarse[iy][:, ix] * (1 - wx) + coarse[iy][:, ix + 1] * wx
    bot = coarse[iy + 1][:, ix] * (1 - wx) + coarse[iy + 1][:, ix + 1] * wx
    img = img + top * (1 - wy) + bot * wy
    img = np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    # distractors: a few thin straight lines
    for _ in range(int(rng.integers(2, 7))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)), lineType=cv2.LINE_8)
    return img


def _add_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    noise = rng.integers(-10, 11, img.shape, dtype=np.int16)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def render(dataset: str, index: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Image ``index`` drawn from ``seed``: (BGR uint8 [H, W, 3], annotations).

    Each annotation: ``category_id`` (0-based), ``polygon`` (flat [x0, y0, x1, y1, ...], pixel-centre
    coordinates), ``bbox`` (XYXY absolute, of the polygon), ``area`` (polygon area) and, for houses,
    ``keypoints`` ([[x, y, 2]] * 5, COCO pixel indices, in :data:`HOUSE_KEYPOINTS` order).
    """
    _check(dataset)
    h, w = image_size(index)
    bg, objects = _layout(dataset, index, seed)
    rng = _rng(dataset, seed, 1)
    img = _draw_background(rng, bg, h, w)
    for obj in objects:
        pts = obj["points"]
        colour = tuple(int(c) for c in obj["colour"])
        if dataset == "shapes":
            cv2.fillPoly(img, [pts], colour, lineType=cv2.LINE_8)
        else:  # base (left_eave, right_eave, right_base, left_base), then roof (apex, eaves)
            cv2.fillPoly(img, [pts[[1, 2, 3, 4]]], colour, lineType=cv2.LINE_8)
            cv2.fillPoly(img, [pts[[0, 1, 2]]], tuple(int(c) for c in obj["roof_colour"]), lineType=cv2.LINE_8)
    img = _add_noise(rng, img)
    return img, [_annotation(dataset, o) for o in objects]


# ---------------------------------------------------------------------------------- data sets


def file_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}_{split}_{index:06d}.png"


def _d2_annotation(ann: dict) -> dict:
    out = {
        "bbox": list(ann["bbox"]),
        "bbox_mode": BBOX_MODE_XYXY_ABS,
        "category_id": ann["category_id"],
        "segmentation": [list(ann["polygon"])],
        "iscrowd": 0,
    }
    if "keypoints" in ann:
        out["keypoints"] = [v for x, y, vis in ann["keypoints"] for v in (x + 0.5, y + 0.5, vis)]
    return out


def detectron2_dicts(dataset: str, split: str, count: int, annotations: bool = True) -> list[dict]:
    """Detectron2 records of images 0..count-1 of a split.

    Each carries ``dataset``, ``index`` and ``seed`` (what a mapper needs to draw the image with
    :func:`render`), ``file_name`` (the name :func:`write_coco` gives it), ``image_id`` (index + 1,
    as in the COCO json), ``height``, ``width`` and, unless ``annotations=False`` (cheaper, for a
    mapper that takes them from :func:`render`), ``annotations`` in Detectron2's format
    (``bbox_mode`` XYXY_ABS = 0, polygons, keypoints with Detectron2's +0.5).
    """
    _check(dataset, split)
    records = []
    for i in range(int(count)):
        h, w = image_size(i)
        seed = seed_for(dataset, split, i)
        rec = {"dataset": dataset, "index": i, "seed": seed, "file_name": file_name(dataset, split, i),
               "image_id": i + 1, "height": h, "width": w}
        if annotations:
            rec["annotations"] = [_d2_annotation(a) for a in _annotations_from_layout(dataset, i, seed)]
        records.append(rec)
    return records


def _annotations_from_layout(dataset: str, index: int, seed: int) -> list[dict]:
    return [_annotation(dataset, o) for o in _layout(dataset, index, seed)[1]]


def d2_annotations(anns: list[dict]) -> list[dict]:
    """:func:`render`'s annotations in Detectron2's record format."""
    return [_d2_annotation(a) for a in anns]


def coco_categories(dataset: str) -> list[dict]:
    _check(dataset)
    cats = []
    for i, name in enumerate(CLASSES[dataset]):
        cat = {"id": i + 1, "name": name, "supercategory": "house" if dataset == "houses" else "shape"}
        if dataset == "houses":
            cat["keypoints"] = list(HOUSE_KEYPOINTS)
            cat["skeleton"] = [[HOUSE_KEYPOINTS.index(a) + 1, HOUSE_KEYPOINTS.index(b) + 1] for a, b in HOUSE_SKELETON]
        cats.append(cat)
    return cats


def coco_dict(dataset: str, split: str, count: int) -> dict:
    """The COCO json document of images 0..count-1 of a split (no pixels drawn)."""
    _check(dataset, split)
    images, anns = [], []
    for i in range(int(count)):
        h, w = image_size(i)
        images.append({"id": i + 1, "file_name": file_name(dataset, split, i), "height": h, "width": w})
        for a in _annotations_from_layout(dataset, i, seed_for(dataset, split, i)):
            anns.append(_coco_annotation(a, i + 1, len(anns) + 1))
    return {
        "info": {"description": f"d2build synthetic {dataset} ({split}, {count} images)", "version": "1"},
        "images": images,
        "annotations": anns,
        "categories": coco_categories(dataset),
    }


def _coco_annotation(a: dict, image_id: int, ann_id: int) -> dict:
    x0, y0, x1, y1 = a["bbox"]
    out = {"id": ann_id, "image_id": image_id, "category_id": a["category_id"] + 1,
           "bbox": [x0, y0, x1 - x0, y1 - y0], "area": a["area"], "iscrowd": 0,
           "segmentation": [list(a["polygon"])]}
    if "keypoints" in a:
        out["keypoints"] = [v for kp in a["keypoints"] for v in kp]
        out["num_keypoints"] = sum(1 for kp in a["keypoints"] if kp[2] > 0)
    return out


def write_coco(dataset: str, split: str, count: int, folder: str | Path, images: bool = True) -> Path:
    """Write images 0..count-1 of a split as PNGs (unless ``images=False``) and their COCO json
    (``<folder>/<dataset>_<split>.json``, ``file_name`` relative to ``folder``); returns the json path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for i in range(int(count)):
            img, _ = render(dataset, i, seed_for(dataset, split, i))
            cv2.imwrite(str(folder / file_name(dataset, split, i)), img)
    path = folder / f"{dataset}_{split}.json"
    path.write_text(json.dumps(coco_dict(dataset, split, count)))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m d2build.synthetic DATASET SPLIT COUNT FOLDER`: write a split's images and COCO json."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4 or args[0] not in DATASETS or args[1] not in SPLITS or not args[2].isdigit():
        print(f"usage: python -m d2build.synthetic {{{','.join(DATASETS)}}} {{{','.join(SPLITS)}}} COUNT FOLDER",
              file=sys.stderr)
        return 2
    print(write_coco(args[0], args[1], int(args[2]), args[3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
