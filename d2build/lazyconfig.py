"""Detectron2 LazyConfig models: load one, apply the recipe's overrides, tell its family, refuse what d2build cannot
build in one line.

A LazyConfig is Python (`new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`) or the YAML a LazyConfig trainer dumps
with `LazyConfig.save` (`config.yaml`). Three things make it different from a yacs config:

* Loading a .py runs it (a zoo file, or the user's own file: the same trust as running their training). A dumped
  YAML is *not* run here: Detectron2 reads it with `yaml.unsafe_load`, which builds any Python object it names, and
  `instantiate` then calls any `_target_`. `read_dump` reads it with a loader that admits only the tags a dump of a
  Detectron2 model holds (ShapeSpec, a class of detectron2/torch.nn by name, `functools.partial` of one), and
  `check_targets` admits only Detectron2 and torch.nn callables as `_target_`, before anything is imported by name.
* The model's structure is the `_target_` classes, not keys like MODEL.ROI_HEADS.NAME: `family_of` maps them to a
  d2build family from the classes themselves (resolved, compared by identity), never from names that look alike.
* A model may need a module that is not installed (ViTDet's ViT blocks import `timm` when built; the mmdet wrapper
  imports `mmdet`): `build_model` turns that into one line naming the module and the install.

Module level imports only the standard library and PyYAML: Detectron2 is imported where it is needed.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import yaml

#: where a `_target_` (or a class named in a dump) may come from: Detectron2's model code and torch's layers
ALLOWED_PREFIXES = ("detectron2.modeling.", "detectron2.layers.", "torch.nn.")
#: d2build's names for the families a LazyConfig model can be (the same names as families.FAMILIES)
SUPPORTED = ("mask_rcnn", "faster_rcnn", "keypoint_rcnn", "cascade_rcnn", "retinanet")


class LazyConfigError(ValueError):
    """A LazyConfig d2build cannot load or build; the message is one line saying why and what to do."""


# ------------------------------------------------------------------ what kind of config a path is

def is_lazy(config: str) -> bool:
    """A LazyConfig: a .py (zoo name or file) or a .yaml dumped by LazyConfig.save (a `model` mapping with a
    `_target_`), as opposed to a yacs .yaml (MODEL, _BASE_ keys). Reads at most the file's text; no Detectron2."""
    if config.endswith(".py"):
        return True
    path = Path(config).expanduser()
    if not path.is_file():
        return False  # a zoo .yaml name: the zoo's .yaml files are all yacs
    try:
        tree = yaml.load(path.read_text(), Loader=_NoObjectsLoader)  # noqa: S506 - constructs no objects
    except (yaml.YAMLError, UnicodeDecodeError):
        return False  # the yacs path reports an unreadable file
    return isinstance(tree, dict) and isinstance(tree.get("model"), dict) and "_target_" in tree["model"]


class _NoObjectsLoader(yaml.SafeLoader):
    """Reads a dump's structure only: every python/ tag becomes None."""


_NoObjectsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)


# ------------------------------------------------------------------ reading a dumped config.yaml safely

class _DumpLoader(yaml.SafeLoader):
    """The tags LazyConfig.save writes for a Detectron2 model, and nothing else (see module doc)."""


def _allowed_name(name: str, where: str) -> Any:
    """The class or function a dotted name means, if it is defined in Detectron2's model code or torch.nn.

    Both the name and the object's own module are checked: a dotted path can reach anything through module
    attributes (`detectron2.modeling.backbone.vit.torch.load`), and `detectron2.` alone would admit
    `detectron2.config.LazyConfig.load`, which runs a .py file."""
    if not name.startswith(ALLOWED_PREFIXES):
        raise LazyConfigError(f"{where}: names {name!r}, which is not in Detectron2's model code or torch.nn; "
                              "d2build builds only those")
    import pydoc

    obj = pydoc.locate(name)
    if obj is None or not callable(obj):
        raise LazyConfigError(f"{where}: {name!r} is not a class or function of the installed Detectron2/torch")
    return _allowed_object(obj, where)


def _allowed_object(obj: Any, where: str) -> Any:
    module = getattr(obj, "__module__", None) or ""
    if not (isinstance(obj, type) or inspect.isfunction(obj) or inspect.isbuiltin(obj)) \
            or not (module + ".").startswith(ALLOWED_PREFIXES):
        raise LazyConfigError(f"{where}: {target_name(obj)} is not a class or function of Detectron2's model code "
                              "or torch.nn; d2build builds only those")
    return obj


def _python_name(loader: _DumpLoader, suffix: str, node: yaml.Node) -> Any:
    if "<lambda>" in suffix or "%3Clambda%3E" in suffix:
        return LAMBDA  # LazyConfig.save could not name it: an override must replace it (read_dump)
    return _allowed_name(suffix, f"line {node.start_mark.line + 1}")


class _Lambda:
    """Where a dump holds a lambda (`!!python/name:...<lambda>`): not loadable, replaced by an override or refused."""

    def __repr__(self) -> str:
        return "<lambda>"


LAMBDA = _Lambda()


def _python_object(loader: _DumpLoader, suffix: str, node: yaml.Node) -> Any:
    if suffix != "detectron2.layers.shape_spec.ShapeSpec":
        raise LazyConfigError(f"line {node.start_mark.line + 1}: a !!python/object:{suffix}; d2build reads only "
                              "ShapeSpec objects from a dumped config")
    from detectron2.layers import ShapeSpec

    return ShapeSpec(**loader.construct_mapping(node, deep=True))


def _python_apply(loader: _DumpLoader, suffix: str, node: yaml.Node) -> Any:
    line = node.start_mark.line + 1
    if suffix != "functools.partial":
        raise LazyConfigError(f"line {line}: a !!python/object/apply:{suffix}; d2build reads only functools.partial "
                              "of a Detectron2 or torch.nn class from a dumped config")
    spec = loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else \
        {"args": loader.construct_sequence(node, deep=True)}
    args = list(spec.get("args") or [])
    state = spec.get("state") or ()
    # pickle's partial state: (func, args, keywords, __dict__)
    keywords = dict(state[2] or {}) if isinstance(state, tuple) and len(state) >= 3 else {}
    if not args or not callable(args[0]):
        raise LazyConfigError(f"line {line}: functools.partial without a function")
    _allowed_object(args[0], f"line {line}")
    return functools.partial(args[0], *args[1:], **keywords)


_DumpLoader.add_multi_constructor("tag:yaml.org,2002:python/name:", _python_name)
_DumpLoader.add_multi_constructor("tag:yaml.org,2002:python/object:", _python_object)
_DumpLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:", _python_apply)
_DumpLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                            lambda loader, node: tuple(loader.construct_sequence(node, deep=True)))


def read_dump(path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """A config.yaml LazyConfig.save wrote, as the DictConfig LazyConfig.load would give, built safely.

    A trainer's dump of the LSJ configs holds lambdas (their heads' `conv_norm = lambda c: NaiveSyncBatchNorm(c,
    stats_mode="N")`), which YAML cannot hold: Detectron2 writes the text anyway and a cloudpickle beside it.
    Each such key must be set by `overrides` (`BN`: every BatchNorm variant computes the same at inference)."""
    from omegaconf import OmegaConf

    try:
        tree = yaml.load(path.read_text(), Loader=_DumpLoader)  # noqa: S506 - a SafeLoader with the constructors above
    except yaml.constructor.ConstructorError as e:
        line = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise LazyConfigError(f"{path}: {e.problem}{line}; d2build reads only the tags LazyConfig.save writes for "
                              "a Detectron2 model") from None
    except yaml.YAMLError as e:
        raise LazyConfigError(f"{path} is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    holes = [k for k in _paths_of(tree, LAMBDA) if k not in (overrides or {})]
    if holes:
        raise LazyConfigError(
            f"{path}: {', '.join(holes)} {'is a lambda' if len(holes) == 1 else 'are lambdas'}, which LazyConfig.save "
            "cannot write (Detectron2 wrote config.yaml.pkl beside it, a pickle d2build does not load); pass the "
            f"training .py config, or set model.config_overrides={{{','.join(f'{k}:BN' for k in holes)}}} (every "
            "BatchNorm variant is BN at inference)")
    return OmegaConf.create(tree, flags={"allow_objects": True})


def _paths_of(tree: Any, value: Any, path: str = "") -> list[str]:
    """Dotted paths of the nodes of a plain tree that are `value` (identity)."""
    if tree is value:
        return [path]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [p for k, v in items for p in _paths_of(v, value, f"{path}.{k}" if path else str(k))]


# ------------------------------------------------------------------ loading, overrides

def zoo_path(name: str) -> Path | None:
    """The model zoo's file for a name such as `new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`, or None."""
    from detectron2 import model_zoo

    try:
        return Path(model_zoo.get_config_file(name))
    except RuntimeError:
        return None


def load(config: str, overrides: dict[str, Any] | None = None) -> Any:
    """The LazyConfig (root DictConfig: model, dataloader, train, ...) for a zoo name, a local .py or a dumped .yaml,
    with `overrides` ({dotted key: value}) applied and every `_target_` checked."""
    from detectron2.config import LazyConfig

    path = Path(config).expanduser()
    if not path.is_file():
        found = zoo_path(config) if config.endswith(".py") else None
        if found is None:
            raise LazyConfigError(f"model.config={config!r} is neither a file nor a LazyConfig in Detectron2's model "
                                  "zoo (e.g. new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py)")
        path = found
    if path.suffix == ".py":
        try:
            cfg = LazyConfig.load(str(path))
        except ModuleNotFoundError as e:
            raise LazyConfigError(missing_module_line(config, e)) from None
    else:
        cfg = read_dump(path, overrides)
    if "model" not in cfg:
        raise LazyConfigError(f"model.config={config!r} defines no `model` (keys: {', '.join(cfg.keys())})")
    apply_overrides(cfg, overrides or {}, config)
    check_targets(cfg.model, "model")
    return cfg


def apply_overrides(cfg: Any, overrides: dict[str, Any], config: str) -> None:
    """Set dotted keys from the root (`model.backbone.square_pad`). A key must exist already, or be an argument of
    the `_target_` of the node it goes into (`model.roi_heads.box_predictor.test_topk_per_image`): a typo is
    refused instead of silently adding a key the model never reads."""
    import inspect

    from omegaconf import OmegaConf

    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
        if node is None or not OmegaConf.is_dict(node):
            raise LazyConfigError(f"model.config_overrides: {key} -- {'.'.join(parents) or key} is not a section of "
                                  f"{config}")
        if leaf not in node:
            target = node.get("_target_")
            params = ()
            if target is not None:
                fn = target if callable(target) else _allowed_name(str(target), key)
                try:
                    params = tuple(inspect.signature(fn).parameters)
                except (TypeError, ValueError):
                    params = ()
            if leaf not in params:
                known = sorted((set(node.keys()) | set(params)) - {"self", "_target_"})
                raise LazyConfigError(f"model.config_overrides: {key} -- {'.'.join(parents)} has no key {leaf!r} "
                                      f"(it has {', '.join(known)})")
        OmegaConf.update(cfg, key, value, merge=True)


def targets(node: Any, path: str = "model") -> dict[str, Any]:
    """Every `_target_` under `node` by the dotted path of its node (lists as [i])."""
    from omegaconf import DictConfig, ListConfig

    out: dict[str, Any] = {}
    if isinstance(node, (DictConfig, dict)):
        if "_target_" in node:
            out[path] = node["_target_"]
        for k in node.keys():
            if k != "_target_":
                out.update(targets(node[k], f"{path}.{k}"))
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, v in enumerate(node):
            out.update(targets(v, f"{path}[{i}]"))
    return out


def target_name(target: Any) -> str:
    return target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"


def check_targets(model_cfg: Any, path: str = "model") -> None:
    """Every `_target_` is a class or function of Detectron2's model code or torch.nn (`_allowed_name`; a dump names
    them as strings: the name is checked before anything is imported by it)."""
    for where, target in targets(model_cfg, path).items():
        if isinstance(target, str):
            _allowed_name(target, f"{where}._target_")
        else:
            _allowed_object(target, f"{where}._target_")


# ------------------------------------------------------------------ the family, from the classes

def _resolve(target: Any) -> Any:
    return _allowed_name(target, "_target_") if isinstance(target, str) else target


def family_of(cfg: Any, config: str = "model.config") -> str:
    """d2build's family for the model the config builds, from its `_target_` classes (exact classes, resolved)."""
    from detectron2.modeling import GeneralizedRCNN, RetinaNet
    from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads

    m = cfg.model
    meta = _resolve(m["_target_"])
    if meta is RetinaNet:
        return "retinanet"
    if meta is not GeneralizedRCNN:
        raise LazyConfigError(f"{config} builds a {target_name(meta)}; d2build supports GeneralizedRCNN (Mask, Faster, "
                              "Keypoint, Cascade R-CNN) and RetinaNet")
    heads = m.get("roi_heads")
    kind = _resolve(heads["_target_"]) if heads is not None else None
    has_mask = heads is not None and heads.get("mask_head") is not None
    has_kp = heads is not None and heads.get("keypoint_head") is not None
    if kind is CascadeROIHeads:
        if not has_mask or has_kp:
            what = "without a mask head" if not has_mask else "with a keypoint head"
            raise LazyConfigError(f"{config}: CascadeROIHeads {what}; d2build's cascade_rcnn is Cascade Mask R-CNN")
        return "cascade_rcnn"
    if kind is not StandardROIHeads:
        name = target_name(kind) if kind is not None else "no roi_heads"
        raise LazyConfigError(f"{config}: model.roi_heads is {name}; d2build supports StandardROIHeads (FPN) and "
                              "CascadeROIHeads")
    if has_mask and has_kp:
        raise LazyConfigError(f"{config}: both a mask and a keypoint head; d2build builds one of them")
    return "mask_rcnn" if has_mask else "keypoint_rcnn" if has_kp else "faster_rcnn"


def check_family(cfg: Any, recipe_family: str | None, config: str) -> str:
    """The config's family; a recipe that names another is one clear error."""
    found = family_of(cfg, config)
    if recipe_family is not None and recipe_family != found:
        raise LazyConfigError(f"model.family={recipe_family} but model.config {config} builds a {found} model; "
                              f"use model.family={found} (or leave it out)")
    return found


def square_pad_problem(pad: int, input_hw: Any, dynamic: bool, batch: int) -> tuple[str, str, str] | None:
    """A backbone that pads every image to a square (ViTDet's SimpleFeaturePyramid.square_pad) runs at that size
    whatever model.input is: the input must be that square, fixed, and one image (the window attention's reshapes
    are folded at the exported batch of 1). (the recipe key, what is wrong, the fix), or None when the input fits
    (or pad is 0)."""
    if not pad:
        return None
    where = f"the config pads every image to {pad}x{pad} (square_pad)"
    if dynamic:
        return "model.dynamic", f"{where}: it has one input size", "remove model.dynamic"
    if tuple(input_hw) != (pad, pad):
        return ("model.input", f"{where} but model.input is {input_hw[0]}x{input_hw[1]}",
                f"set model.config_overrides={{model.backbone.square_pad:{input_hw[0]}}} (a square input) or "
                f"model.input=[{pad},{pad}]")
    if batch != 1:
        return ("model.batch_size", f"{where}: its window attention builds at batch 1 only, not "
                f"model.batch_size={batch}",
                "use model.batch_size=1")
    return None


def square_pad_of(cfg: Any) -> int:
    """The LazyConfig's backbone square_pad (0 when it has none)."""
    backbone = cfg.model.get("backbone")
    return int(backbone.get("square_pad", 0) or 0) if backbone is not None and hasattr(backbone, "get") else 0


# ------------------------------------------------------------------ building

def missing_module_line(config: str, error: ModuleNotFoundError) -> str:
    """One line naming the module a config needs, and which Detectron2 module imports it."""
    module = (error.name or str(error)).split(".")[0]
    importer = None
    tb = error.__traceback__
    while tb is not None:
        mod = tb.tb_frame.f_globals.get("__name__", "")
        if mod.startswith("detectron2.") and not mod.startswith("detectron2.config"):
            importer = mod
        tb = tb.tb_next
    via = f" ({importer} imports it)" if importer else ""
    return (f"model.config {config} needs the Python module '{module}'{via}, which is not installed: "
            f"pip install {PIP_NAMES.get(module, module)}")


#: pip names for modules whose distribution is named differently
PIP_NAMES = {"mmdet": "mmdet (and mmcv)", "cv2": "opencv-python-headless"}


def build_model(cfg: Any, config: str = "model.config") -> Any:
    """`instantiate(cfg.model)` in eval mode on CPU; a missing module is one LazyConfigError line."""
    from detectron2.config import instantiate

    try:
        model = instantiate(cfg.model)
    except ModuleNotFoundError as e:
        raise LazyConfigError(missing_module_line(config, e)) from None
    return model.to("cpu").eval()

