"""Command line: `d2build [run] key=value ...` and sub-commands (`d2build plan ...`, see commands/).

A run is a Hydra app (so `-m` sweeps, output folders and overrides work as Hydra users expect);
sub-commands live in d2build/commands/. Nothing here imports torch: a bad recipe is rejected in
about a second.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

USAGE = """\
usage: d2build [run] [-m] [-v] [--until STAGE] [KEY=VALUE ...]
                                           compose a recipe and run weights -> export -> surgery
                                           -> [calibration] -> precision -> verify -> build -> check
                                           [-> candidates -> eval]  (--until: stop after STAGE and
                                           what it needs, i.e. run.until=STAGE; -v: keep third-party
                                           warnings on)
       d2build COMMAND ...                 a sub-command (listed below)
       python -m d2build ...               same as d2build

common overrides:
  recipe=mask_rcnn_r50              a recipe from recipes/ (shipped) or ./recipes (yours)
  model.weights=random|PATH|URL     random: seeded weights that behave, offline
  model.config=PATH.yaml            your Detectron2 config (the dump its trainer wrote), with model.weights=...pth
  model.class_names=[a,b,c]         names for pictures, JSON and eval (else Detectron2's dataset metadata)
  model.input=[640,640]             graph input [H, W]: multiple of 32, 256..2048
  model.batch_size=4                images per inference (in the graph, so in its cache keys)
  model.dynamic={min:[H,W],max:[H,W]}   any size in between (surgery.ops=standard), Detectron2's resize
  surgery.ops=plugins|standard      EfficientNMS_TRT/PyramidROIAlign_TRT, or ONNX NonMaxSuppression/RoiAlign
  surgery.nms.iou_threshold=0.5     also score_threshold, max_detections; surgery.rpn.*
  precision=fp32|fp16|int8          calibration=bundled (int8); verify.images=DIR; cache.dir=DIR
  eval.annotations=FILE eval.images=DIR   COCO AP of the graph beside Detectron2's (stages candidates, eval)
  build.required=true               fail (instead of skipping the build) where TensorRT or a GPU is missing
  -m KEY=a,b,c                      a Hydra sweep: one job per value, shared cache; writes
                                    summary.csv/.md/.png in the sweep folder (AP per variant with eval.*)
  hydra/launcher=joblib hydra.launcher.n_jobs=2    sweep jobs in parallel (submitit_slurm: a
                                    cluster, see docs/DISTRIBUTED.md)

Hydra's own flags work too (--cfg job, --hydra-help, hydra.run.dir=...).
A bad override (every value of a sweep) gets one line and exit status 2 before anything runs; -v adds
Hydra's own message.
Runs write outputs/runs/<date>/<time>-<recipe>/run.json; artifacts live in cache.dir.
From Python: d2build.build(recipe, overrides), d2build.load(build).detect(image), ... (docs/API.md).
"""

log = logging.getLogger("d2build")


def _job(cfg) -> None:
    """One run (each job of a sweep): the Hydra job's checked recipe through the Python API's run
    (d2build/api/builds.py run_recipe, what d2build.build ends in), with Hydra's logging as it is."""
    from hydra.core.hydra_config import HydraConfig

    from d2build import console
    from d2build.api.builds import run_recipe
    from d2build.commands._common import print_problems
    from d2build.compose import recipe_from_hydra
    from d2build.recipe import RecipeError
    from d2build.sweep_summary import record_failure

    verbose = bool(cfg.get("run", {}).get("verbose", False))
    console.configure(verbose)
    try:
        recipe = recipe_from_hydra(cfg)
    except RecipeError as e:
        print_problems(e, verbose)
        raise SystemExit(2) from None
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        result = run_recipe(recipe, run_dir, list(hc.overrides.task))
    except RecipeError as e:  # what a stage's preflight found before anything ran
        print_problems(e, verbose)
        raise SystemExit(2) from None
    for r in result.failed:
        print(f"d2build: stage {r.name} failed: {r.reason}", file=sys.stderr)
    log.info("run.json: %s", run_dir / "run.json")
    if not result.ok:
        record_failure(",".join(hc.overrides.task) or recipe.name)


def run(argv: list[str]) -> int:
    import hydra

    from d2build.compose import conf_dir, register_plugins
    from d2build.sweep_summary import FAILED_JOBS_ENV

    register_plugins()
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_job)
    saved = sys.argv, os.environ.get(FAILED_JOBS_ENV)  # hydra.main reads its arguments from sys.argv only
    sys.argv = [saved[0][0] if saved[0] else "d2build", *argv]
    fd, outcome = tempfile.mkstemp(prefix="d2build-failed-jobs-", suffix=".txt")
    os.close(fd)
    os.environ[FAILED_JOBS_ENV] = outcome
    try:
        app()
        failed = Path(outcome).read_text(encoding="utf-8").split("\n")
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop(FAILED_JOBS_ENV, None)
        else:
            os.environ[FAILED_JOBS_ENV] = saved[1]
        os.unlink(outcome)
    return 1 if any(failed) else 0


#: Hydra's flags that need no composition of d2build's config (or another one): handed to Hydra unchecked
_HYDRA_OWN = ("--hydra-help", "--version", "--shell-completion", "-sc", "--config-path", "-cp",
              "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


class _UsageError(Exception):
    pass


def checked_argv(argv: list[str], verbose: bool = False) -> list[str] | None:
    """A run's arguments as hydra.main gets them -- Hydra's flags first, then the overrides -- after the
    overrides went through the composition plan/validate use (compose.check_run); or None after one
    line per problem (with -v, the library's own message too)."""
    from hydra._internal.utils import get_args_parser

    from d2build import commands
    from d2build.commands._common import print_problems
    from d2build.compose import check_run
    from d2build.recipe import Problem, RecipeError

    if any(a.split("=", 1)[0] in _HYDRA_OWN for a in argv):
        return argv
    parser = get_args_parser()

    def error(message: str):  # argparse would print Hydra's usage and exit
        raise _UsageError(message)

    parser.error = error  # type: ignore[method-assign]
    try:
        try:
            ns, extra = parser.parse_known_args(argv)
        except _UsageError as u:
            raise RecipeError([Problem("command line", "(options)", str(u), "see d2build --help")]) from None
        modes = [f for f, on in (("-m", ns.multirun), ("--run", ns.run), ("--cfg", ns.cfg), ("--info", ns.info)) if on]
        if len(modes) > 1:  # Hydra would raise a bare ValueError (a traceback)
            raise RecipeError([Problem("command line", " ".join(modes), "exclude each other (Hydra runs, sweeps, "
                                       "prints the config or prints its information)", "give one of them")])
        flags = [a for a in extra if a.startswith("-")]
        if flags:
            raise RecipeError([Problem("command line", flags[0], "is not an option of a run", "d2build's: -v, "
                                       "--until STAGE; Hydra's: -m, --cfg job|hydra|all, --resolve, --package P, "
                                       "--info, --hydra-help (d2build --help)")])
        overrides = [*ns.overrides, *extra]
        check_run(overrides, ns.multirun, tuple(commands.available()))
    except RecipeError as e:
        print_problems(e, verbose)
        return None
    hydra_flags = (["--multirun"] * ns.multirun + ["--run"] * ns.run + (["--cfg", ns.cfg] if ns.cfg else [])
                   + ["--resolve"] * ns.resolve + (["--package", ns.package] if ns.package else [])
                   + (["--info", ns.info] if ns.info else []))
    return [*hydra_flags, *overrides]


def main(argv: list[str] | None = None) -> int:
    from d2build import commands

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\nsub-commands:\n" + "\n".join(f"  {k:<10} {v}" for k, v in commands.available().items()))
        return 0
    if argv and argv[0] in commands.available():
        return commands.dispatch(argv[0], argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    if "-h" in argv or "--help" in argv:  # a run's help is d2build's (Hydra's own: --hydra-help)
        return main(["--help"])
    from d2build import console

    verbose = "-v" in argv or "--verbose" in argv  # -v is d2build's; Hydra's own is hydra.verbose=LOGGER
    if verbose:
        argv = [a for a in argv if a not in ("-v", "--verbose")] + ["run.verbose=true"]
    console.configure(verbose or "run.verbose=true" in argv)
    for i, a in enumerate(argv):
        if a == "--until" or a.startswith("--until="):
            stage = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if not stage or stage.startswith("-") or "=" in stage:
                from d2build.pipeline import STAGES

                print(f"d2build: command line: --until: needs a stage name. Fix: --until STAGE, one of "
                      f"{', '.join(STAGES)}", file=sys.stderr)
                return 2
            argv = argv[:i] + argv[i + (1 if "=" in a else 2):] + [f"run.until={stage}"]
            break
    checked = checked_argv(argv, verbose or "run.verbose=true" in argv)
    if checked is None:
        return 2
    return run(checked)


if __name__ == "__main__":
    sys.exit(main())
