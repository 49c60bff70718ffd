"""Deploy bundles: a folder that holds everything needed to run a built model, and says what it is.

    <out>/<recipe>-<H>x<W>-<precision>-<ops>-<key12>/
        model.json          what the model is and how to feed it (format below; FORMAT_VERSION)
        model.onnx          the precision graph (plugins or standard ops)
        engine.plan         the TensorRT engine, when one was built (and passed the engine check)
        verify/             verify's report.md and metrics.json (the graph vs Detectron2)
        check/              the engine check's report.md and metrics.json, when there is an engine
        triton/             a Triton Inference Server model repository (d2build/deploy/triton.py)
        detect.py           `python detect.py IMAGE...`: runs the bundle with its own runtime below
        runtime/d2build/    the torch-free part of d2build (deploy/vendor.py: runtime_files())
        manifest.json       sha256 and size of every other file, and the bundle's key

The folder name ends in the bundle key: a hash of the cache keys the files came from (precision
graph, verify, engine, check) and of model.json's content, so two different builds never share a
folder and writing the same build again finds it in place (and leaves it alone). A folder is
written beside its final place and renamed into it, so a reader sees a whole bundle or none.

`load_bundle(path)` checks every file against manifest.json and the format version before anything
runs, then opens a runner: the engine when there is one and TensorRT (and a GPU) is here, else
ONNX Runtime for a standard-op graph, else d2build's CPU reference for a graph with TensorRT plugins.
Loading imports neither torch nor Detectron2 nor Hydra, nor (for a graph without float16 tensors)
the `onnx` package: a bundle runs where only numpy, Pillow and ONNX Runtime (or TensorRT) are
installed, from its own vendored runtime (`python BUNDLE/detect.py IMAGE...`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2build.backends.base import Runner, RunnerError
from d2build.families.base import Outputs
from d2build.runtime.info import ModelInfo

FORMAT = "d2build-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"
GRAPH = "model.onnx"
ENGINE = "engine.plan"
LAUNCHER = "detect.py"
RUNTIME_DIR = "runtime"
BACKENDS = ("auto", "tensorrt", "onnxruntime", "reference")

#: What each graph output holds (model.json "outputs"[].meaning).
OUTPUT_MEANING = {
    Outputs.NUM: "valid rows per image in the outputs below; rows past it are zero padding",
    Outputs.BOXES: "x1, y1, x2, y2 in input_tensor pixels (letterboxed canvas); map back with the "
                       "letterbox (x / (resized_w / w), y / (resized_h / h)), then clip to the image",
    Outputs.SCORES: "class probability, descending across classes",
    Outputs.CLASSES: "contiguous class id (index into model.class_names)",
    Outputs.MASKS: "per detection, its class's mask probabilities over its box (28x28; PointRend's subdivided "
                   "224x224): paste into the box bilinearly (Detectron2's paste_masks_in_image), keep >= mask_threshold",
    Outputs.HEATMAPS: "per detection, K x 56 x 56 keypoint logits over its box: decode with "
                          "d2build.families.keypoint_rcnn.decode_keypoints (Detectron2's heatmaps_to_keypoints)",
    Outputs.SEMANTIC: "per image, the semantic head's class logits over the input canvas at 1/4 (class 0 "
                      "'things', then model.extra.panoptic.stuff_classes): upsample x4, crop to the image, resize "
                      "to it, argmax (d2build.processing.semantic_to_original); combined with the instances by "
                      "d2build.families.panoptic_fpn.combine",
}


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is; the message names the bundle file at fault and the fix."""


# ----------------------------------------------------------------------------- digests


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def bundle_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(material).encode()).hexdigest()


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts)


def write_manifest(root: Path, key: str, name: str) -> dict[str, Any]:
    files = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in _files_under(root)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "key": key, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_files(root: Path) -> dict[str, Any]:
    """The manifest of an intact bundle; BundleError naming the first file that is missing, of
    another size or another sha256 than manifest.json says, or a manifest that is not one."""
    mf = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    if not mf.is_file():
        raise BundleError(f"{mf}: missing; {root} is not a d2build bundle (or an incomplete copy of one)")
    try:
        manifest = json.loads(mf.read_text())
        files = {k: (int(v["size"]), str(v["sha256"])) for k, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{mf}: not a bundle manifest ({type(e).__name__}: {e})") from None
    _check_version(mf, manifest)
    for rel, (size, digest) in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in manifest.json but missing; copy the whole bundle folder, or "
                              "re-run `d2build deploy`")
        if p.stat().st_size != size or sha256_file(p) != digest:
            raise BundleError(f"{p}: does not match its sha256 in manifest.json (the file was changed or damaged "
                              "after deploy wrote it); refusing to run it. Re-run `d2build deploy` or restore the file")
    return manifest


def _check_version(path: Path, doc: dict[str, Any]) -> None:
    if doc.get("format") != FORMAT:
        raise BundleError(f"{path}: format {doc.get('format')!r} is not {FORMAT!r}")
    version = doc.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this d2build reads "
                          f"({FORMAT_VERSION}); upgrade d2build (pip install -U d2build) to load it")


# ----------------------------------------------------------------------------- writing


@dataclass
class BundleSource:
    """Everything a bundle is made of, as files and plain data (commands/deploy.py gathers it)."""

    name: str  # readable part of the folder name, e.g. mask_rcnn_r50-640x640-fp16-plugins
    graph: Path  # the precision graph
    info: ModelInfo
    recipe: dict[str, Any]  # {"name", "file", "overrides", "config"}
    keys: dict[str, str]  # cache stage -> key the files came from
    postprocess: dict[str, Any]  # thresholds the graph applies, and display threshold
    engine: Path | None = None
    engine_facts: dict[str, Any] | None = None  # build stage facts (TensorRT version, GPU, io)
    reports: dict[str, Path] = field(default_factory=dict)  # "verify/report.md" -> source file, ...
    verify: dict[str, Any] | None = None  # verify's summary
    check: dict[str, Any] = field(default_factory=dict)  # {"status", "reason" | "summary"}
    triton_prefix: str = "detector"
    triton_model: str = "auto"  # deploy.triton.model (triton.MODELS)


def graph_io(graph: Path) -> tuple[dict[str, Any], list[dict[str, Any]], str, int, bool]:
    """(input, outputs, flavour, opset, holds float16 tensors) of a graph, as model.json states them."""
    import onnx

    from d2build.backends import graphs

    proto = onnx.load(str(graph), load_external_data=False)
    elem = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
            onnx.TensorProto.INT64: "int64", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool"}

    def desc(v) -> dict[str, Any]:
        t = v.type.tensor_type
        return {"name": v.name, "dtype": elem.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in t.shape.dim]}

    inputs = [desc(v) for v in proto.graph.input]
    outputs = [{**desc(v), "meaning": OUTPUT_MEANING.get(v.name, "")} for v in proto.graph.output]
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return inputs[0], outputs, graphs.flavour(proto), opset, graphs.has_fp16(proto)


def resize_rule(info) -> dict[str, Any]:
    """How an image becomes the input: model.json's words for what runtime.Model.prepare does."""
    h, w = info.input_hw
    if info.resize == "letterbox":
        return {"rule": "letterbox",
                "steps": ["scale = min(H / h, W / w); resized = (int(h * scale + 0.5), int(w * scale + 0.5)) "
                          "capped at (H, W), as Detectron2's ResizeShortestEdge rounds",
                          "PIL bilinear resize of the uint8 image (Detectron2's ResizeTransform)",
                          "image at the top-left of an H x W canvas filled with pixel_mean (normalises to 0)"],
                "sizes": [[h, w]]}
    return {"rule": "shortest_edge", "min_size": info.min_size, "max_size": info.max_size,
            "size_divisibility": info.size_divisibility,
            "steps": [f"Detectron2's ResizeShortestEdge: short side {info.min_size}, long side at most "
                      f"{info.max_size}, sizes rounded half up", "PIL bilinear resize of the uint8 image",
                      f"padded bottom/right with pixel_mean to a multiple of {info.size_divisibility} (a batch: to "
                      "its largest image)"],
            "sizes": {"min": list(info.input_min), "opt": [h, w], "max": list(info.input_max)}}


def model_document(src: BundleSource) -> dict[str, Any]:
    """model.json's content without the bundle's own name and key (those are derived from it)."""
    from d2build.deploy.triton import resolve_model

    inp, outputs, flavour, opset, float16 = graph_io(src.graph)
    info = src.info
    h, w = info.input_hw
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": info.to_dict(),
        "input": {
            **inp, "layout": "NCHW", "batch": info.batch, "height": h, "width": w, "channels": "BGR",
            "value_range": [0, 255], "pixel_mean": list(info.pixel_mean), "pixel_std": list(info.pixel_std),
            "normalization": "inside the graph: Sub(pixel_mean); 1/pixel_std folded into the first conv "
                             "(and its input channels flipped for an RGB-trained model); feed raw BGR 0..255",
            "resize": resize_rule(info),
        },
        "outputs": outputs,
        "postprocess": {**src.postprocess, "mask_threshold": info.mask_threshold,
                        "boxes": "detector_postprocess: boxes / (resized / original) per axis, clipped; boxes "
                                 "empty after clipping (entirely in the padding) dropped"},
        "graph": {"file": GRAPH, "flavour": flavour, "opset": opset, "float16": float16,
                  "precision": src.recipe.get("config", {}).get("precision", {}).get("mode")},
        "engine": ({"file": ENGINE, **{k: v for k, v in (src.engine_facts or {}).items()
                                        if k in ("tensorrt", "gpu", "compute_capability", "io", "precision")}}
                   if src.engine is not None else None),
        "recipe": src.recipe,
        "cache_keys": dict(sorted(src.keys.items())),
        "verify": src.verify,
        "check": src.check,
        "triton": {"repository": "triton", "prefix": src.triton_prefix,
                   "model": resolve_model(src.triton_model, flavour, src.engine is not None)},
        "runtime": {"launcher": LAUNCHER, "folder": RUNTIME_DIR},
        "created_by": _created_by(),
    }


def _created_by() -> str:
    from d2build import __version__

    return f"d2build {__version__}"


def key_material(doc: dict[str, Any]) -> dict[str, Any]:
    """What the bundle key hashes: model.json minus who wrote it (the cache keys inside pin the files)."""
    return {k: v for k, v in doc.items() if k != "created_by"}


def _intact_with_key(folder: Path, key: str) -> bool:
    try:
        return check_files(folder).get("key") == key
    except BundleError:
        return False


def write_bundle(out: Path, src: BundleSource, say=print) -> tuple[Path, str]:
    """Write (or find) the bundle for `src` under the folder `out`: (its path, "written" | "unchanged" |
    "replaced"). An intact bundle of the same key is left exactly as it is."""
    from d2build.deploy import triton

    doc = model_document(src)
    key = bundle_key(key_material(doc))
    name = f"{src.name}-{key[:12]}"
    final = out / name
    if final.exists():
        try:
            if check_files(final).get("key") == key:
                return final, "unchanged"
            say(f"{final}: holds another bundle key; rewriting it")
        except BundleError as e:
            say(f"{e}; rewriting the bundle")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    try:
        tmp.mkdir()
        doc = {"name": name, "key": key, **doc}
        (tmp / MODEL_JSON).write_text(json.dumps(doc, indent=1) + "\n")
        shutil.copyfile(src.graph, tmp / GRAPH)  # copies, not links: a bundle edited in place must not edit the cache
        if src.engine is not None:
            shutil.copyfile(src.engine, tmp / ENGINE)
        for rel, source in src.reports.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / rel)
        write_runtime(tmp)
        triton.write_repository(tmp, doc)
        write_manifest(tmp, key, name)
        status = "written"
        if final.exists() and _intact_with_key(final, key):  # a concurrent deploy published it meanwhile
            return final, "unchanged"
        if final.exists():
            aside = out / f".old-{name}-{os.getpid()}"
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
            status = "replaced"
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, status


LAUNCHER_TEXT = '''"""Run this d2build bundle on images, with the runtime it carries (runtime/d2build/).

    python detect.py IMAGE... [--backend auto|tensorrt|onnxruntime|reference] [--out detections.json]

Needs numpy, Pillow and one backend: onnxruntime for a standard-op graph, tensorrt for the engine
(onnx and onnxruntime-extensions too for a plugin graph on the CPU, or a float16 graph on the CPU).
Neither torch nor Detectron2 nor d2build itself is needed. Prints (or writes) detections in
`d2build infer`'s format; exit 2 with one line on a bad bundle or image.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "runtime"))  # this bundle's own d2build runtime comes first

from d2build.deploy.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], bundle=HERE, prog="python detect.py"))
'''


def write_runtime(root: Path) -> None:
    """The bundle's own runtime: runtime/d2build/ (vendor.runtime_files()) and the detect.py launcher."""
    from d2build.deploy.vendor import copy_runtime

    copy_runtime(root / RUNTIME_DIR)
    (root / LAUNCHER).write_text(LAUNCHER_TEXT)


# ----------------------------------------------------------------------------- loading


@dataclass
class Bundle:
    """An opened bundle: its folder, model.json, manifest; which backend runs it."""

    path: Path
    doc: dict[str, Any]
    manifest: dict[str, Any]
    backend: str = ""

    @property
    def name(self) -> str:
        return self.doc.get("name", self.path.name)

    @property
    def key(self) -> str:
        return self.manifest.get("key", "")

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_dict(self.doc["model"])

    @property
    def flavour(self) -> str:
        return self.doc["graph"]["flavour"]

    @property
    def has_engine(self) -> bool:
        return bool(self.doc.get("engine")) and (self.path / ENGINE).is_file()

    def file(self, name: str) -> Path:
        return self.path / name


def open_bundle(path: str | Path) -> Bundle:
    """A bundle whose files all match manifest.json and whose model.json this d2build can read."""
    root = Path(path).expanduser()
    manifest = check_files(root)
    mj = root / MODEL_JSON
    if MODEL_JSON not in manifest["files"]:
        raise BundleError(f"{mj}: not listed in manifest.json; {root} is not a complete bundle")
    try:
        doc = json.loads(mj.read_text())
    except ValueError as e:
        raise BundleError(f"{mj}: not JSON ({e})") from None
    _check_version(mj, doc)
    try:
        ModelInfo.from_dict(doc["model"])
        doc["graph"]["flavour"], doc["input"]["name"]
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mj}: missing or malformed field ({type(e).__name__}: {e})") from None
    return Bundle(root, doc, manifest)


def tensorrt_usable(device: int = 0) -> str | None:
    """None when an engine can run here (TensorRT imports, a CUDA device is visible); else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    from d2build.backends import cuda

    d = cuda.describe(device)
    return None if d.get("compute_capability") else f"no usable CUDA device ({d.get('error', 'none')})"


def choose_backend(bundle: Bundle, backend: str = "auto", device: int = 0) -> str:
    if backend not in BACKENDS:
        raise BundleError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if bundle.has_engine and tensorrt_usable(device) is None:
            return "tensorrt"
        return "onnxruntime" if bundle.flavour == "standard" else "reference"
    if backend == "tensorrt" and not bundle.has_engine:
        raise BundleError(f"{bundle.path}: no {ENGINE} in this bundle (it was made where TensorRT or a GPU was "
                          "missing); use backend onnxruntime (standard-op graph) or reference (plugin graph), or "
                          "deploy again where TensorRT is")
    if backend == "onnxruntime" and bundle.flavour != "standard":
        raise BundleError(f"{bundle.file(GRAPH)}: has TensorRT plugin nodes, which ONNX Runtime cannot run; use "
                          "backend reference (d2build's CPU plugins) or tensorrt, or deploy with surgery.ops=standard")
    return backend


class BundleRunner(Runner):
    """A backend runner that refuses inputs the model file does not take (a batch larger than the
    engine's, another image size, another dtype) with a message naming the file, instead of handing
    them to a backend that might broadcast, truncate or crash."""

    def __init__(self, inner: Runner, path: Path):
        super().__init__()
        self.inner, self.path = inner, path
        self.backend = inner.backend
        self.input_name = inner.input_name
        self.input_shape = tuple(inner.input_shape)
        self.output_names = list(inner.output_names)
        self.emulated = inner.emulated

    def check(self, feeds) -> None:
        for name, value in feeds.items():
            if name != self.input_name:
                raise BundleError(f"{self.path}: no input named {name!r} (the model takes {self.input_name!r})")
            shape = tuple(np.shape(value))
            want = self.input_shape
            if len(shape) != len(want):
                raise BundleError(f"{self.path}: {name} takes shape {list(want)}, got {list(shape)}")
            if isinstance(want[0], int) and shape[0] > want[0]:
                raise BundleError(f"{self.path}: a batch of {shape[0]} images, but this model takes at most "
                                  f"{want[0]} per run (input {list(want)}); send smaller batches")
            bad = [i for i, (s, w) in enumerate(zip(shape, want)) if isinstance(w, int) and s != w]
            if bad:
                raise BundleError(f"{self.path}: {name} takes shape {list(want)}, got {list(shape)}")
            dtype = np.asarray(value).dtype if not isinstance(value, np.ndarray) else value.dtype
            if dtype != np.float32:
                raise BundleError(f"{self.path}: {name} takes float32 (BGR 0..255), got {dtype}")

    def run(self, feeds, outputs=None):
        self.check(feeds)
        return self.inner.run(feeds, outputs)

    def prepare(self, feeds) -> None:
        self.check(feeds)
        self.inner.prepare(feeds)

    def execute(self) -> None:
        self.inner.execute()

    def synchronize(self) -> None:
        self.inner.synchronize()


def run_devices(device: int | str = 0):
    """(the engine's CUDA device index, the graph's device) for `device`: an int N is the engine's GPU and keeps
    a graph on the CPU (as before devices existed); "cuda" / "cuda:N" runs an engine there and a standard-op graph
    on ONNX Runtime's CUDA provider there; "cpu" runs a graph on the CPU (and never picks the engine)."""
    from d2build.backends import devices

    if isinstance(device, int) and not isinstance(device, bool):
        return device, devices.Device("cpu")
    try:
        dev = devices.parse(device)
    except devices.DeviceError as e:
        raise BundleError(f"--device: {e}") from None
    return (dev.index if dev.is_cuda else None), dev


#: pip's names for the modules a backend imports
_PIP_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "onnxruntime_extensions": "onnxruntime-extensions",
              "tensorrt": "tensorrt", "PIL": "Pillow", "numpy": "numpy"}


def load_bundle(path: str | Path, backend: str = "auto", *, device: int | str = 0, threads: int | None = None):
    """(runtime.Model, Bundle): files checked against manifest.json, format version checked, backend
    chosen (`auto`: engine if TensorRT and a GPU are here, else onnxruntime for a standard-op graph,
    else reference), the graph or engine opened. BundleError says what is wrong and with which file.
    `device`: see `run_devices` (cpu | cuda | cuda:N, or the engine's CUDA index)."""
    from d2build import backends
    from d2build.runtime import Model

    engine_device, graph_device = run_devices(device)
    bundle = open_bundle(path)
    if engine_device is None and backend == "auto":  # device cpu: the graph, never the engine
        backend = "onnxruntime" if bundle.flavour == "standard" else "reference"
    bundle.backend = choose_backend(bundle, backend, engine_device or 0)
    info = bundle.info
    file = bundle.file(ENGINE if bundle.backend == "tensorrt" else GRAPH)
    if graph_device.is_cuda and bundle.backend == "onnxruntime":
        from d2build.backends import devices

        problem = devices.cuda_problem(graph_device)
        if problem:
            raise BundleError(f"--device {graph_device}: {problem[0]}; {problem[1]}")
    try:
        if bundle.backend == "tensorrt":
            runner = backends.open_engine(file, engine_device or 0)
        elif (bundle.backend == "onnxruntime" and not graph_device.is_cuda
              and bundle.doc["graph"].get("float16") is False):
            from d2build.deploy.onnx_runner import OnnxFileRunner  # numpy + onnxruntime: no `onnx` needed

            runner = OnnxFileRunner(file, threads=threads)
        else:
            runner = backends.open_graph(file, bundle.backend, threads=threads,
                                         device=graph_device if bundle.backend == "onnxruntime" else "cpu")
    except ImportError as e:
        raise BundleError(f"{file}: backend {bundle.backend} needs the Python package {e.name or e}, which is not "
                          f"installed here: pip install {_PIP_NAMES.get(e.name or '', e.name or '<it>')}") from None
    except RunnerError as e:
        raise BundleError(f"{file}: cannot be opened with backend {bundle.backend}: {e}") from None
    batch = runner.input_shape[0]
    if isinstance(batch, int) and info.batch > batch:
        raise BundleError(f"{bundle.file(MODEL_JSON)}: says batch {info.batch}, but {file.name} takes {batch} "
                          "image(s) per run; the bundle is inconsistent, deploy it again")
    fixed = tuple(runner.input_shape[2:])
    if all(isinstance(d, int) for d in fixed) and fixed != tuple(info.input_hw):
        raise BundleError(f"{bundle.file(MODEL_JSON)}: says input {list(info.input_hw)}, but {file.name} takes "
                          f"{list(runner.input_shape[2:])}; the bundle is inconsistent, deploy it again")
    model = Model(BundleRunner(runner, file), info, source=f"bundle {bundle.name}", path=file)
    return model, bundle
