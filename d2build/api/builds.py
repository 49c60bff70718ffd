"""Building from Python: `build`, `plan`, `sweep`, `evaluate`, and the `Build` they return.

Every call goes the command line's way: the overrides through `compose.compose` (the one composition:
Hydra, the schema, the file checks, every problem one line), the DAG through `runner.execute` (same
cache, same keys, same preflight, same console lines), run.json written by the runner. The command
line's run job (`cli._job`) ends in `run_recipe` below, so there is one code path from a checked
recipe to a finished run.

Where a run's files go: `run_dir`, else `outputs/runs/<date>/<time>-<recipe>/` under the working
directory as for the command line (a `-2`, `-3` suffix when a run of the same second has the folder).
A sweep's jobs go to `outputs/sweeps/<date>/<time>-<recipe>/<n>/`, the layout of Hydra's multirun,
and its summary (summary.csv/.md/.png) is written by d2build/sweep_summary.py from their run.json files, as
after a `d2build -m` sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from d2build.api.errors import InputError, Problem, RecipeError, StageFailed, input_or_recipe_error
from d2build.recipe import Files, Recipe

if TYPE_CHECKING:
    from d2build.runner import ProgressEvent

log = logging.getLogger("d2build")

Status = Literal["built", "hit", "skipped", "failed"]
#: `progress`: True prints d2build's lines (logger "d2build"), False prints nothing, a callable gets every
#: ProgressEvent (and nothing is printed)
Progress = bool | Callable[["ProgressEvent"], None]
RecipeRef = str | os.PathLike[str] | None


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StageResult:
    """One stage of a run: `status` (built, hit, skipped, failed), its cache `key`, `seconds`, the folder
    of its files (`dir`: the cache entry; for a failed stage the evidence folder in the run folder, or
    None), `info` (the facts it recorded: verify's metrics, the graph's node count, ...), `reason` (why it
    was skipped or failed) and `files` (the names in `dir`)."""

    name: str
    status: Status
    key: str
    seconds: float
    dir: Path | None
    info: dict[str, Any]
    reason: str | None
    files: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def produced(self) -> bool:
        """Built or reused: its files are in the cache."""
        return self.status in ("built", "hit") and self.dir is not None


@dataclass(frozen=True)
class Build:
    """A finished run of a recipe's DAG (or of the part `until` needs).

    `ok` is False when a stage failed (`raise_for_status()` raises StageFailed then); `stages` maps each
    stage to its StageResult, in the order they ran; `config` is the checked recipe the run was made from;
    `artifact(stage, name)` the path of one of a stage's files; `report(stage)` its report; `to_dict()`
    the run.json the runner wrote into `run_dir`."""

    config: Recipe
    stages: dict[str, StageResult]
    run_dir: Path
    overrides: tuple[str, ...]  # as the run saw them (the recipe= override first), run.json's "overrides"
    recipe_dirs: tuple[Path, ...] = field(default=(), repr=False)  # folders searched first (a recipe file's)

    @property
    def name(self) -> str:
        """The recipe's name."""
        return self.config.name

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages.values())

    @property
    def failed(self) -> list[StageResult]:
        return [s for s in self.stages.values() if s.status == "failed"]

    def raise_for_status(self) -> Build:
        """This Build when no stage failed; else StageFailed for the first that did."""
        for s in self.failed:
            raise StageFailed(s.name, s.reason or "", self._report_path(s), self)
        return self

    def _stage(self, stage: str) -> StageResult:
        if stage not in self.stages:
            raise LookupError(f"this build has no stage {stage!r} (its stages: {', '.join(self.stages)})")
        return self.stages[stage]

    def artifact(self, stage: str, name: str = Files.GRAPH) -> Path:
        """The path of file `name` of `stage` (default model.onnx: export, surgery and precision write one).
        StageFailed if the stage failed; LookupError if it was skipped or has no such file."""
        s = self._stage(stage)
        if s.status == "failed":
            raise StageFailed(s.name, s.reason or "", self._report_path(s), self)
        if not s.produced or s.dir is None:
            raise LookupError(f"stage {stage} was {s.status} ({s.reason or 'no reason'}): it has no files")
        if name not in s.files:
            raise LookupError(f"stage {stage} has no file {name!r} (its files: {', '.join(s.files) or 'none'})")
        return s.dir / name

    def _report_path(self, s: StageResult) -> Path | None:
        if s.dir is not None and Files.REPORT in s.files:
            return s.dir / Files.REPORT
        return None

    def report(self, stage: str = "verify") -> str:
        """The text of the report a stage wrote (report.md: verify, check and eval write one, a failed
        verify into the run folder's evidence); LookupError when it wrote none."""
        s = self._stage(stage)
        path = self._report_path(s)
        if path is None:
            raise LookupError(f"stage {stage} ({s.status}) wrote no {Files.REPORT} (its files: "
                              f"{', '.join(s.files) or 'none'})")
        return path.read_text(encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        """The run's run.json, as the runner wrote it: recipe, recipe_file, overrides, config, stages, ok."""
        return cast(dict[str, Any], json.loads((self.run_dir / "run.json").read_text(encoding="utf-8")))

    def __repr__(self) -> str:
        states = ", ".join(f"{s.name} {s.status}" for s in self.stages.values())
        return f"Build({self.name}: {'ok' if self.ok else 'FAILED'}; {states}; run {self.run_dir})"


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a Plan: its key, what a run would do with it (build, hit, skip), why it would skip,
    and the stages it needs."""

    name: str
    key: str
    would: Literal["build", "hit", "skip"]
    needs: tuple[str, ...]
    reason: str | None


@dataclass(frozen=True)
class Plan:
    """What a build would do, nothing built: `stages` in run order; `str(plan)` is `d2build plan`'s table."""

    config: Recipe
    cache_dir: Path
    stages: dict[str, PlannedStage]
    table: str = field(repr=False)

    @property
    def to_build(self) -> list[str]:
        """The stages a run would build (neither in the cache nor skipped)."""
        return [s.name for s in self.stages.values() if s.would == "build"]

    def __str__(self) -> str:
        return self.table


class Sweep(list[Build]):
    """The builds of a sweep, one per variant in grid order, with the sweep's summary: `rows` (one dict
    per job, the columns of summary.csv: swept keys, per-stage status and seconds, verify and eval
    metrics), `dir` (the sweep folder) and `files` (summary.csv, summary.md, summary.png)."""

    def __init__(self, builds: Sequence[Build], rows: list[dict[str, Any]], folder: Path, files: list[Path],
                 markdown: str):
        super().__init__(builds)
        self.rows = rows
        self.dir = folder
        self.files = files
        self.markdown = markdown

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self)


# ---------------------------------------------------------------------------------- console


@contextlib.contextmanager
def console(progress: Progress) -> Iterator[Callable[[ProgressEvent], None] | None]:
    """d2build's lines while the block runs: True prints them (to stdout as the command line does, through a
    handler of its own where logging has none, at INFO where the logger is quieter), False and a callable
    silence them; a callable is yielded to hand to the runner."""
    from d2build import console as d2console

    d2console.configure(d2console.verbose())  # known third-party notices quiet, as the command line has them
    logger = logging.getLogger("d2build")
    level, handler = logger.level, None
    if progress is True:
        if not logger.hasHandlers():
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield progress if callable(progress) else None
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


# ---------------------------------------------------------------------------------- composing


def hydra_value(value: Any) -> str:
    """A Python value as Hydra's override grammar writes it: lists as [a,b], mappings as {k:v}, None as
    null, booleans as true/false, strings quoted where the grammar needs it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = text and all(c.isalnum() or c in "_-+./:@%" for c in text) and text not in ("null", "true", "false")
    return text if plain else "'" + text.replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def recipe_args(recipe: RecipeRef, overrides: Sequence[str], cache_dir: str | os.PathLike[str] | None,
                who: str) -> tuple[list[str], tuple[Path, ...]]:
    """(the overrides a run sees, folders to search for recipes first) for `recipe` -- a recipe name, a
    recipe file, or None (the overrides' recipe=, or conf/config.yaml's default) -- and `overrides`."""
    if isinstance(overrides, str):
        raise RecipeError([Problem(who, "overrides", f"is one string ({overrides!r}), not a list of overrides",
                                   f"pass a list: [{overrides!r}]")])
    args = [str(o) for o in overrides]
    dirs: tuple[Path, ...] = ()
    if recipe is not None:
        if any(_key(o) == "recipe" for o in args):
            raise RecipeError([Problem(who, "recipe", "is given twice: as the first argument and as a recipe= "
                                       "override", "give it once")])
        text = os.fspath(recipe)
        path = Path(text).expanduser()
        if isinstance(recipe, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text:
            if not path.is_file():
                raise InputError([Problem(who, "recipe", f"{text}: no such recipe file",
                                          "pass a recipe name (d2build validate lists them) or an existing .yaml")])
            dirs = (path.resolve().parent,)
            text = path.stem
        args.insert(0, f"recipe={hydra_value(text)}")
    if cache_dir is not None:
        args = [o for o in args if _key(o) != "cache.dir"]
        args.append(f"cache.dir={hydra_value(str(Path(cache_dir).expanduser().resolve()))}")
    return args, dirs


def _sweep_problems(args: list[str], who: str) -> list[Problem]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for token in args:
        try:
            (o,) = parser.parse_overrides([token])
        except HydraException:
            continue  # composition says what is wrong with it
        if o.is_sweep_override():
            key = o.get_key_element()
            out.append(Problem(f"{who} ({token})", key, "has several values (a sweep)",
                               f"use d2build.sweep(recipe, {{{key!r}: [...]}}) for one build per value; a list "
                               "value is written [a,b]"))
    return out


def compose_recipe(args: list[str], dirs: tuple[Path, ...] = (), who: str | None = None) -> Recipe:
    """The checked Recipe for the overrides `args` (compose.compose, the composition every command uses);
    RecipeError (InputError when every problem is a file's) naming each problem. `who`: the API function
    called (a swept value gets a hint to d2build.sweep); None: the command line (compose's own words)."""
    from d2build import compose

    problems = _sweep_problems(args, who) if who is not None else []
    if problems:
        raise RecipeError(problems)
    try:
        with compose.extra_recipe_dirs(list(dirs)) if dirs else contextlib.nullcontext():
            return compose.compose(args)
    except RecipeError as e:
        raise input_or_recipe_error(_from_caller(e, who) if who else e) from e.__cause__


def _from_caller(e: RecipeError, who: str) -> RecipeError:
    """`e` with "command line" (where an override set the key) said as the API call whose overrides did."""
    cli = "command line"
    problems = [dataclasses.replace(p, source=who + p.source[len(cli):]) if p.source.startswith(cli) else p
                for p in e.problems]
    out = RecipeError(problems)
    out.__cause__ = e.__cause__
    return out


def _check_until(recipe: Recipe, until: str | None, who: str) -> None:
    if until is None:
        return
    from d2build.runner import ordered_stages

    names = [s.name for s in ordered_stages(recipe)]
    if until not in names:
        raise RecipeError([Problem(who, "until", f"{until!r} is not a stage of this recipe",
                                   f"use one of: {', '.join(names)}")])


def new_run_dir(kind: str, name: str) -> Path:
    """outputs/<kind>/<date>/<time>-<name>/ under the working directory (made; suffixed if taken)."""
    base = Path("outputs") / kind / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-{name}"
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder.resolve()
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- running


def run_recipe(recipe: Recipe, run_dir: Path, overrides: Sequence[str], *, until: str | None = None,
               on_event: Callable[[ProgressEvent], None] | None = None,
               recipe_dirs: tuple[Path, ...] = ()) -> Build:
    """Run a checked recipe's DAG into the cache and `run_dir` (run.json); the Build. What the command
    line's run job and every API call end in. RecipeError for what a stage's preflight finds."""
    from d2build.runner import execute

    try:
        results = execute(recipe, run_dir, list(overrides), until=until, on_event=on_event)
    except RecipeError as e:
        raise input_or_recipe_error(e) from e.__cause__
    stages = {r.name: StageResult(r.name, cast(Status, r.status), r.key, float(r.seconds),
                                  Path(r.dir) if r.dir else None, dict(r.info), r.reason, tuple(r.artifacts))
              for r in results}
    return Build(recipe, stages, Path(run_dir).resolve(), tuple(overrides), recipe_dirs)


def build(recipe: RecipeRef, overrides: Sequence[str] = (), *, until: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None, progress: Progress = True,
          run_dir: str | os.PathLike[str] | None = None) -> Build:
    """Run a recipe's DAG as `d2build recipe=RECIPE OVERRIDES...` does: same composition and checks, same
    cache and keys, same run.json.

    `recipe`: a recipe name (recipes/ or ./recipes), a recipe .yaml file, or None (then `overrides` may say
    recipe=NAME). `overrides`: KEY=VALUE words as on the command line. `until`: stop after this stage and
    what it needs (`--until`). `cache_dir`: cache.dir. `progress`: True prints d2build's lines, False
    nothing, a callable gets each ProgressEvent. `run_dir`: where run.json goes (default
    outputs/runs/<date>/<time>-<recipe>/).

    Raises RecipeError (InputError for a wrong file) before anything runs; a stage that fails makes
    `ok` False (`raise_for_status()` raises StageFailed)."""
    who = "d2build.build()"
    args, dirs = recipe_args(recipe, overrides, cache_dir, who)
    with console(progress) as on_event:
        config = compose_recipe(args, dirs, who)
        _check_until(config, until, who)
        folder = Path(run_dir).expanduser() if run_dir is not None else new_run_dir("runs", config.name)
        return run_recipe(config, folder, args, until=until, on_event=on_event, recipe_dirs=dirs)


def plan_recipe(recipe: Recipe, until: str | None = None) -> Plan:
    """The Plan of a checked recipe (`until`: the stages it does not need would be skipped)."""
    from d2build import runner

    planned = runner.plan(recipe)
    if until is not None:
        _check_until(recipe, until, "d2build.plan()")
        wanted = runner._ancestors(planned, until)
        planned = [p if p.name in wanted else dataclasses.replace(p, skip=f"--until {until}") for p in planned]
    stages = {p.name: PlannedStage(p.name, p.key, "skip" if p.skip else ("hit" if p.cached else "build"),
                                   tuple(p.needs), p.skip) for p in planned}
    return Plan(recipe, Path(recipe.cache.dir).resolve(), stages, runner.format_plan(planned))


def plan(recipe: RecipeRef, overrides: Sequence[str] = (), *, until: str | None = None,
         cache_dir: str | os.PathLike[str] | None = None) -> Plan:
    """What `build` would do with the same arguments -- each stage's key, and build, hit or skip -- with
    nothing built or written (`d2build plan`). RecipeError as for `build`."""
    who = "d2build.plan()"
    args, dirs = recipe_args(recipe, overrides, cache_dir, who)
    with console(False):
        return plan_recipe(compose_recipe(args, dirs, who), until)


def sweep(recipe: RecipeRef, grid: Mapping[str, Sequence[Any]], overrides: Sequence[str] = (), *,
          until: str | None = None, cache_dir: str | os.PathLike[str] | None = None, progress: Progress = True,
          sweep_dir: str | os.PathLike[str] | None = None) -> Sweep:
    """One build per combination of `grid`'s values (key -> values; the first key varies slowest, as in
    `d2build -m key=a,b other=c,d`), sharing one cache, then the sweep summary d2build/sweep_summary.py writes
    after a multirun (rows as in summary.csv).

    Every variant is composed and checked before the first runs (one RecipeError listing the problems
    of all of them). The jobs run one after another in this process: parallel or cluster launchers are
    the command line's (`d2build -m hydra/launcher=joblib ...`)."""
    who = "d2build.sweep()"
    if not grid:
        raise RecipeError([Problem(who, "grid", "is empty", "give {key: [value, ...]} with at least one key")])
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise RecipeError([Problem(who, f"grid[{key!r}]", f"is {values!r}, not a non-empty list of values",
                                       f"write {{{key!r}: [a, b]}}")])
    args, dirs = recipe_args(recipe, overrides, cache_dir, who)
    swept = set(grid)
    base = [o for o in args if _key(o) not in swept]
    variants = [[*base, *(f"{k}={hydra_value(v)}" for k, v in zip(grid, combo))]
                for combo in itertools.product(*grid.values())]
    with console(progress) as on_event:
        configs: list[Recipe] = []
        problems: dict[Problem, None] = {}
        for job in variants:
            try:
                configs.append(compose_recipe(job, dirs, who))
                _check_until(configs[-1], until, who)
            except RecipeError as e:
                problems.update(dict.fromkeys(e.problems))
        if problems:
            raise input_or_recipe_error(RecipeError(list(problems)))
        folder = Path(sweep_dir).expanduser().resolve() if sweep_dir is not None else \
            new_run_dir("sweeps", configs[0].name)
        builds = []
        for i, (job, config) in enumerate(zip(variants, configs)):
            log.info("d2build: sweep job %d/%d: %s", i + 1, len(variants), " ".join(job[len(base):]))
            builds.append(run_recipe(config, folder / str(i), job, until=until, on_event=on_event,
                                     recipe_dirs=dirs))
        from d2build import sweep_summary as summary

        result = summary.write_summary(folder)
        log.info("sweep: %d job(s), %d failed; %s", len(result.rows), len(result.failed), result.counts_line())
        log.info("sweep summary: %s", ", ".join(str(f) for f in result.files))
    return Sweep(builds, result.rows, folder, list(result.files), summary.to_markdown(result))


def evaluate(build: Build, annotations: str | os.PathLike[str], images: str | os.PathLike[str], *,
             count: int = 0, progress: Progress = True) -> dict[str, Any]:
    """COCO AP of a build's graph beside Detectron2's on your annotated images: the eval stage's
    metrics.json (`metrics[side][iou_type]` with AP, AP50, ..., for side graph, detectron2 on the same
    input and detectron2_native with its own resize; `delta`; `detections_per_image`; ...).

    Runs the build's recipe with eval.annotations/eval.images/eval.count set, up to the eval stage
    (candidates and eval join the DAG; everything else is reused from the cache). `count`: the json's
    first N images by id (0: all). InputError for an annotation file or image folder that is wrong;
    StageFailed if a stage fails."""
    who = "d2build.evaluate()"
    if not isinstance(build, Build):
        raise TypeError(f"{who}: evaluates a Build (from d2build.build), got {type(build).__name__}")
    drop = {"eval.annotations", "eval.images", "eval.count"}
    args = [o for o in build.overrides if _key(o) not in drop]
    for key, path in (("eval.annotations", annotations), ("eval.images", images)):
        args.append(f"{key}={hydra_value(str(Path(path).expanduser().resolve()))}")
    args.append(f"eval.count={int(count)}")
    with console(progress) as on_event:
        config = compose_recipe(args, build.recipe_dirs, who)
        result = run_recipe(config, new_run_dir("runs", config.name), args, until="eval", on_event=on_event,
                            recipe_dirs=build.recipe_dirs)
    result.raise_for_status()
    return cast(dict[str, Any], json.loads(result.artifact("eval", Files.METRICS).read_text(encoding="utf-8")))
