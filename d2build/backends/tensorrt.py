"""Backend `tensorrt`, and the one module that talks to TensorRT. Nothing imports `tensorrt` except through `load()`.

Written to the Python API that TensorRT 10.x and 11.x share: `Builder`, `create_network` (with the
STRONGLY_TYPED flag where the enum still has it; 11.x networks are always strongly typed),
`OnnxParser`, `create_builder_config`, `set_memory_pool_limit(WORKSPACE)`,
`builder_optimization_level`, timing caches, `build_serialized_network`, `Runtime`,
`deserialize_cuda_engine`, the named-tensor I/O API and `execute_async_v3`. Precision is never a
builder flag: it is in the graph (casts for fp16, Q/DQ for int8), which is what a strongly typed
network builds. The legacy plugin library (EfficientNMS_TRT, PyramidROIAlign_TRT) is registered
with `init_libnvinfer_plugins` before parsing. Builds use torch for the GPU probe they key on;
running an engine (`EngineRunner`) needs no torch: device memory, copies and streams come from
libcudart through ctypes (d2build/backends/cuda.py).

Everything decided before TensorRT is called (settings from the config, what enters the cache key,
whether and why a build is skipped) is plain Python here and unit-tested without TensorRT.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from d2build.backends.base import Runner, RunnerError
from d2build.recipe import BuildConfig, Files, ModelConfig

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
    except ImportError as e:  # a deployment without torch: ask libcudart itself
        return _gpu_cudart(device, f"torch does not import: {e}")
    cuda_version = torch.version.cuda
    if not torch.cuda.is_available():
        why = "torch sees no CUDA device" + ("" if cuda_version else " (a CPU-only torch build)")
        return False, cuda_version, None, None, why
    if device >= torch.cuda.device_count():
        return True, cuda_version, None, None, (f"build.device={device} but torch sees "
                                                f"{torch.cuda.device_count()} CUDA device(s)")
    major, minor = torch.cuda.get_device_capability(device)
    return True, cuda_version, torch.cuda.get_device_name(device), f"{major}.{minor}", None


def _gpu_cudart(device: int, why_not_torch: str) -> tuple[bool, str | None, str | None, str | None, str | None]:
    """(cuda, None, name, compute capability, error) through d2build.backends.cuda (no torch)."""
    from d2build.backends import cuda

    d = cuda.describe(device)
    if d.get("compute_capability"):
        return True, None, d["name"], d["compute_capability"], None
    return bool(d.get("devices")), None, None, None, f"{why_not_torch}; {d.get('error', 'no CUDA device')}"


@functools.lru_cache(maxsize=None)
def environment(device: int = 0, *, probe_gpu: bool | None = None) -> Environment:
    """Probe TensorRT, then (only if TensorRT imports, unless `probe_gpu`) the GPU through torch; once per
    process and device."""
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
    """What the builder is told, derived from `build.*` and the model's input (testable and keyable)."""

    workspace_bytes: int
    optimization_level: int
    strongly_typed: bool = True  # precision comes from the graph's types, never from builder flags
    #: a dynamic graph's optimization profile for input_tensor: [min, opt, max] shapes [B, 3, H, W]; None: static
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    device: int = 0
    #: fp32 layers may use TF32 (BuilderFlag.TF32, on by TensorRT's default); d2build clears it unless build.tf32
    tf32: bool = False

    @classmethod
    def from_config(cls, build: BuildConfig, model: ModelConfig) -> "BuilderSettings":
        profile = None
        d = model.dynamic
        if d is not None:
            profile = tuple((model.batch_size, 3, *hw) for hw in (d.min, model.input, d.max))
        return cls(workspace_bytes=int(round(build.workspace_gib * GIB)), optimization_level=build.optimization_level,
                   profile=profile, device=build.device, tf32=build.tf32)

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
    if settings.profile is not None:  # a dynamic graph: the input sizes the engine is built for
        profile = builder.create_optimization_profile()
        profile.set_shape("input_tensor", *settings.profile)
        config.add_optimization_profile(profile)
    config.builder_optimization_level = settings.optimization_level
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None:  # explicit both ways: TensorRT sets TF32 by default
        (config.set_flag if settings.tf32 else config.clear_flag)(tf32_flag)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is refused
    say(f"building (optimization level {settings.optimization_level}, workspace "
        f"{settings.workspace_bytes / GIB:g} GiB, strongly typed, TF32 {'on' if settings.tf32 else 'off'})")
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("build_serialized_network returned nothing; TensorRT's log above says why")
    seconds = time.monotonic() - t0
    engine_bytes = bytes(memoryview(serialized))
    (out_dir / Files.ENGINE).write_bytes(engine_bytes)
    (out_dir / Files.TIMING_CACHE).write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    io = engine_io(trt, engine)
    (out_dir / Files.IO).write_text(json.dumps(io, indent=2))
    return {"tensorrt": trt.__version__, "tf32": settings.tf32, "build_seconds": round(seconds, 1),
            "engine_bytes": len(engine_bytes),
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


def numpy_dtype(trt, dtype) -> np.dtype:
    """The numpy dtype of a TensorRT I/O tensor type (what the host buffers hold)."""
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int8: np.int8,
             trt.bool: np.bool_}
    for name, np_type in (("int64", np.int64), ("uint8", np.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = np_type
    if dtype not in table:
        raise RunnerError(f"engine I/O type {dtype} has no numpy equivalent d2build's runner supports "
                          f"({', '.join(sorted(str(k) for k in table))})")
    return np.dtype(table[dtype])


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # the engine's; -1 where dynamic
    capacity: tuple[int, ...]  # what the device buffer was sized for (profile max where dynamic)
    buffer: Any  # cuda.DeviceBuffer


class EngineRunner(Runner):
    """Backend `tensorrt`: a deserialized engine, its I/O in device buffers from d2build.backends.cuda.

    No torch: numpy host arrays, libcudart through ctypes, TensorRT's named-tensor API
    (`set_tensor_address`, `set_input_shape`, `execute_async_v3`). Each I/O tensor gets one device
    buffer at open (its static shape, or the optimisation profile's maximum where a dimension is
    dynamic), bound once. `run(feeds)` copies inputs in (shapes checked, dynamic ones set with
    `set_input_shape`), executes on the runner's own stream, copies the outputs back and
    synchronises once. `prepare()` copies inputs once and `execute()` runs on what is already on the
    device (for timing); `capture()` records one execution as a CUDA graph that `execute()` then
    replays. `close()` frees everything (also done when the runner is collected).
    """

    backend = "tensorrt"

    def __init__(self, engine_path: Path, device: int = 0, cuda: Any = None):
        super().__init__()
        from d2build.backends import cuda as cudart

        self.path = Path(engine_path)
        self.graph = None
        self.stream = 0
        self._bindings: dict[str, _Binding] = {}
        trt = load()
        try:
            self.cuda = cuda or cudart.runtime()
            count = self.cuda.device_count()
        except (cudart.CudaUnavailable, cudart.CudaError) as e:
            raise RunnerError(f"{self.path}: a TensorRT engine needs an NVIDIA GPU and the CUDA runtime: {e}") from None
        if not 0 <= device < count:
            raise RunnerError(f"{self.path}: CUDA device {device} requested, but {count} device(s) are visible "
                              "(CUDA_VISIBLE_DEVICES?)")
        self.device = device
        self.cuda.set_device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"{self.path}: TensorRT {trt.__version__} could not deserialize the engine (built by "
                              "another TensorRT version or for another GPU? TensorRT's log above says which)")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream_create()
        for item in engine_io(trt, self.engine):
            name = item["name"]
            is_input = item["mode"] == "input"
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            capacity = shape
            if any(d < 0 for d in shape):
                if not is_input:  # set by the inputs; sized from the profile's maximum input below
                    capacity = ()
                else:
                    capacity = tuple(int(d) for d in self.engine.get_tensor_profile_shape(name, 0)[2])
            dtype = numpy_dtype(trt, self.engine.get_tensor_dtype(name))
            self._bindings[name] = _Binding(name, is_input, dtype, shape, capacity, None)
        self._size_dynamic_outputs()
        for b in self._bindings.values():
            b.buffer = cudart.DeviceBuffer(self.cuda, int(np.prod(b.capacity, dtype=np.int64)) * b.dtype.itemsize)
            self.context.set_tensor_address(b.name, b.buffer.ptr)
        inputs = [b for b in self._bindings.values() if b.is_input]
        self.input_name = inputs[0].name if self.input_name not in self._bindings else self.input_name
        self.input_shape = self._bindings[self.input_name].shape
        self.output_names = [b.name for b in self._bindings.values() if not b.is_input]
        self._host_inputs: list[np.ndarray] = []

    def _size_dynamic_outputs(self) -> None:
        """Where an input is dynamic, set every input to its profile maximum once and read the
        outputs' shapes from the context: the largest each output can be. A data-dependent output
        (still -1 then) would need an output allocator, which d2build's graphs avoid by design."""
        if all(b.capacity for b in self._bindings.values()):
            return
        for b in self._bindings.values():
            if b.is_input and any(d < 0 for d in b.shape):
                self.context.set_input_shape(b.name, b.capacity)
        for b in self._bindings.values():
            if not b.is_input and not b.capacity:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(b.name))
                if any(d < 0 for d in shape):
                    raise RunnerError(f"{self.path}: output {b.name} has a data-dependent shape {shape}; "
                                      "d2build's runner needs outputs whose size the inputs decide")
                b.capacity = shape

    # ------------------------------------------------------------------ I/O
    def _stage_inputs(self, feeds: dict[str, Any]) -> None:
        """Copy the feeds to their device buffers (async on the runner's stream); shapes checked."""
        self._host_inputs = []
        for name, value in feeds.items():
            b = self._bindings.get(name)
            if b is None or not b.is_input:
                raise RunnerError(f"{self.path}: the engine has no input named {name!r} "
                                  f"(inputs: {[x.name for x in self._bindings.values() if x.is_input]})")
            host = np.ascontiguousarray(value, dtype=b.dtype)
            fits = len(host.shape) == len(b.shape) and all(
                (s == d) if d >= 0 else (s <= c) for s, d, c in zip(host.shape, b.shape, b.capacity))
            if not fits:
                raise RunnerError(f"{self.path}: input {name} takes shape {list(b.shape)} (-1: up to "
                                  f"{list(b.capacity)}); got {list(host.shape)}"
                                  + (f" -- a batch of {host.shape[0]} where the engine takes at most "
                                     f"{b.capacity[0]}" if host.shape[1:] == b.capacity[1:] else ""))
            if any(d < 0 for d in b.shape) and not self.context.set_input_shape(name, host.shape):
                raise RunnerError(f"{self.path}: TensorRT refused input shape {list(host.shape)} for {name}")
            self.cuda.memcpy_htod_async(b.buffer.ptr, host, self.stream)
            self._host_inputs.append(host)  # alive until the stream is synchronised

    def prepare(self, feeds: dict[str, Any]) -> None:
        self._stage_inputs(feeds)
        self.cuda.stream_synchronize(self.stream)

    def execute(self) -> None:
        if self.graph is not None:
            self.graph.launch(self.stream)
            return
        if not self.context.execute_async_v3(self.stream):
            raise RunnerError(f"{self.path}: execute_async_v3 failed; TensorRT's log says why")

    def capture(self) -> None:
        """Record one execution as a CUDA graph (after one plain run, which does TensorRT's lazy set-up)."""
        self.execute()
        self.cuda.stream_synchronize(self.stream)
        self.cuda.begin_capture(self.stream)
        try:
            ok = self.context.execute_async_v3(self.stream)
        finally:
            graph = self.cuda.end_capture(self.stream)
        if not ok:
            graph.close()
            raise RunnerError(f"{self.path}: execute_async_v3 failed while capturing a CUDA graph")
        self.graph = graph

    def synchronize(self) -> None:
        self.cuda.stream_synchronize(self.stream)

    def run(self, feeds: dict[str, Any], outputs: Any = None) -> dict[str, np.ndarray]:
        names = list(self.output_names if outputs is None else outputs)
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise RunnerError(f"{self.path}: no output named {unknown[0]!r} (outputs: {self.output_names})")
        self._stage_inputs(feeds)
        self.execute()
        out = {}
        for name in names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            out[name] = np.empty(shape, dtype=self._bindings[name].dtype)
            self.cuda.memcpy_dtoh_async(out[name], self._bindings[name].buffer.ptr, self.stream)
        self.cuda.stream_synchronize(self.stream)
        self._host_inputs = []
        return out

    def close(self) -> None:
        """Free the CUDA graph, the device buffers and the stream (the engine goes with the object)."""
        if self.graph is not None:
            self.graph.close()
            self.graph = None
        for b in self._bindings.values():
            if b.buffer is not None:
                b.buffer.close()
        if self.stream:
            stream, self.stream = self.stream, 0
            self.cuda.stream_destroy(stream)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a failed __init__
            pass


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
