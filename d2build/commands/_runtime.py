"""What infer, bench and eval share: arguments, the recipe, the output folder, the model."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("d2build")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"d2build {prog}", description=description,
                                epilog="KEY=VALUE overrides pick the recipe and its settings as for a run "
                                       "(recipe=..., model.*, precision=..., runtime.backend=tensorrt|reference|"
                                       "onnxruntime, runtime.*); the model's graph or engine comes from the cache "
                                       "and what is missing is built.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--engine", help="a TensorRT engine (runtime.backend=tensorrt) instead of the recipe's")
    model.add_argument("--graph", help="a precision graph .onnx (runtime.backend=reference or onnxruntime) "
                                       "instead of the recipe's")
    p.add_argument("--out", help=f"output folder (default outputs/{prog}/<date>/<time>)")
    p.add_argument("-v", "--verbose", action="store_true", help="keep third-party warnings and notices on, and "
                   "show a library's own message behind a problem (as run.verbose=true)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]):
    """The command's arguments with `.overrides` (its KEY=VALUE words), or None after one d2build line
    for a word that is neither (argparse's own would be its usage and an error line)."""
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        from d2build.compose import token_problem

        print(f"d2build: {token_problem(bad[0])}", file=sys.stderr)
        return None
    args.overrides = rest
    return args


def setup(prog: str, args):
    """(recipe, output folder) or None after printing why not."""
    from d2build import console
    from d2build.commands._common import compose_or_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    verbose = bool(getattr(args, "verbose", False)) or "run.verbose=true" in args.overrides
    console.configure(verbose)  # before torch, Detectron2 and ONNX Runtime are imported: d2build's lines only
    recipe = compose_or_report(args.overrides, verbose)
    if recipe is None:
        return None
    out = Path(args.out) if args.out else Path("outputs") / prog / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    return recipe, out


def prepare(prog: str, p: argparse.ArgumentParser, argv: list[str], images=None):
    """Parse, compose the recipe and open its model: (args, recipe, out, model), or None after saying why.
    `images(args)`: the image references (bundled names or paths) the command will run, so a dynamic
    graph's range is checked against each of them before anything is built or run."""
    args = parse(p, argv)
    ready = setup(prog, args) if args is not None else None
    if ready is None:
        return None
    recipe, out = ready
    sizes = None
    if images is not None:
        from d2build import photos

        try:
            sizes = photos.image_sizes(images(args))
        except ValueError as e:
            print(f"d2build {prog}: {e}", file=sys.stderr)
            return None
    model = open_model_or_report(recipe, args, out, sizes)
    return None if model is None else (args, recipe, out, model)


class ModelUnavailable(RuntimeError):
    """A model that cannot be opened here; the message says why and what to do."""


def artifacts_for(recipe, backend: str, run_dir: Path, overrides: list[str]) -> dict[str, Path]:
    """The recipe's precision graph (and engine for tensorrt), built through the runner if missing."""
    from d2build.runner import execute

    from d2build.recipe import RecipeError

    until = {"tensorrt": "build", "detectron2": "weights"}.get(backend, "precision")
    try:
        results = {r.name: r for r in execute(recipe, run_dir, overrides, until=until,
                                              unneeded=f"not needed to run the model with {backend}")}
    except RecipeError as e:
        raise ModelUnavailable(str(e)) from None
    failed = [r for r in results.values() if r.status == "failed"]
    if failed:
        raise ModelUnavailable(f"stage {failed[0].name} failed: {failed[0].reason}")
    if backend == "detectron2":
        return {"weights": Path(results["weights"].dir) / "model.pth"}
    out = {"precision": Path(results["precision"].dir) / "model.onnx"}
    if backend == "tensorrt":
        b = results["build"]
        if b.status == "skipped" or not b.dir:
            raise ModelUnavailable(f"no TensorRT engine: the build was skipped ({b.reason}). On this machine, "
                                   "runtime.backend=reference runs the same graph on the CPU")
        out["engine"] = Path(b.dir) / "engine.plan"
    return out


def open_model(recipe, *, engine: str | None = None, graph: str | None = None, run_dir: Path,
               overrides: list[str], threads: int | None = None, backend: str | None = None,
               resize: str = "letterbox", sizes: dict[str, tuple[int, int]] | None = None):
    """The recipe's model (cached graph or engine; what is missing is built) or an explicit file,
    opened with `backend` (default `runtime.backend`); `detectron2` is the eager model it came from.
    `sizes` (image name -> [h, w]): the images it will run, refused in one message before anything is
    built where a dynamic graph's range does not hold one of them (runtime.model.outside_range)."""
    from d2build import backends, detectron
    from d2build.recipe import ModelSlice
    from d2build.runtime import Model

    backend = backend or recipe.runtime.backend
    if backend == "detectron2":
        if engine or graph:
            raise ModelUnavailable("runtime.backend=detectron2 runs the recipe's Detectron2 model; --engine and "
                                   "--graph name built models (use runtime.backend=tensorrt|reference|onnxruntime)")
        return eager_model(recipe, run_dir, overrides, resize)
    if engine and graph:
        raise ModelUnavailable("give --engine or --graph, not both")
    if engine and backend != "tensorrt":
        raise ModelUnavailable("--engine needs runtime.backend=tensorrt (an engine runs only in TensorRT)")
    if graph and backend == "tensorrt":
        raise ModelUnavailable("--graph needs runtime.backend=reference or onnxruntime (TensorRT runs built "
                               "engines: build one with `d2build` and pass --engine, or let the recipe build it)")
    if backend == "tensorrt":  # before building anything: without TensorRT no engine can run here
        from d2build.backends import tensorrt

        reason = tensorrt.skip_reason(tensorrt.environment(recipe.build.device))
        if reason:
            raise ModelUnavailable(f"{reason}. On this machine, runtime.backend=reference (or onnxruntime for "
                                   "surgery.ops=standard) runs the same graph on the CPU")
    info = detectron.model_info(ModelSlice.of(recipe))
    if sizes:
        from d2build.runtime.model import outside_range, range_message

        outside = outside_range(info, sizes)
        if outside:
            raise ModelUnavailable(range_message(info, outside, len(sizes)))
    if engine or graph:
        path = Path(engine or graph).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"{path}: no such file")
        source = "explicit path"
    else:
        arts = artifacts_for(recipe, backend, run_dir, overrides)
        path = arts["engine" if backend == "tensorrt" else "precision"]
        source = f"recipe {recipe.name}"
    try:
        runner = (backends.open_engine(path, recipe.build.device) if backend == "tensorrt"
                  else backends.open_graph(path, backend, threads=threads, **graph_device(recipe, backend)))
    except backends.RunnerError as e:
        raise ModelUnavailable(str(e)) from None
    return Model(runner, info, source, path)


def graph_device(recipe, backend: str, cuda_graph: bool = False) -> dict:
    """open_graph's device arguments from runtime.device/.tf32/.cuda (backends.devices.graph_options)."""
    from d2build.backends import devices

    return devices.graph_options(recipe.runtime, backend, cuda_graph)


def eager_model(recipe, run_dir: Path, overrides: list[str], resize: str = "letterbox"):
    """Detectron2 eager with the recipe's weights (cached) and thresholds: backends.detectron2.EagerModel."""
    import torch

    from d2build import backends, detectron
    from d2build.backends.detectron2 import EagerModel
    from d2build.recipe import ConfigRef, ModelSlice
    from d2build.families import builder

    weights = artifacts_for(recipe, "detectron2", run_dir, overrides)["weights"]
    fam = builder(recipe.model.family)
    cfg = detectron.load_cfg(ConfigRef.of(recipe.model.config, recipe.model.config_overrides),
                             fam.eager_overrides(recipe.surgery))
    model = detectron.build_model(cfg, torch.load(weights, map_location="cpu", weights_only=True))
    if recipe.runtime.device != "cpu":  # runtime.device and runtime.tf32 apply to Detectron2 eager too
        from d2build.backends.detectron2 import on_device

        try:
            model = on_device(model, recipe.runtime.device, tf32=recipe.runtime.tf32)
        except backends.RunnerError as e:
            raise ModelUnavailable(str(e)) from None
    info = detectron.model_info(ModelSlice.of(recipe), cfg)
    return EagerModel(model, fam, info, cfg, resize)


def open_model_or_report(recipe, args, out: Path, sizes: dict[str, tuple[int, int]] | None = None):
    try:
        model = open_model(recipe, engine=args.engine, graph=args.graph, run_dir=out, overrides=args.overrides,
                           sizes=sizes)
    except ModelUnavailable as e:
        print(f"d2build: {e}", file=sys.stderr)
        return None
    runner = getattr(model, "runner", None)
    emulated = f", {len(runner.emulated)} fp16 nodes emulated in fp32 arithmetic" if runner and runner.emulated else ""
    log.info("model: %s backend, %s (%s), input %dx%d%s", model.backend, model.path, model.source,
             *model.input_hw, emulated)
    return model


def percentiles(ms: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ms, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "fps": float(1000.0 / a.mean())}
