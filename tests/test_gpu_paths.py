"""The GPU code paths that run without a GPU: runtime.device parsing and the one-line refusal, the CUDA provider's
options (TF32 included) from the recipe, IO binding through ONNX Runtime's CPU OrtValues (on a small graph and on a
real standard-op graph), TF32 on the eager side, build.tf32 in the engine's settings, and doctor's provider line.
The GPU figures come from bench/gpu_runtime.py on the GPU machine, not from here."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, SMALL_320, d2build, published
from d2build import backends
from d2build.backends import devices
from d2build.backends.base import RunnerError
from d2build.compose import compose
from d2build.schema import RecipeError

HAS_CUDA_PROVIDER = devices.CUDA_PROVIDER in ort.get_available_providers()


# ------------------------------------------------------------------ runtime.device

@pytest.mark.parametrize("text, kind, index", [("cpu", "cpu", 0), ("cuda", "cuda", 0), ("cuda:3", "cuda", 3),
                                               ("CUDA:1", "cuda", 1), ("2", "cuda", 2), (1, "cuda", 1)])
def test_device_names(text, kind, index):
    d = devices.parse(text)
    assert (d.kind, d.index) == (kind, index)
    assert str(d) == ("cpu" if kind == "cpu" else f"cuda:{index}")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cpu:0", "", -1])
def test_bad_device_names(bad):
    with pytest.raises(devices.DeviceError, match="use cpu, cuda or cuda:N|negative"):
        devices.parse(bad)


def test_provider_options_from_the_recipe():
    r = compose(["runtime.tf32=true", "runtime.cuda.cudnn_conv_algo_search=HEURISTIC", "runtime.cuda.prefer_nhwc=true",
                 "runtime.cuda.gpu_mem_limit_gib=2", "runtime.cuda.cudnn_conv_use_max_workspace=false"])
    from d2build.commands._runtime import graph_device

    kw = graph_device(r, "onnxruntime")
    assert kw["tf32"] is True and kw["device"] == "cpu"
    opts = devices.provider_options(devices.parse("cuda:1"), tf32=kw["tf32"], cuda=kw["cuda"], cuda_graph=True)
    assert opts == {"device_id": "1", "use_tf32": "1", "cudnn_conv_algo_search": "HEURISTIC",
                    "cudnn_conv_use_max_workspace": "0", "prefer_nhwc": "1", "gpu_mem_limit": str(2 * 2**30),
                    "enable_cuda_graph": "1"}
    assert graph_device(r, "reference") == {}  # the reference backend has no device


def test_tf32_is_off_unless_asked():
    r = compose([])
    assert r.runtime.tf32 is False and r.build.tf32 is False and r.runtime.device == "cpu"
    opts = devices.provider_options(devices.parse("cuda"))
    assert opts["use_tf32"] == "0" and opts["cudnn_conv_algo_search"] == "EXHAUSTIVE" and "enable_cuda_graph" not in opts
    cuda, cpu = devices.providers(devices.parse("cuda"), tf32=True)
    assert cuda[0] == devices.CUDA_PROVIDER and cuda[1]["use_tf32"] == "1" and cpu == devices.CPU_PROVIDER
    assert devices.providers(devices.parse("cpu"), tf32=True) == [devices.CPU_PROVIDER]


def test_bad_cuda_options_are_refused_by_name():
    with pytest.raises(RecipeError) as e:
        compose(["runtime.cuda.cudnn_conv_algo_search=FAST", "runtime.cuda.gpu_mem_limit_gib=-1"])
    keys = sorted(p.key for p in e.value.problems)
    assert keys == ["runtime.cuda.cudnn_conv_algo_search", "runtime.cuda.gpu_mem_limit_gib"]


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this machine's onnxruntime has a CUDA provider")
def test_cuda_is_refused_in_one_line_without_a_gpu(tmp_path):
    with pytest.raises(RecipeError) as e:
        compose(["runtime.device=cuda", "runtime.backend=onnxruntime"])
    (p,) = e.value.problems
    assert p.key == "runtime.device" and "CPU build" in p.message and "onnxruntime-gpu" in p.fix
    # the command line: one line naming the key, before any stage runs, never a traceback
    proc = subprocess.run([sys.executable, "-m", "d2build", "runtime.device=cuda:0", f"cache.dir={tmp_path / 'c'}",
                           f"hydra.run.dir={tmp_path / 'r'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    lines = [line for line in out.splitlines() if "runtime.device" in line]
    assert len(lines) == 1 and "onnxruntime-gpu" in lines[0], out
    assert not (tmp_path / "c" / "weights").exists()  # no stage ran


def test_reference_backend_on_cuda_is_refused():
    with pytest.raises(RecipeError) as e:
        compose(["runtime.device=cuda", "runtime.backend=reference"])
    assert [p.key for p in e.value.problems] == ["runtime.device"]
    assert "CPU only" in e.value.problems[0].message


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this machine's onnxruntime has a CUDA provider")
def test_cuda_problem_names_what_is_missing():
    what, fix = devices.cuda_problem(devices.parse("cuda"))
    assert "CPU build" in what and "pip install 'd2build[gpu]'" in fix
    assert devices.cuda_problem(devices.parse("cpu")) is None
    got, why = devices.loaded_providers(devices.parse("cpu"))  # a real probe session
    assert got == [devices.CPU_PROVIDER] and why is None


# ------------------------------------------------------------------ IO binding on CPU OrtValues

def _graph(dynamic_output: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> (static) sum per channel, plus (optionally) NonZero: a data-dependent output shape."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Conv", ["input_tensor", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceSum", ["r", "axes"], ["sums"], keepdims=0)]
    outputs = [helper.make_tensor_value_info("sums", TensorProto.FLOAT, [2, 4]),
               helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4, 8, 8])]
    if dynamic_output:
        nodes.append(helper.make_node("NonZero", ["r"], ["nz"]))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, [4, "n"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_tensor", TensorProto.FLOAT, [2, 3, 8, 8])],
                          outputs, [w, axes])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _plain(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input_tensor": x})))


def test_io_binding_on_cpu_ortvalues_matches_session_run():
    model = _graph(dynamic_output=True)
    r = backends.open_graph(model, "onnxruntime")
    assert r.device.kind == "cpu" and r.providers == [devices.CPU_PROVIDER]
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = _plain(model, x)
    got = r.run({"input_tensor": x})
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert got["nz"].shape[1] == int((want["r"] != 0).sum())  # a data-dependent output comes back whole
    only = r.run({"input_tensor": x}, outputs=["sums"])  # a subset of the outputs is bound and fetched
    assert list(only) == ["sums"]
    np.testing.assert_array_equal(only["sums"], want["sums"])
    # bench: input bound once, executed again and again, outputs fetched once
    r.prepare({"input_tensor": x})
    for _ in range(3):
        r.execute()
    r.synchronize()
    fetched = r.fetch()
    for k in want:
        np.testing.assert_array_equal(fetched[k], want[k])


def test_preallocated_outputs_for_cuda_graphs_on_cpu():
    """runtime.cuda_graph binds outputs preallocated at the graph's static shapes (fixed addresses): the same path,
    on CPU OrtValues; a graph with a data-dependent output shape is refused by name."""
    model = _graph()
    r = backends.open_graph(model, "onnxruntime", cuda_graph=True)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = _plain(model, x)
    for _ in range(2):  # the same preallocated buffers, run after run
        got = r.run({"input_tensor": x}, outputs=["sums"])
        np.testing.assert_array_equal(got["sums"], want["sums"])
    with pytest.raises(RunnerError, match="static output shapes; nz"):
        backends.open_graph(_graph(dynamic_output=True), "onnxruntime", cuda_graph=True).run({"input_tensor": x})


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this machine's onnxruntime has a CUDA provider")
def test_runner_on_cuda_without_the_provider_says_so():
    with pytest.raises(RunnerError, match="fell back to CPUExecutionProvider|CUDA"):
        backends.open_graph(_graph(), "onnxruntime", device="cuda", tf32=True)
    with pytest.raises(RunnerError, match="reference backend .* CPU only"):
        backends.open_graph(_graph(), "reference", device="cuda")


def test_io_binding_on_a_real_standard_graph(cache_320, tmp_path):
    """d2build's own standard-op graph (NonZero, NonMaxSuppression: data-dependent intermediates) through IO binding
    gives exactly what a plain session.run gives."""
    d2build([*SMALL_320, "surgery.ops=standard"], cache_320, tmp_path / "run", until="surgery")
    from d2build import detectron, photos
    from d2build.backends import graphs
    from d2build.runtime import Model

    (graph,) = [p / "model.onnx" for p in published(cache_320, "surgery")
                if graphs.flavour(onnx.load(str(p / "model.onnx"))) == "standard"]
    r = backends.open_graph(graph, "onnxruntime")
    from d2build.recipe import ModelSlice

    info = detectron.model_info(ModelSlice.of(compose([*SMALL_320, "surgery.ops=standard"])))
    x, _ = Model(r, info).prepare([photos.load("astronaut").bgr])
    want = _plain(onnx.load(str(graph)), x)
    got = r.run({"input_tensor": x})
    assert int(got["num_detections"][0, 0]) > 0
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # the Python API refuses the same graph on a GPU this machine cannot run it on, in one line, before opening it
    import d2build as api

    with pytest.raises(api.ModelUnavailable, match="device='cuda:0': the installed onnxruntime .* is a CPU build"):
        api.load(graph, device="cuda:0", info=info)


# ------------------------------------------------------------------ TF32 on the eager side, build.tf32

def test_eager_tf32_is_set_explicitly():
    import torch

    from d2build.backends.detectron2 import on_device, set_tf32, tf32_state

    before = set_tf32(True)
    try:
        assert tf32_state() == {"matmul": True, "cudnn": True}
        m = on_device(torch.nn.Conv2d(3, 4, 3).train(), "cpu", tf32=False)
        assert tf32_state() == {"matmul": False, "cudnn": False} and not m.training
        if not torch.cuda.is_available():
            with pytest.raises(devices.DeviceError, match="sees no CUDA device"):
                on_device(torch.nn.Conv2d(3, 4, 3), "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before["matmul"]
        torch.backends.cudnn.allow_tf32 = before["cudnn"]


def test_build_tf32_is_in_the_engine_settings_and_key():
    from d2build.backends import tensorrt as trt

    r_off, r_on = compose([]), compose(["build.tf32=true"])
    off = trt.BuilderSettings.from_config(r_off.build, r_off.model)
    on = trt.BuilderSettings.from_config(r_on.build, r_on.model)
    assert off.tf32 is False and on.tf32 is True
    assert off.key_material()["tf32"] is False and on.key_material() != off.key_material()


def test_doctor_says_which_providers_load():
    from d2build.commands.doctor import lines

    line = dict(lines())["providers"]
    if HAS_CUDA_PROVIDER:
        assert "CUDAExecutionProvider" in line
    else:
        assert line.startswith("CPUExecutionProvider") and "onnxruntime-gpu" in line


def test_deploy_device_argument():
    from d2build.deploy.bundle import BundleError, run_devices

    assert run_devices(0) == (0, devices.Device("cpu"))  # an int: the engine's GPU, the graph on the CPU
    assert run_devices("cuda:1") == (1, devices.Device("cuda", 1))
    assert run_devices("cpu") == (None, devices.Device("cpu"))
    with pytest.raises(BundleError, match="--device: 'gpu' is not a device"):
        run_devices("gpu")


def test_conv_algo_search_auto_is_heuristic_for_float16_graphs_only():
    """The default (measured on the H200: docs/BENCHMARKS.md) and its one-place agreement with conf/config.yaml."""
    from d2build.compose import conf_default

    assert conf_default("runtime.cuda") == devices.CUDA_DEFAULTS  # the runner's fallbacks are conf's defaults
    cuda = devices.parse("cuda")
    assert devices.provider_options(cuda, float16=True)["cudnn_conv_algo_search"] == "HEURISTIC"
    assert devices.provider_options(cuda, float16=False)["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    fixed = {"cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert devices.provider_options(cuda, cuda=fixed, float16=True)["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_stages_run_standard_graphs_where_runtime_device_says_and_key_it():
    """verify, calibration and candidates carry runtime.device (and runtime.tf32, runtime.cuda.*) in their slices
    when the graph can run there (a standard-op graph on a GPU), and nothing of runtime.* on the CPU, so a CPU
    recipe's keys do not change with runtime.tf32; the report states the TF32 policy."""
    from d2build.recipe import GraphDevice, ModelSlice
    from d2build.stages.calibration import CalibrationStage
    from d2build.stages.verify import VerifyStage, render_report, where

    cpu = compose(["surgery.ops=standard", "runtime.tf32=true"])
    assert GraphDevice.of(cpu) is None and VerifyStage().slice(cpu).device is None
    assert CalibrationStage().slice(compose(["precision=int8", "calibration=bundled"])).device is None
    # a GPU recipe (composed past the schema's GPU check, which this CPU machine would refuse)
    import dataclasses

    gpu = dataclasses.replace(cpu, runtime=dataclasses.replace(cpu.runtime, device="cuda:1"))
    dev = GraphDevice.of(gpu)
    assert dev is not None and (dev.device, dev.tf32) == ("cuda:1", True)
    assert devices.stage_options(dev)["device"] == "cuda:1" and devices.stage_options(None) == {}
    plugins = dataclasses.replace(gpu, surgery=dataclasses.replace(gpu.surgery, ops="plugins"))
    assert GraphDevice.of(plugins) is None  # the CPU reference runs plugin graphs
    assert "TF32 ON" in where(dev) and "TF32 off" in where(dataclasses.replace(dev, tf32=False))
    cfg = dataclasses.replace(VerifyStage().slice(cpu), device=dev, model=ModelSlice.of(cpu))
    assert "Where: cuda:1, both sides, TF32 ON" in render_report(cfg, [], {"matched_share": 1.0, "mean_box_iou": 1.0,
                                                                           "mean_score_shift": 0.0,
                                                                           "eager_s_per_image": 0.0,
                                                                           "graph_s_per_image": 0.0}, [])
