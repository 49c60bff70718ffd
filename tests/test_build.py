"""The build stage and d2build/backends/tensorrt.py: everything decided before TensorRT is called.

No tensorrt module is faked: these tests use real `Environment` objects (as `trt.environment()`
returns them) and real recipes, and check the builder settings, what enters the engine's cache
key, and when and why a build is skipped or fails. On this machine TensorRT is absent, so the
actual build is checked only through its skip path; `d2build doctor` is run for real.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from d2build.backends import tensorrt as trt
from d2build.cache import Cache
from d2build.compose import compose
from d2build.runner import format_plan, plan
from d2build.stages.base import StageFailed
from d2build.stages.build import BuildStage

SMALL = ["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[640,640]"]
NO_TRT = trt.Environment(None, "TensorRT is not installed (...)", False, None, 0, None, None, "not probed")
NO_GPU = trt.Environment("10.13.0", None, False, "13.0", 0, None, None, "torch sees no CUDA device")
H100 = trt.Environment("10.13.0", None, True, "13.0", 0, "NVIDIA H100 80GB HBM3", "9.0")
A5000 = trt.Environment("10.13.0", None, True, "13.0", 0, "NVIDIA RTX A5000", "8.6")
H100_TRT11 = trt.Environment("11.1.0", None, True, "13.0", 0, "NVIDIA H100 80GB HBM3", "9.0")


def recipe(*overrides: str):
    return compose([*SMALL, *overrides])


def build_key(env: trt.Environment, *overrides: str) -> str:
    """The build stage's key for a recipe on a machine described by `env` (upstream keys planned)."""
    from d2build.cache import make_key

    r = recipe(*overrides)
    upstream = {p.name: p.key for p in plan(r) if p.name in ("precision", "verify")}
    stage = build_stage(env, r.build.device)
    return make_key(stage.key_material(stage.slice(r), upstream))


def build_stage(env: trt.Environment, device: int = 0) -> BuildStage:
    return BuildStage({"graph": "precision"}, after=("verify",), device=device, environment=env)


# ------------------------------------------------------------------ config -> builder settings

def test_builder_settings_from_config():
    r = recipe("build.workspace_gib=2.5", "build.optimization_level=5")
    s = trt.BuilderSettings.from_config(r.build, r.model)
    assert s.workspace_bytes == int(2.5 * 2**30)
    assert s.optimization_level == 5
    assert s.strongly_typed is True  # precision is in the graph; never a builder flag
    assert s.profile is None and s.device == 0  # the batch is in the graph; a static graph needs no profile
    assert "device" not in s.key_material()
    r = recipe("surgery.ops=standard", "model.batch_size=2", "model.dynamic={min:[384,384],max:[704,704]}")
    d = trt.BuilderSettings.from_config(r.build, r.model)
    assert d.profile == ((2, 3, 384, 384), (2, 3, 640, 640), (2, 3, 704, 704))  # min, opt (model.input), max


# ------------------------------------------------------------------ key material

def test_engine_key_follows_tensorrt_gpu_settings_and_graph_only():
    base = build_key(H100)
    assert build_key(A5000) != base  # another compute capability: another engine
    assert build_key(H100_TRT11) != base  # another TensorRT version
    assert build_key(H100, "build.optimization_level=5") != base
    assert build_key(H100, "build.workspace_gib=8") != base
    assert build_key(H100, "precision=fp16") != base  # another graph
    # not the engine: which GPU index builds it, whether a build is required, verify's settings
    assert build_key(H100, "build.device=1") == base
    assert build_key(H100, "build.required=true") == base
    assert build_key(H100, "verify.count=2", "verify.min_recovered=0.9") == base
    same_arch = trt.Environment("10.13.0", None, True, "13.0", 0, "NVIDIA H100 PCIe", "9.0")
    assert build_key(same_arch) == base  # same architecture, same TensorRT: the engine is valid there


def test_build_material_names_tensorrt_and_compute_capability():
    r = recipe()
    upstream = {p.name: p.key for p in plan(r)}
    stage = build_stage(H100)
    m = stage.key_material(stage.slice(r), upstream)
    assert m["config"]["tensorrt"] == "10.13.0" and m["config"]["compute_capability"] == "9.0"
    assert m["upstream"] == {"graph": upstream["precision"]}  # verify gates the build; it is not in the key


# ------------------------------------------------------------------ skip logic

def test_skip_reasons_say_what_is_missing_and_how_to_get_it():
    no_trt = trt.skip_reason(NO_TRT)
    assert no_trt.startswith("TensorRT is not installed")
    assert "pip install 'd2build[trt]'" in no_trt and "container" in no_trt and "\n" not in no_trt
    no_gpu = trt.skip_reason(NO_GPU)
    assert "no usable NVIDIA GPU" in no_gpu and "torch sees no CUDA device" in no_gpu
    assert trt.skip_reason(H100) is None


def test_this_machine_has_no_tensorrt_and_says_so():
    env = trt.environment(0)
    assert env.tensorrt is None and "not installed" in env.tensorrt_error
    assert trt.skip_reason(env).startswith("TensorRT is not installed")
    with pytest.raises(ImportError, match="d2build\\[trt\\]"):
        trt.load()


def test_build_skips_unless_required_then_fails_with_the_reason(tmp_path):
    optional, required = recipe(), recipe("build.required=true")
    assert build_stage(NO_TRT).skip_reason(optional).startswith("TensorRT is not installed")
    assert build_stage(H100).skip_reason(optional) is None
    stage = build_stage(NO_TRT)
    assert stage.skip_reason(required) is None  # not skipped: run() fails instead
    with pytest.raises(StageFailed, match="build.required=true, but TensorRT is not installed"):
        stage.run(stage.slice(required), {}, tmp_path, None)
    with pytest.raises(StageFailed, match="no usable NVIDIA GPU"):
        build_stage(NO_GPU).run(stage.slice(required), {}, tmp_path, None)


# ------------------------------------------------------------------ the DAG

def test_pipeline_has_calibration_only_at_int8_and_build_after_verify():
    for precision, stages in (("fp32", ["weights", "export", "surgery", "precision", "verify", "build", "check"]),
                              ("fp16", ["weights", "export", "surgery", "precision", "verify", "build", "check"])):
        assert [p.name for p in plan(recipe(f"precision={precision}"))] == stages
    planned = plan(recipe("precision=int8", "calibration=bundled"))
    names = [p.name for p in planned]
    assert names == ["weights", "export", "surgery", "surgery[cal]", "calibration", "precision", "verify", "build",
                     "check"]
    needs = {p.name: p.needs for p in planned}
    # not the recipe's graph: its NMS thresholds do not reach calibration (the default NMS graph does)
    assert needs["surgery[cal]"] == ("export",) and needs["calibration"] == ("surgery[cal]",)
    assert needs["precision"] == ("surgery", "calibration")
    assert needs["build"] == ("precision", "verify")
    assert needs["check"] == ("weights", "precision", "build")
    keys = {p.name: p.key for p in planned}
    assert keys["surgery[cal]"] == keys["surgery"]  # the recipe's NMS is the default: one graph, one entry
    swept = {p.name: p.key for p in plan(recipe("precision=int8", "calibration=bundled", "surgery.nms.iou_threshold=0.6"))}
    assert swept["surgery"] != keys["surgery"] and swept["surgery[cal]"] == keys["surgery[cal]"]
    assert swept["calibration"] == keys["calibration"]
    text = format_plan(planned)
    assert "calibration" in text.splitlines()[5] and "TensorRT is not installed" in text.splitlines()[-1]


def test_calibration_key_ignores_final_nms_but_not_rpn_images_or_method():
    def key(*o):
        return {p.name: p.key for p in plan(recipe("precision=int8", "calibration=bundled", *o))}

    base = key()
    for o in ("surgery.nms.iou_threshold=0.4", "surgery.nms.score_threshold=0.3", "surgery.nms.max_detections=50"):
        k = key(o)
        assert k["calibration"] == base["calibration"] and k["precision"] != base["precision"], o
    for o in ("surgery.rpn.iou_threshold=0.6", "calibration.method=minmax", "calibration.count=2",
              "model.input=[672,672]"):
        assert key(o)["calibration"] != base["calibration"], o


# ------------------------------------------------------------------ one GPU job at a time

def test_gpu_lock_is_exclusive_per_device(tmp_path):
    cache = Cache(tmp_path)
    a, b = cache.gpu_lock(trt.gpu_identity(0)), cache.gpu_lock(trt.gpu_identity(0))
    other = cache.gpu_lock(trt.gpu_identity(1))
    assert a.lock_file == b.lock_file != other.lock_file
    name = Path(a.lock_file).name  # named by host and GPU, so a shared cache does not serialise nodes
    assert name == f".gpu-{trt.gpu_identity(0)}.lock"
    assert trt.gpu_identity(0).split("-")[0] == socket.gethostname().split("-")[0]
    order = []
    with a:
        t = threading.Thread(target=lambda: (b.acquire(), order.append("b"), b.release()))
        t.start()
        with other:  # another GPU is free meanwhile
            order.append("other")
        time.sleep(0.3)
        order.append("a done")
    t.join(5)
    assert order == ["other", "a done", "b"]


# ------------------------------------------------------------------ doctor and the schema

def test_doctor_reports_one_line_each_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "d2build", "doctor"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    heads = [line.split()[0] for line in lines]
    assert heads == ["TensorRT", "plugins", "flavours", "torch", "CUDA", "GPU", "Detectron2", "onnxruntime", "providers",
                     "build"]
    assert "missing" in lines[0] and "d2build[trt]" in lines[0]
    assert "0.7.2" in lines[6] and "extensions" in lines[7]


@pytest.mark.parametrize("override, key, text", [
    ("runtime.backend=onnx", "runtime.backend", "unknown backend"),
    ("build.device=-1", "build.device", "negative"),
    ("runtime.iterations=0", "runtime.iterations", "measures nothing"),
    ("calibration.count=9", "calibration.count", "bundled photographs"),
    ("precision.keep_fp32=[' ']", "precision.keep_fp32[0]", "is empty"),
])
def test_schema_rejects_bad_build_runtime_and_calibration_settings(override, key, text):
    from d2build.recipe import RecipeError

    extra = ["calibration=bundled"] if key.startswith("calibration") else []
    with pytest.raises(RecipeError) as info:
        compose([*SMALL, *extra, override])
    found = [p for p in info.value.problems if p.key == key]
    assert found and text in str(found[0]) and found[0].fix, info.value
