"""A Triton Inference Server model repository for a bundle (its `triton/` folder).

`deploy.triton.model` picks what runs the graph, so the repository loads on the server the user has:

    tensorrt     <p>_engine        platform tensorrt_plan: the bundle's engine (NVIDIA's containers)
    onnxruntime  <p>_onnxruntime   platform onnxruntime_onnx: the standard-op graph (NVIDIA's containers)
    python       <p>_ort_python    backend python: the standard-op graph in ONNX Runtime inside a
                                   Python-backend model, for servers with the Python backend only
                                   (`d2build serve`, pytriton's tritonserver), on CPU or GPU
    auto         tensorrt when the bundle has an engine, else python for a standard-op graph

and the repository holds, whatever the choice:

    triton/
      <p>/config.pbtxt                 ensemble: IMAGE (encoded bytes) -> DETECTIONS (JSON), BOXES, ...
      <p>_preprocess/config.pbtxt      Python backend: decode, letterbox -> input_tensor, ORIGINAL_HW
      <p>_preprocess/1/model.py        d2build/deploy/triton_model.py, with model.json and the d2build
      <p>_preprocess/1/model.json      runtime (vendor.runtime_files()) beside it
      <p>_preprocess/1/d2build/...
      <p>_<engine|onnxruntime|ort_python>/...   the graph (above); 1/model.plan or 1/model.onnx
      <p>_postprocess/...              Python backend: graph outputs + ORIGINAL_HW -> DETECTIONS, BOXES, ...
      README.md                        what loads where, and the commands

Why vendor the runtime instead of `pip install d2build` in the server: the Python models then run
exactly the pre/post-processing code of the d2build that wrote the bundle (no version skew between
model.json and the code reading it), the server needs no access to d2build's sources or index, and
the vendored files are digest-checked with the rest of the bundle. What the server's Python needs:
numpy and Pillow (and onnxruntime for `python`). Where that Python comes from is the server's
business, as Triton documents it: the container's own Python (add `pip install pillow`), or an
execution environment (config parameter EXECUTION_ENV_PATH), which `d2build serve` adds to the
configs it serves (d2build/deploy/tritonserver.py); the bundle's own configs stay portable.

Configs are protobuf text of Triton's `inference.ModelConfig`; the tests parse every file written
here with the ModelConfig message of tritonclient's model_config_pb2 (Triton's own schema).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from d2build.deploy.vendor import copy_runtime, package_dir
from d2build.recipe import TRITON_MODELS

#: deploy.triton.model: what runs the graph in the repository ("auto" is resolved by `resolve_model`)
MODELS = TRITON_MODELS
#: the inference model's name suffix and what it is, per choice
INFER = {"tensorrt": ("engine", "TensorRT plan (platform tensorrt_plan)"),
         "onnxruntime": ("onnxruntime", "the standard-op graph in Triton's onnxruntime backend"),
         "python": ("ort_python", "the standard-op graph in ONNX Runtime, inside a Python-backend model")}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
IMAGE, ORIGINAL_HW, DETECTIONS = "IMAGE", "ORIGINAL_HW", "DETECTIONS"
#: Tensor outputs of the post-processing model besides DETECTIONS (JSON): name, type, dims.
ARRAY_OUTPUTS = (("BOXES", "TYPE_FP32", [-1, 4]), ("SCORES", "TYPE_FP32", [-1]), ("CLASSES", "TYPE_INT32", [-1]))


class TritonChoiceError(ValueError):
    """A deploy.triton.model this bundle cannot be served with; says why and what to use."""


def resolve_model(choice: str, flavour: str, has_engine: bool) -> str:
    """The inference model for deploy.triton.model=`choice` ("auto": the engine if there is one, else
    ONNX Runtime in a Python-backend model for a standard-op graph, else the (missing) engine)."""
    if choice not in MODELS:
        raise TritonChoiceError(f"deploy.triton.model={choice!r}: use one of {'|'.join(MODELS)}")
    if choice == "auto":
        return "tensorrt" if has_engine or flavour != "standard" else "python"
    if choice in ("onnxruntime", "python") and flavour != "standard":
        raise TritonChoiceError(f"deploy.triton.model={choice} runs the graph in ONNX Runtime, which cannot run the "
                                "TensorRT plugin nodes of this graph: add surgery.ops=standard, or use "
                                "deploy.triton.model=tensorrt (the engine)")
    return choice


def model_names(prefix: str, model: str) -> dict[str, str]:
    """Model names of a repository: the ensemble (what clients call), its three steps."""
    return {"ensemble": prefix, "preprocess": f"{prefix}_preprocess", "infer": f"{prefix}_{INFER[model][0]}",
            "postprocess": f"{prefix}_postprocess"}


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


def _instances(kind: str) -> str:
    return f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]\n"


def _parameter(key: str, value: str) -> str:
    return f"parameters {{\n  key: \"{key}\"\n  value {{\n    string_value: \"{value}\"\n  }}\n}}\n"


def _post_outputs(doc: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    outs = [(DETECTIONS, "TYPE_STRING", [1]), *ARRAY_OUTPUTS]
    if doc["model"]["family"] == "keypoint_rcnn":
        outs.append(("KEYPOINTS", "TYPE_FP32", [-1, len(doc["model"]["keypoint_names"]) or -1, 3]))
    return outs


def engine_config(doc: dict[str, Any], name: str) -> str:
    """The TensorRT plan: max_batch_size 0 (the graph's dims include its static batch)."""
    inp, outputs = _graph_tensors(doc)
    return (_header(name, "the TensorRT engine (plugins, if any, come from libnvinfer_plugin: see README.md)")
            + "platform: \"tensorrt_plan\"\nmax_batch_size: 0\n" + _io("input", [inp]) + _io("output", outputs)
            + _instances("KIND_GPU"))


def onnxruntime_config(doc: dict[str, Any], name: str) -> str:
    """The standard-op graph in Triton's onnxruntime backend (GPU when there is one, else CPU)."""
    inp, outputs = _graph_tensors(doc)
    return (_header(name, "the standard-op precision graph in Triton's onnxruntime backend")
            + "platform: \"onnxruntime_onnx\"\nmax_batch_size: 0\n" + _io("input", [inp]) + _io("output", outputs))


def python_config(doc: dict[str, Any], name: str, role: str) -> str:
    """A Python-backend model running d2build/deploy/triton_model.py in `role`."""
    inp, outputs = _graph_tensors(doc)
    if role == "preprocess":
        ins, outs = [(IMAGE, "TYPE_UINT8", [-1])], [inp, (ORIGINAL_HW, "TYPE_INT32", [2])]
        what, kind = "encoded image bytes -> letterboxed input_tensor and the original size", "KIND_CPU"
    elif role == "onnxruntime":
        ins, outs = [inp], outputs
        what = "the standard-op graph (1/model.onnx) in ONNX Runtime: CUDA on a GPU instance where onnxruntime has it"
        kind = "KIND_AUTO"  # a GPU instance where the server has GPUs, else a CPU one
    else:
        ins, outs = [(ORIGINAL_HW, "TYPE_INT32", [2]), *outputs], _post_outputs(doc)
        what, kind = "graph outputs -> detections in original pixels (JSON as `d2build infer` writes, and arrays)", \
            "KIND_CPU"
    return (_header(name, f"d2build {role}: {what}") + "backend: \"python\"\nmax_batch_size: 0\n"
            + _io("input", ins) + _io("output", outs) + _instances(kind) + _parameter("role", role))


def ensemble_config(doc: dict[str, Any], names: dict[str, str]) -> str:
    """IMAGE (encoded bytes, UINT8 [-1]) -> DETECTIONS (JSON), BOXES, SCORES, CLASSES [, KEYPOINTS]."""
    inp, outputs = _graph_tensors(doc)
    post_outs = _post_outputs(doc)

    def step(model_name: str, inputs: dict[str, str], outs: dict[str, str]) -> str:
        maps = "".join(f"      input_map {{\n        key: \"{k}\"\n        value: \"{v}\"\n      }}\n"
                       for k, v in inputs.items())
        maps += "".join(f"      output_map {{\n        key: \"{k}\"\n        value: \"{v}\"\n      }}\n"
                        for k, v in outs.items())
        return f"    {{\n      model_name: \"{model_name}\"\n      model_version: -1\n{maps}    }}"

    graph_names = [o[0] for o in outputs]
    steps = [
        step(names["preprocess"], {IMAGE: IMAGE}, {inp[0]: "preprocessed", ORIGINAL_HW: "original_hw"}),
        step(names["infer"], {inp[0]: "preprocessed"}, {g: f"raw_{g}" for g in graph_names}),
        step(names["postprocess"], {ORIGINAL_HW: "original_hw", **{g: f"raw_{g}" for g in graph_names}},
             {o[0]: o[0] for o in post_outs}),
    ]
    return (_header(names["ensemble"], f"encoded image -> detections: {names['preprocess']} -> {names['infer']} -> "
                                       f"{names['postprocess']}")
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


def _python_model(folder: Path, bundle: Path, config: str) -> None:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config)
    _link_or_copy(bundle / "model.json", folder / "1" / "model.json")
    shutil.copyfile(package_dir() / "deploy" / "triton_model.py", folder / "1" / "model.py")
    copy_runtime(folder / "1")


def write_repository(bundle: Path, doc: dict[str, Any]) -> list[str]:
    """Write `<bundle>/triton/` for the bundle whose model.json is `doc` (already written, with the
    graph and, if any, the engine beside it); doc["triton"]["model"] is the resolved choice. Returns
    the model names written, steps first, the ensemble last."""
    root = bundle / "triton"
    model = doc["triton"]["model"]
    names = model_names(sanitize(doc["triton"]["prefix"]), model)
    root.mkdir(parents=True, exist_ok=True)
    _python_model(root / names["preprocess"], bundle, python_config(doc, names["preprocess"], "preprocess"))
    _python_model(root / names["postprocess"], bundle, python_config(doc, names["postprocess"], "postprocess"))
    infer = root / names["infer"]
    has_engine = (bundle / "engine.plan").is_file()
    if model == "tensorrt":
        (infer / "1").mkdir(parents=True, exist_ok=True)
        (infer / "config.pbtxt").write_text(engine_config(doc, names["infer"]))
        if has_engine:
            _link_or_copy(bundle / "engine.plan", infer / "1" / "model.plan")
    elif model == "onnxruntime":
        (infer / "1").mkdir(parents=True, exist_ok=True)
        (infer / "config.pbtxt").write_text(onnxruntime_config(doc, names["infer"]))
        _link_or_copy(bundle / "model.onnx", infer / "1" / "model.onnx")
    else:
        _python_model(infer, bundle, python_config(doc, names["infer"], "onnxruntime"))
        _link_or_copy(bundle / "model.onnx", infer / "1" / "model.onnx")
    (root / names["ensemble"] / "1").mkdir(parents=True, exist_ok=True)  # an ensemble needs an (empty) version folder
    (root / names["ensemble"] / "config.pbtxt").write_text(ensemble_config(doc, names))
    (root / "README.md").write_text(readme(doc, names, model, has_engine))
    return [names["preprocess"], names["infer"], names["postprocess"], names["ensemble"]]


def readme(doc: dict[str, Any], names: dict[str, str], model: str, has_engine: bool) -> str:
    trt = (doc.get("engine") or {}).get("tensorrt")
    pip = "pillow onnxruntime" if model == "python" else "pillow"
    lines = [
        f"# Triton model repository for {doc.get('name', 'this bundle')}",
        "",
        f"Written by `d2build deploy` with `deploy.triton.model={model}`. A client sends one encoded image (JPEG, "
        "PNG, ...) as `IMAGE` (UINT8, [-1]) to the ensemble and gets `DETECTIONS` (one JSON string in `d2build "
        "infer`'s per-image format, original pixels, masks as COCO RLE) and `BOXES`, `SCORES`, `CLASSES` arrays.",
        "",
        "| model | what |",
        "|---|---|",
        f"| `{names['ensemble']}` | ensemble: {names['preprocess']} -> {names['infer']} -> {names['postprocess']} |",
        f"| `{names['preprocess']}` | Python backend: decode, letterbox (numpy, Pillow) |",
        f"| `{names['infer']}` | {INFER[model][1]}"
        + (" (**model.plan missing: no engine was built for this bundle**)" if model == "tensorrt" and not has_engine
           else "") + " |",
        f"| `{names['postprocess']}` | Python backend: detections in original pixels, masks, keypoints |",
        "",
    ]
    if model == "python":
        lines += ["On this machine, with pytriton's tritonserver (`pip install --no-deps nvidia-pytriton==0.7.0`, then "
                  "`d2build serve --prepare` once):", "", "    d2build serve <bundle>", "",
                  "It gives the Python models an execution environment with numpy<2, Pillow and onnxruntime "
                  "(config parameter EXECUTION_ENV_PATH) and loads the models one by one, naming any that fails.", ""]
    lines += [
        "In NVIDIA's Triton container (its Python has numpy; add " + pip
        + ("; its TensorRT must be the version the engine was built with" + (f", TensorRT {trt}" if trt else "")
           if model == "tensorrt" else "") + "):",
        "",
        "```",
        "docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\",
        "  -v $PWD/triton:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\",
        f"  bash -c 'pip install {pip} && tritonserver --model-repository=/models'",
        "```",
        "",
    ]
    if model == "tensorrt" and not has_engine:
        lines += ["Without `model.plan` the engine model (and its ensemble) cannot load: build the engine where "
                  "TensorRT and the target GPU are (`d2build deploy` there adds it), or put an engine built from "
                  f"../model.onnx at `{names['infer']}/1/model.plan`. A standard-op bundle deployed with "
                  "`deploy.triton.model=python` (or onnxruntime) loads without one.", ""]
    if model == "tensorrt" and doc["graph"]["flavour"] == "plugins":
        lines += ["The engine uses EfficientNMS_TRT and PyramidROIAlign_TRT from libnvinfer_plugin, which Triton's "
                  "container ships and its TensorRT backend loads; if a plugin is reported missing, start "
                  "tritonserver with `LD_PRELOAD=libnvinfer_plugin.so` (the container's own copy).", ""]
    return "\n".join(lines)


def config_files(root: Path) -> dict[str, str]:
    """{model name: config.pbtxt text} of a written repository (for tests and `d2build deploy`'s summary)."""
    return {p.parent.name: p.read_text() for p in sorted(root.glob("*/config.pbtxt"))}


def python_models(root: Path) -> list[str]:
    """Names of the Python-backend models of a written repository."""
    return [name for name, text in config_files(root).items() if re.search(r'^backend:\s*"python"', text, re.M)]
