"""Detectron2 plumbing shared by the families: configs, models, and weights that can be trusted.

Weights come from a model-zoo URL, a local .pkl/.pth, or `random`. Model-zoo .pkl files are
pickles; they are read with a restricted unpickler that admits numpy arrays and plain containers
only, so a checkpoint cannot run code. `random` builds seeded random weights and sets every
FrozenBatchNorm's statistics from its own input on a real photograph, so the model produces
ordinary detections instead of the degenerate ones identity BN gives.
"""

from __future__ import annotations

import functools
import io
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from d2build import model_facts

if TYPE_CHECKING:
    from d2build.recipe import ConfigRef, ModelSlice
    from d2build.runtime import ModelInfo

BN_PHOTO = "astronaut"  # the photograph whose activations set random weights' BN statistics


def load_cfg(config: "str | ConfigRef", overrides: dict[str, Any] | None = None):
    """A frozen Detectron2 CfgNode on CPU from a model-zoo name or a local .yaml path; for a LazyConfig (a .py, or
    a LazyConfig.save dump; a ConfigRef carries its model.config_overrides) the yacs keys d2build reads, filled from
    the built model (`lazy_as_yacs`). `overrides`: yacs keys (the families' eager_overrides) for either kind."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from d2build import lazyconfig

    name = config if isinstance(config, str) else config.name
    if lazyconfig.is_lazy(name):
        cfg = lazy_as_yacs(name, {} if isinstance(config, str) else config.overrides_dict)
    else:
        cfg = get_cfg()
        path = Path(name).expanduser()
        file = str(path) if path.is_file() else model_zoo.get_config_file(name)
        add_project_keys(cfg, file)
        cfg.merge_from_file(file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    for k, v in (overrides or {}).items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, v)
    cfg.freeze()
    return cfg


#: the yacs keys of the recipe's test settings and the lazy model's attributes they set (model_facts.apply_test_settings)
LAZY_TEST_KEYS = {"nms.score_threshold": "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                  "nms.iou_threshold": "MODEL.ROI_HEADS.NMS_THRESH_TEST",
                  "nms.max_detections": "TEST.DETECTIONS_PER_IMAGE",
                  "rpn.pre_nms_topk": "MODEL.RPN.PRE_NMS_TOPK_TEST",
                  "rpn.post_nms_topk": "MODEL.RPN.POST_NMS_TOPK_TEST",
                  "rpn.iou_threshold": "MODEL.RPN.NMS_THRESH"}


def lazy_as_yacs(config: str, config_overrides: dict[str, Any]):
    """A LazyConfig as the yacs CfgNode d2build's stages read: every key they read is FILLED FROM THE BUILT MODEL'S
    FACTS (`model_facts.facts`: classes, levels, poolers, box head convs, regression weights, pixel mean/std and
    format, the anchor generator's sizes checked against the model's own cell anchors), the test resize and the
    dataset names from the config (`model_facts.LazyDefinition`), the test thresholds from the model's own
    settings. The cfg carries the LazyConfig itself (`D2BUILD_LAZY`: its name and overrides), so `build_model`
    instantiates the real lazy model (lazyconfig.build_model) and sets the cfg's test keys on it; nothing pretends
    the model is a yacs backbone (MODEL.BACKBONE.NAME names the lazy backbone's class, which no yacs builder has).

    Only the GeneralizedRCNN families with StandardROIHeads are filled (lazyconfig.family_of refuses the rest in
    one line); the cfg is built once per config, overrides and file content (building costs 0.3-5 s)."""
    import json

    from d2build.recipe import ConfigRef

    ref = ConfigRef.of(config)
    return _lazy_as_yacs(config, json.dumps(config_overrides, sort_keys=True), ref.sha256).clone()


@functools.lru_cache(maxsize=8)
def _lazy_as_yacs(config: str, overrides_json: str, _digest: str | None):
    import json

    import torch
    from detectron2.config import CfgNode, get_cfg
    from omegaconf import OmegaConf

    from d2build import lazyconfig

    overrides = json.loads(overrides_json)
    d = model_facts.LazyDefinition(config, overrides)
    if d.family not in ("mask_rcnn", "faster_rcnn", "keypoint_rcnn"):
        raise lazyconfig.LazyConfigError(f"model.config {config} builds a {d.family} model; d2build builds "
                                         "LazyConfig Mask, Faster and Keypoint R-CNN models so far")
    state = torch.random.get_rng_state()
    try:
        model = d.build()
    finally:
        torch.random.set_rng_state(state)  # reading facts must not move the caller's seeded stream
    f = model_facts.facts(model)
    problems = lazy_structure_problems(model, f)
    if problems:
        raise lazyconfig.LazyConfigError(f"model.config {config}: {problems[0]}")
    cfg = get_cfg()
    m = cfg.MODEL
    m.META_ARCHITECTURE = f.meta_architecture
    m.BACKBONE.NAME = f"lazy:{type(model.backbone).__name__}"
    m.PIXEL_MEAN, m.PIXEL_STD = list(f.pixel_mean), list(f.pixel_std)
    cfg.INPUT.FORMAT = f.input_format
    heads = model.roi_heads
    m.MASK_ON, m.KEYPOINT_ON = bool(heads.mask_on), bool(getattr(heads, "keypoint_on", False))
    m.PROPOSAL_GENERATOR.NAME = type(model.proposal_generator).__name__
    m.RPN.IN_FEATURES = list(f.dense_in_features)
    m.RPN.BBOX_REG_WEIGHTS = list(f.dense_reg_weights)
    gen = model.proposal_generator.anchor_generator
    a = d.cfg.model.proposal_generator.anchor_generator  # the config LazyDefinition loaded
    m.ANCHOR_GENERATOR.NAME = f.anchor_generator
    sizes = OmegaConf.to_container(a.sizes) if OmegaConf.is_config(a.sizes) else list(a.sizes)
    m.ANCHOR_GENERATOR.SIZES = [v if isinstance(v, list) else [v] for v in sizes]
    ratios = OmegaConf.to_container(a.aspect_ratios) if OmegaConf.is_config(a.aspect_ratios) else list(a.aspect_ratios)
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = ratios if isinstance(ratios[0], list) else [ratios]
    m.ANCHOR_GENERATOR.OFFSET = float(gen.offset)
    m.ROI_HEADS.NAME = f.roi_heads
    m.ROI_HEADS.IN_FEATURES = list(f.roi_in_features)
    m.ROI_HEADS.NUM_CLASSES = f.num_classes
    b = m.ROI_BOX_HEAD
    b.NAME, b.NUM_CONV, b.NUM_FC = f.box_head, f.box_head_convs, f.box_head_fcs
    b.CONV_DIM = int(heads.box_head.conv1.out_channels) if f.box_head_convs else b.CONV_DIM
    b.POOLER_RESOLUTION, b.POOLER_SAMPLING_RATIO = f.box_pooler
    b.POOLER_TYPE = "ROIAlignV2" if f.pooler_aligned else "ROIAlign"
    b.CLS_AGNOSTIC_BBOX_REG = f.class_agnostic_boxes
    b.BBOX_REG_WEIGHTS = list(f.box_reg_weights[0])
    if f.mask_pooler is not None:
        m.ROI_MASK_HEAD.POOLER_RESOLUTION, m.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = f.mask_pooler
        m.ROI_MASK_HEAD.POOLER_TYPE = b.POOLER_TYPE
        m.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = f.class_agnostic_masks
    if f.keypoint_pooler is not None:
        k = m.ROI_KEYPOINT_HEAD
        k.POOLER_RESOLUTION, k.POOLER_SAMPLING_RATIO = f.keypoint_pooler
        k.POOLER_TYPE, k.NUM_KEYPOINTS, k.NAME = b.POOLER_TYPE, f.num_keypoints, type(heads.keypoint_head).__name__
    predictor = heads.box_predictor
    gen_rpn = model.proposal_generator
    m.ROI_HEADS.SCORE_THRESH_TEST = float(predictor.test_score_thresh)
    m.ROI_HEADS.NMS_THRESH_TEST = float(predictor.test_nms_thresh)
    cfg.TEST.DETECTIONS_PER_IMAGE = int(predictor.test_topk_per_image)
    m.RPN.PRE_NMS_TOPK_TEST = int(gen_rpn.pre_nms_topk[False])
    m.RPN.POST_NMS_TOPK_TEST = int(gen_rpn.post_nms_topk[False])
    m.RPN.NMS_THRESH = float(gen_rpn.nms_thresh)
    try:
        cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = d.test_resize()
    except ValueError:
        pass  # a config without a test loader (common/models/*.py): Detectron2's defaults (800, 1333)
    names = d.dataset_names()
    cfg.DATASETS.TEST, cfg.DATASETS.TRAIN = tuple(names[:1]), tuple(names[1:])
    cfg.D2BUILD_LAZY = CfgNode({"CONFIG": config, "OVERRIDES": overrides_json, "FAMILY": d.family,
                                "SQUARE_PAD": f.square_pad})
    # the model's own anchors equal what anchor_facts builds from the keys (it generates the graph's anchors)
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.anchor_generator import build_anchor_generator

    strides = [f.strides[k] for k in f.dense_in_features]
    rebuilt = build_anchor_generator(cfg, [ShapeSpec(channels=1, stride=s) for s in strides])
    if not all(torch.equal(x, y) for x, y in zip(rebuilt.cell_anchors, gen.cell_anchors)) \
            or list(rebuilt.strides) != list(gen.strides):
        raise lazyconfig.LazyConfigError(f"model.config {config}: its anchor generator is not what d2build's anchors "
                                         "reproduce (sizes, aspect ratios, strides)")
    return cfg


def lazy_structure_problems(model: Any, f: Any) -> list[str]:
    """What surgery cannot rebuild in a lazy R-CNN, read from the built model (the yacs configs' RCNN_STRUCTURE
    rows check the same from keys): FPN levels with the strides surgery assumes, Detectron2's RPN and default
    anchors, StandardROIHeads with ROIAlignV2 poolers, a FastRCNNConvFCHead box head (convs, then fcs:
    surgery feeds its first conv, or fc1 without convs), class-specific boxes, an RPN with unit regression weights."""
    from d2build.families.surgery.spec import STRIDES

    out = []
    if f.meta_architecture != "GeneralizedRCNN":
        out.append(f"the model is a {f.meta_architecture}; surgery rebuilds GeneralizedRCNN")
    for level in (*f.dense_in_features, *f.roi_in_features):
        if STRIDES.get(level) != f.strides.get(level):
            out.append(f"feature {level} has stride {f.strides.get(level)}; surgery expects {STRIDES.get(level)}")
    if type(model.proposal_generator).__name__ != "RPN" or f.anchor_generator != "DefaultAnchorGenerator":
        out.append(f"proposals come from {type(model.proposal_generator).__name__} with {f.anchor_generator}; "
                   "surgery rebuilds Detectron2's RPN with DefaultAnchorGenerator")
    if tuple(f.dense_reg_weights) != (1.0, 1.0, 1.0, 1.0):
        out.append(f"RPN regression weights {f.dense_reg_weights}; surgery supports (1, 1, 1, 1)")
    if f.roi_heads != "StandardROIHeads":
        out.append(f"ROI heads are {f.roi_heads}; surgery supports StandardROIHeads for LazyConfig models")
    if not f.pooler_aligned:
        out.append("a pooler is not ROIAlignV2 (aligned); surgery supports ROIAlignV2")
    if f.box_head != "FastRCNNConvFCHead" or f.box_head_fcs < 1:
        out.append(f"box head {f.box_head} with {f.box_head_fcs} fc(s); surgery supports FastRCNNConvFCHead "
                   "(convs, then at least one fc)")
    if f.class_agnostic_boxes:
        out.append("class-agnostic box regression; surgery supports class-specific boxes outside a cascade")
    if f.class_agnostic_masks:
        out.append("class-agnostic masks; surgery supports class-specific masks")
    return out


def check_input(cfg, input_hw: tuple[int, int], dynamic: bool = False, batch: int = 1) -> None:
    """The input a square_pad backbone (ViTDet) needs (lazyconfig.square_pad_problem; yacs: no-op). The export
    stage's preflight says the same before any stage runs."""
    from d2build import lazyconfig

    lazy = cfg.get("D2BUILD_LAZY")
    problem = lazy and lazyconfig.square_pad_problem(int(lazy.SQUARE_PAD), input_hw, dynamic, batch)
    if problem:
        raise lazyconfig.LazyConfigError(f"model.config {lazy.CONFIG}: {problem[1]}; {problem[2]}")


def check_family(cfg, family: str) -> None:
    """A LazyConfig's family follows from its classes: a recipe naming another is one line (yacs: no-op, the
    schema checked its keys)."""
    from d2build import lazyconfig

    lazy = cfg.get("D2BUILD_LAZY")
    if lazy is not None and lazy.FAMILY != family:
        raise lazyconfig.LazyConfigError(f"model.family={family} but model.config {lazy.CONFIG} builds a "
                                         f"{lazy.FAMILY} model; use model.family={lazy.FAMILY}")


#: Detectron2 projects whose configs hold keys get_cfg() lacks: (the MODEL key only their configs set, the module that
#: registers their heads, the function that adds their keys). PointRend ships in sal-detectron2 without configs.
PROJECT_CONFIGS = (("POINT_HEAD", "detectron2.projects.point_rend", "add_pointrend_config"),)


def add_project_keys(cfg, file: str) -> None:
    """Before merging `file`: the keys (and head registrations) of the Detectron2 projects it configures."""
    import importlib

    import yaml

    from d2build.recipe import config_chain

    class Loader(yaml.SafeLoader):  # configs may hold !!python tags: never construct them
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    model_keys: set[str] = set()
    for p in config_chain(Path(file)):
        tree = yaml.load(p.read_text(), Loader=Loader) or {}  # noqa: S506 - a SafeLoader subclass
        model = tree.get("MODEL") if isinstance(tree, dict) else None
        model_keys |= set(model) if isinstance(model, dict) else set()
    for key, module, adder in PROJECT_CONFIGS:
        if key in model_keys:
            getattr(importlib.import_module(module), adder)(cfg)


def build_model(cfg, state_dict: dict[str, Any] | None = None):
    import torch
    from detectron2.modeling import build_model as d2_build

    if cfg.get("D2BUILD_LAZY") is not None:
        model = build_lazy_model(cfg)
    else:
        model = d2_build(cfg)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(
            {k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def build_lazy_model(cfg):
    """The real LazyConfig model a `lazy_as_yacs` cfg carries (lazyconfig.build_model, Detectron2's own
    initialisation, seeded by the caller), with the cfg's test keys set on it (the families' eager_overrides
    reach a lazy model this way)."""
    import json

    from d2build import lazyconfig

    lazy = cfg.D2BUILD_LAZY
    model = lazyconfig.build_model(lazyconfig.load(lazy.CONFIG, json.loads(lazy.OVERRIDES)), lazy.CONFIG)

    def value(key: str) -> Any:
        node = cfg
        for part in key.split("."):
            node = node[part]
        return node

    settings: dict[str, dict[str, Any]] = {"nms": {}, "rpn": {}}
    for ours, key in LAZY_TEST_KEYS.items():
        section, name = ours.split(".")
        settings[section][name] = value(key)
    model_facts.apply_test_settings(model, settings)
    return model


# ---------------------------------------------------------------- restricted unpickling

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("_codecs", "encode"),  # protocol-2 pickles store raw array bytes as latin-1 text; encode() only converts it
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint refers to {module}.{name}; only numpy arrays and plain containers are "
            "allowed in a .pkl checkpoint")


def read_pkl_checkpoint(data: bytes) -> dict[str, Any]:
    obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError("a model-zoo checkpoint is a dict; this file holds something else")
    return obj


def fetch_weights(weights: str, timeout: float = 20.0) -> tuple[bytes, str]:
    """Bytes and a display name for a URL or local path; an unreachable URL fails fast and says what to do."""
    if weights.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(weights, timeout=timeout) as r:  # noqa: S310 - http(s) only
                return r.read(), weights
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ConnectionError(
                f"cannot download model.weights={weights} ({getattr(e, 'reason', e)}). Offline? Download it "
                "elsewhere and pass model.weights=/path/to/model.pkl, or use model.weights=random") from e
    p = Path(weights).expanduser()
    return p.read_bytes(), str(p)


def load_checkpoint(model, weights: str) -> None:
    """Load a model-zoo .pkl (restricted unpickler) or a torch .pth (weights_only) into `model`."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    data, name = fetch_weights(weights)
    if name.endswith(".pkl"):
        ckpt = read_pkl_checkpoint(data)
        if "model" not in ckpt:
            ckpt = {"model": ckpt}
        if "__author__" not in ckpt:
            ckpt["matching_heuristics"] = True
        ckpt["model"] = {k: np.asarray(v) for k, v in ckpt["model"].items()}
    else:
        try:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch's message advises loading unsafely: say it our way
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{name}: not a plain state dict d2build can load ({first[:200]}); refused") from None
        ckpt = ckpt if "model" in ckpt else {"model": ckpt}
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(ckpt)  # d2's own name conversion (c2 -> d2) and shape checks
    if incompatible is not None and incompatible.missing_keys:
        raise ValueError(f"{name}: checkpoint lacks {len(incompatible.missing_keys)} model parameters, "
                         f"e.g. {incompatible.missing_keys[:3]}; does model.config match these weights?")


def random_model(cfg, seed: int, image_chw, family: Any = None, report: dict[str, Any] | None = None):
    """Seeded random weights that behave; the same bytes whatever the thread count (see below).

    `family` (a Family, or its name): its `adjust_random` runs last, for what the generic steps do not
    cover (RetinaNet's dense head, a cascade's per-stage classifiers). `report`: filled with what
    random_norms.behave did (LazyConfig models: norms reached, residual branches scaled)."""
    import torch

    # The statistics come from forward passes whose float sums depend on how many threads split
    # them; one thread makes `random` weights reproducible across machines and joblib workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if isinstance(family, str):
            from d2build.families import builder

            family = builder(family)
        if cfg.get("D2BUILD_LAZY") is not None:  # BN/LN heads, RegNet, ViT: random_norms (design note §5)
            from d2build import random_norms

            torch.manual_seed(seed)
            model = build_model(cfg)
            done = random_norms.behave(model, image_chw, seed=seed, family=family, predictor_spread=PREDICTOR_SPREAD,
                                       rescale=rescale_outputs)
            if report is not None:
                report.update(done)
            return model
        return _random_model(cfg, seed, image_chw, family)
    finally:
        torch.set_num_threads(threads)


def _random_model(cfg, seed: int, image_chw, family: Any = None):
    """Seeded random weights with each FrozenBatchNorm's statistics taken from its own input.

    Detectron2 builds FrozenBN as the identity, so random convolutions blow activations up and
    the heads saturate. One forward pass over a real photograph, setting each BN's mean/var from
    the batch statistics of what reaches it (in execution order), gives a well-scaled network
    whose detections look ordinary (about 100 per image with moderate scores).
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    torch.manual_seed(seed)
    model = build_model(cfg)  # Detectron2's own initialisation (c2 msra/xavier fills), seeded

    def set_stats(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)))

    _scale_residual_branches(model, RESIDUAL_BRANCH_SCALE)  # before the pass: later BNs see the result
    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    try:
        with torch.no_grad():
            images = model.preprocess_image([{"image": torch.as_tensor(image_chw)}])
            model.backbone(images.tensor)
    finally:
        for h in hooks:
            h.remove()
    done: tuple[str, ...] = ()
    if family is not None:  # before the generic predictors: a cascade's mask head sees detections only after it
        done = tuple(family.adjust_random(model, image_chw) or ())
    # Detectron2 initialises the predictors with std 0.01/0.001, so class scores sit at ~1/81 and
    # mask logits at ~0: nothing clears the 0.05 score threshold and masks are coin flips. Rescale
    # each predictor so its outputs on the photograph have a spread like a trained model's (unless the
    # family's adjust_random has, to the same spread: rescaling again would measure it and change nothing).
    for path, target in PREDICTOR_SPREAD.items():
        layer = model.get_submodule(path) if _has(model, path) and path not in done else None
        if layer is not None:
            rescale_outputs(model, layer, image_chw, target)
    return model


PREDICTOR_SPREAD = {"roi_heads.box_predictor.cls_score": 2.0, "roi_heads.mask_head.predictor": 3.0,
                    # keypoint logits (before the head's x2 upsample): at 10 a heatmap has one clear peak
                    # and keypoint scores spread like a trained model's (median ~0.1; at 1 they are ~1e-3)
                    "roi_heads.keypoint_head.score_lowres": 10.0}

# Each residual block's last BN scales its branch to this std (the identity path stays at ~1).
RESIDUAL_BRANCH_SCALE = 0.1


def _scale_residual_branches(model, scale: float) -> None:
    """Make random residual branches smaller than the identity path, as in trained ResNets.

    With every branch normalised to the identity's size a random ResNet is chaotic: a relative
    2^-12 perturbation of the input (one float16 rounding) grew 130x to a 4.4% rms difference at
    res5, so a float16 graph matched only 28% of Detectron2's detections at verify's IoU 0.98 /
    score 0.01: no lower precision (or other kernel) could be checked against such a model.
    Trained ResNets keep their branches small (zero-initialised last BN gammas are the standard
    training trick). At 0.1 the same perturbation grows 3.7x (1.2e-3 at res5) and the fp16 graph
    matches 98-99 of 100 detections per photograph at 640x640.
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    with torch.no_grad():
        for mod in model.modules():
            if not hasattr(mod, "shortcut"):  # detectron2's residual blocks (Bottleneck, Basic)
                continue
            last = getattr(mod, "conv3", None) or getattr(mod, "conv2", None)
            norm = getattr(last, "norm", None)
            if isinstance(norm, FrozenBatchNorm2d):
                norm.weight.mul_(scale)
                norm.bias.mul_(scale)


def _has(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def rescale_outputs(model, layer, image_chw, target_std: float, forward: Any = None) -> None:
    """Scale `layer`'s weight and bias so its outputs over one forward pass on the photograph have std
    `target_std` (`forward()`: that pass; default GeneralizedRCNN's inference)."""
    import torch

    seen = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().flatten()))
    try:
        with torch.no_grad():
            if forward is not None:
                forward()
            else:
                model.inference([{"image": torch.as_tensor(image_chw)}], do_postprocess=False)
    finally:
        hook.remove()
    if not seen:
        return
    values = torch.cat(seen)
    if values.numel() < 2:
        raise ValueError(f"random weights: {type(layer).__name__} saw {values.numel()} output value(s) on the photograph, "
                         "too few to measure their spread (does anything reach it?)")
    std = float(values.std())
    with torch.no_grad():
        layer.weight.mul_(target_std / std)
        layer.bias.mul_(target_std / std)


# ---------------------------------------------------------------- what the model is (names, sizes)

def dataset_metadata(cfg) -> dict[str, Any]:
    """Class and keypoint names and keypoint limbs Detectron2's dataset metadata knows for this config
    (the test datasets first, then the training ones); empty where none is registered."""
    from detectron2.data import MetadataCatalog

    found: dict[str, Any] = {}
    for ds in [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]:
        meta = MetadataCatalog.get(ds)
        for key in ("thing_classes", "stuff_classes", "keypoint_names", "keypoint_connection_rules"):
            value = meta.get(key, None)
            if value and key not in found:
                found[key] = list(value)
    return found


def bgr_normalisation(cfg) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """PIXEL_MEAN and PIXEL_STD in the BGR channel order of d2build's input_tensor (reversed for an RGB model, such
    as ViTDet): the mean is the letterbox padding that normalises to 0 once the graph (or Detectron2) flips the
    channels."""
    mean = tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN)
    std = tuple(float(v) for v in cfg.MODEL.PIXEL_STD)
    if cfg.INPUT.FORMAT == "RGB":
        return mean[::-1], std[::-1]  # type: ignore[return-value]
    return mean, std  # type: ignore[return-value]


def model_info(ms: ModelSlice, cfg=None) -> ModelInfo:
    """The runtime's ModelInfo for a model slice: the recipe's names first, then Detectron2's dataset
    metadata, then (keypoints only) COCO's person keypoints when the model has 17. `cfg`: the
    Detectron2 config when the caller has it loaded already."""
    from d2build.families import family
    from d2build.families.keypoint_rcnn import COCO_KEYPOINT_NAMES, COCO_SKELETON
    from d2build.runtime import ModelInfo

    g, n = ms.graph, ms.names
    cfg = cfg if cfg is not None else load_cfg(g.config)
    fam = family(g.family)
    meta = dataset_metadata(cfg)
    names = n.class_names or meta.get("thing_classes")
    num_classes = fam.num_classes(cfg)
    if names is not None and len(names) != num_classes:
        names = None  # a dataset registered under the config's name with other classes: not this model's
    kp_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()
    if fam.with_keypoints:
        k = int(cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS)
        kp_names = tuple(n.keypoint_names or meta.get("keypoint_names") or
                         (COCO_KEYPOINT_NAMES if k == 17 else [f"keypoint{i}" for i in range(k)]))
        index = {name: i for i, name in enumerate(kp_names)}
        if n.keypoint_skeleton:
            skeleton = tuple((index[a], index[b]) for a, b in n.keypoint_skeleton)
        elif meta.get("keypoint_connection_rules"):
            skeleton = tuple((index[a], index[b]) for a, b, *_ in meta["keypoint_connection_rules"]
                             if a in index and b in index)
        elif k == 17:
            skeleton = COCO_SKELETON
    resize: dict[str, Any] = {}
    if g.dynamic is not None:
        d = g.dynamic
        resize = {"resize": "shortest_edge", "min_size": int(d.min_size or cfg.INPUT.MIN_SIZE_TEST),
                  "max_size": int(d.max_size or cfg.INPUT.MAX_SIZE_TEST), "input_min": d.min, "input_max": d.max}
    mean, std = bgr_normalisation(cfg)
    return ModelInfo(
        **resize,
        family=g.family, input_hw=g.input, pixel_mean=mean,
        num_classes=num_classes, class_names=tuple(names) if names else None, keypoint_names=kp_names,
        keypoint_skeleton=skeleton, input_format="BGR", batch=g.batch,
        pixel_std=std, extra=fam.info_extra(cfg, meta))


# ---------------------------------------------------------------- model definitions (model_facts.Definition)

class YacsDefinition(model_facts.Definition):
    """A yacs config as a Definition (a LazyConfig's is model_facts.LazyDefinition)."""

    def __init__(self, config: str, overrides: dict[str, Any] | None = None):
        self.config = config
        self.cfg = load_cfg(config, overrides)

    def build(self):
        return build_model(self.cfg)

    def test_resize(self):
        return int(self.cfg.INPUT.MIN_SIZE_TEST), int(self.cfg.INPUT.MAX_SIZE_TEST)

    def dataset_names(self):
        return [*self.cfg.DATASETS.TEST, *self.cfg.DATASETS.TRAIN]

    def keypoint_oks_sigmas(self):
        return tuple(self.cfg.TEST.KEYPOINT_OKS_SIGMAS)


def definition(config: str, overrides: dict[str, Any] | None = None) -> model_facts.Definition:
    """model.config as a Definition of either kind."""
    from d2build import lazyconfig

    if lazyconfig.is_lazy(config):
        return model_facts.LazyDefinition(config, overrides)
    return YacsDefinition(config, overrides)
