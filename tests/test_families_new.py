"""RetinaNet and Cascade Mask R-CNN (issue 15): end to end through the real command line, and their schema rules.

Each shipped recipe runs weights -> export -> surgery -> verify with random weights that behave on
the bundled photographs, in both graph flavours, at a square and a non-square size, fp16 once; verify
holds them to the usual gates (>= 99% of Detectron2's detections at IoU >= 0.98 and |score
difference| <= 0.01, fp16 97%) with >= 20 Detectron2 detections per image. Small inputs keep CPU time
down; the wider matrix (batch, dynamic, more sizes and precisions) is bench/families_matrix.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from conftest import d2build
from d2build import standard_ops
from d2build.compose import compose
from d2build.graph import scope_regex
from d2build.schema import RecipeError, _detectron2_configs_dir

# (recipe, input, flavour, precision)
E2E = [
    ("retinanet_r50", "[320,320]", "plugins", "fp32"),
    ("retinanet_r50", "[384,320]", "standard", "fp32"),
    ("retinanet_r50", "[320,320]", "plugins", "fp16"),
    ("cascade_mask_rcnn_r50", "[320,320]", "plugins", "fp32"),
    ("cascade_mask_rcnn_r50", "[320,384]", "standard", "fp32"),
]
MASKS = {"retinanet_r50": {}, "cascade_mask_rcnn_r50": {"detection_masks": [1, 100, 28, 28]}}
# plugin nodes per graph: RetinaNet has no RPN and no ROI pooling; the cascade pools three box stages and masks
PLUGINS = {"retinanet_r50": {"EfficientNMS_TRT": 1},
           "cascade_mask_rcnn_r50": {"EfficientNMS_TRT": 2, "PyramidROIAlign_TRT": 4}}


@pytest.mark.parametrize(("recipe", "size", "ops", "precision"), E2E, ids=["-".join(c) for c in E2E])
def test_new_family_recipe_passes_verify(shared_cache, tmp_path, recipe, size, ops, precision):
    run = d2build([f"recipe={recipe}", "model.weights=random", f"model.input={size}", f"surgery.ops={ops}",
                   f"precision={precision}"], shared_cache, tmp_path / "r")
    assert run.run_json["ok"], run.output[-3000:]
    h, w = json.loads(size)
    info = run.stage("surgery")["info"]
    assert info["io"]["inputs"] == {"input_tensor": [1, 3, h, w]}
    assert info["io"]["outputs"] == {"num_detections": [1, 1], "detection_boxes": [1, 100, 4],
                                     "detection_scores": [1, 100], "detection_classes": [1, 100], **MASKS[recipe]}
    ops_used = info["op_counts"]
    if ops == "plugins":
        assert {k: ops_used.get(k, 0) for k in ("EfficientNMS_TRT", "PyramidROIAlign_TRT")
                if k in PLUGINS[recipe]} == PLUGINS[recipe]
        assert not {"If", "Loop", "NonZero", "Scan"} & set(ops_used)
    else:
        model = onnx.load(str(Path(run.stage("precision")["dir"]) / "model.onnx"))
        assert {n.domain for n in model.graph.node} <= {""} and standard_ops.problems(model) == []
        assert "NonMaxSuppression" in ops_used
    rows = json.loads((Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]
    floor = 0.97 if precision == "fp16" else 0.99
    for r in rows:
        assert r["detectron2"] >= 20 and r["matched"] >= 20, r
        assert r["recovered"] >= floor and r["mean_box_iou"] >= 0.98 and r["max_score_diff"] <= 0.01, r
        if MASKS[recipe]:
            assert r["mean_mask_iou"] >= (0.9 if precision == "fp16" else 0.95), r
        else:
            assert r["mean_mask_iou"] is None, r


def test_retinanet_random_weights_keep_the_focal_loss_prior(shared_cache, tmp_path):
    """The weights key names RetinaNet's own spread constants; the class logits keep the prior bias -log(99)."""
    import math

    import torch

    run = d2build(["recipe=retinanet_r50", "model.weights=random", "model.input=[320,320]"], shared_cache,
                  tmp_path / "r", until="weights")
    stage = run.stage("weights")
    material = json.loads((Path(stage["dir"]) / "manifest.json").read_text())["material"]["config"]
    assert material["random"]["family"] == "retinanet" and "retinanet_spread" in material["random"]["family_random"]
    state = torch.load(Path(stage["dir"]) / "model.pth", weights_only=True)
    bias = state["head.cls_score.bias"]
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99)), atol=1e-5)
    assert float(state["head.cls_score.weight"].std()) > 0.01 * 1.5  # spread, not Detectron2's std 0.01 init


# ------------------------------------------------------------------ schema


def test_new_recipes_compose():
    r = compose(["recipe=retinanet_r50"])
    assert r.model.family == "retinanet" and r.surgery.rpn.pre_nms_topk == 1000
    assert compose(["recipe=cascade_mask_rcnn_r50"]).model.family == "cascade_rcnn"
    assert compose(["recipe=retinanet_r101"]).model.config.endswith("retinanet_R_101_FPN_3x.yaml")
    compose(["recipe=retinanet_r50", "surgery.ops=standard", "model.batch_size=2",
             "model.dynamic={min:[256,256],max:[640,640]}", "model.input=[320,320]"])


def _problem(overrides: list[str], key: str):
    with pytest.raises(RecipeError) as info:
        compose(overrides)
    found = [p for p in info.value.problems if p.key == key]
    assert found, info.value
    assert "\n" not in str(found[0]) and found[0].fix, found[0]  # one line, with a fix
    return found[0]


@pytest.mark.parametrize(("overrides", "key", "says", "fix"), [
    (["recipe=mask_rcnn_r50", "model.config=COCO-Detection/retinanet_R_50_FPN_3x.yaml"], "model.config",
     "MODEL.META_ARCHITECTURE='RetinaNet'", "model.family=retinanet"),
    (["recipe=faster_rcnn_r50", "model.config=Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"], "model.config",
     "MODEL.ROI_HEADS.NAME='CascadeROIHeads'", "model.family=cascade_rcnn"),
    (["recipe=retinanet_r50", "model.family=faster_rcnn"], "model.family", "is a RetinaNet", "model.family=retinanet"),
    (["recipe=cascade_mask_rcnn_r50", "model.family=mask_rcnn"], "model.family", "is a Cascade Mask R-CNN",
     "model.family=cascade_rcnn"),
    (["recipe=retinanet_r50", "surgery.rpn.post_nms_topk=500"], "surgery.rpn.post_nms_topk", "has no effect",
     "remove it"),
    (["recipe=retinanet_r50", "surgery.rpn.iou_threshold=0.6"], "surgery.rpn.iou_threshold", "has no effect",
     "remove it"),
    (["recipe=retinanet_r50", "surgery.ops=standard", "surgery.rpn.pre_nms_topk=1200"], "surgery.rpn.pre_nms_topk",
     "ranks only the top 5000", "<= 1000"),
    (["recipe=retinanet_r50", "surgery.rpn.pre_nms_topk=1200"], "surgery.rpn.pre_nms_topk", "EfficientNMS_TRT",
     "1000"),
    (["recipe=retinanet_r50", "model.dynamic={min:[256,256],max:[640,640]}", "model.input=[320,320]"],
     "model.dynamic", "need the standard-op graph", "surgery.ops=standard"),
    (["recipe=retinanet_r50", f"model.class_names=[{','.join(f'c{i}' for i in range(3))}]"], "model.class_names",
     "MODEL.RETINANET.NUM_CLASSES", "80"),
])
def test_new_family_rules(overrides, key, says, fix):
    p = _problem(overrides, key)
    assert says in p.message and fix in p.fix, p


@pytest.mark.parametrize(("family", "base", "extra", "says"), [
    ("cascade_rcnn", "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
     "  ROI_BOX_CASCADE_HEAD:\n    BBOX_REG_WEIGHTS: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0]]\n"
     "    IOUS: [0.5, 0.6]\n", "not 3 cascade stages"),
    ("cascade_rcnn", "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml", "  ROI_BOX_HEAD:\n    CLS_AGNOSTIC_BBOX_REG: False\n",
     "class-specific box regression"),
    ("retinanet", "COCO-Detection/retinanet_R_50_FPN_3x.yaml", "  RETINANET:\n    NORM: GN\n", "a normalised head"),
    ("retinanet", "COCO-Detection/retinanet_R_50_FPN_3x.yaml",
     "  RETINANET:\n    IN_FEATURES: [p3, p4, p5]\n", "head levels other than P3-P7"),
])
def test_local_configs_each_family_cannot_build_are_named(tmp_path, family, base, extra, says):
    """A local yaml: its _BASE_ chain is read without Detectron2 and held to the family's own structure."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"_BASE_: {_detectron2_configs_dir() / base}\nMODEL:\n{extra}")
    recipe = "cascade_mask_rcnn_r50" if family == "cascade_rcnn" else "retinanet_r50"
    p = _problem([f"recipe={recipe}", f"model.config={cfg}"], "model.config")
    assert says in p.message, p


def test_module_list_children_are_found_by_their_scope():
    """Cascade stages are ModuleList children: the exporter scopes them `box_head.0`, not `box_head/0`."""
    pat = scope_regex("roi_heads.box_head.1.fc1", "Gemm")
    assert pat.match("/roi_heads/box_head.1/fc1/Gemm")
    assert not pat.match("/roi_heads/box_head.0/fc1/Gemm") and not pat.match("/roi_heads/box_head/fc1/Gemm")
    assert scope_regex("roi_heads.box_head.fc1", "Gemm").match("/roi_heads/box_head/fc1/Gemm")
    assert not scope_regex("roi_heads.box_head.fc1", "Gemm").match("/roi_heads/box_head.0/fc1/Gemm")


def test_export_check_drops_boxes_lying_in_the_letterbox_padding():
    """RetinaNet's boxes are not clipped in the graph: one lying right of the photograph is empty once mapped
    back, on both sides of the export check alike, and must be dropped (it could never match by IoU)."""
    import numpy as np

    from d2build.families import builder
    from d2build.processing import Letterbox

    lb = Letterbox(original_hw=(512, 512), resized_hw=(480, 480), scale=480 / 512, input_hw=(480, 640))
    outputs = {"pred_boxes": np.array([[10, 10, 100, 100], [560, 250, 600, 270]], np.float32),
               "scores": np.array([0.9, 0.2], np.float32), "pred_classes": np.array([1, 3])}
    det = builder("retinanet").export_detections(outputs, lb)
    assert len(det) == 1 and det.classes.tolist() == [1]
