"""One way to run a model: every caller (verify, calibration, infer, eval, bench, the engine check)
opens a `Runner` here and feeds it named arrays.

    open_graph(path_or_model, backend="auto", device="cpu")   an ONNX graph on the CPU, or (onnxruntime) a GPU
    open_engine(path, device)                   a TensorRT engine

Backends, one module each (Polygraphy's layout: a loader and a runner per backend, imported lazily):

* `reference`: a graph with TensorRT plugin nodes (EfficientNMS_TRT, PyramidROIAlign_TRT), run by
  ONNX Runtime with d2build's reference implementations of the plugins as custom ops;
* `onnxruntime`: a graph of standard ONNX ops only, run by a plain `onnxruntime.InferenceSession`
  (its own NonMaxSuppression and RoiAlign kernels), on the CPU or, with `device="cuda[:N]"`
  (runtime.device), on ONNX Runtime's CUDA provider (`devices`: options, TF32, the refusal without a GPU);
* `tensorrt`: an engine (the only module that imports tensorrt);
* `detectron2`: not a runner but the eager model the graph came from (`EagerModel`), for `d2build eval`.

`auto` picks `reference` for a graph with plugin nodes and `onnxruntime` for one without. Whether
float16 nodes are emulated is decided from the graph itself (`graphs.executable`), the same way for
every caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build.backends.base import Runner, RunnerError

GRAPH_BACKENDS = ("reference", "onnxruntime")
#: what `runtime.backend` may name: an engine, a graph backend, or Detectron2 eager (backends/detectron2.py)
BACKENDS = ("tensorrt", *GRAPH_BACKENDS, "detectron2")

__all__ = ["BACKENDS", "GRAPH_BACKENDS", "Runner", "RunnerError", "open_engine", "open_graph"]


def open_graph(model: Any, backend: str = "auto", *, threads: int | None = None,
               providers: list[Any] | None = None, device: Any = "cpu", tf32: bool = False,
               cuda: dict[str, Any] | None = None, cuda_graph: bool = False, configure: Any = None) -> Runner:
    """A runner over an ONNX graph (a path or a ModelProto): `reference`, `onnxruntime` or `auto`.

    `device` (cpu | cuda | cuda:N), `tf32`, `cuda` (runtime.cuda.* provider options) and `cuda_graph` apply to
    `onnxruntime`; the reference backend runs on the CPU only. `providers` overrides the device's providers
    (names or (name, options) tuples, as ONNX Runtime takes them); `configure(SessionOptions)` adjusts the
    session (profiling)."""
    from d2build.backends import devices, graphs

    dev = devices.parse(device)

    proto = graphs.load(model)
    flavour = graphs.flavour(proto)
    if backend == "auto":
        backend = "reference" if flavour == "plugins" else "onnxruntime"
    if backend == "reference":
        if dev.is_cuda:
            raise devices.DeviceError(f"runtime.device={dev}: the reference backend (d2build's plugin implementations) runs "
                              "on the CPU only; build the graph with surgery.ops=standard and use "
                              "runtime.backend=onnxruntime to run it on a GPU")
        from d2build.backends.reference import ReferenceRunner

        return ReferenceRunner(proto, threads=threads)
    if backend == "onnxruntime":
        if flavour == "plugins":
            raise RunnerError("runtime.backend=onnxruntime runs standard-op graphs only; this graph has TensorRT "
                              "plugin nodes (surgery.ops=plugins): use runtime.backend=reference, or build the "
                              "graph with surgery.ops=standard")
        from d2build.backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(proto, threads=threads, providers=providers, device=dev, tf32=tf32, cuda=cuda,
                                 cuda_graph=cuda_graph, configure=configure)
    raise RunnerError(f"unknown graph backend {backend!r}; use one of {', '.join(GRAPH_BACKENDS)}")


def open_engine(path: str | Path, device: int = 0) -> Runner:
    """A runner over a serialized TensorRT engine (needs TensorRT and a GPU)."""
    from d2build.backends.tensorrt import EngineRunner

    return EngineRunner(Path(path), device)
