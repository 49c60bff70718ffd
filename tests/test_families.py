"""Model families beyond Mask R-CNN R50: Keypoint R-CNN, Faster R-CNN, R101 and X101 backbones.

End to end through the real command line (random weights that behave, bundled photographs): each
recipe at two input sizes runs weights -> export -> surgery -> verify and the TensorRT-ready graph
matches Detectron2. The big backbones run at small sizes to keep CPU time down. Also: the family
registry drives what the schema accepts, and configs the surgery cannot handle are rejected at
validation, naming what is supported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import d2build
from d2build.compare import match_detections
from d2build.compose import compose, shipped_recipes_dir
from d2build.families import FAMILIES, builder, family
from d2build.families.keypoint_rcnn import keypoint_agreement
from d2build.processing import Detections
from d2build.schema import FAMILIES_SUPPORTED, RecipeError
from d2build.families.keypoint_rcnn import COCO_SKELETON
from d2build.visualize import draw_detections

# One size each here (a non-square one for the big backbones); every family at more sizes and in both
# flavours is bench/standard_matrix.py's (docs/BENCHMARKS.md).
E2E = [
    ("keypoint_rcnn_r50", "[640,640]"),
    ("faster_rcnn_r50", "[640,640]"),
    ("mask_rcnn_r101", "[512,512]"),
    ("mask_rcnn_x101", "[448,576]"),
]
# what each family's graph has besides the four EfficientNMS_TRT outputs
HEADS = {
    "mask_rcnn": {"detection_masks": [1, 100, 28, 28]},
    "keypoint_rcnn": {"detection_heatmaps": [1, 100, 17, 56, 56]},
    "faster_rcnn": {},
}


def _verify_rows(run) -> list[dict]:
    """verify's full per-image rows (metrics.json holds the family's extra metrics too)."""
    return json.loads((Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]


@pytest.mark.parametrize(("recipe", "size"), E2E, ids=[f"{r}-{s}" for r, s in E2E])
def test_recipe_passes_verify(shared_cache, tmp_path, recipe, size):
    run = d2build([f"recipe={recipe}", "model.weights=random", f"model.input={size}"], shared_cache, tmp_path / "r")
    assert run.run_json["ok"], run.output[-3000:]
    fam = compose([f"recipe={recipe}"]).model.family
    h, w = json.loads(size)

    info = run.stage("surgery")["info"]
    outputs = info["io"]["outputs"]
    assert info["io"]["inputs"] == {"input_tensor": [1, 3, h, w]}
    assert outputs == {"num_detections": [1, 1], "detection_boxes": [1, 100, 4], "detection_scores": [1, 100],
                       "detection_classes": [1, 100], **HEADS[fam]}
    ops = info["op_counts"]
    assert ops["EfficientNMS_TRT"] == 2
    assert ops["PyramidROIAlign_TRT"] == 1 + len(HEADS[fam])  # box pooler + one per extra head
    assert not {"If", "Loop", "NonZero", "Scan"} & set(ops)

    rows = _verify_rows(run)
    assert [r["image"] for r in rows] == ["astronaut", "coffee", "rocket"]
    for r in rows:
        assert r["detectron2"] >= 20 and r["matched"] >= 20, r
        assert r["recovered"] >= 0.99 and r["mean_box_iou"] >= 0.98, r
        if fam == "mask_rcnn":
            assert r["mean_mask_iou"] >= 0.95, r
        else:
            assert r["mean_mask_iou"] is None, r
        if fam == "keypoint_rcnn":
            assert r["keypoints"] == 17 * r["matched"], r
            assert r["keypoint_median_px"] <= 1.0 and r["keypoint_p95_px"] <= 3.0, r
    assert len(list(Path(run.stage("verify")["dir"], "pictures").glob("*.png"))) == 3
    report = Path(run.stage("verify")["dir"], "report.md").read_text()
    assert ("keypoint median px" in report) == (fam == "keypoint_rcnn")


def test_rgb_config_passes_verify(shared_cache, tmp_path):
    """An INPUT.FORMAT=RGB model (PIXEL_STD != 1 too): the graph and Detectron2 both get the photograph right.

    input_tensor is BGR for every model; surgery flips the stem's channels for RGB models, and the
    family hands Detectron2 (eager and the traced export) the RGB image it expects.
    """
    from d2build.schema import _detectron2_configs_dir

    cfg = tmp_path / "mask_rcnn_rgb.yaml"
    cfg.write_text(f"_BASE_: {_detectron2_configs_dir() / 'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml'}\n"
                   "MODEL:\n  PIXEL_MEAN: [123.675, 116.28, 103.53]\n  PIXEL_STD: [58.395, 57.12, 57.375]\n"
                   "INPUT:\n  FORMAT: RGB\n")
    run = d2build(["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[320,320]", f"model.config={cfg}"],
                  shared_cache, tmp_path / "r")
    for r in _verify_rows(run):
        assert r["matched"] >= 20 and r["recovered"] >= 0.99 and r["mean_mask_iou"] >= 0.95, r


# ------------------------------------------------------------------ registry and validation


def test_every_registered_family_is_supported_and_has_a_shipped_recipe():
    assert FAMILIES_SUPPORTED == tuple(FAMILIES)
    shipped = {compose([f"recipe={p.stem}"]).model.family for p in shipped_recipes_dir().glob("*.yaml")}
    assert shipped == set(FAMILIES)
    for name in FAMILIES:
        fam = builder(name)
        assert fam.name == name == family(name).name and type(fam.family) is type(family(name))
        # TracingAdapter flattens Instances fields sorted by name, then image_size (then image-level outputs)
        fields = list(fam.export_outputs[:fam.export_outputs.index("image_size")])
        assert fields == sorted(fields) and fields[0] == "pred_boxes"


@pytest.mark.parametrize(("override", "key", "says"), [
    ("model.config=COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml", "model.config", "a C4 model"),
    ("model.config=COCO-InstanceSegmentation/mask_rcnn_R_101_DC5_3x.yaml", "model.config", "a dilated-C5 model"),
    ("model.config=Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml", "model.config", "is a Cascade Mask R-CNN"),
    ("model.config=COCO-Detection/retinanet_R_50_FPN_3x.yaml", "model.config", "MODEL.META_ARCHITECTURE='RetinaNet'"),
    ("model.config=COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml", "model.config",
     "MODEL.META_ARCHITECTURE='PanopticFPN'"),
    ("model.config=recipes/detectron2/pointrend_rcnn_R_50_FPN_3x_coco.yaml", "model.config",
     "MODEL.ROI_MASK_HEAD.NAME='PointRendMaskHead'"),
    ("model.config=COCO-Detection/rpn_R_50_FPN_1x.yaml", "model.config", "'ProposalNetwork'"),
    ("model.config=COCO-Detection/fast_rcnn_R_50_FPN_1x.yaml", "model.config", "'PrecomputedProposals'"),
    ("model.config=Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", "model.config", "MODEL.ROI_BOX_HEAD.NUM_CONV=4"),
    ("model.config=Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5.yaml", "model.config", "deformable"),
    ("model.config=COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml", "model.config", "MODEL.KEYPOINT_ON=True"),
    ("model.config=COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", "model.config", "MODEL.MASK_ON=False"),
    ("model.family=faster_rcnn", "model.family", "MODEL.MASK_ON=True"),
    ("model.family=retinanet", "model.family", "MODEL.META_ARCHITECTURE='GeneralizedRCNN'"),
    ("model.family=cascade_rcnn", "model.family", "MODEL.ROI_HEADS.NAME='StandardROIHeads'"),
    ("model.family=fcos", "model.family", "is not supported"),
])
def test_unsupported_models_fail_validation_naming_what_is_supported(override, key, says):
    with pytest.raises(RecipeError) as info:
        compose(["recipe=mask_rcnn_r50", override])
    [p] = [p for p in info.value.problems if p.key == key]
    assert says in p.message, p
    assert p.source.startswith("command line"), p
    text = str(p)
    assert all(name in text for name in FAMILIES), text  # names what is supported


def test_unsupported_local_config_is_recognised_by_content(tmp_path):
    """A local yaml whose name says nothing: its _BASE_ chain is read (without Detectron2) and judged."""
    from d2build.schema import _detectron2_configs_dir

    base = _detectron2_configs_dir() / "Base-RCNN-C4.yaml"
    cfg = tmp_path / "my_model.yaml"
    cfg.write_text(f"_BASE_: {base}\nMODEL:\n  MASK_ON: True\n")
    with pytest.raises(RecipeError) as info:
        compose(["recipe=mask_rcnn_r50", f"model.config={cfg}"])
    assert "MODEL.BACKBONE.NAME='build_resnet_backbone'" in str(info.value)
    good = tmp_path / "my_fpn.yaml"
    good.write_text(f"_BASE_: {_detectron2_configs_dir() / 'Base-RCNN-FPN.yaml'}\nMODEL:\n  MASK_ON: True\n")
    assert compose(["recipe=mask_rcnn_r50", f"model.config={good}"]).model.config == str(good)


# ------------------------------------------------------------------ keypoint metrics and pictures


def _people(n: int = 3) -> Detections:
    rng = np.random.default_rng(0)
    boxes = np.array([[40 + 150 * i, 60, 160 + 150 * i, 380] for i in range(n)], np.float32)
    kps = np.zeros((n, 17, 3), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        kps[i, :, 0] = rng.uniform(x0 + 10, x1 - 10, 17)
        kps[i, :, 1] = np.linspace(y0 + 10, y1 - 10, 17)
        kps[i, :, 2] = 0.5
    return Detections(boxes, np.linspace(0.9, 0.6, n), np.zeros(n), keypoints=kps)


def test_keypoint_agreement_and_verify_extra():
    ref = _people()
    got = Detections(ref.boxes, ref.scores, ref.classes, keypoints=ref.keypoints.copy())
    got.keypoints[0, 0, 0] += 30.0  # one keypoint of 51 far off: p95 stays small
    m = match_detections(ref, got)
    stats = keypoint_agreement(ref, got, m.pairs)
    assert stats["keypoints"] == 51 and stats["keypoint_median_px"] == 0.0
    assert stats["keypoint_max_px"] == pytest.approx(30.0) and stats["keypoint_p95_px"] < 1.0
    verify = verify_config(keypoint_median_px=1.0, keypoint_p95_px=3.0)
    extra, problems = family("keypoint_rcnn").verify_extra(ref, got, m, verify)
    assert problems == [] and extra["keypoints"] == 51
    got.keypoints[:, :, 0] += 5.0
    _, problems = family("keypoint_rcnn").verify_extra(ref, got, m, verify)
    assert len(problems) == 2 and "median keypoint distance 5.00 px" in problems[0]
    with pytest.raises(ValueError, match="keypoints are missing"):
        keypoint_agreement(ref, Detections(ref.boxes, ref.scores, ref.classes), m.pairs)


def test_report_shows_family_metrics():
    """Keypoint distances reach report.md as their own table, not only metrics.json."""
    from d2build.stages.verify import render_report, summarize

    ref = _people()
    got = Detections(ref.boxes, ref.scores, ref.classes, keypoints=ref.keypoints.copy())
    got.keypoints[:, :, 1] += 0.25
    m = match_detections(ref, got)
    extra, _ = family("keypoint_rcnn").verify_extra(ref, got, m, verify_config())
    row = {"image": "people", "detectron2": 3, "graph": 3, "matched": 3, "recovered": 1.0,
           "mean_box_iou": 1.0, "mean_mask_iou": None, "max_score_diff": 0.0, "mean_score_shift": 0.0,
           "mean_abs_score_diff": 0.0, "eager_s": 1.0, "graph_s": 0.5, "picture": "pictures/people.png",
           "match": {}, **extra}
    report = render_report(verify_slice("keypoint_rcnn"), [row], summarize([row]), [])
    assert "| image | keypoints | keypoint median px | keypoint p95 px |" in report
    assert "| people | 51 | 0.2500 | 0.2500 |" in report
    plain = {k: v for k, v in row.items() if k not in extra}
    assert "keypoint" not in render_report(verify_slice("mask_rcnn"), [plain], summarize([plain]), [])


def verify_config(**kw):
    from d2build.recipe import VerifyConfig

    return VerifyConfig(**{"images": "bundled", "count": 1, "iou_threshold": 0.9, "score_tolerance": 0.02,
                           "min_recovered": 0.97, "min_mask_iou": 0.9, "min_detections": 1, "keypoint_median_px": 1.0,
                           "keypoint_p95_px": 3.0, "min_semantic_agreement": 0.995, "segment_iou_threshold": 0.9,
                           "min_segments_matched": 0.95, **kw})


def verify_slice(family_name: str):
    from d2build.recipe import ConfigRef, GraphSpec, ModelSlice, NmsConfig, RpnConfig, SurgeryConfig, VerifySlice

    surgery = SurgeryConfig("plugins", NmsConfig(0.5, 0.05, 100), RpnConfig(1000, 1000, 0.7))
    graph = GraphSpec(family_name, ConfigRef("x.yaml"), (640, 640), 1, None, surgery)
    return VerifySlice(ModelSlice(graph), "fp32", verify_config(), (), None)


def test_pictures_draw_the_coco_skeleton():
    img = np.full((420, 520, 3), 90, np.uint8)
    det = _people()
    det.keypoints[2, :, 2] = 0.01  # below Detectron2's visualisation threshold: not drawn
    plain = np.asarray(draw_detections(img, Detections(det.boxes, det.scores, det.classes), None))
    pic = np.asarray(draw_detections(img, det, None, skeleton=COCO_SKELETON))
    for i in range(2):
        for x, y, _ in det.keypoints[i]:
            assert tuple(pic[int(round(y)), int(round(x))]) == (255, 255, 255)  # keypoint dot
        a, b = COCO_SKELETON[4]  # shoulders
        mid = (det.keypoints[i, a, :2] + det.keypoints[i, b, :2]) / 2
        assert tuple(pic[int(round(mid[1])), int(round(mid[0]))]) != (90, 90, 90)  # limb drawn
    x0, y0, x1, y1 = det.boxes[2].astype(int) + np.array([4, 30, -4, -4])
    np.testing.assert_array_equal(pic[y0:y1, x0:x1], plain[y0:y1, x0:x1])  # low scores: nothing drawn


def test_test_settings_drive_eager_and_the_config_notes(tmp_path):
    """One table per family maps the recipe's thresholds to Detectron2's keys: eager runs with them, and a
    config that sets its own is noted (RetinaNet's keys, not the R-CNN ones)."""
    from d2build.compose import compose
    from d2build.schema import _detectron2_configs_dir, config_setting_notes

    r = compose(["recipe=mask_rcnn_r50", "surgery.nms.score_threshold=0.3"])
    assert builder("mask_rcnn").eager_overrides(r.surgery) == {
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.3,
        "TEST.DETECTIONS_PER_IMAGE": 100, "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
        "MODEL.RPN.NMS_THRESH": 0.7}
    assert set(builder("retinanet").eager_overrides(r.surgery)) == {
        "MODEL.RETINANET.SCORE_THRESH_TEST", "MODEL.RETINANET.NMS_THRESH_TEST", "MODEL.RETINANET.TOPK_CANDIDATES_TEST",
        "TEST.DETECTIONS_PER_IMAGE"}
    cfg = tmp_path / "retina.yaml"
    cfg.write_text(f"_BASE_: {_detectron2_configs_dir() / 'COCO-Detection/retinanet_R_50_FPN_3x.yaml'}\n"
                   "MODEL:\n  RETINANET:\n    SCORE_THRESH_TEST: 0.3\n")
    notes = config_setting_notes(compose(["recipe=retinanet_r50", f"model.config={cfg}"]))
    assert notes == [f"{cfg} sets MODEL.RETINANET.SCORE_THRESH_TEST=0.3; the recipe's surgery.nms.score_threshold=0.05 "
                     "is used (graph and Detectron2 alike)"]
