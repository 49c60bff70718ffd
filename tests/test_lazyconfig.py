"""LazyConfig models (issue 21 prototypes): loading zoo .py / local .py / dumped .yaml with overrides, the family
from the config's classes, one-line refusals (missing module, unsupported model, unsafe dump), the facts read
from a built model, and random weights that behave for BatchNorm heads.

Real Detectron2 configs from the model zoo, real LazyConfig.save dumps written here, real models built on CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")

from conftest import d2build  # noqa: E402
from d2build import lazyconfig  # noqa: E402
from d2build.lazyconfig import LazyConfigError  # noqa: E402

LSJ_R50 = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
VITDET = "common/models/mask_rcnn_vitdet.py"


@pytest.mark.parametrize(("config", "family"), [
    (LSJ_R50, "mask_rcnn"),
    ("new_baselines/mask_rcnn_R_101_FPN_100ep_LSJ.py", "mask_rcnn"),
    ("new_baselines/mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ.py", "mask_rcnn"),
    (VITDET, "mask_rcnn"),
    ("common/models/cascade_rcnn.py", "cascade_rcnn"),
    ("common/models/retinanet.py", "retinanet"),
    ("common/models/keypoint_rcnn_fpn.py", "keypoint_rcnn"),
])
def test_zoo_lazyconfig_tells_its_family(config, family):
    cfg = lazyconfig.load(config)
    assert lazyconfig.is_lazy(config)
    assert lazyconfig.family_of(cfg, config) == family


@pytest.mark.parametrize(("config", "named"), [
    ("common/models/fcos.py", "FCOS"),
    ("common/models/panoptic_fpn.py", "PanopticFPN"),
    ("common/models/mask_rcnn_c4.py", "Res5ROIHeads"),
    ("Misc/mmdet_mask_rcnn_R_50_FPN_1x.py", "MMDetDetector"),
])
def test_unsupported_models_are_refused_in_one_line(config, named):
    with pytest.raises(LazyConfigError) as e:
        lazyconfig.family_of(lazyconfig.load(config), config)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_family_from_the_config_beats_a_wrong_recipe_family():
    cfg = lazyconfig.load("common/models/cascade_rcnn.py")
    with pytest.raises(LazyConfigError, match="model.family=mask_rcnn but .* builds a cascade_rcnn model"):
        lazyconfig.check_family(cfg, "mask_rcnn", "common/models/cascade_rcnn.py")
    assert lazyconfig.check_family(cfg, None, "x") == "cascade_rcnn"


@pytest.mark.parametrize(("overrides", "key", "says"), [
    (["recipe=mask_rcnn_r50_lsj", "model.family=keypoint_rcnn"], "model.family",
     ["builds a mask_rcnn model", "use model.family=mask_rcnn"]),
    (["recipe=mask_rcnn_vitdet_b", "model.input=[512,512]"], "model.input",
     ["pads every image to 1024x1024 (square_pad) but model.input is 512x512",
      "model.config_overrides={model.backbone.square_pad:512}"]),
    (["recipe=mask_rcnn_vitdet_b", "model.batch_size=2"], "model.batch_size",
     ["batch 1 only, not model.batch_size=2", "use model.batch_size=1"]),
], ids=["wrong-family", "vitdet-size", "vitdet-batch"])
def test_a_lazyconfig_that_cannot_build_stops_the_main_command_before_any_stage(tmp_path, overrides, key, says):
    """What the LazyConfig itself settles (its family; ViTDet's fixed square input, one image at a time) is one line
    naming the key and the fix, before the weights stage builds anything (no cache entry)."""
    run = d2build([*overrides, "model.weights=random"], tmp_path / "cache", tmp_path / "r", check=False)
    assert run.returncode != 0 and "Traceback" not in run.output, run.output[-2000:]
    lines = [x for x in run.output.splitlines() if f": {key}: " in x]
    assert len(lines) == 1 and all(s in lines[0] for s in says), run.output[-2000:]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("manifest.json"))


@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_letterbox_padding_normalises_to_zero_for_rgb_and_bgr_models(fmt):
    """input_tensor is BGR; an RGB model (ViTDet) sees it with flipped channels. The padding must be its mean in BGR
    order, so that after the flip and the normalisation the padded area is 0, as Detectron2's ImageList pads."""
    from detectron2.config import get_cfg

    from d2build import detectron
    from d2build.processing import letterbox

    cfg = get_cfg()
    cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = fmt, [123.675, 116.28, 103.53], [58.4, 57.1, 57.4]
    mean, std = detectron.bgr_normalisation(cfg)
    assert (mean, std) == (((103.53, 116.28, 123.675), (57.4, 57.1, 58.4)) if fmt == "RGB" else
                           ((123.675, 116.28, 103.53), (58.4, 57.1, 57.4)))
    chw, lb = letterbox(np.full((32, 64, 3), 200, np.uint8), (64, 64), mean)
    seen = chw[::-1] if fmt == "RGB" else chw  # the channels the model normalises, in its own order
    norm = (seen - np.array(cfg.MODEL.PIXEL_MEAN, np.float32)[:, None, None]) / \
        np.array(cfg.MODEL.PIXEL_STD)[:, None, None]
    assert lb.padding_hw == (32, 0) and np.abs(norm[:, 32:, :]).max() < 1e-5 and np.abs(norm[:, :32, :]).min() > 0.5


def test_a_missing_module_is_one_line_naming_it():
    config = "Misc/mmdet_mask_rcnn_R_50_FPN_1x.py"  # mmdet is not installed here
    with pytest.raises(LazyConfigError) as e:
        lazyconfig.build_model(lazyconfig.load(config), config)
    msg = str(e.value)
    assert "needs the Python module 'mmdet'" in msg and "detectron2.modeling.mmdet_wrapper" in msg
    assert "\n" not in msg


def test_vitdet_without_timm_names_timm(monkeypatch):
    """ViT's blocks import timm when built; with timm made unimportable the refusal names it and its importer."""
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ModuleNotFoundError
    cfg = lazyconfig.load(VITDET)
    with pytest.raises(LazyConfigError, match=r"needs the Python module 'timm' \(detectron2.modeling.backbone.vit "
                                              r"imports it\), which is not installed: pip install timm"):
        lazyconfig.build_model(cfg, VITDET)


def test_a_dumped_config_builds_the_same_model(tmp_path):
    """LazyConfig.save of ViTDet (functools.partial of LayerNorm, ShapeSpec objects) read back safely."""
    import torch
    from detectron2.config import LazyConfig

    cfg = lazyconfig.load(VITDET)
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    assert lazyconfig.is_lazy(str(tmp_path / "config.yaml"))
    back = lazyconfig.load(str(tmp_path / "config.yaml"))
    assert lazyconfig.family_of(back) == "mask_rcnn"
    torch.manual_seed(0)
    a = lazyconfig.build_model(cfg)
    torch.manual_seed(0)
    b = lazyconfig.build_model(back)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.backbone.net.blocks[0].norm1.eps == 1e-6  # the partial's keyword came through


def test_a_dump_with_lambdas_needs_overrides(tmp_path):
    """The LSJ configs' head norm is a lambda: LazyConfig.save writes text it cannot load (and a pickle beside it)."""
    from detectron2.config import LazyConfig
    from torch import nn

    LazyConfig.save(lazyconfig.load(LSJ_R50), str(tmp_path / "config.yaml"))
    assert (tmp_path / "config.yaml.pkl").exists()
    keys = ["model.roi_heads.box_head.conv_norm", "model.roi_heads.mask_head.conv_norm"]
    with pytest.raises(LazyConfigError) as e:
        lazyconfig.load(str(tmp_path / "config.yaml"))
    assert all(k in str(e.value) for k in keys) and "\n" not in str(e.value)
    cfg = lazyconfig.load(str(tmp_path / "config.yaml"), {k: "BN" for k in keys})
    model = lazyconfig.build_model(cfg)
    assert type(model.roi_heads.box_head.conv1.norm) is nn.BatchNorm2d
    assert type(model.roi_heads.mask_head.mask_fcn1.norm) is nn.BatchNorm2d


@pytest.mark.parametrize("payload", [
    "model: !!python/object/apply:os.system ['touch {marker}']\n",
    "model: {{_target_: os.system, command: 'touch {marker}'}}\n",
    "model: {{_target_: detectron2.modeling.GeneralizedRCNN, backbone: !!python/name:os.system ''}}\n",
    "model: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    # reachable through Detectron2's names: LazyConfig.load runs a .py; a module attribute path reaches os
    "model: {{_target_: detectron2.config.LazyConfig.load, filename: '{marker}.py'}}\n",
    "model: {{_target_: detectron2.modeling.backbone.vit.os.system, command: 'touch {marker}'}}\n",
    "model: {{_target_: detectron2.modeling.GeneralizedRCNN, backbone: !!python/name:detectron2.modeling.os.system ''}}\n",
])
def test_a_dump_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "config.yaml"
    path.write_text(payload.format(marker=marker))
    with pytest.raises(LazyConfigError) as e:
        lazyconfig.build_model(lazyconfig.load(str(path)))
    assert not marker.exists()
    assert "\n" not in str(e.value)


def test_overrides_must_name_real_keys():
    cfg = lazyconfig.load(LSJ_R50)
    lazyconfig.apply_overrides(cfg, {"model.roi_heads.box_predictor.test_topk_per_image": 50}, LSJ_R50)  # an argument
    assert cfg.model.roi_heads.box_predictor.test_topk_per_image == 50
    with pytest.raises(LazyConfigError, match="has no key 'test_topk_per_imag' .*test_topk_per_image"):
        lazyconfig.apply_overrides(cfg, {"model.roi_heads.box_predictor.test_topk_per_imag": 5}, LSJ_R50)
    with pytest.raises(LazyConfigError, match="model.roi_head is not a section"):
        lazyconfig.apply_overrides(cfg, {"model.roi_head.num_classes": 5}, LSJ_R50)
    cfg = lazyconfig.load(VITDET, {"model.backbone.square_pad": 512, "model.roi_heads.num_classes": 3})
    assert cfg.model.backbone.square_pad == 512 and cfg.model.roi_heads.num_classes == 3


def test_a_local_py_config(tmp_path):
    """A user's own .py that imports the zoo's model and changes it."""
    path = tmp_path / "my_model.py"
    path.write_text("from detectron2.model_zoo import get_config\n"
                    f"model = get_config('{LSJ_R50}').model\n"
                    "model.roi_heads.num_classes = 3\n")
    cfg = lazyconfig.load(str(path))
    assert lazyconfig.family_of(cfg) == "mask_rcnn" and cfg.model.roi_heads.num_classes == 3


def test_yacs_configs_are_not_lazy():
    repo = Path(__file__).resolve().parents[1]
    assert not lazyconfig.is_lazy(str(repo / "models" / "shapes_mask_rcnn" / "config.yaml"))
    assert not lazyconfig.is_lazy("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")


# ------------------------------------------------------------------ facts from the built model, for both kinds

def test_facts_from_the_model_equal_the_yacs_keys():
    """What head_spec reads from yacs keys, read from the instantiated model instead: the same values."""
    from d2build import detectron, model_facts
    from d2build.families.surgery.spec import anchor_facts

    d = detectron.definition("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    cfg, m = d.cfg, d.cfg.MODEL
    f = model_facts.facts(d.build())
    f32 = np.float32  # the model keeps them as float32 buffers; surgery uses float32 of the config's values
    assert np.array_equal(f32(f.pixel_mean), f32(m.PIXEL_MEAN)) and np.array_equal(f32(f.pixel_std), f32(m.PIXEL_STD))
    assert f.input_format == cfg.INPUT.FORMAT
    assert f.dense_in_features == tuple(m.RPN.IN_FEATURES) and f.roi_in_features == tuple(m.ROI_HEADS.IN_FEATURES)
    assert f.num_classes == m.ROI_HEADS.NUM_CLASSES
    assert f.box_reg_weights == (tuple(m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),)
    assert f.box_pooler == (m.ROI_BOX_HEAD.POOLER_RESOLUTION, m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO)
    assert f.mask_pooler == (m.ROI_MASK_HEAD.POOLER_RESOLUTION, m.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO)
    assert f.dense_reg_weights == tuple(m.RPN.BBOX_REG_WEIGHTS)
    assert f.box_head_convs == m.ROI_BOX_HEAD.NUM_CONV and f.box_head_fcs == m.ROI_BOX_HEAD.NUM_FC
    assert not f.class_agnostic_boxes and not f.class_agnostic_masks and f.pooler_aligned
    assert d.test_resize() == (800, 1333)
    ref = anchor_facts(cfg, f.dense_in_features, (320, 384))["anchors"]
    got = model_facts.anchors(d.build(), (320, 384), f.dense_in_features)
    assert len(ref) == len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_facts_of_the_lazy_baselines():
    from d2build import detectron, model_facts

    lsj = model_facts.facts(detectron.definition(LSJ_R50).build())
    assert (lsj.box_head_convs, lsj.box_head_fcs, lsj.num_classes) == (4, 1, 80)
    assert lsj.norms == {"NaiveSyncBatchNorm": 8, "SyncBatchNorm": 61}  # the heads' 4 + 4 convs; backbone and FPN
    d = detectron.definition(VITDET, {"model.backbone.square_pad": 512})
    vit = model_facts.facts(d.build())
    assert vit.input_format == "RGB" and vit.square_pad == 512 and vit.pixel_std[0] == pytest.approx(58.395)
    assert vit.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    with pytest.raises(ValueError, match="has no dataloader.test"):
        d.test_resize()  # common/models/*.py are models only
    assert detectron.definition(LSJ_R50).test_resize() == (800, 1333)  # the LSJ configs test at 800/1333


def test_test_settings_on_the_model_match_yacs_overrides():
    """Thresholds set on the built model give what the yacs config keys (families' eager_overrides) give."""
    import torch

    from d2build import detectron, families, model_facts, photos
    from d2build.processing import letterbox
    from d2build.recipe import NmsConfig, RpnConfig, SurgeryConfig

    config = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    surgery = {"nms": {"iou_threshold": 0.4, "score_threshold": 0.0, "max_detections": 37},
               "rpn": {"pre_nms_topk": 300, "post_nms_topk": 200, "iou_threshold": 0.6}}
    fam = families.builder("mask_rcnn")
    torch.manual_seed(0)
    settings = SurgeryConfig("plugins", NmsConfig(**surgery["nms"]), RpnConfig(**surgery["rpn"]))
    yacs = detectron.build_model(detectron.load_cfg(config, fam.eager_overrides(settings)))
    torch.manual_seed(0)
    model = detectron.definition(config).build()
    chw, _ = letterbox(photos.bundled("astronaut").bgr, (320, 320), yacs.pixel_mean.flatten().tolist())
    before = fam.eager(model, chw)  # the config's own thresholds (score 0.05, NMS 0.5, RPN 1000/1000 at 0.7)
    model_facts.apply_test_settings(model, surgery)
    a, b = fam.eager(yacs, chw), fam.eager(model, chw)
    assert 0 < len(a) == len(b) <= 37 and len(b) != len(before)  # the settings took effect, and as yacs keys do
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


# ------------------------------------------------------------------ the main pipeline on a LazyConfig model

def test_lsj_r50_through_the_pipeline(shared_cache, tmp_path):
    """LSJ R50 (4conv1fc BN box head, two-conv RPN head, BN mask head, SyncBN backbone and FPN) from its zoo .py
    through the main command at 320x320, random weights that behave (random_norms): weights -> export -> surgery ->
    verify, plugins flavour, every image's detections matched (masks too). The standard flavour of a LazyConfig
    model is test_trained.py's (the trained one, through eval); both flavours of all four recipes at 512 and 1024
    are bench/lazyconfig_matrix.py's."""
    import onnx

    run = d2build(["recipe=mask_rcnn_r50_lsj", "model.weights=random", "model.input=[320,320]",
                   "surgery.ops=plugins", "verify.count=2"], shared_cache, tmp_path / "r")
    assert run.run_json["ok"], run.output[-3000:]
    norms = run.stage("weights")["info"]["random_norms"]
    assert norms["norms_never_reached"] == 0 and norms["norms_after_classifier"] == 4, norms
    assert norms["residual_branches"] == 16, norms
    graph = onnx.load(str(Path(run.stage("surgery")["dir"]) / "model.onnx"), load_external_data=False)
    names = {n.name for n in graph.graph.node}
    assert any("box_conv_features" in n for n in names)  # the pooled features enter the box head's conv1
    assert sum(n.op_type == "Conv" and n.name.startswith("/roi_heads/box_head/conv") for n in graph.graph.node) == 4
    rows = json.loads((Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]
    assert len(rows) == 2
    for r in rows:
        assert r["detectron2"] >= 50 and r["matched"] >= 20, r  # ordinary detections, not the 0-2 of unset BN
        assert r["recovered"] >= 0.99 and r["mean_box_iou"] >= 0.98 and r["mean_mask_iou"] >= 0.95, r


def test_vitdet_through_the_pipeline(shared_cache, tmp_path):
    """ViTDet-B (plain ViT, window attention with relative position biases, LayerNorm, simple feature pyramid, LN
    4conv1fc box head; an RGB model) at 256x256 (square_pad 256), standard flavour: the export's backbone shapes
    folded, only ONNX ops TensorRT imports (standard_ops), every detection matched. 1024 and 512, both flavours,
    are bench/lazyconfig_matrix.py's."""
    import onnx

    from d2build import standard_ops

    run = d2build(["recipe=mask_rcnn_vitdet_b", "model.weights=random", "model.input=[256,256]",
                   "model.config_overrides={model.backbone.square_pad:256}", "surgery.ops=standard", "verify.count=2"],
                  shared_cache, tmp_path / "r")
    assert run.run_json["ok"], run.output[-3000:]
    assert run.stage("weights")["info"]["random_norms"]["rel_pos_tables"] == 24, run.stage("weights")["info"]
    ops = run.stage("surgery")["info"]["op_counts"]
    assert ops["LayerNormalization"] >= 24 and ops["Einsum"] == 24 and not {"If", "Loop"} & set(ops), ops
    graph = onnx.load(str(Path(run.stage("precision")["dir"]) / "model.onnx"))
    assert standard_ops.problems(graph) == []
    backbone = [n.op_type for n in graph.graph.node if n.name.startswith("/backbone/")]
    assert len(backbone) > 500 and not {"Shape", "NonZero"} & set(backbone)  # the window arithmetic is folded
    for r in json.loads((Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]:
        assert r["detectron2"] >= 10 and r["recovered"] >= 0.99 and r["mean_mask_iou"] >= 0.95, r


def test_lazy_cache_keys_follow_the_file_and_the_overrides(tmp_path):
    """A local .py is keyed by its bytes and those of the files it imports relatively; config_overrides key too
    (and leave yacs keys as they were: no `overrides` entry)."""
    from d2build.recipe import ConfigRef, as_key_data

    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "parts.py").write_text("x = 1\n")
    main = tmp_path / "my_model.py"
    main.write_text("from .common.parts import x\n")
    a = ConfigRef.of(str(main))
    (tmp_path / "common" / "parts.py").write_text("x = 2\n")
    b = ConfigRef.of(str(main))
    assert a.sha256 and a.sha256 != b.sha256
    c = ConfigRef.of(str(main), (("model.roi_heads.num_classes", 3),))
    assert as_key_data(c)["overrides"] == (("model.roi_heads.num_classes", 3),) and as_key_data(c) != as_key_data(b)
    assert "overrides" not in as_key_data(ConfigRef.of("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))


def test_lazy_cfg_carries_the_model_facts_and_the_family():
    """detectron.load_cfg of a LazyConfig: yacs keys filled from the built model; the family from its classes."""
    from d2build import detectron
    from d2build.recipe import ConfigRef

    cfg = detectron.load_cfg(ConfigRef.of(LSJ_R50, (("model.roi_heads.num_classes", 3),)))
    m = cfg.MODEL
    assert (m.ROI_BOX_HEAD.NAME, m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC) == ("FastRCNNConvFCHead", 4, 1)
    assert m.ROI_HEADS.NUM_CLASSES == 3 and m.MASK_ON and m.BACKBONE.NAME == "lazy:FPN"
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    detectron.check_family(cfg, "mask_rcnn")
    with pytest.raises(LazyConfigError, match="model.family=keypoint_rcnn but .* builds a mask_rcnn model"):
        detectron.check_family(cfg, "keypoint_rcnn")


def test_a_lazy_recipe_may_leave_the_family_out(tmp_path, monkeypatch):
    """model.family follows from the LazyConfig's classes when a recipe leaves it out; compose resolves it."""
    import yaml

    from d2build.compose import compose

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "my_lsj.yaml").write_text("# @package _global_\n" + yaml.safe_dump(
        {"model": {"config": LSJ_R50, "weights": "random", "input": [512, 512]}}))
    recipe = compose(["recipe=my_lsj"])
    assert recipe.model.family == "mask_rcnn" and recipe.model.config == LSJ_R50
