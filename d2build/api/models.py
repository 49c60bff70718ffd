"""Running a built model from Python: `load` and the `Model` and `Detections` it gives.

`load` opens what the command line opens: a Build's precision graph (or its engine where TensorRT and
a GPU are here) through `commands/_runtime.open_model`, a deploy bundle through `deploy.load_bundle`
(files checked against the bundle's manifest), or a bare .onnx/.plan given with its ModelInfo. The
Model wraps the runtime's `runtime.Model` (letterbox -> backend -> the family's decode), so its
detections are what `d2build infer`, verify and a deployed bundle compute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, cast, overload

import numpy as np
from PIL import Image

from d2build.api.errors import InputError, ModelUnavailable, Problem
from d2build.processing import Detections as _Detections
from d2build.recipe import Files
from d2build.runtime.info import ModelInfo

if TYPE_CHECKING:
    from d2build.api.builds import Build

#: an image: a file path, a PIL image (EXIF orientation applied, any mode converted to RGB, as for a file),
#: or an [h, w, 3] uint8 array in BGR order (OpenCV's)
ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
BACKENDS = ("auto", "tensorrt", "onnxruntime", "reference", "detectron2")
DEVICES = ("cpu", "cuda", "cuda:N")  # cuda: ONNX Runtime's CUDA provider (onnxruntime-gpu) for a standard-op graph


@dataclass(frozen=True)
class Detection:
    """One detection, in original-image pixels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    class_id: int
    class_name: str
    mask: np.ndarray | None = None  # bool [h, w] (mask families)
    keypoints: np.ndarray | None = None  # float32 [K, 3] x, y, score (keypoint families)


@dataclass(eq=False, repr=False)
class Detections(_Detections):
    """The detections of one image, in its original pixels: `boxes` float32 [N, 4] (x1, y1, x2, y2),
    `scores` [N], `classes` int64 [N], `class_names` (one per detection), `masks` bool [N, h, w] for mask
    families, `keypoints` float32 [N, K, 3] for keypoint families (else None), `segmentation` the image's semantic
    and panoptic maps for Panoptic FPN (processing.Segmentation, else None); `image_hw` the image's
    size. Iterating gives `Detection`s; `above(score)` a subset; `to_dict()` `d2build infer`'s JSON."""

    info: ModelInfo | None = None  # the model's names (class, keypoint) and mask threshold
    image_hw: tuple[int, int] = (0, 0)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self._name(int(c)) for c in self.classes)

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        return tuple(self.info.keypoint_names) if self.info is not None else ()

    def _name(self, k: int) -> str:
        return self.info.class_name(k) if self.info is not None else f"class {k}"

    def subset(self, index: Any) -> Detections:
        """The detections a numpy index selects (a boolean mask, indices or a slice)."""
        base = _Detections.subset(self, index)
        return Detections(base.boxes, base.scores, base.classes, base.masks, base.keypoints, base.segmentation, self.info,
                          self.image_hw)

    def above(self, score: float) -> Detections:
        """The detections scoring at least `score`."""
        return self.subset(self.scores >= score)

    def __iter__(self) -> Iterator[Detection]:
        for k in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[k])
            yield Detection((x1, y1, x2, y2), float(self.scores[k]), int(self.classes[k]),
                            self._name(int(self.classes[k])),
                            None if self.masks is None else self.masks[k],
                            None if self.keypoints is None else self.keypoints[k])

    def to_dict(self, name: str = "image") -> dict[str, Any]:
        """`d2build infer`'s per-image JSON: boxes, scores, class ids and names, masks as COCO RLE, keypoints."""
        from d2build.deploy.runtime import detections_to_dict

        if self.info is None:
            raise ValueError("to_dict needs the model's names: use detections from Model.detect")
        return detections_to_dict(name, self, self.image_hw, self.info)

    def __repr__(self) -> str:
        top = ", ".join(f"{d.class_name} {d.score:.2f}" for _, d in zip(range(3), self))
        more = f", +{len(self) - 3} more" if len(self) > 3 else ""
        return f"Detections({len(self)} in {self.image_hw[0]}x{self.image_hw[1]}: {top}{more})"

    def __str__(self) -> str:
        extra = [w for w, v in (("masks", self.masks), ("keypoints", self.keypoints)) if v is not None]
        lines = [f"{len(self)} detections in a {self.image_hw[1]}x{self.image_hw[0]} (WxH) image"
                 + (f", with {' and '.join(extra)}" if extra else "")]
        for k, d in enumerate(self):
            if k == 10:
                lines.append(f"  ... {len(self) - 10} more")
                break
            lines.append(f"  {d.score:.3f}  {d.class_name:<16} [{', '.join(f'{v:.1f}' for v in d.box)}]")
        return "\n".join(lines)


def _problem(source: str, message: str, fix: str) -> InputError:
    return InputError([Problem(source, "image", message, fix)])


_IMAGE_FIX = "pass an image file (JPEG, PNG, ...), a PIL image or an [h, w, 3] uint8 BGR array"


def read_image(image: ImageLike, name: str = "image") -> tuple[np.ndarray, str]:
    """(uint8 BGR [h, w, 3], a name for messages) for an ImageLike; InputError naming what is wrong."""
    from d2build.processing import apply_exif_orientation, load_image_bgr

    if isinstance(image, Image.Image):
        rgb = np.asarray(apply_exif_orientation(image).convert("RGB"))
        return np.ascontiguousarray(rgb[:, :, ::-1]), name
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise _problem(name, f"an array of shape {list(image.shape)} and dtype {image.dtype}, not [h, w, 3] "
                           "uint8 BGR", _IMAGE_FIX)
        return np.ascontiguousarray(image), name
    if isinstance(image, (str, os.PathLike)):
        from d2build.inputs import image_problem

        path = Path(image).expanduser()
        if not path.is_file():
            raise _problem(str(path), "no such file", "check the path (relative paths are taken from the working "
                           f"directory, {Path.cwd()})")
        problem = image_problem(path)
        if problem:
            raise _problem(str(path), problem, _IMAGE_FIX)
        return load_image_bgr(path), str(path)
    raise _problem(name, f"a {type(image).__name__}", _IMAGE_FIX)


class Model:
    """A built model that detects. `detect(image)` -> Detections, `detect_batch(images)` -> one per image
    (in batches of the model's batch size), `draw(image, detections)` -> a PIL image. `info` says what the
    model is (family, input size, class names), `backend` what runs it, `path` its graph or engine."""

    def __init__(self, inner: Any, bundle: Any = None):
        self._inner = inner  # runtime.Model, or backends.detectron2.EagerModel
        self.bundle = bundle  # the deploy.bundle.Bundle it was loaded from, if any

    @property
    def info(self) -> ModelInfo:
        return cast(ModelInfo, self._inner.info)

    @property
    def backend(self) -> str:
        return str(self._inner.backend)

    @property
    def path(self) -> Path | None:
        p = self._inner.path
        return Path(p) if p is not None else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.info.class_names

    def __repr__(self) -> str:
        h, w = self.info.input_hw
        return f"Model({self.info.family} {h}x{w}, {self.backend} backend, {self.path or self._inner.source})"

    def detect(self, image: ImageLike) -> Detections:
        """The detections of one image, in its own pixels."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[ImageLike]) -> list[Detections]:
        """The detections of each image (run `info.batch` at a time; a short last batch is padded)."""
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            raise TypeError("detect_batch takes a list of images; use detect() for one")
        read = [read_image(im, f"images[{i}]") for i, im in enumerate(images)]
        if not read:
            return []
        info = self.info
        if info.resize != "letterbox":  # a dynamic graph: each image's input size must be in its range
            from d2build.runtime.model import outside_range, range_problem

            sizes = {name: (int(bgr.shape[0]), int(bgr.shape[1])) for bgr, name in read}
            outside = outside_range(info, sizes)
            if outside:
                message, fix = range_problem(info, outside, len(sizes))
                raise InputError([Problem(next(iter(outside)), "image", message, fix)])
        dets, _, _ = self._inner.detect_batch([bgr for bgr, _ in read])
        return [Detections(d.boxes, d.scores, d.classes, d.masks, d.keypoints, d.segmentation, info,
                           (int(bgr.shape[0]), int(bgr.shape[1]))) for d, (bgr, _) in zip(dets, read)]

    def draw(self, image: ImageLike, detections: _Detections, *, score_threshold: float | None = None,
             title: str | None = None) -> Image.Image:
        """The image with the detections drawn (boxes and labels, masks, keypoints and limbs), RGB, its own
        size; `score_threshold`: only those scoring at least that."""
        from d2build.visualize import draw_detections

        bgr, _ = read_image(image)
        if score_threshold is not None:
            detections = detections.subset(detections.scores >= score_threshold)
        return draw_detections(bgr, detections, self.info.class_names, title,
                               skeleton=self.info.keypoint_skeleton)


# ---------------------------------------------------------------------------------- load


def _check_device(device: Any, backend: str) -> str:
    """`device` as d2build writes it (cpu | cuda:N); ValueError for a name that is not a device, or a GPU with
    the reference backend (d2build's plugin implementations run on the CPU)."""
    from d2build.backends import devices

    try:
        dev = devices.parse(device)
    except devices.DeviceError as e:
        raise ValueError(f"device={device!r}: {str(e).split('; ', 1)[-1]}") from None
    if dev.is_cuda and backend == "reference":
        raise ValueError(f"device={device!r} with backend='reference': d2build's plugin implementations run on the "
                         "CPU; use backend='onnxruntime' (a standard-op graph) or device='cpu'")
    return str(dev)


def _graph_on_gpu(device: str) -> None:
    """ModelUnavailable, in one line, when ONNX Runtime cannot run a graph on `device` here."""
    from d2build.backends import devices

    problem = devices.cuda_problem(devices.parse(device))
    if problem:
        raise ModelUnavailable(f"device={device!r}: {problem[0]}; {problem[1]}")


def _info_from(info: ModelInfo | Mapping[str, Any] | str | os.PathLike[str]) -> ModelInfo:
    if isinstance(info, ModelInfo):
        return info
    if isinstance(info, Mapping):
        return ModelInfo.from_dict(dict(info.get("model", info)))
    import json

    path = Path(info).expanduser()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return ModelInfo.from_dict(doc.get("model", doc))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise InputError([Problem(str(path), "info", f"is not a model.json ({type(e).__name__}: {e})",
                                  "pass a bundle's model.json, a ModelInfo or its dict")]) from None


@overload
def load(source: Build, backend: str = "auto", device: str = "cpu", *, threads: int | None = None) -> Model: ...
@overload
def load(source: str | os.PathLike[str], backend: str = "auto", device: str = "cpu", *,
         info: ModelInfo | Mapping[str, Any] | str | os.PathLike[str] | None = None,
         threads: int | None = None) -> Model: ...


def load(source: Any, backend: str = "auto", device: str = "cpu", *, info: Any = None,
         threads: int | None = None) -> Model:
    """A built model, ready to detect.

    `source`: a Build (its precision graph, or its engine where TensorRT and a GPU are here and the
    engine passed its check), a deploy bundle folder (checked against its manifest first), or a .onnx
    graph / .plan engine with `info` (a ModelInfo, a bundle's model.json or its dict: what pre- and
    post-processing need, which a bare graph does not say); a .onnx inside a bundle loads the bundle.
    `backend`: auto (engine, else onnxruntime for a standard-op graph, else reference for a plugin
    graph), tensorrt, onnxruntime, reference, or for a Build detectron2 (the eager model it came from).
    `device`: where a graph runs: 'cpu', or 'cuda' / 'cuda:N' (ONNX Runtime's CUDA provider: onnxruntime-gpu
    and a standard-op graph; an engine runs on that GPU). `threads`: ONNX Runtime's (CPU).

    InputError for a bundle or file that is wrong; ModelUnavailable for what cannot run here; ValueError
    for an unknown backend or device."""
    from d2build.api.builds import Build

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    device = _check_device(device, backend)
    if isinstance(source, Build):
        if info is not None:
            raise ValueError("info= is for a bare .onnx or .plan; a Build knows its model")
        return _load_build(source, backend, device, threads)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load() takes a Build, a bundle folder or a .onnx/.plan path, not {type(source).__name__}")
    path = Path(source).expanduser()
    if backend == "detectron2":
        raise ValueError("backend='detectron2' runs a Build's eager model; a bundle or file holds a graph or engine")
    if path.is_dir() or (path.suffix == ".onnx" and info is None and (path.parent / "model.json").is_file()):
        return _load_bundle(path if path.is_dir() else path.parent, backend, device, threads)
    if not path.is_file():
        raise InputError([Problem(str(path), "source", "no such file or folder",
                                  "pass a Build, a bundle folder (d2build deploy) or a .onnx/.plan file")])
    if info is None:
        raise InputError([Problem(str(path), "info", "a bare graph or engine does not say what model it is "
                                  "(family, input size, pixel mean, class names)",
                                  "pass info= (a ModelInfo, or a bundle's model.json), or load the Build or "
                                  "bundle it came from")])
    return _load_file(path, _info_from(info), backend, device, threads)


def _load_build(b: Build, backend: str, device: str, threads: int | None) -> Model:
    import dataclasses

    from d2build.api.builds import console, new_run_dir
    from d2build.commands import _runtime

    recipe = b.config
    if device != "cpu":  # the graph (and its engine) on that GPU; runtime.device is not part of any cache key
        recipe = dataclasses.replace(recipe, runtime=dataclasses.replace(recipe.runtime, device=device))
    if backend == "detectron2":  # the weights from the cache (a run of its own finds them, or builds them)
        with console(False):
            return Model(_runtime.eager_model(recipe, new_run_dir("runs", f"{recipe.name}-detectron2"),
                                              list(b.overrides)))
    prec = b.stages.get("precision")
    if prec is None or not prec.produced:
        b.raise_for_status()
        raise ModelUnavailable(f"this build has no precision graph (precision: "
                               f"{prec.status + ' ' + (prec.reason or '') if prec else 'not run'}); build with "
                               "until='precision' or later")
    engine = _engine(b)
    if backend == "auto":
        from d2build.backends import tensorrt

        usable = engine is not None and tensorrt.skip_reason(tensorrt.environment(recipe.build.device)) is None
        backend = "tensorrt" if usable else ("onnxruntime" if recipe.surgery.ops == "standard" else "reference")
    if device != "cpu" and backend in ("reference", "onnxruntime"):
        if recipe.surgery.ops != "standard":
            raise ModelUnavailable(f"device={device!r}: this build's graph has TensorRT plugin nodes, which ONNX "
                                   "Runtime cannot run, and no engine can run here; build with surgery.ops=standard "
                                   "for a graph that runs on ONNX Runtime's CUDA provider, or use device='cpu'")
        _graph_on_gpu(device)
    if backend == "tensorrt" and engine is None:
        built = b.stages.get("build")
        check = b.stages.get("check")
        why = (f"the engine failed its check ({check.reason})" if check is not None and check.status == "failed"
               else f"no engine was built ({built.reason if built is not None else 'not run'})")
        raise ModelUnavailable(f"backend='tensorrt': {why}; backend='auto' runs the precision graph on the CPU")
    inner = _runtime.open_model(recipe, engine=str(engine) if backend == "tensorrt" else None,
                                graph=None if backend == "tensorrt" else str(b.artifact("precision")),
                                backend=backend, run_dir=b.run_dir, overrides=list(b.overrides), threads=threads)
    return Model(inner)


def _engine(b: Build) -> Path | None:
    """The build's engine, when one was built and its check did not fail."""
    built, check = b.stages.get("build"), b.stages.get("check")
    if built is None or not built.produced or Files.ENGINE not in built.files:
        return None
    if check is not None and check.status == "failed":
        return None
    return b.artifact("build", Files.ENGINE)


def _load_bundle(folder: Path, backend: str, device: str, threads: int | None) -> Model:
    from d2build.deploy.bundle import BundleError, load_bundle

    if device != "cpu" and backend == "onnxruntime":
        _graph_on_gpu(device)
    try:
        inner, bundle = load_bundle(folder, backend, device=device, threads=threads)
    except BundleError as e:
        text = str(e)
        if text.startswith("--device"):  # auto chose the graph, and this machine cannot run it on that GPU
            raise ModelUnavailable(f"device={device!r}{text.removeprefix('--device ' + device)}") from None
        source, _, message = text.partition(": ")
        raise InputError([Problem(source if message else str(folder), "bundle", message or text,
                                  "deploy it again (d2build deploy), or copy the whole bundle folder")]) from None
    return Model(inner, bundle)


def _load_file(path: Path, info: ModelInfo, backend: str, device: str, threads: int | None) -> Model:
    from d2build import backends
    from d2build.runtime import Model as RuntimeModel

    engine = path.suffix in (".plan", ".engine", ".trt")
    if backend == "auto":
        backend = "tensorrt" if engine else "auto"
    if engine != (backend == "tensorrt"):
        raise ValueError(f"{path}: backend={backend!r} does not run a {'TensorRT engine' if engine else 'graph'}")
    from d2build.backends.devices import DeviceError

    try:
        if engine:
            runner = backends.open_engine(path, int(device.partition(":")[2] or 0))
        else:
            from d2build.backends import graphs

            graph = graphs.load(path)
            if backend == "auto":
                backend = "reference" if graphs.flavour(graph) == "plugins" else "onnxruntime"
            if device != "cpu" and backend == "onnxruntime":
                _graph_on_gpu(device)
            runner = backends.open_graph(graph, backend, threads=threads, device=device)
    except DeviceError as e:  # a plugin graph (the reference backend) asked to run on a GPU
        raise ModelUnavailable(f"{path}: {e}") from None
    except backends.RunnerError as e:
        raise InputError([Problem(str(path), "source", str(e).removeprefix(f"{path}: "),
                                  "pass a graph d2build built (a precision graph or a bundle's model.onnx)")]) from None
    except ImportError as e:
        raise ModelUnavailable(f"{path}: cannot be opened here ({e})") from None
    return Model(RuntimeModel(runner, info, f"file {path}", path))
