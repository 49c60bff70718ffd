"""build: a TensorRT engine from the precision graph (d2build/backends/tensorrt.py talks to TensorRT).

The network is strongly typed, so the engine computes in exactly the precision the graph says
(fp32, fp16 casts, int8 Q/DQ): the builder gets no precision flags. The key holds the precision
graph's key, the builder settings, the TensorRT version and the GPU's compute capability (an
engine runs only where it was built). Verify is a `need` but not part of the key: it gates the
build (no engine from a graph that failed verification) without shaping it.

Without TensorRT or a GPU the stage is skipped with a one-line reason and what to install, and
the run still succeeds -- unless `build.required=true`, which turns that reason into a failure.
A build takes `<cache root>/.gpu-<host>-<GPU UUID>.lock`, so GPU stages of concurrent runs never share a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import BuildSlice, Files, Recipe
from d2build.stages.base import Context, Stage, StageFailed


class BuildStage(Stage):
    """Reads `graph` (the precision graph); runs after verify, which gates it without shaping the engine."""

    kind = "build"
    VERSION = 1

    def __init__(self, needs=None, *, device: int = 0, environment=None, **kw):
        super().__init__(needs, **kw)
        self.device = device  # where to build; not keyed (the GPU's compute capability is)
        self._env = environment  # tests pass a real Environment; runs probe this machine once

    def environment(self):
        from d2build.backends import tensorrt

        return self._env if self._env is not None else tensorrt.environment(self.device)

    def slice(self, recipe: Recipe) -> BuildSlice:
        from d2build.backends.tensorrt import BuilderSettings

        env = self.environment()
        return BuildSlice(BuilderSettings.from_config(recipe.build, recipe.model).key_material(), env.tensorrt,
                          env.compute_capability)

    def skip_reason(self, recipe: Recipe) -> str | None:
        if recipe.build.required:
            return None  # run() fails with the reason instead
        from d2build.backends.tensorrt import skip_reason

        return skip_reason(self.environment())

    def run(self, cfg: BuildSlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        from d2build.backends import tensorrt as trt

        env = self.environment()
        reason = trt.skip_reason(env)
        if reason:
            raise StageFailed(f"build.required=true, but {reason}")
        settings = trt.BuilderSettings(**cfg.settings, device=self.device)
        lock = ctx.cache.gpu_lock(trt.gpu_identity(settings.device))
        ctx.step(f"waiting for GPU {settings.device} ({lock.lock_file})")
        with lock:
            facts = trt.build_engine(inputs["graph"].path(Files.GRAPH), settings, out_dir, ctx.step)
        return {**facts, "gpu": env.gpu, "compute_capability": env.compute_capability,
                "precision": inputs["graph"].info.get("mode")}
