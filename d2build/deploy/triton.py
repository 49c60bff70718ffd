"""A Triton Inference Server model repository for a bundle (its `triton/` folder).

    triton/
      <p>/config.pbtxt                 ensemble: IMAGE (encoded bytes) -> DETECTIONS (JSON) via the engine
      <p>_preprocess/config.pbtxt      Python backend: decode, letterbox -> input_tensor, ORIGINAL_HW
      <p>_preprocess/1/model.py        d2build/deploy/triton_model.py, with model.json and the d2build
      <p>_preprocess/1/model.json      modules it imports (numpy + Pillow only) vendored beside it
      <p>_preprocess/1/d2build/...
      <p>_engine/config.pbtxt          platform tensorrt_plan, the graph's I/O
      <p>_engine/1/model.plan          the engine (absent when the bundle has none: README.md says so)
      <p>_postprocess/...              Python backend: graph outputs + ORIGINAL_HW -> DETECTIONS, BOXES, ...
      <p>_onnxruntime/config.pbtxt     standard-op graphs only: platform onnxruntime_onnx
      <p>_onnxruntime/1/model.onnx
      <p>_ort/config.pbtxt             standard-op graphs only: the same ensemble through ONNX Runtime
      README.md                        what loads, and the container command

Why vendor the runtime modules instead of `pip install d2build` in the container: the Python
models then run exactly the pre/post-processing code of the d2build that wrote the bundle (no
version skew between the bundle's model.json and the code reading it), Triton's container needs no
access to d2build's sources or index, and the vendored part is small (about 65 KB of pure Python:
processing, runtime, families' decode, deploy.runtime) and needs only numpy (in every Triton
container) and Pillow (`pip install pillow` there, or a derived image). The vendored files are in
the bundle manifest like every other file.

Configs are protobuf text of Triton's `inference.ModelConfig`; the tests parse every file written
here with the ModelConfig message of tritonclient's model_config_pb2 (Triton's own schema).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import d2build

def runtime_files() -> list[str]:
    """The d2build modules (relative to d2build/) the Python-backend models import: numpy and Pillow only below
    them. The families' runtime halves come from the family registry (families/<name>/__init__.py)."""
    from d2build.families import runtime_modules

    return ["__init__.py", "processing.py", "runtime/__init__.py", "runtime/info.py", "runtime/model.py",
            *runtime_modules(), "deploy/__init__.py", "deploy/runtime.py", "deploy/triton_model.py"]
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
IMAGE, ORIGINAL_HW, DETECTIONS = "IMAGE", "ORIGINAL_HW", "DETECTIONS"
#: Tensor outputs of the post-processing model besides DETECTIONS (JSON): name, type, dims.
ARRAY_OUTPUTS = (("BOXES", "TYPE_FP32", [-1, 4]), ("SCORES", "TYPE_FP32", [-1]), ("CLASSES", "TYPE_INT32", [-1]))


def model_names(prefix: str) -> dict[str, str]:
    return {"ensemble": prefix, "preprocess": f"{prefix}_preprocess", "engine": f"{prefix}_engine",
            "postprocess": f"{prefix}_postprocess", "onnxruntime": f"{prefix}_onnxruntime",
            "ensemble_onnxruntime": f"{prefix}_ort"}


def sanitize(name: str) -> str:
    """A Triton model name: letters, digits, '_' and '-' (it is a folder name and a URL path part)."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return out or "detector"


# ----------------------------------------------------------------------------- protobuf text


def _dims(shape: list[Any]) -> str:
    return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in shape) + " ]"


def _tensor(name: str, data_type: str, dims: list[Any]) -> str:
    return f"  {{\n    name: \"{name}\"\n    data_type: {data_type}\n    dims: {_dims(dims)}\n  }}"


def _io(kind: str, tensors: list[tuple[str, str, list[Any]]]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(*t) for t in tensors) + "\n]\n"


def _graph_tensors(doc: dict[str, Any]) -> tuple[tuple[str, str, list[Any]], list[tuple[str, str, list[Any]]]]:
    inp = doc["input"]
    outputs = [(o["name"], TRITON_TYPES[o["dtype"]], o["shape"]) for o in doc["outputs"]]
    return (inp["name"], TRITON_TYPES[inp["dtype"]], inp["shape"]), outputs


def _header(name: str, comment: str) -> str:
    return f"# {comment}\n# written by d2build deploy; Triton's ModelConfig protobuf text format\nname: \"{name}\"\n"


def engine_config(doc: dict[str, Any], name: str) -> str:
    """The TensorRT plan: max_batch_size 0 (the graph's dims include its static batch)."""
    inp, outputs = _graph_tensors(doc)
    return (_header(name, "the TensorRT engine (plugins, if any, come from libnvinfer_plugin: see README.md)")
            + "platform: \"tensorrt_plan\"\nmax_batch_size: 0\n" + _io("input", [inp]) + _io("output", outputs)
            + "instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]\n")


def onnxruntime_config(doc: dict[str, Any], name: str) -> str:
    """The standard-op graph in Triton's onnxruntime backend (GPU when there is one, else CPU)."""
    inp, outputs = _graph_tensors(doc)
    return (_header(name, "the standard-op precision graph in ONNX Runtime")
            + "platform: \"onnxruntime_onnx\"\nmax_batch_size: 0\n" + _io("input", [inp]) + _io("output", outputs))


def python_config(doc: dict[str, Any], name: str, role: str) -> str:
    inp, outputs = _graph_tensors(doc)
    if role == "preprocess":
        ins = [(IMAGE, "TYPE_UINT8", [-1])]
        outs = [inp, (ORIGINAL_HW, "TYPE_INT32", [2])]
    else:
        ins = [(ORIGINAL_HW, "TYPE_INT32", [2]), *outputs]
        outs = [(DETECTIONS, "TYPE_STRING", [1]), *ARRAY_OUTPUTS]
        if doc["model"]["family"] == "keypoint_rcnn":
            outs.append(("KEYPOINTS", "TYPE_FP32", [-1, len(doc["model"]["keypoint_names"]) or -1, 3]))
    what = ("encoded image bytes -> letterboxed input_tensor and the original size" if role == "preprocess"
            else "graph outputs -> detections in original pixels (JSON as `d2build infer` writes, and arrays)")
    return (_header(name, f"d2build {role}: {what}") + "backend: \"python\"\nmax_batch_size: 0\n"
            + _io("input", ins) + _io("output", outs)
            + "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"
            + f"parameters {{\n  key: \"role\"\n  value {{\n    string_value: \"{role}\"\n  }}\n}}\n")


def ensemble_config(doc: dict[str, Any], name: str, names: dict[str, str], model: str) -> str:
    """IMAGE (encoded bytes, UINT8 [-1]) -> DETECTIONS (JSON), BOXES, SCORES, CLASSES [, KEYPOINTS]."""
    inp, outputs = _graph_tensors(doc)
    post_outs = [(DETECTIONS, "TYPE_STRING", [1]), *ARRAY_OUTPUTS]
    if doc["model"]["family"] == "keypoint_rcnn":
        post_outs.append(("KEYPOINTS", "TYPE_FP32", [-1, len(doc["model"]["keypoint_names"]) or -1, 3]))

    def step(model_name: str, inputs: dict[str, str], outs: dict[str, str]) -> str:
        maps = "".join(f"      input_map {{\n        key: \"{k}\"\n        value: \"{v}\"\n      }}\n"
                       for k, v in inputs.items())
        maps += "".join(f"      output_map {{\n        key: \"{k}\"\n        value: \"{v}\"\n      }}\n"
                        for k, v in outs.items())
        return f"    {{\n      model_name: \"{model_name}\"\n      model_version: -1\n{maps}    }}"

    graph_names = [o[0] for o in outputs]
    steps = [
        step(names["preprocess"], {IMAGE: IMAGE}, {inp[0]: "preprocessed", ORIGINAL_HW: "original_hw"}),
        step(model, {inp[0]: "preprocessed"}, {g: f"raw_{g}" for g in graph_names}),
        step(names["postprocess"], {ORIGINAL_HW: "original_hw", **{g: f"raw_{g}" for g in graph_names}},
             {o[0]: o[0] for o in post_outs}),
    ]
    return (_header(name, f"encoded image -> detections: {names['preprocess']} -> {model} -> {names['postprocess']}")
            + "platform: \"ensemble\"\nmax_batch_size: 0\n" + _io("input", [(IMAGE, "TYPE_UINT8", [-1])])
            + _io("output", post_outs)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


# ----------------------------------------------------------------------------- the repository


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link inside the bundle (the repository stays valid when triton/ alone is copied or
    mounted), a copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _python_model(folder: Path, bundle: Path, doc: dict[str, Any], config: str) -> None:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config)
    package = Path(d2build.__file__).parent
    _link_or_copy(bundle / "model.json", folder / "1" / "model.json")
    shutil.copyfile(package / "deploy" / "triton_model.py", folder / "1" / "model.py")
    for rel in runtime_files():
        dst = folder / "1" / "d2build" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package / rel, dst)


def write_repository(bundle: Path, doc: dict[str, Any]) -> list[str]:
    """Write `<bundle>/triton/` for the bundle whose model.json is `doc` (already written, with the
    graph and, if any, the engine beside it). Returns the model names written."""
    root = bundle / "triton"
    prefix = sanitize(doc.get("triton", {}).get("prefix") or "detector")
    names = model_names(prefix)
    root.mkdir(parents=True, exist_ok=True)
    _python_model(root / names["preprocess"], bundle, doc, python_config(doc, names["preprocess"], "preprocess"))
    _python_model(root / names["postprocess"], bundle, doc, python_config(doc, names["postprocess"], "postprocess"))
    engine_dir = root / names["engine"]
    (engine_dir / "1").mkdir(parents=True, exist_ok=True)
    (engine_dir / "config.pbtxt").write_text(engine_config(doc, names["engine"]))
    has_engine = (bundle / "engine.plan").is_file()
    if has_engine:
        _link_or_copy(bundle / "engine.plan", engine_dir / "1" / "model.plan")
    (root / names["ensemble"]).mkdir(exist_ok=True)
    (root / names["ensemble"] / "1").mkdir(exist_ok=True)  # an ensemble needs an (empty) version folder
    (root / names["ensemble"] / "config.pbtxt").write_text(
        ensemble_config(doc, names["ensemble"], names, names["engine"]))
    written = [names["preprocess"], names["postprocess"], names["engine"], names["ensemble"]]
    standard = doc["graph"]["flavour"] == "standard"
    if standard:
        ort = root / names["onnxruntime"]
        (ort / "1").mkdir(parents=True, exist_ok=True)
        (ort / "config.pbtxt").write_text(onnxruntime_config(doc, names["onnxruntime"]))
        _link_or_copy(bundle / "model.onnx", ort / "1" / "model.onnx")
        ens = root / names["ensemble_onnxruntime"]
        (ens / "1").mkdir(parents=True, exist_ok=True)
        (ens / "config.pbtxt").write_text(
            ensemble_config(doc, names["ensemble_onnxruntime"], names, names["onnxruntime"]))
        written += [names["onnxruntime"], names["ensemble_onnxruntime"]]
    (root / "README.md").write_text(readme(doc, names, has_engine, standard))
    return written


def readme(doc: dict[str, Any], names: dict[str, str], has_engine: bool, standard: bool) -> str:
    engine = doc.get("engine") or {}
    trt = engine.get("tensorrt")
    lines = [
        f"# Triton model repository for {doc.get('name', 'this bundle')}",
        "",
        "Written by `d2build deploy`; not started here (no Triton server runs on the machines d2build is "
        "developed on). A client sends one encoded image (JPEG, PNG, ...) as `IMAGE` (UINT8, [-1]) and "
        "gets `DETECTIONS` (one JSON string in `d2build infer`'s per-image format, original pixels, masks as "
        "COCO RLE) and `BOXES`, `SCORES`, `CLASSES` arrays.",
        "",
        "| model | what |",
        "|---|---|",
        f"| `{names['ensemble']}` | ensemble: preprocess -> TensorRT engine -> postprocess |",
        f"| `{names['preprocess']}` | Python backend: decode, letterbox (needs numpy and Pillow) |",
        f"| `{names['engine']}` | TensorRT plan " + ("" if has_engine else "(**model.plan missing: no engine was "
                                                    "built for this bundle**)") + " |",
        f"| `{names['postprocess']}` | Python backend: decode to original pixels, masks, keypoints |",
    ]
    if standard:
        lines += [f"| `{names['onnxruntime']}` | the standard-op graph in ONNX Runtime |",
                  f"| `{names['ensemble_onnxruntime']}` | ensemble: preprocess -> ONNX Runtime -> postprocess |"]
    lines += [
        "",
        "Start (Triton's container; its TensorRT must be the version the engine was built with"
        + (f", TensorRT {trt}" if trt else "") + "):",
        "",
        "```",
        "docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\",
        "  -v $PWD/triton:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\",
        "  bash -c 'pip install pillow && tritonserver --model-repository=/models"
        + ("" if has_engine else f" --model-control-mode=explicit --load-model={names['ensemble_onnxruntime']}"
           if standard else " --exit-on-error=false") + "'",
        "```",
        "",
    ]
    if not has_engine:
        lines += ["Without `model.plan` the engine model (and its ensemble) cannot load: build the engine where "
                  "TensorRT and the target GPU are (`d2build deploy` there adds it), or put an engine built from "
                  "../model.onnx at `" + names["engine"] + "/1/model.plan`.", ""]
    if doc["graph"]["flavour"] == "plugins":
        lines += ["The engine uses EfficientNMS_TRT and PyramidROIAlign_TRT from libnvinfer_plugin, which Triton's "
                  "container ships and its TensorRT backend loads; if a plugin is reported missing, start "
                  "tritonserver with `LD_PRELOAD=libnvinfer_plugin.so` (the container's own copy).", ""]
    return "\n".join(lines)


def config_files(root: Path) -> dict[str, str]:
    """{model name: config.pbtxt text} of a written repository (for tests and `d2build deploy`'s summary)."""
    return {p.parent.name: p.read_text() for p in sorted(root.glob("*/config.pbtxt"))}

