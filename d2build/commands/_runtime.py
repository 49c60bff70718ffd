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
                                       "(recipe=..., model.*, precision=..., runtime.backend=tensorrt|reference, "
                                       "runtime.*); the model's graph or engine comes from the cache and what "
                                       "is missing is built.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--engine", help="a TensorRT engine (runtime.backend=tensorrt) instead of the recipe's")
    model.add_argument("--graph", help="a precision graph .onnx (runtime.backend=reference) instead of the recipe's")
    p.add_argument("--out", help=f"output folder (default outputs/{prog}/<date>/<time>)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]):
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = rest
    return args


def setup(prog: str, args):
    """(recipe, output folder) or None after printing why not."""
    from d2build.commands._common import compose_or_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    recipe = compose_or_report(args.overrides)
    if recipe is None:
        return None
    out = Path(args.out) if args.out else Path("outputs") / prog / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    return recipe, out


def prepare(prog: str, p: argparse.ArgumentParser, argv: list[str]):
    """Parse, compose the recipe and open its model: (args, recipe, out, model), or None after saying why."""
    args = parse(p, argv)
    ready = setup(prog, args)
    if ready is None:
        return None
    recipe, out = ready
    model = open_model_or_report(recipe, args, out)
    return None if model is None else (args, recipe, out, model)


def open_model_or_report(recipe, args, out: Path):
    from d2build.runtime import ModelUnavailable, open_model

    try:
        model = open_model(recipe, engine=args.engine, graph=args.graph, run_dir=out, overrides=args.overrides)
    except ModelUnavailable as e:
        print(f"d2build: {e}", file=sys.stderr)
        return None
    emulated = f", {len(model.runner.emulated)} fp16 nodes emulated in fp32 arithmetic" if model.runner.emulated else ""
    log.info("model: %s backend, %s (%s), input %dx%d%s", model.backend, model.path, model.source,
             *model.input_hw, emulated)
    return model
