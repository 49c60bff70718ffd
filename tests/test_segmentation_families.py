"""Panoptic FPN and PointRend (issue 22): the runtime's semantic map and panoptic combination against
Detectron2's own code, the segmentation outputs in JSON, PNG, the bundle and the Triton repository, and
both recipes end to end (weights -> export -> surgery -> verify) in both graph flavours.

The unit tests compare d2build's numpy decoding with Detectron2's functions on synthetic data (exact
agreement expected). The end-to-end runs use random weights that behave on the bundled photographs at
320x320 (PointRend on two photographs: its eager reference refines 80 classes per detection); the
native-size runs are bench/segmentation_native.py's (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import d2build
from d2build import standard_ops
from d2build.compose import compose
from d2build.processing import Detections, Letterbox, fit_size, semantic_to_original

# ------------------------------------------------------------------ the semantic map and the combination


def _smooth_logits(rng, c: int, h: int, w: int) -> np.ndarray:
    """Per-class logits with blobs of several pixels (like a semantic head's), not pixel noise."""
    coarse = rng.normal(0, 3, (c, h // 4 + 1, w // 4 + 1)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w] + rng.normal(0, 0.3, (c, h, w)).astype(
        np.float32)


@pytest.mark.parametrize(("original", "canvas"), [((300, 451), (320, 320)), ((512, 512), (320, 384)),
                                                   ((427, 640), (512, 512))])
def test_semantic_map_is_detectron2s(original, canvas):
    """The head's x4 upsample, sem_seg_postprocess's crop and resize to the photograph, the argmax: as Detectron2."""
    import torch
    import torch.nn.functional as F
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    rng = np.random.default_rng(0)
    logits = _smooth_logits(rng, 54, canvas[0] // 4, canvas[1] // 4)
    scale, resized = fit_size(*original, canvas)
    lb = Letterbox(original, canvas, scale, resized)
    up = F.interpolate(torch.from_numpy(logits)[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    ref = sem_seg_postprocess(up, resized, *original).argmax(dim=0).numpy()
    got = semantic_to_original(logits, lb)
    assert got.shape == original and got.dtype == np.int32
    assert len(np.unique(ref)) >= 20  # several classes, not one background
    assert np.mean(got == ref) >= 0.9999, np.mean(got == ref)


def _instances(rng, h: int, w: int, n: int = 12) -> Detections:
    boxes, masks = [], np.zeros((n, h, w), bool)
    for k in range(n):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
        boxes.append([x0, y0, min(x1, w), min(y1, h)])
        masks[k, y0:y1, x0:x1] = rng.random((min(y1, h) - y0, min(x1, w) - x0)) < 0.8
    masks[3] = masks[2]  # a duplicate: dropped for overlapping more than OVERLAP_THRESH
    masks[5] = False  # an empty mask: skipped
    scores = np.sort(rng.uniform(0.3, 0.95, n))[::-1].astype(np.float32)
    return Detections(np.array(boxes, np.float32), scores, rng.integers(0, 80, n), masks)


def test_panoptic_combination_is_detectron2s():
    """combine(): segment for segment what combine_semantic_and_instance_outputs gives on the same inputs."""
    import torch
    from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
    from detectron2.structures import Instances

    from d2build.families.panoptic_fpn import COMBINE_DEFAULTS, combine

    rng = np.random.default_rng(1)
    h, w = 240, 320
    det = _instances(rng, h, w)
    semantic = np.zeros((h, w), np.int64)
    semantic[:120] = 3
    semantic[120:, :200] = 7
    semantic[120:, 200:] = 0  # "things" only
    semantic[:20, :20] = 11  # a stuff region below STUFF_AREA_LIMIT
    settings = {**COMBINE_DEFAULTS, "stuff_area_limit": 2000}
    got = combine(det, semantic, settings)
    inst = Instances((h, w), scores=torch.from_numpy(det.scores), pred_classes=torch.from_numpy(det.classes),
                     pred_masks=torch.from_numpy(det.masks))
    ref, segments = combine_semantic_and_instance_outputs(inst, torch.from_numpy(semantic), 0.5, 2000, 0.5)
    np.testing.assert_array_equal(got.panoptic, ref.numpy())
    keys = ("id", "isthing", "category_id")
    assert [tuple(s[k] for k in keys) for s in got.segments] == [tuple(s[k] for k in keys) for s in segments]
    things = [s for s in got.segments if s["isthing"]]
    assert len(things) >= 4 and {s["category_id"] for s in got.segments if not s["isthing"]} == {3, 7}
    assert all(s["score"] >= 0.5 for s in things)


def test_segment_matching_counts_a_changed_segment():
    from d2build.families.panoptic_fpn import combine, segmentation_agreement, COMBINE_DEFAULTS

    rng = np.random.default_rng(2)
    h, w = 240, 320
    det = _instances(rng, h, w)
    semantic = np.where(np.arange(w)[None, :] < 160, 3, 7).repeat(h, axis=0)
    ref = combine(det, semantic, COMBINE_DEFAULTS)
    same = segmentation_agreement(ref, combine(det, semantic, COMBINE_DEFAULTS), 0.9)
    assert same["segments_matched"] == same["segments_detectron2"] >= 5 and same["semantic_agreement"] == 1.0
    moved = Detections(det.boxes, det.scores, det.classes, np.roll(det.masks, 25, axis=2))
    other = segmentation_agreement(ref, combine(moved, semantic, COMBINE_DEFAULTS), 0.9)
    assert other["segments_matched"] < other["segments_detectron2"] and other["panoptic_agreement"] < 1.0


def test_segmentation_json_holds_coco_panoptic_pngs():
    """The deploy runtime's JSON: the panoptic PNG decodes to the segment ids (id = R + 256 G + 256^2 B)."""
    from PIL import Image

    from d2build.deploy.runtime import segmentation_to_dict
    from d2build.processing import Segmentation

    ids = np.zeros((40, 60), np.int32)
    ids[5:20, 10:30], ids[20:, :] = 1, 300  # an id past 255 needs the G channel
    seg = Segmentation(np.full((40, 60), 2, np.int32), ids, [
        {"id": 1, "isthing": True, "category_id": 0, "category": "person", "score": 0.9, "instance_id": 0},
        {"id": 300, "isthing": False, "category_id": 2, "category": "bridge"}])
    doc = json.loads(json.dumps(segmentation_to_dict(seg)))
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["panoptic"]["png_base64"])))).astype(np.int64)
    np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ids)
    sem = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["semantic"]["png_base64"]))))
    assert (sem == 2).all()
    person, bridge = doc["panoptic"]["segments_info"]
    assert person == {"id": 1, "category_id": 0, "isthing": True, "category": "person", "area": 300,
                      "bbox": [10, 5, 20, 15], "iscrowd": 0, "score": 0.9, "instance_id": 0}
    assert bridge["area"] == 20 * 60 and bridge["bbox"] == [0, 20, 60, 20] and "score" not in bridge


# ------------------------------------------------------------------ TensorRT import rules of the new ops


def _one_node(op: str, attrs: dict, inputs: list[tuple[str, list[int]]]) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n != "idx" else TensorProto.INT64, s)
           for n, s in inputs]
    node = helper.make_node(op, [n for n, _ in inputs], ["y"], name="n", **attrs)
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_grid_sample_and_scatter_elements_import_rules():
    grid = [("x", [1, 8, 10, 10]), ("g", [1, 5, 1, 2])]
    assert standard_ops.problems(_one_node("GridSample", {"mode": "bilinear", "align_corners": 0}, grid)) == []
    [p] = standard_ops.problems(_one_node("GridSample", {"mode": "linear"}, grid))
    assert "'linear'" in p and "nearest" in p
    scatter = [("x", [2, 9]), ("idx", [2, 3]), ("u", [2, 3])]
    assert standard_ops.problems(_one_node("ScatterElements", {"axis": 1}, scatter)) == []
    assert "reduction" in standard_ops.problems(_one_node("ScatterElements", {"axis": 1, "reduction": "add"},
                                                          scatter))[0]


# ------------------------------------------------------------------ recipes and their rules


def test_recipes_compose_with_their_configs():
    pan = compose(["recipe=panoptic_fpn_r50"])
    assert pan.model.family == "panoptic_fpn" and pan.model.input == (800, 1344)
    pr = compose(["recipe=pointrend_mask_rcnn_r50"])
    assert pr.model.family == "pointrend" and Path(pr.model.config).is_file()  # the config shipped beside the recipe
    assert pan.verify.min_semantic_agreement == 0.995 and pan.verify.segment_iou_threshold == 0.9
    assert compose(["recipe=panoptic_fpn_r50", "precision=fp16"]).verify.min_segments_matched == 0.8


def test_pointrend_config_reads_with_detectron2s_pointrend_keys():
    """detectron.load_cfg adds PointRend's keys (add_pointrend_config) for a config that sets MODEL.POINT_HEAD."""
    from d2build import detectron

    cfg = detectron.load_cfg(compose(["recipe=pointrend_mask_rcnn_r50"]).model.config)
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "PointRendMaskHead" and cfg.MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS == 784
    assert not hasattr(detectron.load_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml").MODEL, "POINT_HEAD")


@pytest.mark.parametrize(("overrides", "key", "says"), [
    (["recipe=pointrend_mask_rcnn_r50", "model.family=mask_rcnn"], "model.family", "is a PointRend Mask R-CNN"),
    (["recipe=panoptic_fpn_r50", "model.family=mask_rcnn"], "model.family", "is a Panoptic FPN"),
    (["recipe=mask_rcnn_r50", "model.family=panoptic_fpn"], "model.family", "is a Mask R-CNN"),
    (["recipe=panoptic_fpn_r50", "verify.min_semantic_agreement=1.5"], "verify.min_semantic_agreement",
     "outside [0, 1]"),
])
def test_family_rules(overrides, key, says):
    from d2build.schema import RecipeError

    with pytest.raises(RecipeError) as info:
        compose(overrides)
    [p] = [p for p in info.value.problems if p.key == key]
    assert says in p.message and p.fix, p


# ------------------------------------------------------------------ end to end (320x320, random weights that behave)

SIZE = "[320,320]"
PANOPTIC = ["recipe=panoptic_fpn_r50", "model.weights=random", f"model.input={SIZE}", "verify.count=2"]
POINTREND = ["recipe=pointrend_mask_rcnn_r50", "model.weights=random", f"model.input={SIZE}", "verify.count=2"]
IO = {"num_detections": [1, 1], "detection_boxes": [1, 100, 4], "detection_scores": [1, 100],
      "detection_classes": [1, 100]}


def _graph_checks(run, ops: str) -> None:
    used = run.stage("surgery")["info"]["op_counts"]
    if ops == "plugins":
        assert used.get("EfficientNMS_TRT") == 2 and not {"If", "Loop", "NonZero", "Scan"} & set(used)
    else:
        model = onnx.load(str(Path(run.stage("precision")["dir"]) / "model.onnx"))
        assert {n.domain for n in model.graph.node} <= {""} and standard_ops.problems(model) == []


def _rows(run) -> list[dict]:
    return json.loads((Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]


@pytest.mark.parametrize(("ops", "precision"), [("plugins", "fp32"), ("standard", "fp32"), ("plugins", "fp16")])
def test_panoptic_fpn_verifies(shared_cache, tmp_path, ops, precision):
    run = d2build([*PANOPTIC, f"surgery.ops={ops}", f"precision={precision}"], shared_cache, tmp_path / "r",
                  until="verify")
    assert run.run_json["ok"], run.output[-3000:]
    info = run.stage("surgery")["info"]
    assert info["io"]["outputs"] == {**IO, "detection_masks": [1, 100, 28, 28], "semantic_logits": [1, 54, 80, 80]}
    _graph_checks(run, ops)
    floor = {"fp32": (0.99, 0.995, 0.95), "fp16": (0.97, 0.99, 0.8)}[precision]
    rows = _rows(run)
    for r in rows:
        assert r["detectron2"] >= 20 and r["recovered"] >= floor[0], r
        assert r["semantic_classes"] >= 5, r  # several stuff classes, not an all-background map
        assert r["semantic_agreement"] >= floor[1] and r["segments_detectron2"] >= 5, r
        assert r["segments_matched_share"] >= floor[2], r
    assert sum(r["things"] for r in rows) >= 3  # instances reach the panoptic result too


@pytest.mark.parametrize("ops", ["plugins", "standard"])
def test_pointrend_verifies_with_subdivided_masks(shared_cache, tmp_path, ops):
    run = d2build([*POINTREND, f"surgery.ops={ops}"], shared_cache, tmp_path / "r", until="verify")
    assert run.run_json["ok"], run.output[-3000:]
    info = run.stage("surgery")["info"]
    assert info["io"]["outputs"] == {**IO, "detection_masks": [1, 100, 224, 224]}
    assert info["point_rend"] == {"coarse": "7x7", "first_pass": "28x28", "steps": 3, "points_per_step": 784,
                                  "mask": "224x224"}
    assert info["op_counts"]["GridSample"] == 2 * 4 + 1 and info["op_counts"]["ScatterElements"] == 3
    _graph_checks(run, ops)
    for r in _rows(run):
        assert r["detectron2"] >= 20 and r["recovered"] >= 0.99 and r["mean_mask_iou"] >= 0.95, r
    if ops == "plugins":  # the masks are objects, not empty or full boxes (an IoU of two empty masks is 1)
        from d2build import backends, detectron, photos
        from d2build.recipe import ModelSlice
        from d2build.runtime import Model

        recipe = compose([*POINTREND, f"surgery.ops={ops}"])
        model = Model(backends.open_graph(Path(run.stage("precision")["dir"]) / "model.onnx"),
                      detectron.model_info(ModelSlice.of(recipe)))
        det, _, _ = model.detect(photos.bundled("coffee").bgr)
        box_area = np.prod(det.boxes[:, 2:] - det.boxes[:, :2], axis=1)
        fill = det.masks.reshape(len(det), -1).sum(axis=1) / np.maximum(box_area, 1)
        assert len(det) >= 20 and 0.1 < float(np.median(fill)) < 0.9, np.median(fill)


def _command(args: list[str], cache: Path) -> str:
    import os
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "d2build", *args, f"cache.dir={cache}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def test_panoptic_infer_and_bundle(shared_cache, tmp_path):
    """infer writes the panoptic/semantic PNGs and their segments_info; the bundle's model.json and Triton
    repository carry semantic_logits and the combination thresholds; the bundle's runtime JSON inlines them."""
    from PIL import Image

    from d2build import photos
    from d2build.deploy import load_bundle
    from d2build.deploy.runtime import detections_to_dict

    overrides = [*PANOPTIC, "surgery.ops=plugins", "precision=fp32"]  # the graph and verify of the e2e test
    _command(["infer", "--out", str(tmp_path / "infer"), "--count", "1", *overrides, "runtime.backend=reference"],
             shared_cache)
    [image] = json.loads((tmp_path / "infer" / "detections.json").read_text())["images"]
    pan = image["panoptic"]
    assert pan["file_name"] == "panoptic/astronaut.png" and image["semantic"]["file_name"] == "semantic/astronaut.png"
    ids = np.asarray(Image.open(tmp_path / "infer" / pan["file_name"])).astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    assert ids.shape == (512, 512) and set(np.unique(ids)) - {0} == {s["id"] for s in pan["segments_info"]}
    assert {s["area"] for s in pan["segments_info"]} == {int((ids == s["id"]).sum()) for s in pan["segments_info"]}
    assert any(s["isthing"] for s in pan["segments_info"]) and any(not s["isthing"] for s in pan["segments_info"])

    _command(["deploy", "--out", str(tmp_path / "bundle"), "--run-dir", str(tmp_path / "run"), *overrides],
             shared_cache)
    [folder] = sorted((tmp_path / "bundle").glob("panoptic_fpn_r50-*"))
    model, bundle = load_bundle(folder)
    outputs = {o["name"]: o for o in bundle.doc["outputs"]}
    assert outputs["semantic_logits"]["shape"] == [1, 54, 80, 80] and outputs["semantic_logits"]["meaning"]
    settings = bundle.doc["model"]["extra"]["panoptic"]
    assert settings["stuff_area_limit"] == 4096 and settings["overlap_threshold"] == 0.5
    assert len(settings["stuff_classes"]) == 54 and settings["stuff_classes"][0] == "things"
    configs = "\n".join(p.read_text() for p in (folder / "triton").rglob("config.pbtxt"))
    assert "semantic_logits" in configs
    photo = photos.bundled("astronaut")
    det, lb, _ = model.detect(photo.bgr)
    doc = detections_to_dict("astronaut", det, lb.original_hw, model.info)
    assert [s["id"] for s in doc["panoptic"]["segments_info"]] == [s["id"] for s in pan["segments_info"]]
    png = Image.open(io.BytesIO(base64.b64decode(doc["panoptic"]["png_base64"])))
    assert png.size == (512, 512)


# ------------------------------------------------------------------ PQ


def test_panoptic_quality_counts_as_panopticapi(tmp_path):
    """A hand-counted case: one matched thing (IoU 0.8), one missed stuff (FN), one false thing (FP), a prediction
    lying on unlabelled pixels (ignored), and a crowd region (never matched, not a false negative)."""
    from d2build.deploy.runtime import png_bytes
    from d2build.evaluation import panoptic_quality
    from d2build.processing import Segmentation

    gt_ids = np.zeros((10, 20), np.int64)
    gt_ids[0:5, 0:10] = 1  # person, 50 px
    gt_ids[5:10, 0:10] = 2  # sky (stuff), 50 px
    gt_ids[0:5, 15:20] = 3  # person crowd
    rgb = np.stack([gt_ids % 256, gt_ids // 256, np.zeros_like(gt_ids)], -1)
    (tmp_path / "1.png").write_bytes(png_bytes(rgb))
    gt = {"categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0}],
          "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": [
              {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 7, "iscrowd": 0},
              {"id": 3, "category_id": 1, "iscrowd": 1}]}]}
    pred = np.zeros((10, 20), np.int32)
    pred[0:4, 0:10] = 1  # 40 px inside the gt person: IoU 0.8
    pred[5:10, 10:14] = 2  # people on unlabelled pixels: not false positives
    pred[5:10, 14:20] = 3
    pred[0:5, 10:15] = 4
    segs = [{"id": k, "isthing": True, "category": "person", "category_id": 0} for k in (1, 2, 3, 4)]
    q = panoptic_quality(gt, tmp_path, {1: Segmentation(np.zeros((10, 20), np.int32), pred, segs)})
    # person: TP 1 (IoU 0.8), FP 0 (the others lie on unlabelled pixels); sky: FN 1
    assert q["Things"] == pytest.approx({"PQ": 0.8, "SQ": 0.8, "RQ": 1.0, "categories": 1})
    assert q["Stuff"] == pytest.approx({"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "categories": 1})
    assert q["All"]["PQ"] == pytest.approx(0.4)
    pred[5:10, 0:10] = 5  # now a person where the gt has sky: a false positive (and sky still missed)
    q = panoptic_quality(gt, tmp_path, {1: Segmentation(np.zeros((10, 20), np.int32), pred,
                                                        segs + [{**segs[0], "id": 5}])})
    assert q["Things"]["PQ"] == pytest.approx(0.8 / 1.5) and q["Things"]["RQ"] == pytest.approx(1 / 1.5)


def _ground_truth_from_detectron2(shared_cache, tmp_path) -> list[str]:
    """A COCO instances json and a COCO panoptic json (+ PNG) of a bundled photograph, made from Detectron2's
    own panoptic result on the graph's input: the eval stages must score Detectron2 at PQ 100 against it."""
    import torch
    from PIL import Image

    from d2build import detectron, photos
    from d2build.deploy.runtime import segmentation_pngs
    from d2build.evaluation import encode_masks
    from d2build.families import builder
    from d2build.processing import letterbox
    from d2build.recipe import ModelSlice

    weights = d2build([*PANOPTIC], shared_cache, tmp_path / "w", until="weights").stage("weights")["dir"]
    recipe = compose(PANOPTIC)
    build = builder("panoptic_fpn")
    cfg = detectron.load_cfg(recipe.model.config, build.eager_overrides(recipe.surgery))
    model = detectron.build_model(cfg, torch.load(Path(weights) / "model.pth", weights_only=True))
    info = detectron.model_info(ModelSlice.of(recipe), cfg)
    stuff = info.extra["panoptic"]["stuff_classes"]
    categories = [{"id": k + 1, "name": n, "isthing": 1} for k, n in enumerate(info.class_names)]
    categories += [{"id": 100 + s, "name": stuff[s], "isthing": 0} for s in range(1, len(stuff))]
    folder, masks = tmp_path / "images", tmp_path / "panoptic"
    folder.mkdir()
    masks.mkdir()
    images, instances, panoptic = [], [], []
    for image_id, name in enumerate(("astronaut",), 1):  # 6 things, 7 stuff segments at 320x320
        photo = photos.bundled(name)
        Image.fromarray(photo.bgr[:, :, ::-1]).save(folder / f"{name}.png")
        h, w = photo.bgr.shape[:2]
        images.append({"id": image_id, "file_name": f"{name}.png", "height": h, "width": w})
        chw, lb = letterbox(photo.bgr, recipe.model.input, info.pixel_mean)
        det = build.eager_detections(model, chw, lb, info)
        for k in np.flatnonzero(det.scores >= 0.5):
            x0, y0, x1, y1 = (float(v) for v in det.boxes[k])
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": int(det.classes[k]) + 1,
                              "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(det.masks[k].sum()), "iscrowd": 0,
                              "segmentation": encode_masks(det.masks[k:k + 1])[0]})
        seg = det.segmentation
        (masks / f"{image_id}.png").write_bytes(segmentation_pngs(seg)[0])
        panoptic.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": [
            {"id": s["id"], "category_id": s["category_id"] + 1 if s["isthing"] else 100 + s["category_id"],
             "iscrowd": 0, "area": s["area"]} for s in seg.segments]})
    (tmp_path / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": instances, "categories": [dict(c) for c in categories if c["isthing"]]}))
    (tmp_path / "panoptic.json").write_text(json.dumps(
        {"images": images, "annotations": panoptic, "categories": categories}))
    return [f"eval.annotations={tmp_path / 'instances.json'}", f"eval.images={folder}",
            f"eval.panoptic={tmp_path / 'panoptic.json'}", f"eval.panoptic_masks={masks}"]


def test_eval_scores_panoptic_quality_beside_ap(shared_cache, tmp_path):
    truth = _ground_truth_from_detectron2(shared_cache, tmp_path)
    run = d2build([*PANOPTIC, "surgery.ops=plugins", *truth], shared_cache, tmp_path / "r", until="eval")
    assert run.run_json["ok"], run.output[-3000:]
    info = run.stage("eval")["info"]
    q = info["panoptic"]
    assert q["detectron2"]["All"]["PQ"] == pytest.approx(1.0)  # the truth is Detectron2's own result
    assert q["detectron2"]["Things"]["categories"] >= 3 and q["detectron2"]["Stuff"]["categories"] >= 5
    assert q["graph"]["All"]["PQ"] >= 0.95 and q["graph"]["Things"]["PQ"] >= 0.9, q["graph"]
    # with its own resize (800 / 1333) random weights see another image: scored, not compared
    assert 0 <= q["detectron2_native"]["All"]["PQ"] <= 1 and q["detectron2_native"]["All"]["categories"] > 0
    report = (Path(run.stage("eval")["dir"]) / "report.md").read_text()
    assert "panoptic PQ All" in report and "segm" in json.dumps(info["ap"])
