"""Where a graph runs (`runtime.device` = cpu | cuda | cuda:N) and what ONNX Runtime's CUDA provider is told.

Everything here is decided before a session opens, so a recipe that asks for a GPU this machine does
not have is refused in one line (`cuda_problem`) before any stage runs, and the provider options a
session gets are a pure function of the recipe (`provider_options`), testable without a GPU.

TF32 is explicit: ONNX Runtime's CUDA provider (`use_tf32`), PyTorch's cuDNN convolutions
(`torch.backends.cudnn.allow_tf32`) and TensorRT's builder (BuilderFlag.TF32) all default to TF32 on
Ampere and later, which rounds fp32 convolution and matmul inputs to 10 mantissa bits. d2build turns it
off unless `runtime.tf32=true` (graphs, Detectron2 eager) or `build.tf32=true` (engines), so an fp32
comparison compares fp32 arithmetic (see backends/detectron2.py for the eager side).

The provider's option names are ONNX Runtime's (onnxruntime/core/providers/cuda/
cuda_execution_provider_info.cc): device_id, use_tf32, cudnn_conv_algo_search (EXHAUSTIVE, HEURISTIC,
DEFAULT), cudnn_conv_use_max_workspace, prefer_nhwc, gpu_mem_limit, enable_cuda_graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from d2build.backends.base import RunnerError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
#: runtime.cuda.cudnn_conv_algo_search: ONNX Runtime's three, and `auto`: HEURISTIC for a graph with float16 nodes,
#: EXHAUSTIVE otherwise. Measured on the H200 (docs/BENCHMARKS.md, Mask R-CNN standard graph, TF32 off): HEURISTIC
#: takes the fp16 graph from 15.2 to 10.4 ms at 640 and from 39.3 to 14.1 ms at 1344 (EXHAUSTIVE's timed search
#: lands on fp16 convolutions no faster than fp32), while fp32 is no faster with it (15.8 vs 16.2 ms at 640, 37.9 vs
#: 32.9 ms at 1344).
CONV_ALGO_SEARCH = ("auto", "EXHAUSTIVE", "HEURISTIC", "DEFAULT")
GIB = 1 << 30
#: runtime.cuda.* as conf/config.yaml writes them (schema.py checks the recipe's against these names)
CUDA_DEFAULTS: dict[str, Any] = {"cudnn_conv_algo_search": "auto", "cudnn_conv_use_max_workspace": True,
                                 "prefer_nhwc": False, "gpu_mem_limit_gib": None}
GPU_INSTALL = ("pip install 'd2build[gpu]', then pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
               "onnxruntime-gpu (both wheels install the same `onnxruntime` package: only one may be installed)")

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class DeviceError(RunnerError, ValueError):
    """A device name d2build does not know, or a device this machine cannot run a graph on."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def ort_type(self) -> str:
        """ONNX Runtime's name for the device of an OrtValue or a bound output."""
        return self.kind


def parse(value: Any) -> Device:
    """`cpu`, `cuda`, `cuda:N` (or a Device); an int N means cuda:N (the deploy runtime's --device N)."""
    if isinstance(value, Device):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise DeviceError(f"device {value} is negative; use cpu, cuda or cuda:N")
        return Device("cuda", value)
    text = str(value).strip().lower()
    if text.isdigit():
        return Device("cuda", int(text))
    m = _DEVICE.match(text)
    if not m or (m.group(1) == "cpu" and m.group(2) is not None):
        raise DeviceError(f"{value!r} is not a device; use cpu, cuda or cuda:N (N: the CUDA device index)")
    return Device(m.group(1), int(m.group(2) or 0))


def cuda_option_problems(cuda: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key under runtime.cuda, message, fix) for values the CUDA provider would refuse or misread."""
    out = []
    algo = cuda.get("cudnn_conv_algo_search", CUDA_DEFAULTS["cudnn_conv_algo_search"])
    if algo not in CONV_ALGO_SEARCH:
        out.append(("cudnn_conv_algo_search", f"{algo!r} is not one of {', '.join(CONV_ALGO_SEARCH)}",
                    "auto (HEURISTIC for float16 graphs, EXHAUSTIVE otherwise), EXHAUSTIVE (cuDNN times every "
                    "algorithm on the first run) or HEURISTIC (cuDNN's guess, no search)"))
    limit = cuda.get("gpu_mem_limit_gib")
    if limit is not None and not limit > 0:
        out.append(("gpu_mem_limit_gib", f"{limit} is not positive", "use null (no limit) or a size in GiB, e.g. 8"))
    return out


def provider_options(device: Device, *, tf32: bool = False, cuda: Mapping[str, Any] | None = None,
                     cuda_graph: bool = False, float16: bool = False) -> dict[str, str]:
    """The CUDA provider's options for `device` from runtime.tf32 and runtime.cuda.* (strings, as ONNX Runtime
    parses them); `float16`: the graph has float16 nodes (what cudnn_conv_algo_search=auto decides by)."""
    c = {**CUDA_DEFAULTS, **(cuda or {})}
    algo = str(c["cudnn_conv_algo_search"])
    if algo == "auto":
        algo = "HEURISTIC" if float16 else "EXHAUSTIVE"
    opts = {"device_id": str(device.index), "use_tf32": "1" if tf32 else "0",
            "cudnn_conv_algo_search": algo,
            "cudnn_conv_use_max_workspace": "1" if c["cudnn_conv_use_max_workspace"] else "0",
            "prefer_nhwc": "1" if c["prefer_nhwc"] else "0"}
    if c.get("gpu_mem_limit_gib"):
        opts["gpu_mem_limit"] = str(int(float(c["gpu_mem_limit_gib"]) * GIB))
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    for k, v in c.items():  # provider options d2build has no key for (e.g. tunable_op_enable): passed through
        if k not in CUDA_DEFAULTS and v is not None:
            opts[k] = str(int(v)) if isinstance(v, bool) else str(v)
    return opts


def providers(device: Device, *, tf32: bool = False, cuda: Mapping[str, Any] | None = None,
              cuda_graph: bool = False, float16: bool = False) -> list[Any]:
    """ONNX Runtime's providers argument: the CPU provider alone, or the CUDA provider (with its options) first
    and the CPU provider for what CUDA has no kernel for."""
    if not device.is_cuda:
        return [CPU_PROVIDER]
    return [(CUDA_PROVIDER, provider_options(device, tf32=tf32, cuda=cuda, cuda_graph=cuda_graph, float16=float16)),
            CPU_PROVIDER]


def graph_options(runtime: Any, backend: str, cuda_graph: bool = False) -> dict[str, Any]:
    """open_graph's device arguments from a recipe's `runtime` section (runtime.device, .tf32, .cuda.*); the
    onnxruntime backend only (the reference backend runs on the CPU). Every caller that opens a graph for a
    recipe (infer, bench, eval; verify, calibration and candidates in phase 2 of issue 19) goes through here."""
    import dataclasses

    if backend != "onnxruntime":
        return {}
    cuda = runtime.cuda if isinstance(runtime.cuda, Mapping) else dataclasses.asdict(runtime.cuda)
    return {"device": runtime.device, "tf32": runtime.tf32, "cuda": dict(cuda), "cuda_graph": cuda_graph}


def stage_options(where: Any) -> dict[str, Any]:
    """open_graph's device arguments for a stage's `GraphDevice` slice (recipe.py): {} for None (the CPU)."""
    return graph_options(where, "onnxruntime") if where is not None else {}


def preload() -> None:
    """Load the CUDA/cuDNN libraries of the `nvidia-*` wheels before the CUDA provider needs them (a no-op where
    torch loaded them already, or on a CPU build of onnxruntime)."""
    import onnxruntime as ort

    fn = getattr(ort, "preload_dlls", None)
    if fn is not None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the session's own check below says what is missing
            pass


def _probe_model() -> bytes:
    """A one-node graph (Add) to ask ONNX Runtime whether the CUDA provider really loads."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def loaded_providers(device: Device) -> tuple[list[str], str | None]:
    """(providers a session on `device` really got, why the CUDA provider did not load or None)."""
    import onnxruntime as ort

    if device.is_cuda:
        preload()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the CUDA provider's load failure is reported below, not on the console
    try:
        ort.set_default_logger_severity(4)
        session = ort.InferenceSession(_probe_model(), options, providers=providers(device))
        got = session.get_providers()
    except Exception as e:  # noqa: BLE001 - an invalid device id, a broken install: reported as the reason
        return [], f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)
    if device.is_cuda and CUDA_PROVIDER not in got:
        return got, "ONNX Runtime fell back to the CPU provider (the CUDA provider's libraries, libcudart/libcublas/" \
                    "libcudnn, did not load, or no CUDA device answered)"
    return got, None


def cuda_device_count() -> int | None:
    """CUDA devices visible through libcudart (ctypes, no torch), or None without a CUDA runtime library."""
    try:
        from d2build.backends import cuda

        return cuda.runtime().device_count()
    except Exception:  # noqa: BLE001 - no libcudart, no driver: no device, as far as d2build can tell
        return None


def cuda_problem(device: Device) -> tuple[str, str] | None:
    """(what is missing, the fix) when a graph cannot run on `device` here, None when it can: no onnxruntime-gpu,
    no CUDA device, a provider that does not load. Checked before any stage runs, so the refusal is one line."""
    if not device.is_cuda:
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed", f"install onnxruntime-gpu: {GPU_INSTALL}"
    if CUDA_PROVIDER not in ort.get_available_providers():
        return (f"the installed onnxruntime {ort.__version__} is a CPU build (no {CUDA_PROVIDER})",
                f"{GPU_INSTALL}; or use runtime.device=cpu")
    count = cuda_device_count()
    if count == 0:
        return "no CUDA device is visible on this machine (libcudart reports 0 devices)", "use runtime.device=cpu"
    if count is not None and device.index >= count:
        return (f"{device} asked for, but this machine has {count} CUDA device(s)",
                f"use runtime.device=cuda:0..cuda:{count - 1}")
    _, why = loaded_providers(device)
    if why:
        return (f"onnxruntime {ort.__version__} has a CUDA provider, but it does not run here: {why}",
                "install the CUDA runtime, cuBLAS and cuDNN that onnxruntime-gpu needs (PyTorch's CUDA wheels bring "
                "them; `d2build doctor` says which providers load), or use runtime.device=cpu")
    return None
