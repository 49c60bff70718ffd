"""The recipe as typed data: its sections, the slices each stage reads, the stage and artifact names.

A leaf module: it imports nothing of d2build, so every layer may import it. `schema` turns a
composed Hydra tree into a `Recipe` (and rejects what no stage could build), `compose` does the
composing, the stages read the slices below. A stage's slice is all it reads of a recipe; its cache
key is the sha256 of the slice (as JSON), of its upstream keys and of its VERSION, so a slice
holds exactly what changes the stage's output and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: Every stage of the DAG, in order (`run.until` names one of them). Graphs derived for one consumer
#: run as extra nodes named `<stage>[<consumer>]` (see d2build/pipeline.py).
STAGES = ("weights", "export", "surgery", "calibration", "precision", "verify", "build", "check", "candidates", "eval")
PRECISIONS = ("fp32", "fp16", "int8")
#: graph flavours (`surgery.ops`): TensorRT plugin nodes, or ONNX ops TensorRT's parser imports natively
OPS = ("plugins", "standard")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: deploy.triton.model: what runs the graph in a bundle's Triton repository (deploy/triton.py resolves "auto")
TRITON_MODELS = ("auto", "tensorrt", "onnxruntime", "python")
#: keys that moved: old key -> (new key, why)
MOVED = {"build.batch_size": ("model.batch_size", "the batch is part of the graph, so it is part of its cache keys")}


class Files:
    """The file names stages publish in their cache entries (one place for each)."""

    WEIGHTS = "model.pth"
    GRAPH = "model.onnx"  # export, surgery, precision
    RANGES = "ranges.json"  # calibration
    ENGINE = "engine.plan"
    TIMING_CACHE = "timing.cache"
    IO = "io.json"
    REPORT = "report.md"
    METRICS = "metrics.json"
    PICTURES = "pictures"


# ---------------------------------------------------------------------------------- recipe sections

@dataclass(frozen=True)
class DynamicConfig:
    """Input sizes a standard-op graph takes: each image is resized as Detectron2's ResizeShortestEdge does
    (short side min_size, long side at most max_size) and padded to a multiple of 32."""

    min: tuple[int, int]  # smallest [H, W] (the TensorRT optimization profile's min)
    max: tuple[int, int]  # largest [H, W] (its max; model.input is its opt)
    min_size: int | None = None  # None: the Detectron2 config's INPUT.MIN_SIZE_TEST
    max_size: int | None = None  # None: INPUT.MAX_SIZE_TEST


#: model.config_overrides as the recipe holds them: (dotted key, value) pairs sorted by key, lists as tuples
ConfigOverrides = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ModelConfig:
    family: str
    config: str
    weights: str
    input: tuple[int, int]
    batch_size: int  # images per inference: the graph's (and engine's) first input dimension
    dynamic: DynamicConfig | None  # None: one fixed input size (model.input), images letterboxed into it
    seed: int
    class_names: tuple[str, ...] | None  # None: from Detectron2's dataset metadata
    keypoint_names: tuple[str, ...] | None  # keypoint families; None: metadata, or COCO's 17
    keypoint_skeleton: tuple[tuple[str, str], ...] | None  # limbs as pairs of keypoint names
    #: a LazyConfig's dotted keys and values (model.config_overrides={model.backbone.square_pad:512}), sorted
    config_overrides: "ConfigOverrides" = ()


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
    ops: str  # plugins (EfficientNMS_TRT, PyramidROIAlign_TRT) | standard (NonMaxSuppression, RoiAlign)
    nms: NmsConfig
    rpn: RpnConfig


@dataclass(frozen=True)
class PrecisionConfig:
    mode: str
    keep_fp32: tuple[str, ...]


@dataclass(frozen=True)
class CalibrationConfig:
    images: str | None
    count: int
    method: str


@dataclass(frozen=True)
class BuildConfig:
    workspace_gib: float
    optimization_level: int
    required: bool
    device: int  # CUDA device index the engine is built for (and whose lock is taken)
    tf32: bool  # fp32 layers in TF32 (BuilderFlag.TF32, TensorRT's default); false: fp32 is fp32


@dataclass(frozen=True)
class CudaConfig:
    """runtime.cuda.*: ONNX Runtime's CUDA provider options (backends/devices.py passes them on)."""

    cudnn_conv_algo_search: str  # auto (HEURISTIC for float16 graphs) | EXHAUSTIVE | HEURISTIC | DEFAULT
    cudnn_conv_use_max_workspace: bool
    prefer_nhwc: bool
    gpu_mem_limit_gib: float | None  # None: no limit


@dataclass(frozen=True)
class RuntimeConfig:
    """How `d2build infer/bench/eval` run a model (not part of any cache key)."""

    backend: str  # tensorrt (the built engine) | reference | onnxruntime (the precision graph, CPU or GPU)
    warmup: int
    iterations: int
    cuda_graph: bool
    score_threshold: float  # infer: detections drawn in pictures (all are written to JSON)
    device: str  # cpu | cuda | cuda:N: where runtime.backend=onnxruntime runs the graph
    tf32: bool  # cuda: TF32 convolutions/matmuls in ONNX Runtime (use_tf32) and Detectron2 eager
    cuda: CudaConfig


@dataclass(frozen=True)
class VerifyConfig:
    images: str
    count: int
    iou_threshold: float
    score_tolerance: float
    min_recovered: float
    min_mask_iou: float
    min_detections: int
    keypoint_median_px: float
    keypoint_p95_px: float
    min_semantic_agreement: float  # semantic heads: share of pixels of Detectron2's class, per image
    segment_iou_threshold: float  # panoptic: a segment matches one of the same category at this IoU ...
    min_segments_matched: float  # ... and this share of Detectron2's segments must match, per image


@dataclass(frozen=True)
class EvalConfig:
    """COCO evaluation as a stage of the DAG (candidates + eval), when `annotations` is set."""

    annotations: str | None  # COCO instances json (with keypoints for keypoint families)
    images: str | None  # folder holding the json's file_name images
    count: int  # the first N images of the json (by id); 0: all
    keypoint_oks_sigmas: tuple[float, ...] | None  # per keypoint; None: the config's, or COCO's for 17
    score_floor: float  # candidates keep every score above this (NMS variants need thresholds >= it)
    max_candidates: int  # per image
    panoptic: str | None  # COCO panoptic json of the same images: PQ/SQ/RQ (models with a semantic head)
    panoptic_masks: str | None  # folder of its segment-id PNGs (the json's annotations' file_name)


@dataclass(frozen=True)
class CacheConfig:
    dir: str


@dataclass(frozen=True)
class RunConfig:
    """This run only; never part of a cache key."""

    until: str | None  # stop after this stage and what it needs (`--until STAGE`)
    verbose: bool  # `-v`: third-party warnings and notices stay on


@dataclass(frozen=True)
class TritonDeployConfig:
    model: str  # what runs the graph in the bundle's Triton repository: auto|tensorrt|onnxruntime|python


@dataclass(frozen=True)
class DeployConfig:
    """`d2build deploy` (part of the bundle's model.json and key, of no stage's cache key)."""

    triton: TritonDeployConfig


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    surgery: SurgeryConfig
    precision: PrecisionConfig
    calibration: CalibrationConfig
    build: BuildConfig
    verify: VerifyConfig
    eval: EvalConfig
    cache: CacheConfig
    runtime: RuntimeConfig
    run: RunConfig
    deploy: DeployConfig
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


# ---------------------------------------------------------------------------------- stage slices


@dataclass(frozen=True)
class ConfigRef:
    """How a key names the Detectron2 config: a model-zoo name as it is (its content is fixed by the
    sal-detectron2 version), a local file also by the sha256 of it and of the _BASE_ files it names,
    so editing a user's config rebuilds what depends on it."""

    name: str
    sha256: str | None = None
    #: a LazyConfig's model.config_overrides (in keys only when set: yacs configs' keys are unchanged)
    overrides: ConfigOverrides = field(default=(), metadata={"key": "omit_default"})

    @classmethod
    def of(cls, config: str, overrides: ConfigOverrides = ()) -> "ConfigRef":
        path = Path(config).expanduser()
        if not path.is_file():
            return cls(config, overrides=tuple(overrides))
        h = hashlib.sha256()
        for p in (lazy_config_files(path) if path.suffix == ".py" else config_chain(path)):
            h.update(p.read_bytes())
        return cls(config, h.hexdigest(), tuple(overrides))

    @property
    def overrides_dict(self) -> dict[str, Any]:
        """The overrides as LazyConfig values (tuples back to lists)."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, tuple) else v
        return {k: plain(v) for k, v in self.overrides}


def lazy_config_files(path: Path, depth: int = 0) -> list[Path]:
    """A local LazyConfig .py and the local config files it imports relatively (`from .common.x import y`,
    `from ..models import z`), which LazyConfig.load resolves next to it: their bytes key what is built from it.
    Absolute imports (model_zoo.get_config, detectron2's own modules) are fixed by the installed versions."""
    import ast

    files = [path]
    if depth > 10:
        return files
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError):
        return files  # LazyConfig.load reports it
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            parts = (node.module or "").split(".") if node.module else []
            stem = base.joinpath(*parts) if parts else base
            candidates = [stem.with_suffix(".py")] if parts else []
            candidates += [stem / f"{a.name}.py" for a in node.names]
            for c in candidates:
                if c.is_file() and c.resolve() not in {f.resolve() for f in files}:
                    files += lazy_config_files(c, depth + 1)
    return files


def config_chain(path: Path, depth: int = 0) -> list[Path]:
    """A yacs config file and the _BASE_ files it inherits from, child first."""
    import yaml

    class Loader(yaml.SafeLoader):  # Detectron2 dumps may hold !!python tags: never construct them
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    tree = yaml.load(path.read_text(), Loader=Loader) or {}  # noqa: S506 - a SafeLoader subclass
    base = tree.get("_BASE_") if isinstance(tree, dict) else None
    if not base or depth > 10:
        return [path]
    base_path = (path.parent / Path(base).expanduser()).resolve()
    return [path, *(config_chain(base_path, depth + 1) if base_path.is_file() else [])]


@dataclass(frozen=True)
class Names:
    """What a model's classes and keypoints are called (pictures, JSON, eval); None: Detectron2's metadata."""

    class_names: tuple[str, ...] | None = None
    keypoint_names: tuple[str, ...] | None = None
    keypoint_skeleton: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class GraphSpec:
    """What a TensorRT-ready graph is made from: surgery's slice, and the graph half of a model slice."""

    family: str
    config: ConfigRef
    input: tuple[int, int]
    batch: int
    dynamic: DynamicConfig | None
    surgery: SurgeryConfig

    @classmethod
    def of(cls, recipe: "Recipe") -> "GraphSpec":
        m = recipe.model
        return cls(m.family, ConfigRef.of(m.config, m.config_overrides), m.input, m.batch_size, m.dynamic,
                   recipe.surgery)

    @property
    def ops(self) -> str:
        return self.surgery.ops


@dataclass(frozen=True)
class ModelSlice:
    """A built graph as a model: the graph it is and the names of what it finds (`detectron.model_info` turns
    it into the runtime's ModelInfo)."""

    graph: GraphSpec
    names: Names = Names()

    @classmethod
    def of(cls, recipe: "Recipe", graph: GraphSpec | None = None) -> "ModelSlice":
        m = recipe.model
        return cls(graph or GraphSpec.of(recipe), Names(m.class_names, m.keypoint_names, m.keypoint_skeleton))

    @property
    def family(self) -> str:
        return self.graph.family

    @property
    def config(self) -> str:
        return self.graph.config.name


def as_key_data(slice_: Any) -> Any:
    """A slice as plain JSON-able data (for cache keys and manifests). A field declared with
    `metadata={"key": "omit_default"}` is left out while it holds its default, so adding one keeps every
    existing key (ConfigRef.overrides)."""
    if not dataclasses.is_dataclass(slice_):
        return slice_
    data = dataclasses.asdict(slice_)
    _drop_defaults(slice_, data)
    return data


def _drop_defaults(obj: Any, data: Any) -> None:
    if dataclasses.is_dataclass(obj) and isinstance(data, dict):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("key") == "omit_default" and value == f.default:
                data.pop(f.name, None)
            elif f.name in data:
                _drop_defaults(value, data[f.name])
    elif isinstance(obj, (list, tuple)) and isinstance(data, (list, tuple)):
        for o, d in zip(obj, data):
            _drop_defaults(o, d)
    elif isinstance(obj, dict) and isinstance(data, dict):
        for k, o in obj.items():
            if k in data:
                _drop_defaults(o, data[k])


@dataclass(frozen=True)
class RandomWeights:
    """`model.weights=random`: the seed and every constant that shapes seeded weights that behave."""

    seed: int
    bn_photo: str
    residual_branch_scale: float
    predictor_spread: Mapping[str, float]
    family: str | None = None  # set when the family adjusts random weights itself (family_random)
    family_random: Mapping[str, Any] | None = None
    #: a LazyConfig model's scheme (random_norms.behave: every norm over whole inference passes); yacs: None
    norms: Mapping[str, Any] | None = field(default=None, metadata={"key": "omit_default"})


@dataclass(frozen=True)
class WeightsSlice:
    config: ConfigRef
    weights: str  # `random`, a URL or a local file
    weights_sha256: str | None = None  # a local file's content
    random: RandomWeights | None = None


@dataclass(frozen=True)
class ExportSlice:
    family: str
    config: ConfigRef
    input: tuple[int, int]


@dataclass(frozen=True)
class GraphDevice:
    """Where a stage runs a standard-op graph, and Detectron2 eager beside it: runtime.device on a GPU, with
    runtime.tf32 (both sides) and the CUDA provider's options. In a slice only when it applies (a GPU and a
    standard-op graph; plugin graphs run on d2build's CPU reference): None is the CPU, so runtime.* on a CPU
    never enters a key."""

    device: str
    tf32: bool
    cuda: CudaConfig

    @classmethod
    def of(cls, recipe: "Recipe") -> "GraphDevice | None":
        rt = recipe.runtime
        if rt.device == "cpu" or recipe.surgery.ops != "standard":
            return None
        return cls(rt.device, rt.tf32, rt.cuda)


#: (name, sha256 of the decoded pixels) of each image a stage reads
ImageDigests = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CalibrationSlice:
    """int8 ranges: the graph comes in as an input (its identity is in the key); this is how it is fed."""

    config: ConfigRef  # pixel mean of the letterbox padding
    input: tuple[int, int]
    method: str
    count: int
    source: str  # `bundled` or a folder
    images: ImageDigests
    device: GraphDevice | None  # None: the CPU


@dataclass(frozen=True)
class VerifySlice:
    """verify (and the engine check): the model, its precision, the gates, the photographs."""

    model: ModelSlice
    precision: str
    verify: VerifyConfig
    images: ImageDigests
    device: GraphDevice | None  # None: the CPU (both sides)


@dataclass(frozen=True)
class BuildSlice:
    settings: Mapping[str, Any]  # backends.tensorrt.BuilderSettings without the device index
    tensorrt: str | None
    compute_capability: str | None


@dataclass(frozen=True)
class EvalImages:
    """The user's annotated images, keyed by content (a replaced image rebuilds what read it)."""

    annotations: str  # resolved path
    annotations_sha256: str
    images: str  # resolved folder
    count: int
    images_sha256: str


@dataclass(frozen=True)
class CandidatesSlice:
    model: ModelSlice  # the candidate graph: final NMS at the score floor, suppressing nothing
    precision: str
    data: EvalImages
    device: GraphDevice | None  # None: the CPU (every side)


@dataclass(frozen=True)
class PanopticTruth:
    """A COCO panoptic ground truth, keyed by content: the json and the bytes of its PNGs."""

    annotations: str  # resolved path of the json
    annotations_sha256: str
    masks: str  # resolved folder of its PNGs
    masks_sha256: str


@dataclass(frozen=True)
class EvalSlice:
    """The eval images come in with the candidates (their key holds them)."""

    model: ModelSlice  # the recipe's final NMS, applied to the candidates
    keypoint_oks_sigmas: tuple[float, ...] | None
    panoptic: PanopticTruth | None = None  # PQ/SQ/RQ where eval.panoptic is set
