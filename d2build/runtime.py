"""Running a built model: one interface over TensorRT engines and the CPU reference executor.

`d2build infer`, `bench` and `eval` open a `Model` and call `detect(photo)`: letterbox with the
model's PIXEL_MEAN padding, run, decode -- the same `d2build.processing` code verify uses, so what
the commands report is what verify checked. Two backends (`runtime.backend`):

* `tensorrt`: the `build` stage's engine, run by `d2build.trt.EngineRunner` (torch CUDA buffers,
  `execute_async_v3`);
* `reference`: the `precision` stage's graph on the CPU, plugins included (ReferenceSession),
  float16 nodes without a CPU kernel emulated as verify does.

A model comes from a recipe (its cached artifacts; what is missing is built through the runner,
exactly as `d2build` would) or from an explicit `--engine`/`--graph` path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("d2build")


class ModelUnavailable(RuntimeError):
    """A model that cannot be opened here; the message says why and what to do."""


class ReferenceRunner:
    """The precision graph on CPU (ONNX Runtime, reference plugins, fp16 emulation where needed)."""

    backend = "reference"

    def __init__(self, graph: Path, threads: int | None = None):
        import onnx

        from d2build.reference import ReferenceSession
        from d2build.reference.emulate import emulate_unsupported_fp16

        model = onnx.load(str(graph))
        self.emulated: list[str] = []
        if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
            model, self.emulated = emulate_unsupported_fp16(model)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        self.input_hw = (dims[2].dim_value, dims[3].dim_value)
        self.session = ReferenceSession(model, threads=threads)
        self._feeds: dict[str, np.ndarray] | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(feeds)

    # bench: the model alone, on an input already in place
    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        self._feeds = feeds

    def execute(self) -> None:
        assert self._feeds is not None
        self.session.run(self._feeds)

    def synchronize(self) -> None:
        pass


class TensorRTRunner:
    """A TensorRT engine (d2build.trt.EngineRunner) behind the same interface."""

    backend = "tensorrt"

    def __init__(self, engine: Path, device: int = 0):
        from d2build import trt

        self.engine = trt.EngineRunner(engine, device)
        shape = self.engine.input_shape
        self.input_hw = (int(shape[2]), int(shape[3]))
        self.emulated: list[str] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.run(feeds)

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        import torch

        for name, value in feeds.items():
            self.engine.inputs[name].copy_(torch.as_tensor(value))
        torch.cuda.synchronize(self.engine.device)

    def execute(self) -> None:
        self.engine.execute()

    def synchronize(self) -> None:
        self.engine.synchronize()


@dataclass
class Model:
    runner: Any
    path: Path
    pad: tuple[float, float, float]  # PIXEL_MEAN (BGR): letterbox padding that normalises to 0
    class_names: list[str] | None
    source: str  # "recipe <name>" or "explicit path"
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.runner.input_hw

    def detect(self, bgr: np.ndarray):
        """(Detections in original pixels, Letterbox, seconds spent in the backend)."""
        from d2build.processing import decode_outputs, letterbox

        chw, lb = letterbox(bgr, self.input_hw, self.pad)
        t0 = time.perf_counter()
        outputs = self.runner.run({"input_tensor": chw[None]})
        seconds = time.perf_counter() - t0
        return decode_outputs(outputs, lb), lb, seconds


def model_facts(recipe) -> tuple[tuple[float, float, float], list[str] | None]:
    """PIXEL_MEAN and class names from the recipe's Detectron2 config."""
    from d2build import detectron
    from d2build.stages.verify import class_names

    d2cfg = detectron.load_cfg(recipe.model.config)
    return tuple(float(v) for v in d2cfg.MODEL.PIXEL_MEAN), class_names(d2cfg)


def artifacts_for(recipe, backend: str, run_dir: Path, overrides: list[str]) -> dict[str, Path]:
    """The recipe's precision graph (and engine for tensorrt), built through the runner if missing."""
    from d2build.runner import execute

    until = "build" if backend == "tensorrt" else "precision"
    results = {r.name: r for r in execute(recipe, run_dir, overrides, until=until)}
    failed = [r for r in results.values() if r.status == "failed"]
    if failed:
        raise ModelUnavailable(f"stage {failed[0].name} failed: {failed[0].reason}")
    out = {"precision": Path(results["precision"].dir) / "model.onnx"}
    if backend == "tensorrt":
        b = results["build"]
        if b.status == "skipped" or not b.dir:
            raise ModelUnavailable(f"no TensorRT engine: the build was skipped ({b.reason}). On this machine, "
                                "runtime.backend=reference runs the same graph on the CPU")
        out["engine"] = Path(b.dir) / "engine.plan"
    return out


def open_model(recipe, *, engine: str | None = None, graph: str | None = None, run_dir: Path,
               overrides: list[str], threads: int | None = None) -> Model:
    backend = recipe.runtime.backend
    if engine and graph:
        raise ModelUnavailable("give --engine or --graph, not both")
    if engine and backend != "tensorrt":
        raise ModelUnavailable("--engine needs runtime.backend=tensorrt (an engine runs only in TensorRT)")
    if graph and backend != "reference":
        raise ModelUnavailable("--graph needs runtime.backend=reference (TensorRT runs built engines: "
                            "build one with `d2build` and pass --engine, or let the recipe build it)")
    if backend == "tensorrt":  # before building anything: without TensorRT no engine can run here
        from d2build import trt

        reason = trt.skip_reason(trt.environment(recipe.build.device))
        if reason:
            raise ModelUnavailable(f"{reason}. On this machine, runtime.backend=reference runs the same graph "
                                   "on the CPU")
    pad, names = model_facts(recipe)
    if engine or graph:
        path = Path(engine or graph).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"{path}: no such file")
        source, arts = "explicit path", {}
    else:
        arts_p = artifacts_for(recipe, backend, run_dir, overrides)
        path = arts_p["engine" if backend == "tensorrt" else "precision"]
        source, arts = f"recipe {recipe.name}", {k: str(v) for k, v in arts_p.items()}
    if backend == "tensorrt":
        runner: Any = TensorRTRunner(path, recipe.build.device)
    else:
        runner = ReferenceRunner(path, threads)
    return Model(runner, path, pad, names, source, arts)


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "fps": float(1000.0 / a.mean())}
