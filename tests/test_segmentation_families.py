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
