"""The recipe schema: dataclasses plus the checks that run before any stage.

Hydra composes plain YAML; this module turns the composed tree into typed, frozen dataclasses and
rejects anything a stage would otherwise trip over minutes later (a typo, a threshold of 5, an
input the FPN cannot tile, int8 with nothing to calibrate on). Every problem names the recipe file,
the key and the fix. Nothing here imports torch or Detectron2, so rejecting a recipe is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from d2build import lazyconfig  # is_lazy reads a file with PyYAML only
from d2build import plugins  # the plugin contract: pure Python
from d2build.backends import BACKENDS as RUNTIME_BACKENDS  # names only (numpy)
from d2build.families import FAMILIES  # a dict of names, no torch or Detectron2 import
from d2build.photos import BUNDLED
from d2build.recipe import (CALIBRATION_METHODS, MOVED, OPS, PRECISIONS, STAGES, TRITON_MODELS, ConfigOverrides,
                            ModelConfig, Problem, Recipe, RecipeError, RuntimeConfig, SurgeryConfig)

FAMILIES_SUPPORTED = tuple(FAMILIES)
# Detectron2 model families users ask for; the ones without a module in d2build/families are
# rejected as "not supported" rather than "unknown".
FAMILIES_KNOWN = (*FAMILIES_SUPPORTED, *(f for f in ("retinanet", "cascade_rcnn", "panoptic_fpn", "fcos")
                                       if f not in FAMILIES_SUPPORTED))
RPN_LEVELS = 5  # P2..P6 for every FPN recipe d2build supports
MAX_BATCH = 64


@dataclass
class _Checker:
    """Collects problems; `where(key)` says which file (or the command line) set a key."""

    recipe_file: str
    overrides: dict[str, str] = field(default_factory=dict)
    default: Callable[[str], Any] = lambda key: "?"  # a key's default as conf/ writes it
    problems: list[Problem] = field(default_factory=list)

    def where(self, key: str) -> str:
        for k in self.overrides:
            if key == k or key.startswith((k + ".", k + "[")):
                return f"command line ({k}={self.overrides[k]})"
        return self.recipe_file

    def add(self, key: str, message: str, fix: str, *, set_by: str | None = None) -> None:
        """`set_by`: the key whose setting caused the problem, when it is not `key` itself."""
        self.problems.append(Problem(self.where(set_by or key), key, message, fix))


# ---------------------------------------------------------------- generic structure and types

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0])
        return f"list of {inner}" + (f" (exactly {len(args)})" if args[-1] is not Ellipsis else "")
    if _is_optional(tp):
        return f"{_type_name(_strip_optional(tp))} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _coerce(value: Any, tp: Any, key: str, ck: _Checker) -> Any:
    """Check `value` against annotation `tp`; return the typed value or None after adding a problem."""
    bad = object()
    if _is_optional(tp):
        return None if value is None else _coerce(value, _strip_optional(tp), key, ck)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, ck)
    result: Any = bad
    if tp == ConfigOverrides:
        if value is None:
            return ()
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.startswith("model.") for k in value):
            ck.add(key, f"{value!r} is not a mapping of the LazyConfig's dotted keys",
                   f"set {key}={{model.backbone.square_pad:512}} (keys from the config's root, `model.` first)")
            return None

        def frozen(v: Any) -> Any:
            return tuple(frozen(x) for x in v) if isinstance(v, (list, tuple)) else v
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    if tp is bool:
        result = value if isinstance(value, bool) else bad
    elif tp is int:
        result = value if isinstance(value, int) and not isinstance(value, bool) else bad
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        result = float(value) if ok else bad
    elif tp is str:
        result = value if isinstance(value, str) else bad
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            fixed = args[-1] is not Ellipsis
            if fixed and len(value) != len(args):
                ck.add(key, f"has {len(value)} items", f"give exactly {len(args)} ({_type_name(tp)})")
                return None
            items = [_coerce(v, args[0], f"{key}[{i}]", ck) for i, v in enumerate(value)]
            result = tuple(items) if all(i is not None for i in items) else None
            if result is None:
                return None
    if result is bad:
        ck.add(key, f"{value!r} is not {_type_name(tp)}", f"set {key} to {_type_name(tp)}")
        return None
    return result


def _build(cls: type, node: Any, prefix: str, ck: _Checker) -> Any:
    if not isinstance(node, dict):
        ck.add(prefix, f"{node!r} is not a section", f"make {prefix} a mapping of keys")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("name", "source")}
    for k in node:
        full = f"{prefix + '.' if prefix else ''}{k}"
        if k not in fields and full in MOVED:
            ck.add(full, f"has moved to {MOVED[full][0]} ({MOVED[full][1]})", f"use {MOVED[full][0]} instead")
        elif k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"did you mean {prefix + '.' if prefix else ''}{near[0]}?" if near else (
                f"known keys: {', '.join(fields)}")
            ck.add(f"{prefix + '.' if prefix else ''}{k}", "unknown key", hint)
    values: dict[str, Any] = {}
    missing = False
    for name, f in fields.items():
        key = f"{prefix + '.' if prefix else ''}{name}"
        if name not in node or node[name] == "???":
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if not has_default:
                ck.add(key, "is missing", f"set {key} in the recipe ({_type_name(hints[name])})")
                missing = True
            continue
        v = _coerce(node[name], hints[name], key, ck)
        if v is None and (node[name] is not None or not _is_optional(hints[name])):  # null for a required value
            missing = True
            continue
        values[name] = v
    return None if missing else cls(**values)


# ---------------------------------------------------------------- semantic rules

# Config names d2build refuses, and what the model is (the structural check below names the key for any config).
_UNSUPPORTED_KINDS = (
    (r"_C4_", "a C4 model (no FPN)"), (r"_DC5_", "a dilated-C5 model (no FPN)"),
    (r"LVIS", "an LVIS model"), (r"Cityscapes", "a Cityscapes model"),
    (r"[Rr]otated", "a rotated-box model"),
)
_ZOO_UNSUPPORTED = re.compile("|".join(f"({p})" for p, _ in _UNSUPPORTED_KINDS))


def _supported_models() -> str:
    """Each family's Detectron2 models (its `described_as`), for messages."""
    from d2build.families import family

    return "yacs configs of the families " + "; ".join(f"{name} ({family(name).described_as})"
                                                       for name in FAMILIES_SUPPORTED)


_EXAMPLE_CONFIGS = ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml, COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml, "
                    "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml, COCO-Detection/retinanet_R_50_FPN_3x.yaml, "
                    "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml or COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml")


def _detectron2_configs_dir() -> Path | None:
    """The model-zoo config folder inside the installed detectron2, found without importing it."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_zoo" / "configs"


def _in_unit(ck: _Checker, key: str, v: float, default: float, who: str = "Detectron2 uses") -> None:
    if not 0.0 <= v <= 1.0:
        ck.add(key, f"{v} is outside [0, 1]", f"set a value between 0 and 1 ({who} {default})")


def _check_model(m: ModelConfig, ck: _Checker):
    """Model keys; returns a getter of the Detectron2 config's keys (None when it cannot be read)."""
    get = None
    if m.family not in FAMILIES_KNOWN:
        ck.add("model.family", f"unknown family {m.family!r}", f"use one of: {', '.join(FAMILIES_SUPPORTED)}")
    elif m.family not in FAMILIES_SUPPORTED:
        ck.add("model.family", f"{m.family!r} is not supported by this version of d2build",
               f"use one of: {', '.join(FAMILIES_SUPPORTED)}")
    if _ZOO_UNSUPPORTED.search(m.config):
        kind = next(what for pattern, what in _UNSUPPORTED_KINDS if re.search(pattern, m.config))
        ck.add("model.config", f"{m.config!r} is {kind}, which is not supported: d2build supports {_supported_models()}",
               f"use an FPN config such as {_EXAMPLE_CONFIGS}")
    elif not m.config.endswith((".yaml", ".py")):
        ck.add("model.config", f"{m.config!r} is neither a .yaml nor a LazyConfig .py config",
               "name a model-zoo config (.yaml or LazyConfig .py) or a local one")
    elif lazyconfig.is_lazy(m.config):
        _check_lazy(m, ck)  # its structure is checked on the built model when a stage loads it (detectron.load_cfg)
    else:
        if m.config_overrides:
            ck.add("model.config_overrides", f"applies to LazyConfig models only; {m.config} is a yacs config",
                   "remove model.config_overrides (a yacs config's keys are the recipe's model.config file)")
        local = Path(m.config).expanduser()
        zoo = _detectron2_configs_dir()
        in_zoo = zoo is not None and (zoo / m.config).is_file()
        if not local.is_file() and not in_zoo:
            where = f"under {zoo}" if zoo else "(detectron2 is not installed)"
            ck.add("model.config", f"{m.config!r} is neither a local file nor a model-zoo config {where}",
                   "check the spelling, e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
        else:
            get = _check_structure(m, local if local.is_file() else zoo / m.config, ck)  # type: ignore[operator]
    w = m.weights
    if w != "random" and not re.match(r"^https?://", w):
        p = Path(w).expanduser()
        if not p.is_file():
            ck.add("model.weights", f"{w!r} is not `random`, a URL, or an existing file",
                   "pass model.weights=random, a local .pkl/.pth path, or a model-zoo URL")
        elif p.suffix not in (".pkl", ".pth", ".pt"):
            ck.add("model.weights", f"{w!r} has an unknown suffix {p.suffix!r}", "use a .pkl (model zoo) or .pth checkpoint")
        else:
            from d2build.inputs import checkpoint_problem

            problem = checkpoint_problem(p)
            if problem:
                ck.add("model.weights", f"{w} {problem}", "pass the model_final.pth Detectron2's trainer wrote (or a "
                       "torch.save of a state dict, or a model-zoo .pkl), or model.weights=random")
    sizes = [("model.input", m.input)]
    if m.dynamic is not None:
        sizes += [("model.dynamic.min", m.dynamic.min), ("model.dynamic.max", m.dynamic.max)]
    for name, hw in sizes:
        for i, side in enumerate(hw):
            key = f"{name}[{i}]"
            if not 256 <= side <= 2048:
                ck.add(key, f"{side} is outside 256..2048", "pick a size between 256 and 2048 pixels")
            elif side % 32:
                lo, hi = side // 32 * 32, (side // 32 + 1) * 32
                ck.add(key, f"{side} is not divisible by 32 (the FPN's largest stride)", f"use {lo} or {hi}")
    if m.dynamic is not None:
        d = m.dynamic
        for i, axis in enumerate(("height", "width")):
            if d.min[i] > d.max[i]:
                ck.add("model.dynamic.min", f"min {axis} {d.min[i]} is above max {d.max[i]}", "swap them")
            elif not d.min[i] <= m.input[i] <= d.max[i]:
                ck.add("model.input", f"{axis} {m.input[i]} is outside model.dynamic's {d.min[i]}..{d.max[i]} (the "
                       "input is the optimization profile's opt size)", f"use a {axis} between them")
        for key in ("min_size", "max_size"):
            v = getattr(d, key)
            if v is not None and not 32 <= v <= 2048:
                ck.add(f"model.dynamic.{key}", f"{v} is outside 32..2048", "use e.g. 800 / 1333 (Detectron2's)")
        if d.min_size is not None and d.max_size is not None and d.min_size > d.max_size:
            ck.add("model.dynamic.min_size", f"{d.min_size} is above max_size {d.max_size}", "swap them")
    if m.seed < 0:
        ck.add("model.seed", f"{m.seed} is negative", "use a seed >= 0")
    if not 1 <= m.batch_size <= MAX_BATCH:
        ck.add("model.batch_size", f"{m.batch_size} is outside 1..{MAX_BATCH}", "use e.g. 1, 2, 4 or 8")
    return get


def _check_lazy(m: ModelConfig, ck: _Checker) -> None:
    """A LazyConfig exists (a local file or the zoo's), without Detectron2: its classes, family and structure are
    checked when a stage builds it (one line each, lazyconfig.LazyConfigError)."""
    zoo = _detectron2_configs_dir()
    if not Path(m.config).expanduser().is_file() and not (zoo is not None and (zoo / m.config).is_file()):
        where = f"under {zoo}" if zoo else "(detectron2 is not installed)"
        ck.add("model.config", f"{m.config!r} is neither a local file nor a LazyConfig of the model zoo {where}",
               "check the spelling, e.g. new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
    if m.family in FAMILIES_SUPPORTED and m.family not in lazyconfig.SUPPORTED:
        ck.add("model.family", f"{m.family} is not built from LazyConfigs", f"use one of {', '.join(lazyconfig.SUPPORTED)}")


def _family_from_lazy_config(tree: dict[str, Any], ck: _Checker) -> None:
    """model.family is optional for a LazyConfig: left out, it follows from the config's classes
    (lazyconfig.family_of). Only then is Detectron2 imported here (to load the config, 0.05 s after the import);
    a recipe that names its family is checked against the built model when a stage loads it."""
    m = tree.get("model")
    if not isinstance(m, dict) or m.get("family") not in (None, "???") or not isinstance(m.get("config"), str) \
            or not lazyconfig.is_lazy(m["config"]) or importlib.util.find_spec("detectron2") is None:
        return
    overrides = m.get("config_overrides") or {}
    try:
        m["family"] = lazyconfig.family_of(lazyconfig.load(m["config"], dict(overrides)), m["config"])
    except lazyconfig.LazyConfigError as e:
        ck.add("model.config", str(e), "use a LazyConfig of a supported model, or name model.family")


def _read_d2_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    """A Detectron2 yacs config as a dict, `_BASE_` chains merged (child keys win), without Detectron2."""
    import yaml

    class Loader(yaml.SafeLoader):  # Detectron2 configs may hold `!!python/...` tags; never run them
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    tree = yaml.load(path.read_text(), Loader=Loader) or {}  # noqa: S506 - a SafeLoader subclass
    if not isinstance(tree, dict):
        raise ValueError(f"{path} holds a YAML {type(tree).__name__}, not a mapping of config keys")
    base = tree.pop("_BASE_", None)
    if base is None or depth > 10:
        return tree
    merged = _read_d2_yaml((path.parent / Path(base).expanduser()).resolve(), depth + 1)

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v
    merge(merged, tree)
    return merged


def _check_structure(m: ModelConfig, path: Path, ck: _Checker):
    """The Detectron2 config describes a model surgery handles, with the heads of model.family; returns a
    getter of its keys (`get("MODEL.ROI_HEADS.NUM_CLASSES", 80)`), or None when it cannot be read."""
    import yaml

    try:
        tree = _read_d2_yaml(path)
    except OSError as e:
        ck.add("model.config", f"{e.filename or m.config} cannot be read ({e.strerror or e})",
               "pass a readable Detectron2 .yaml config (and the _BASE_ files it names)")
        return None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        ck.add("model.config", f"{m.config} is not valid YAML{at} ({getattr(e, 'problem', None) or e})",
               "pass a Detectron2 .yaml config (the config.yaml Detectron2's trainer wrote)")
        return None
    except (UnicodeDecodeError, ValueError) as e:
        ck.add("model.config", f"{m.config} is not a Detectron2 config ({e})",
               "pass a Detectron2 .yaml config (the config.yaml Detectron2's trainer wrote)")
        return None

    def get(key: str, default: Any) -> Any:
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    from d2build.families import family

    def first_difference(name: str) -> tuple[str, Any, str] | None:
        """The first key where the config is not what family `name` builds: (key, value, what it is), or None."""
        fam = family(name)
        for key, default, ok, what in fam.structure:
            value = get(key, default)
            if isinstance(value, tuple):
                value = list(value)
            if not (ok(value) if callable(ok) else value in ok):
                return key, value, what
        for key, wanted in (("MODEL.MASK_ON", fam.with_masks), ("MODEL.KEYPOINT_ON", fam.with_keypoints)):
            if bool(get(key, False)) != wanted:
                return key, bool(get(key, False)), "heads"
        return None

    if m.family not in FAMILIES_SUPPORTED:
        return None
    differs = first_difference(m.family)
    if differs is None:
        return get
    fits = [name for name in FAMILIES_SUPPORTED if first_difference(name) is None]
    key, value, what = differs
    # blame whichever of the two the command line changed (the recipe itself is consistent)
    blamed = "model.family" if ck.where("model.family") != ck.recipe_file else "model.config"
    if what == "heads":
        has = {k: bool(get(k, False)) for k in ("MODEL.MASK_ON", "MODEL.KEYPOINT_ON")}
        needs = "; ".join(f"{name}: " + (", ".join(k for k, on in (("MODEL.MASK_ON", family(name).with_masks),
                                                                   ("MODEL.KEYPOINT_ON", family(name).with_keypoints))
                                                   if on) or "neither")
                          for name in FAMILIES_SUPPORTED)
        ck.add(blamed, f"model.config {m.config!r} has {', '.join(f'{k}={v}' for k, v in has.items())}, "
               f"which model.family={m.family} does not build (heads per family: {needs})",
               f"use model.family={fits[0]}" if fits else "pick a config of one of these families")
    elif fits:
        ck.add(blamed, f"model.config {m.config!r} is a {family(fits[0]).described_as} config ({key}={value!r}), "
               f"which model.family={m.family} does not build (families: {', '.join(FAMILIES_SUPPORTED)})",
               f"use model.family={fits[0]}")
    else:
        ck.add("model.config", f"{m.config!r} has {key}={value!r} ({what}); d2build supports {_supported_models()}",
               f"use an FPN config such as {_EXAMPLE_CONFIGS}")
    return None


def _check_names(r: Recipe, get, ck: _Checker) -> None:
    """Class and keypoint names against the Detectron2 config's NUM_CLASSES / NUM_KEYPOINTS."""
    m = r.model
    from d2build.families import family

    key = family(m.family).num_classes_key
    num_classes = int(get(key, 80))
    if m.class_names is not None and len(m.class_names) != num_classes:
        ck.add("model.class_names", f"{len(m.class_names)} names for the {num_classes} classes of {m.config} "
               f"({key})", f"give exactly {num_classes} names, in the model's class order")
    if m.class_names is not None and len(set(m.class_names)) != len(m.class_names):
        ck.add("model.class_names", "has duplicate names", "give each class its own name")
    with_keypoints = m.family in FAMILIES_SUPPORTED and family(m.family).with_keypoints
    for key in ("keypoint_names", "keypoint_skeleton"):
        if getattr(m, key) is not None and not with_keypoints:
            ck.add(f"model.{key}", f"model.family={m.family} has no keypoints", f"remove model.{key}")
    if not with_keypoints:
        return
    k = int(get("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 17))
    if m.keypoint_names is not None and len(m.keypoint_names) != k:
        ck.add("model.keypoint_names", f"{len(m.keypoint_names)} names for the {k} keypoints of {m.config} "
               "(MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS)", f"give exactly {k} names, in the model's keypoint order")
    if m.keypoint_skeleton:
        names = set(m.keypoint_names or ())
        bad = sorted({n for limb in m.keypoint_skeleton for n in limb if n not in names})
        if bad:
            ck.add("model.keypoint_skeleton", f"names {bad} are not in model.keypoint_names", "set "
                   "model.keypoint_names and name limbs by them, e.g. [[apex, left_eave], ...]",
                   set_by="model.keypoint_skeleton")


def _check_eval(r: Recipe, get, ck: _Checker) -> None:
    """eval.*: the annotation file and its images, the candidate floor, keypoint sigmas."""
    e = r.eval
    if e.count < 0:
        ck.add("eval.count", f"{e.count} is negative", "use 0 (every image of the json) or a positive count")
    if not 0 < e.score_floor < 1:
        ck.add("eval.score_floor", f"{e.score_floor} is outside (0, 1)", "use e.g. 0.01")
    elif r.surgery.ops == "plugins" and e.score_floor < plugins.DENSE_MODE_BELOW:
        ck.add("eval.score_floor", f"{e.score_floor} is below {plugins.DENSE_MODE_BELOW}, where EfficientNMS_TRT "
               "pads its output with sub-threshold boxes", f"use >= {plugins.DENSE_MODE_BELOW}")
    if not 1 <= e.max_candidates <= 1000:
        ck.add("eval.max_candidates", f"{e.max_candidates} is outside 1..1000", "use e.g. 1000")
    _check_panoptic(r, ck)
    if e.annotations is None:
        if e.images is not None:
            ck.add("eval.annotations", "eval.images is set but eval.annotations is not",
                   "set eval.annotations=/path/to/instances.json (COCO format)", set_by="eval.images")
        return
    if e.images is None:
        ck.add("eval.images", "eval.annotations is set but eval.images is not",
               "set eval.images to the folder holding the json's file_name images", set_by="eval.annotations")
        return
    path, folder = Path(e.annotations).expanduser(), Path(e.images).expanduser()
    if not path.is_file():
        ck.add("eval.annotations", f"{e.annotations} is not a file", "pass a COCO instances .json")
        return
    if not folder.is_dir():
        ck.add("eval.images", f"{e.images} is not a folder", "pass the folder holding the json's images")
        return
    from d2build.inputs import coco_problem

    problem = coco_problem(path, folder)
    if problem:
        key = "eval.images" if "missing under" in problem else "eval.annotations"
        ck.add(key, f"{e.annotations} {problem}", "fix the json, or point eval.images at the folder that holds "
               "its file_name images")
        return
    if r.surgery.nms.score_threshold < e.score_floor:
        ck.add("surgery.nms.score_threshold", f"{r.surgery.nms.score_threshold} is below eval.score_floor="
               f"{e.score_floor}: the eval candidates keep only scores above the floor",
               "lower eval.score_floor, or raise the threshold")
    if get is not None and m_has_keypoints(r) and not e.keypoint_oks_sigmas:
        k = int(get("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 17))
        if k != 17 and not get("TEST.KEYPOINT_OKS_SIGMAS", []):
            ck.add("eval.keypoint_oks_sigmas", f"the model has {k} keypoints, not COCO's 17, and neither the recipe "
                   "nor the config (TEST.KEYPOINT_OKS_SIGMAS) gives their OKS sigmas",
                   f"set eval.keypoint_oks_sigmas to {k} values (COCO uses 0.025-0.107; 0.05 is typical)")
    if e.keypoint_oks_sigmas and get is not None and m_has_keypoints(r):
        k = int(get("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 17))
        if len(e.keypoint_oks_sigmas) != k:
            ck.add("eval.keypoint_oks_sigmas", f"{len(e.keypoint_oks_sigmas)} sigmas for {k} keypoints",
                   f"give exactly {k}")


def _check_panoptic(r: Recipe, ck: _Checker) -> None:
    """eval.panoptic / eval.panoptic_masks: a COCO panoptic json and its PNG folder, for a model with a semantic head."""
    from d2build.families import family
    from d2build.families.base import Outputs

    e = r.eval
    if e.panoptic is None and e.panoptic_masks is None:
        return
    if e.panoptic is None or e.panoptic_masks is None:
        given, missing = ("eval.panoptic", "eval.panoptic_masks") if e.panoptic else ("eval.panoptic_masks",
                                                                                    "eval.panoptic")
        ck.add(missing, f"{given} is set but {missing} is not", "set both: the COCO panoptic .json and the folder "
               "of its PNGs", set_by=given)
        return
    if r.model.family in FAMILIES_SUPPORTED and Outputs.SEMANTIC not in family(r.model.family).head_outputs:
        ck.add("eval.panoptic", f"model.family={r.model.family} has no semantic head, so no panoptic result to score",
               "remove eval.panoptic, or use model.family=panoptic_fpn")
    if e.annotations is None:
        ck.add("eval.annotations", "eval.panoptic needs eval.annotations and eval.images too (the instances of the same "
               "images: the eval stages run on them)", "set eval.annotations to the COCO instances .json",
               set_by="eval.panoptic")
    path, folder = Path(e.panoptic).expanduser(), Path(e.panoptic_masks).expanduser()
    if not path.is_file():
        ck.add("eval.panoptic", f"{e.panoptic} is not a file", "pass a COCO panoptic .json")
        return
    if not folder.is_dir():
        ck.add("eval.panoptic_masks", f"{e.panoptic_masks} is not a folder", "pass the folder of the json's PNGs")
        return
    import json

    try:
        doc = json.loads(path.read_text())
        files = [a["file_name"] for a in doc["annotations"]]
        assert isinstance(doc["categories"], list) and all("isthing" in c for c in doc["categories"])
    except (ValueError, KeyError, TypeError, AssertionError):
        ck.add("eval.panoptic", f"{e.panoptic} is not a COCO panoptic json (annotations with file_name and "
               "segments_info, categories with isthing)", "pass the panoptic json, e.g. panoptic_val2017.json")
        return
    missing_png = [f for f in files if not (folder / f).is_file()]
    if missing_png:
        ck.add("eval.panoptic_masks", f"{len(missing_png)} of the json's {len(files)} PNGs are missing under "
               f"{e.panoptic_masks} (e.g. {missing_png[0]})", "point eval.panoptic_masks at the folder of the PNGs")


def m_has_keypoints(r: Recipe) -> bool:
    from d2build.families import family

    return r.model.family in FAMILIES_SUPPORTED and family(r.model.family).with_keypoints


def _check_surgery(s: SurgeryConfig, ck: _Checker) -> None:
    _in_unit(ck, "surgery.nms.iou_threshold", s.nms.iou_threshold, 0.5)
    _in_unit(ck, "surgery.nms.score_threshold", s.nms.score_threshold, 0.05)
    _in_unit(ck, "surgery.rpn.iou_threshold", s.rpn.iou_threshold, 0.7)
    if s.ops not in OPS:
        ck.add("surgery.ops", f"unknown graph flavour {s.ops!r}", f"use surgery.ops={'|'.join(OPS)} (plugins: "
               "EfficientNMS_TRT/PyramidROIAlign_TRT; standard: ONNX NonMaxSuppression/RoiAlign)")
        return
    if not 1 <= s.nms.max_detections <= 1000:
        ck.add("surgery.nms.max_detections", f"{s.nms.max_detections} is outside 1..1000", "Detectron2 uses 100")
    if s.ops == "standard":
        from d2build.standard_ops import TOPK_MAX

        for key, v in (("surgery.rpn.pre_nms_topk", s.rpn.pre_nms_topk), ("surgery.rpn.post_nms_topk",
                                                                             s.rpn.post_nms_topk)):
            if not 1 <= v <= TOPK_MAX:
                ck.add(key, f"{v} is outside 1..{TOPK_MAX}, the largest K TensorRT's TopK layer takes",
                       "Detectron2 uses 1000")
        if s.rpn.post_nms_topk > RPN_LEVELS * s.rpn.pre_nms_topk:
            ck.add("surgery.rpn.post_nms_topk", f"{s.rpn.post_nms_topk} is more than the {RPN_LEVELS} levels x "
                   f"pre_nms_topk={s.rpn.pre_nms_topk} candidates", "lower it, or raise surgery.rpn.pre_nms_topk")
        return
    if s.nms.score_threshold < plugins.DENSE_MODE_BELOW:
        ck.add("surgery.nms.score_threshold", f"{s.nms.score_threshold} is below {plugins.DENSE_MODE_BELOW}, where "
               "EfficientNMS_TRT switches to a dense mode that pads its output with sub-threshold boxes",
               f"use a threshold >= {plugins.DENSE_MODE_BELOW} (Detectron2 uses 0.05), or surgery.ops=standard")
    limit = plugins.PRE_NMS_TOPK // RPN_LEVELS
    if not 1 <= s.rpn.pre_nms_topk <= limit:
        ck.add("surgery.rpn.pre_nms_topk", f"{s.rpn.pre_nms_topk} is outside 1..{limit}: {RPN_LEVELS} levels "
               f"must fit EfficientNMS_TRT's {plugins.PRE_NMS_TOPK} pre-NMS slots", "Detectron2 uses 1000")
    if not 1 <= s.rpn.post_nms_topk <= plugins.PRE_NMS_TOPK:
        ck.add("surgery.rpn.post_nms_topk", f"{s.rpn.post_nms_topk} is outside 1..{plugins.PRE_NMS_TOPK}",
               "Detectron2 uses 1000")


def _check_family(r: Recipe, ck: _Checker) -> None:
    """The family's own rules (`Family.recipe_problems`)."""
    if r.model.family not in FAMILIES_SUPPORTED:
        return
    from d2build.families import family

    for key, message, fix in family(r.model.family).recipe_problems(r, ck.default):
        ck.add(key, message, fix)


def _check_rest(r: Recipe, ck: _Checker) -> None:
    if r.model.dynamic is not None and r.surgery.ops != "standard":
        ck.add("model.dynamic", "dynamic input sizes need the standard-op graph: surgery.ops=plugins has a fixed "
               "input size (PyramidROIAlign_TRT's image_size attribute)", "add surgery.ops=standard, or drop "
               "model.dynamic", set_by="model.dynamic")
    if r.precision.mode not in PRECISIONS:
        ck.add("precision.mode", f"unknown precision {r.precision.mode!r}", f"use precision={'|'.join(PRECISIONS)}")
    c = r.calibration
    if c.method not in CALIBRATION_METHODS:
        ck.add("calibration.method", f"unknown method {c.method!r}", f"use one of {', '.join(CALIBRATION_METHODS)}")
    if c.count < 1:
        ck.add("calibration.count", f"{c.count} images cannot calibrate anything", "use calibration.count >= 1")
    if r.precision.mode == "int8" and not c.images:
        ck.add("calibration.images", "precision=int8 needs calibration images and none are set",
               "add calibration=bundled, or calibration.images=/path/to/folder", set_by="precision.mode")
    _check_images(ck, "calibration.images", c.images, c.count)
    if c.images == "bundled" and c.count > len(BUNDLED):
        ck.add("calibration.count", f"{c.count} is more than the {len(BUNDLED)} bundled photographs",
               f"use calibration.count<={len(BUNDLED)} or calibration.images=/path/to/folder")
    for i, item in enumerate(r.precision.keep_fp32):
        if not item.strip():
            ck.add(f"precision.keep_fp32[{i}]", "is empty", "name an op type (Softmax), a node name or a "
                   "pattern of node names (/roi_heads/mask_head/*)")
    rt = r.runtime
    if rt.backend not in RUNTIME_BACKENDS:
        ck.add("runtime.backend", f"unknown backend {rt.backend!r}", f"use runtime.backend={'|'.join(RUNTIME_BACKENDS)}")
    if rt.warmup < 0:
        ck.add("runtime.warmup", f"{rt.warmup} is negative",
               f"use runtime.warmup >= 0 (default {ck.default('runtime.warmup')})")
    if rt.iterations < 1:
        ck.add("runtime.iterations", f"{rt.iterations} measures nothing",
               f"use runtime.iterations >= 1 (default {ck.default('runtime.iterations')})")
    _in_unit(ck, "runtime.score_threshold", rt.score_threshold, ck.default("runtime.score_threshold"),
             "the default is")
    _check_device(rt, ck)
    v = r.verify
    _check_images(ck, "verify.images", v.images, v.count)
    for key in ("iou_threshold", "score_tolerance", "min_recovered", "min_mask_iou", "min_semantic_agreement",
                "segment_iou_threshold", "min_segments_matched"):
        _in_unit(ck, f"verify.{key}", getattr(v, key), ck.default(f"verify.{key}"), "the default is")
    if v.count < 1:
        ck.add("verify.count", f"{v.count} images verify nothing", "use verify.count >= 1")
    if v.min_detections < 1:
        ck.add("verify.min_detections", "a verify that accepts zero detections proves nothing", "use 1 or more")
    for key in ("keypoint_median_px", "keypoint_p95_px"):
        if getattr(v, key) < 0:
            ck.add(f"verify.{key}", f"{getattr(v, key)} is negative", f"use a distance >= 0 px (default "
                   f"{ck.default(f'verify.{key}')})")
    b = r.build
    if b.workspace_gib <= 0:
        ck.add("build.workspace_gib", f"{b.workspace_gib} is not positive", "use e.g. 4")
    if not 0 <= b.optimization_level <= 5:
        ck.add("build.optimization_level", f"{b.optimization_level} is outside 0..5", "TensorRT's default is 3")
    if b.device < 0:
        ck.add("build.device", f"{b.device} is negative", "use a CUDA device index, e.g. build.device=0")
    if r.run.until is not None and r.run.until not in STAGES:
        near = difflib.get_close_matches(r.run.until, STAGES, n=1)
        ck.add("run.until", f"no stage named {r.run.until!r}", (f"did you mean {near[0]}? " if near else "")
               + f"stages: {', '.join(STAGES)}")
    elif r.run.until == "calibration" and r.precision.mode != "int8":
        ck.add("run.until", "calibration runs only at precision=int8", "add precision=int8 calibration=bundled, "
               "or stop at another stage", set_by="run.until")
    elif r.run.until in ("candidates", "eval") and not r.eval.annotations:
        ck.add("run.until", f"{r.run.until} runs only with eval.annotations and eval.images",
               "set them, or stop at another stage", set_by="run.until")
    if r.deploy.triton.model not in TRITON_MODELS:
        ck.add("deploy.triton.model", f"unknown Triton model {r.deploy.triton.model!r}",
               f"use deploy.triton.model={'|'.join(TRITON_MODELS)} (python: ONNX Runtime in a Python-backend model, "
               "for servers without the tensorrt and onnxruntime backends)")
    if not r.cache.dir.strip():
        ck.add("cache.dir", "is empty", "use cache.dir=outputs/cache or another writable folder")
    else:  # a file where the cache folder (or a folder above it) would be: refused before any stage
        here = Path(r.cache.dir).expanduser()
        for part in (here, *here.parents):
            if part.exists():
                if not part.is_dir():
                    what = "is a file" if part == here else f"is inside {part}, which is a file"
                    ck.add("cache.dir", f"{r.cache.dir} {what}, not a folder", "point cache.dir at a folder "
                           "(it is created if missing), e.g. cache.dir=outputs/cache")
                break


def _check_device(rt: RuntimeConfig, ck: _Checker) -> None:
    """runtime.device and runtime.cuda.*: a GPU this machine cannot run a graph on is refused here, in one line,
    before any stage runs (backends/devices.py says what is missing: onnxruntime-gpu, a CUDA device)."""
    from d2build.backends import devices

    for k, message, fix in devices.cuda_option_problems(dataclasses.asdict(rt.cuda)):
        ck.add(f"runtime.cuda.{k}", message, fix)
    try:
        dev = devices.parse(rt.device)
    except devices.DeviceError as e:
        ck.add("runtime.device", str(e).split("; ")[0], "use runtime.device=cpu, cuda or cuda:N")
        return
    if not dev.is_cuda:
        return
    if rt.backend == "reference":
        ck.add("runtime.device", f"{dev} with runtime.backend=reference: d2build's plugin implementations run on the "
               "CPU only", "use runtime.backend=onnxruntime (surgery.ops=standard graphs), or runtime.device=cpu")
        return
    if rt.backend == "detectron2":  # eager runs on torch; backends/detectron2.on_device refuses a missing GPU
        return
    problem = devices.cuda_problem(dev)
    if problem:
        ck.add("runtime.device", f"{dev} asked for, but {problem[0]}", problem[1])


def _check_images(ck: _Checker, key: str, images: str | None, count: int) -> None:
    if images in (None, "bundled"):
        return
    p = Path(images).expanduser()
    if not p.is_dir():
        ck.add(key, f"{images!r} is not `bundled` or an existing folder", f"set {key}=bundled or a folder of images")
        return
    from d2build.inputs import images_problems

    for file, problem in images_problems(str(p), count):
        ck.add(key, f"{file} {problem}", f"remove or replace it ({key} reads the folder's first {count} images "
               "in name order: .jpg, .jpeg, .png, .bmp, .webp)")


def config_setting_notes(r: Recipe) -> list[str]:
    """Where the Detectron2 config sets a test-time threshold other than the recipe's: the recipe's value is
    what the graph and the eager comparison use; say so (a trainer's config dump often sets its own)."""
    if lazyconfig.is_lazy(r.model.config):
        return []  # the recipe's thresholds are set on the built lazy model (model_facts.apply_test_settings)
    local = Path(r.model.config).expanduser()
    zoo = _detectron2_configs_dir()
    path = local if local.is_file() else (zoo / r.model.config if zoo else None)
    if path is None or not path.is_file():
        return []
    try:
        tree = _read_d2_yaml(path)
    except Exception:  # noqa: BLE001 - the schema reported an unreadable config already
        return []
    values = dataclasses.asdict(r)
    notes = []
    if r.model.family not in FAMILIES_SUPPORTED:
        return []
    from d2build.families import family

    for key, d2_key, default in family(r.model.family).test_settings:
        node: Any = tree
        for part in d2_key.split("."):
            node = node.get(part, None) if isinstance(node, dict) else None
        theirs = default if node is None else node
        ours: Any = values
        for part in key.split("."):
            ours = ours[part]
        if float(theirs) != float(ours):
            notes.append(f"{r.model.config} sets {d2_key}={theirs}; the recipe's {key}={ours} is used (graph "
                         "and Detectron2 alike)")
    return notes


def parse_recipe(tree: dict[str, Any], defaults: Callable[[str], Any], *, name: str = "?", source: str = "?",
                 overrides: dict[str, str] | None = None) -> Recipe:
    """Type-check and rule-check a composed config tree; raise RecipeError listing every problem.

    `defaults(key)`: a key's default as conf/ writes it (`compose.conf_default`), for the hints."""
    ck = _Checker(source, dict(overrides or {}), defaults)
    tree = {k: v for k, v in tree.items() if k not in ("hydra", "recipe")}
    _family_from_lazy_config(tree, ck)
    recipe = _build(Recipe, tree, "", ck)
    if recipe is not None:
        recipe = dataclasses.replace(recipe, name=name, source=source)
        get = _check_model(recipe.model, ck)
        if get is not None:
            _check_names(recipe, get, ck)
        _check_surgery(recipe.surgery, ck)
        _check_family(recipe, ck)
        _check_eval(recipe, get, ck)
        _check_rest(recipe, ck)
    if ck.problems:
        raise RecipeError(ck.problems)
    assert recipe is not None
    return recipe
