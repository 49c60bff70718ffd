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
from typing import Any

from d2build.families import FAMILIES  # noqa: E402 - a dict of names, no torch or Detectron2 import

FAMILIES_SUPPORTED = tuple(FAMILIES)
FAMILIES_KNOWN = ("mask_rcnn", "keypoint_rcnn", "faster_rcnn")
PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# EfficientNMS_TRT considers at most this many (box, class) candidates before NMS on
# desktop/datacenter GPUs; a graph that needs more cannot reproduce Detectron2.
PLUGIN_PRE_NMS_LIMIT = 5000
RPN_LEVELS = 5  # P2..P6 for every FPN recipe d2build supports
# Below this score threshold EfficientNMS_TRT keeps sub-threshold candidates as output padding.
DENSE_MODE_BELOW = 0.007


@dataclass(frozen=True)
class ModelConfig:
    family: str
    config: str
    weights: str
    input: tuple[int, int]
    seed: int = 0


@dataclass(frozen=True)
class NmsConfig:
    iou_threshold: float
    score_threshold: float
    max_detections: int


@dataclass(frozen=True)
class RpnConfig:
    pre_nms_topk: int
    post_nms_topk: int
    iou_threshold: float


@dataclass(frozen=True)
class SurgeryConfig:
    nms: NmsConfig
    rpn: RpnConfig


@dataclass(frozen=True)
class PrecisionConfig:
    mode: str
    keep_fp32: tuple[str, ...] = ()


@dataclass(frozen=True)
class CalibrationConfig:
    images: str | None
    count: int
    method: str


@dataclass(frozen=True)
class BuildConfig:
    batch_size: int
    workspace_gib: float
    optimization_level: int
    required: bool


@dataclass(frozen=True)
class VerifyConfig:
    images: str
    count: int
    iou_threshold: float
    score_tolerance: float
    min_recovered: float
    min_mask_iou: float
    min_detections: int


@dataclass(frozen=True)
class CacheConfig:
    dir: str


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    surgery: SurgeryConfig
    precision: PrecisionConfig
    calibration: CalibrationConfig
    build: BuildConfig
    verify: VerifyConfig
    cache: CacheConfig
    name: str = "?"  # recipe name (the `recipe` group choice)
    source: str = "?"  # the recipe file, for messages

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Problem:
    source: str  # recipe file, or "command line"
    key: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}. Fix: {self.fix}"


class RecipeError(ValueError):
    """A recipe that cannot be built; carries every problem found, one line each."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class _Checker:
    """Collects problems; `where(key)` says which file (or the command line) set a key."""

    recipe_file: str
    overrides: dict[str, str] = field(default_factory=dict)
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
        if k not in fields:
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

_ZOO_UNSUPPORTED = re.compile(r"(_C4_|_DC5_|[Cc]ascade|LVIS|Panoptic|Cityscapes|[Rr]otated|\.py$)")


def _detectron2_configs_dir() -> Path | None:
    """The model-zoo config folder inside the installed detectron2, found without importing it."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_zoo" / "configs"


def _in_unit(ck: _Checker, key: str, v: float, default: float, who: str = "Detectron2 uses") -> None:
    if not 0.0 <= v <= 1.0:
        ck.add(key, f"{v} is outside [0, 1]", f"set a value between 0 and 1 ({who} {default})")


def _check_model(m: ModelConfig, ck: _Checker) -> None:
    if m.family not in FAMILIES_KNOWN:
        ck.add("model.family", f"unknown family {m.family!r}", f"use one of: {', '.join(FAMILIES_SUPPORTED)}")
    elif m.family not in FAMILIES_SUPPORTED:
        ck.add("model.family", f"{m.family!r} is not supported by this version of d2build",
               f"use one of: {', '.join(FAMILIES_SUPPORTED)}")
    if _ZOO_UNSUPPORTED.search(m.config):
        ck.add("model.config", f"{m.config!r} is not an FPN R-CNN yacs config d2build can surgery "
               "(C4, DC5, cascade, LazyConfig .py and rotated models are not supported)",
               "use an FPN config such as COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    elif not m.config.endswith(".yaml"):
        ck.add("model.config", f"{m.config!r} is not a .yaml config", "name a model-zoo .yaml config or a local .yaml file")
    else:
        local = Path(m.config).expanduser()
        zoo = _detectron2_configs_dir()
        in_zoo = zoo is not None and (zoo / m.config).is_file()
        if not local.is_file() and not in_zoo:
            where = f"under {zoo}" if zoo else "(detectron2 is not installed)"
            ck.add("model.config", f"{m.config!r} is neither a local file nor a model-zoo config {where}",
                   "check the spelling, e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    w = m.weights
    if w != "random" and not re.match(r"^https?://", w):
        p = Path(w).expanduser()
        if not p.is_file():
            ck.add("model.weights", f"{w!r} is not `random`, a URL, or an existing file",
                   "pass model.weights=random, a local .pkl/.pth path, or a model-zoo URL")
        elif p.suffix not in (".pkl", ".pth", ".pt"):
            ck.add("model.weights", f"{w!r} has an unknown suffix {p.suffix!r}", "use a .pkl (model zoo) or .pth checkpoint")
    for i, side in enumerate(m.input):
        key = f"model.input[{i}]"
        if not 256 <= side <= 2048:
            ck.add(key, f"{side} is outside 256..2048", "pick a size between 256 and 2048 pixels")
        elif side % 32:
            lo, hi = side // 32 * 32, (side // 32 + 1) * 32
            ck.add(key, f"{side} is not divisible by 32 (the FPN's largest stride)", f"use {lo} or {hi}")
    if m.seed < 0:
        ck.add("model.seed", f"{m.seed} is negative", "use a seed >= 0")


def _check_surgery(s: SurgeryConfig, ck: _Checker) -> None:
    _in_unit(ck, "surgery.nms.iou_threshold", s.nms.iou_threshold, 0.5)
    _in_unit(ck, "surgery.nms.score_threshold", s.nms.score_threshold, 0.05)
    _in_unit(ck, "surgery.rpn.iou_threshold", s.rpn.iou_threshold, 0.7)
    if s.nms.score_threshold < DENSE_MODE_BELOW:
        ck.add("surgery.nms.score_threshold", f"{s.nms.score_threshold} is below {DENSE_MODE_BELOW}, where "
               "EfficientNMS_TRT switches to a dense mode that pads its output with sub-threshold boxes",
               f"use a threshold >= {DENSE_MODE_BELOW} (Detectron2 uses 0.05)")
    if not 1 <= s.nms.max_detections <= 1000:
        ck.add("surgery.nms.max_detections", f"{s.nms.max_detections} is outside 1..1000", "Detectron2 uses 100")
    limit = PLUGIN_PRE_NMS_LIMIT // RPN_LEVELS
    if not 1 <= s.rpn.pre_nms_topk <= limit:
        ck.add("surgery.rpn.pre_nms_topk", f"{s.rpn.pre_nms_topk} is outside 1..{limit}: {RPN_LEVELS} levels "
               f"must fit EfficientNMS_TRT's {PLUGIN_PRE_NMS_LIMIT} pre-NMS slots", "Detectron2 uses 1000")
    if not 1 <= s.rpn.post_nms_topk <= PLUGIN_PRE_NMS_LIMIT:
        ck.add("surgery.rpn.post_nms_topk", f"{s.rpn.post_nms_topk} is outside 1..{PLUGIN_PRE_NMS_LIMIT}",
               "Detectron2 uses 1000")


def _check_rest(r: Recipe, ck: _Checker) -> None:
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
    _check_images(ck, "calibration.images", c.images)
    v = r.verify
    _check_images(ck, "verify.images", v.images)
    for key in ("iou_threshold", "score_tolerance", "min_recovered", "min_mask_iou"):
        _in_unit(ck, f"verify.{key}", getattr(v, key), getattr(_VERIFY_DEFAULTS, key), "the default is")
    if v.count < 1:
        ck.add("verify.count", f"{v.count} images verify nothing", "use verify.count >= 1")
    if v.min_detections < 1:
        ck.add("verify.min_detections", "a verify that accepts zero detections proves nothing", "use 1 or more")
    b = r.build
    if b.batch_size != 1:
        ck.add("build.batch_size", f"{b.batch_size}: only batch size 1 is supported so far", "use build.batch_size=1")
    if b.workspace_gib <= 0:
        ck.add("build.workspace_gib", f"{b.workspace_gib} is not positive", "use e.g. 4")
    if not 0 <= b.optimization_level <= 5:
        ck.add("build.optimization_level", f"{b.optimization_level} is outside 0..5", "TensorRT's default is 3")
    if not r.cache.dir.strip():
        ck.add("cache.dir", "is empty", "use cache.dir=outputs/cache or another writable folder")


def _check_images(ck: _Checker, key: str, images: str | None) -> None:
    if images in (None, "bundled"):
        return
    p = Path(images).expanduser()
    if not p.is_dir():
        ck.add(key, f"{images!r} is not `bundled` or an existing folder", f"set {key}=bundled or a folder of images")


_VERIFY_DEFAULTS = VerifyConfig("bundled", 3, 0.98, 0.01, 0.99, 0.95, 1)


def parse_recipe(tree: dict[str, Any], *, name: str = "?", source: str = "?",
                 overrides: dict[str, str] | None = None) -> Recipe:
    """Type-check and rule-check a composed config tree; raise RecipeError listing every problem."""
    ck = _Checker(source, dict(overrides or {}))
    tree = {k: v for k, v in tree.items() if k not in ("hydra", "recipe")}
    recipe = _build(Recipe, tree, "", ck)
    if recipe is not None:
        recipe = dataclasses.replace(recipe, name=name, source=source)
        _check_model(recipe.model, ck)
        _check_surgery(recipe.surgery, ck)
        _check_rest(recipe, ck)
    if ck.problems:
        raise RecipeError(ck.problems)
    assert recipe is not None
    return recipe
