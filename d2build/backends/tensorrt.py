"""Backend `tensorrt`, and the one module that talks to TensorRT. Nothing imports `tensorrt` except through `load()`.

Written to the Python API that TensorRT 10.x and 11.x share: `Builder`, `create_network` (with the
STRONGLY_TYPED flag where the enum still has it; 11.x networks are always strongly typed),
`OnnxParser`, `create_builder_config`, `set_memory_pool_limit(WORKSPACE)`,
`builder_optimization_level`, timing caches, `build_serialized_network`, `Runtime`,
`deserialize_cuda_engine`, the named-tensor I/O API and `execute_async_v3`. Precision is never a
builder flag: it is in the graph (casts for fp16, Q/DQ for int8), which is what a strongly typed
network builds. The legacy plugin library (EfficientNMS_TRT, PyramidROIAlign_TRT) is registered
with `init_libnvinfer_plugins` before parsing. Device buffers are torch CUDA tensors.

Everything decided before TensorRT is called (settings from the config, what enters the cache key,
whether and why a build is skipped) is plain Python here and unit-tested without TensorRT.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from d2build.backends.base import Runner

INSTALL_HINT = ("pip install 'd2build[trt]' on a machine that can reach NVIDIA's package index "
                "(pypi.nvidia.com), or run d2build in NVIDIA's TensorRT container (nvcr.io/nvidia/tensorrt)")
GIB = 1 << 30


# ----------------------------------------------------------------------------- what is here


@dataclass(frozen=True)
class Environment:
    """TensorRT and GPU as this process sees them; every field is plain data (JSON-able)."""

    tensorrt: str | None  # version, or None when it cannot be imported
    tensorrt_error: str | None  # why not (absent, or the import error)
    cuda: bool  # torch sees a CUDA device
    torch_cuda: str | None  # torch's CUDA version
    device: int
    gpu: str | None  # device name
    compute_capability: str | None  # "9.0"
    gpu_error: str | None = None


def load():
    """The tensorrt module (imported on first use); raises ImportError with the install hint."""
    if importlib.util.find_spec("tensorrt") is None:
        raise ImportError(f"TensorRT is not installed ({INSTALL_HINT})")
    return importlib.import_module("tensorrt")


def _tensorrt() -> tuple[str | None, str | None]:
    try:
        trt = load()
    except ImportError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) is reported, not raised
        return None, f"tensorrt does not import: {type(e).__name__}: {e}"
    return str(getattr(trt, "__version__", "unknown")), None


def _gpu(device: int) -> tuple[bool, str | None, str | None, str | None, str | None]:
    """(cuda, torch CUDA version, name, compute capability, error) through torch."""
    try:
        import torch
    except ImportError as e:
        return False, None, None, None, f"torch does not import: {e}"
    cuda_version = torch.version.cuda
    if not torch.cuda.is_available():
        why = "torch sees no CUDA device" + ("" if cuda_version else " (a CPU-only torch build)")
        return False, cuda_version, None, None, why
    if device >= torch.cuda.device_count():
        return True, cuda_version, None, None, (f"build.device={device} but torch sees "
                                                f"{torch.cuda.device_count()} CUDA device(s)")
    major, minor = torch.cuda.get_device_capability(device)
    return True, cuda_version, torch.cuda.get_device_name(device), f"{major}.{minor}", None


def environment(device: int = 0, *, probe_gpu: bool | None = None) -> Environment:
    """Probe TensorRT, then (only if TensorRT imports, unless `probe_gpu`) the GPU through torch."""
    version, error = _tensorrt()
    if probe_gpu is None:
        probe_gpu = version is not None
    if not probe_gpu:
        return Environment(version, error, False, None, device, None, None, "not probed (no TensorRT)")
    cuda, torch_cuda, name, cc, gpu_error = _gpu(device)
    return Environment(version, error, cuda, torch_cuda, device, name, cc, gpu_error)


def skip_reason(env: Environment) -> str | None:
    """One line: why no engine can be built here, and how to get what is missing; None if it can."""
    if env.tensorrt is None:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    if env.compute_capability is None:
        return (f"no usable NVIDIA GPU ({env.gpu_error or 'none found'}): build on a machine with an NVIDIA GPU, "
                "a CUDA build of torch and TensorRT (e.g. NVIDIA's TensorRT container)")
    return None


# ----------------------------------------------------------------------------- build settings


@dataclass(frozen=True)
class BuilderSettings:
    """What the builder is told, derived from `build.*` alone (so it is testable and keyable)."""

    workspace_bytes: int
    optimization_level: int
    strongly_typed: bool = True  # precision comes from the graph's types, never from builder flags
    batch_size: int = 1  # the graph's static batch (only 1 so far)
    device: int = 0

    @classmethod
    def from_config(cls, build: dict[str, Any]) -> "BuilderSettings":
        return cls(workspace_bytes=int(round(float(build["workspace_gib"]) * GIB)),
                   optimization_level=int(build["optimization_level"]),
                   batch_size=int(build["batch_size"]),
                   device=int(build.get("device", 0)))

    def key_material(self) -> dict[str, Any]:
        """What changes the engine (the device index does not: the GPU model enters the key)."""
        d = asdict(self)
        d.pop("device")
        return d


# ----------------------------------------------------------------------------- building


class BuildError(RuntimeError):
    pass


def _network_flags(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(flag)) if flag is not None else 0  # 11.x: always strongly typed, flag may be gone


def build_engine(onnx_path: Path, settings: BuilderSettings, out_dir: Path,
                 say: Callable[[str], None] = print, timing_cache: bytes = b"") -> dict[str, Any]:
    """Parse the precision graph, build a strongly typed engine; write engine.plan, timing.cache
    and io.json into `out_dir`; return facts for the manifest."""
    import torch

    trt = load()
    torch.cuda.set_device(settings.device)
    logger = trt.Logger(trt.Logger.WARNING)
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise BuildError("init_libnvinfer_plugins failed: the TensorRT plugin library (libnvinfer_plugin) "
                         "is missing or does not load; the plugins of surgery.ops=plugins graphs live there, and so "
                         "does ROIAlign_TRT, which the ONNX parser uses for RoiAlign in surgery.ops=standard graphs")
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError("TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is refused
    say(f"building (optimization level {settings.optimization_level}, workspace "
        f"{settings.workspace_bytes / GIB:g} GiB, strongly typed)")
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("build_serialized_network returned nothing; TensorRT's log above says why")
    seconds = time.monotonic() - t0
    engine_bytes = bytes(memoryview(serialized))
    (out_dir / "engine.plan").write_bytes(engine_bytes)
    (out_dir / "timing.cache").write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    io = engine_io(trt, engine)
    (out_dir / "io.json").write_text(json.dumps(io, indent=2))
    return {"tensorrt": trt.__version__, "build_seconds": round(seconds, 1), "engine_bytes": len(engine_bytes),
            "layers": network.num_layers, "io": io}


def engine_io(trt, engine) -> list[dict[str, Any]]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        out.append({"name": name, "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                    "shape": list(engine.get_tensor_shape(name)), "dtype": str(engine.get_tensor_dtype(name))})
    return out


# ----------------------------------------------------------------------------- running


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dtype not in table:
        raise BuildError(f"engine I/O type {dtype} is not supported by d2build's runner")
    return table[dtype]


class EngineRunner(Runner):
    """Backend `tensorrt`: a deserialized engine with torch CUDA tensors bound to every I/O tensor.

    `run(feeds)` copies inputs in, executes on its own stream and returns numpy outputs;
    `prepare()` copies inputs once and `execute()` runs on what is already on the device (for
    timing); `capture()` records one execution as a CUDA graph that `execute()` then replays.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: Path, device: int = 0):
        super().__init__()
        import torch

        trt = load()
        self.torch = torch
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BuildError(f"{engine_path}: TensorRT could not deserialize the engine (built by another "
                             "TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        for item in engine_io(trt, self.engine):
            name = item["name"]
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BuildError(f"engine tensor {name} has a dynamic shape {shape}; d2build builds static engines")
            t = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device=self.device)
            self.context.set_tensor_address(name, t.data_ptr())
            (self.inputs if item["mode"] == "input" else self.outputs)[name] = t
        self.graph = None
        self.input_shape = tuple(self.inputs[self.input_name].shape)
        self.output_names = list(self.outputs)

    def prepare(self, feeds: dict[str, Any]) -> None:
        for name, value in feeds.items():
            self.inputs[name].copy_(self.torch.as_tensor(value))
        self.torch.cuda.synchronize(self.device)

    def execute(self) -> None:
        if self.graph is not None:
            with self.torch.cuda.stream(self.stream):
                self.graph.replay()
            return
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BuildError("execute_async_v3 failed; TensorRT's log says why")

    def capture(self) -> None:
        """Record one execution as a CUDA graph (after one plain run, which does lazy set-up)."""
        self.execute()
        self.stream.synchronize()
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.graph = graph

    def synchronize(self) -> None:
        self.stream.synchronize()

    def run(self, feeds: dict[str, Any], outputs: Any = None) -> dict[str, Any]:
        names = list(self.outputs if outputs is None else outputs)
        with self.torch.cuda.stream(self.stream):
            for name, value in feeds.items():
                self.inputs[name].copy_(self.torch.as_tensor(value), non_blocking=False)
            self.execute()
            out = {name: self.outputs[name].cpu().numpy() for name in names}
        self.stream.synchronize()
        return out


# ----------------------------------------------------------------------------- one GPU, one job


def gpu_identity(device: int) -> str:
    """What names a GPU across processes: this host's name and the device's UUID (unique even when
    CUDA_VISIBLE_DEVICES renumbers devices, as SLURM does), or its index where torch cannot tell."""
    import socket

    ident = f"cuda{device}"
    try:
        import torch

        if torch.cuda.is_available():
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            ident = str(uuid) if uuid else ident
    except Exception:  # noqa: BLE001 - no usable CUDA: the index is the best name there is
        pass
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{ident}"
