"""d2build.synthetic: deterministic images, sane annotations, a COCO json pycocotools reads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from d2build import synthetic as S


@pytest.mark.parametrize("dataset", S.DATASETS)
def test_render_is_deterministic(dataset):
    for index in range(4):
        seed = S.seed_for(dataset, "val", index)
        a_img, a_anns = S.render(dataset, index, seed)
        b_img, b_anns = S.render(dataset, index, seed)
        assert a_img.dtype == np.uint8 and a_img.shape == (*S.image_size(index), 3)
        assert a_img.tobytes() == b_img.tobytes()
        assert a_anns == b_anns
        assert S.annotations(dataset, index, seed) == a_anns  # geometry without pixels
    # another seed, another image
    assert S.render(dataset, 0, 1)[0].tobytes() != S.render(dataset, 0, 2)[0].tobytes()


def test_module_does_not_import_torch_or_detectron2():
    code = "import sys, d2build.synthetic; print(any(m.split('.')[0] in ('torch', 'detectron2') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_splits_are_disjoint():
    for dataset in S.DATASETS:
        train = {S.seed_for(dataset, "train", i) for i in range(1000)}
        val = {S.seed_for(dataset, "val", i) for i in range(1000)}
        assert not train & val
    img_train, _ = S.render("shapes", 0, S.seed_for("shapes", "train", 0))
    img_val, _ = S.render("shapes", 0, S.seed_for("shapes", "val", 0))
    assert img_train.tobytes() != img_val.tobytes()


def _point_in_polygon(x, y, poly):
    inside = False
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


@pytest.mark.parametrize("dataset", S.DATASETS)
def test_annotation_sanity(dataset):
    lo, hi = S.OBJECTS_PER_IMAGE[dataset]
    sizes = set()
    for index in range(24):
        img, anns = S.render(dataset, index, S.seed_for(dataset, "train", index))
        h, w = img.shape[:2]
        sizes.add((h, w))
        assert lo <= len(anns) <= hi
        boxes = []
        for a in anns:
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 10 <= max(x1 - x0, y1 - y0) <= S.OBJECT_SIZE[1] * 1.2
            poly = np.array(a["polygon"]).reshape(-1, 2)
            assert len(poly) >= 3
            assert (poly[:, 0] >= x0).all() and (poly[:, 0] <= x1).all()
            assert (poly[:, 1] >= y0).all() and (poly[:, 1] <= y1).all()
            assert 0 < a["area"] <= (x1 - x0) * (y1 - y0)
            assert 0 <= a["category_id"] < len(S.CLASSES[dataset])
            # the object's colour is drawn there: its centre differs from the image border average
            if dataset == "houses":
                kps = a["keypoints"]
                assert len(kps) == len(S.HOUSE_KEYPOINTS) and all(v == 2 for _, _, v in kps)
                for x, y, _ in kps:  # pixel indices, +0.5 = inside the box
                    assert x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1
                apex, le, re, rb, lb = kps
                assert le[0] < re[0] and lb[0] < rb[0]  # left is left (rotation within +-20 degrees)
                assert apex[1] < min(le[1], re[1])  # the roof is above the eaves
                cx, cy = np.mean([k[0] for k in kps]) + 0.5, np.mean([k[1] for k in kps]) + 0.5
                assert _point_in_polygon(cx, cy, poly)
            for b in boxes:  # no two objects overlap
                assert x1 < b[0] or b[2] < x0 or y1 < b[1] or b[3] < y0
            boxes.append(a["bbox"])
    assert sizes == set(S.IMAGE_SIZES)


@pytest.mark.parametrize("dataset", S.DATASETS)
def test_drawn_pixels_match_polygons(dataset):
    """The polygon covers the pixels drawn in the object's colour (mask IoU from pycocotools)."""
    from pycocotools import mask as mask_utils

    img, anns = S.render(dataset, 1, S.seed_for(dataset, "val", 1))
    h, w = img.shape[:2]
    clean = S._layout(dataset, 1, S.seed_for(dataset, "val", 1))[1]
    for a, obj in zip(anns, clean):
        rle = mask_utils.frPyObjects([a["polygon"]], h, w)
        m = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        x0, y0, x1, y1 = (int(v) for v in a["bbox"])
        colours = [obj["colour"]] + ([obj["roof_colour"]] if "roof_colour" in obj else [])
        near = np.zeros((h, w), bool)
        for c in colours:  # the noise is within +-10 per channel
            near |= (np.abs(img.astype(int) - np.asarray(c)[None, None, :]) <= 10).all(-1)
        box = np.zeros((h, w), bool)
        box[max(y0 - 2, 0):y1 + 3, max(x0 - 2, 0):x1 + 3] = True
        drawn = near & box
        iou = (m & drawn).sum() / (m | drawn).sum()
        assert iou > 0.8, (a, iou)


@pytest.mark.parametrize("dataset", S.DATASETS)
def test_detectron2_dicts(dataset):
    recs = S.detectron2_dicts(dataset, "val", 6)
    light = S.detectron2_dicts(dataset, "val", 6, annotations=False)
    for r, l in zip(recs, light):
        assert {k: v for k, v in r.items() if k != "annotations"} == l
        img, anns = S.render(r["dataset"], r["index"], r["seed"])
        assert img.shape[:2] == (r["height"], r["width"])
        assert r["annotations"] == S.d2_annotations(anns)
        for a in r["annotations"]:
            assert a["bbox_mode"] == S.BBOX_MODE_XYXY_ABS and a["iscrowd"] == 0
            if dataset == "houses":
                assert len(a["keypoints"]) == 3 * len(S.HOUSE_KEYPOINTS)
    assert len({r["image_id"] for r in recs}) == 6


@pytest.mark.parametrize("dataset", S.DATASETS)
def test_write_coco_reads_with_pycocotools(dataset, tmp_path):
    from pycocotools.coco import COCO

    count = 5
    path = S.write_coco(dataset, "val", count, tmp_path)
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == count
    recs = S.detectron2_dicts(dataset, "val", count)
    assert len(coco.getAnnIds()) == sum(len(r["annotations"]) for r in recs)
    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == list(S.CLASSES[dataset])
    if dataset == "houses":
        assert cats[0]["keypoints"] == list(S.HOUSE_KEYPOINTS)
        assert [1, 2] in cats[0]["skeleton"] and all(1 <= i <= 5 for p in cats[0]["skeleton"] for i in p)
    import cv2

    for info in coco.loadImgs(coco.getImgIds()):
        img = cv2.imread(str(tmp_path / info["file_name"]))
        assert img.shape[:2] == (info["height"], info["width"])
        r = recs[info["id"] - 1]
        assert img.tobytes() == S.render(dataset, r["index"], r["seed"])[0].tobytes()  # PNG is lossless
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
            assert ann["iscrowd"] == 0 and ann["area"] > 0
            assert coco.annToMask(ann).sum() > 0
            if dataset == "houses":
                assert ann["num_keypoints"] == 5 and len(ann["keypoints"]) == 15
    doc = json.loads(path.read_text())
    assert doc["annotations"][0]["id"] == 1


def test_known_bytes():
    """Pins the generator: a change of these digests changes every image (and any AP measured on them)."""
    digests = {ds: hashlib.sha256(S.render(ds, 1, S.seed_for(ds, "val", 1))[0].tobytes()).hexdigest()[:16]
               for ds in S.DATASETS}
    assert digests == EXPECTED_DIGESTS


EXPECTED_DIGESTS = {"shapes": "eb00ebef68b958f5", "houses": "6af18c297000118c"}
