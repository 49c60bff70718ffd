"""Detectron2 plumbing shared by the families: configs, models, and weights that can be trusted.

Weights come from a model-zoo URL, a local .pkl/.pth, or `random`. Model-zoo .pkl files are
pickles; they are read with a restricted unpickler that admits numpy arrays and plain containers
only, so a checkpoint cannot run code. `random` builds seeded random weights and sets every
FrozenBatchNorm's statistics from its own input on a real photograph, so the model produces
ordinary detections instead of the degenerate ones identity BN gives.
"""

from __future__ import annotations

import io
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from d2build.recipe import ModelSlice
    from d2build.runtime import ModelInfo

BN_PHOTO = "astronaut"  # the photograph whose activations set random weights' BN statistics


def load_cfg(config: str, overrides: dict[str, Any] | None = None):
    """A frozen Detectron2 CfgNode on CPU from a model-zoo name or a local .yaml path."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    path = Path(config).expanduser()
    file = str(path) if path.is_file() else model_zoo.get_config_file(config)
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

    model = d2_build(cfg)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(
            {k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


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


def random_model(cfg, seed: int, image_chw, family: Any = None):
    """Seeded random weights that behave; the same bytes whatever the thread count (see below).

    `family` (a Family, or its name): its `adjust_random` runs last, for what the generic steps do not
    cover (RetinaNet's dense head, a cascade's per-stage classifiers)."""
    import torch

    # The statistics come from forward passes whose float sums depend on how many threads split
    # them; one thread makes `random` weights reproducible across machines and joblib workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if isinstance(family, str):
            from d2build.families import builder

            family = builder(family)
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


def model_info(ms: ModelSlice, cfg=None) -> ModelInfo:
    """The runtime's ModelInfo for a model slice: the recipe's names first, then Detectron2's dataset
    metadata, then (keypoints only) COCO's person keypoints when the model has 17. `cfg`: the
    Detectron2 config when the caller has it loaded already."""
    from d2build.families import family
    from d2build.families.keypoint_rcnn import COCO_KEYPOINT_NAMES, COCO_SKELETON
    from d2build.runtime import ModelInfo

    g, n = ms.graph, ms.names
    cfg = cfg if cfg is not None else load_cfg(g.config.name)
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
    return ModelInfo(
        **resize,
        family=g.family, input_hw=g.input, pixel_mean=tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN),
        num_classes=num_classes, class_names=tuple(names) if names else None, keypoint_names=kp_names,
        keypoint_skeleton=skeleton, input_format="BGR", batch=g.batch,
        pixel_std=tuple(float(v) for v in cfg.MODEL.PIXEL_STD), extra=fam.info_extra(cfg, meta))
