"""Orders a recipe's stages, computes their keys, and runs or reuses each through the cache."""

from __future__ import annotations

import graphlib
import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from d2build.cache import Artifact, Cache, CacheError, make_key
from d2build.pipeline import pipeline_for
from d2build.recipe import Recipe, RecipeError
from d2build.stages.base import Context, Stage, StageFailed

log = logging.getLogger("d2build")


class ProgressEvent(NamedTuple):
    """What a run is doing, as data (`execute(on_event=...)`; d2build.build's `progress` callable): a stage
    starts `building` (or `waiting` for another process), reports steps inside it (`what`, with `i` of `n`
    in loops), and ends (`done`: `what` is its status -- built, hit, skipped, failed -- and `i` of `n` its
    place among the run's stages)."""

    stage: str
    what: str
    i: int | None = None
    n: int | None = None
    done: bool = False


OnEvent = Callable[[ProgressEvent], None]


class _ReportingContext(Context):
    """A Context whose progress lines also go to `on_event` as ProgressEvents."""

    def __init__(self, stage: str, cache: Cache, on_event: OnEvent):
        super().__init__(stage, cache)
        self.on_event = on_event

    def step(self, what: str) -> None:
        self.on_event(ProgressEvent(self.stage, what))
        super().step(what)

    def count(self, i: int, n: int, what: str) -> None:
        self.on_event(ProgressEvent(self.stage, what, i, n))
        Context.step(self, f"[{i}/{n}] {what}")


@dataclass
class PlannedStage:
    stage: Stage
    cfg: Any  # the stage's slice of the recipe (recipe.py)
    key: str
    material: dict[str, Any]
    cached: bool
    skip: str | None

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def needs(self) -> tuple[str, ...]:
        return self.stage.upstream


@dataclass
class StageResult:
    name: str
    key: str
    status: str  # built | hit | skipped | failed
    seconds: float
    dir: str | None = None
    artifacts: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def ordered_stages(recipe: Recipe) -> list[Stage]:
    """The pipeline's stages in dependency order, ties broken by the pipeline's own order."""
    listed = pipeline_for(recipe)
    sorter = graphlib.TopologicalSorter({s.name: set(s.upstream) for s in listed})
    sorter.prepare()
    rank = {s.name: i for i, s in enumerate(listed)}
    by_name = {s.name: s for s in listed}
    out: list[Stage] = []
    ready: list[str] = []
    while sorter.is_active():
        ready = sorted({*ready, *sorter.get_ready()}, key=rank.__getitem__)
        name = ready.pop(0)
        out.append(by_name[name])
        sorter.done(name)
    return out


def plan(recipe: Recipe, cache: Cache | None = None) -> list[PlannedStage]:
    cache = cache or Cache(recipe.cache.dir)
    keys: dict[str, str] = {}
    out = []
    for stage in ordered_stages(recipe):
        cfg = stage.slice(recipe)
        material = stage.key_material(cfg, keys)
        key = keys[stage.name] = make_key(material)
        out.append(PlannedStage(stage, cfg, key, material, cache.is_published(stage.kind, key),
                                stage.skip_reason(recipe)))
    return out


def format_plan(planned: list[PlannedStage]) -> str:
    lines = [f"{'stage':<16} {'key':<14} {'would':<7} needs"]
    for p in planned:
        would = "skip" if p.skip else ("hit" if p.cached else "build")
        lines.append(f"{p.name:<16} {p.key[:12]:<14} {would:<7} {', '.join(p.needs) or '-'}"
                     + (f"   ({p.skip})" if p.skip else ""))
    return "\n".join(lines)


def execute(recipe: Recipe, run_dir: Path, overrides: list[str], until: str | None = None,
            unneeded: str | None = None, on_event: OnEvent | None = None) -> list[StageResult]:
    """Run the DAG (or the part of it that `until`, default `run.until`, needs); write run.json; return
    per-stage results. One console line per stage, and a last line saying what was built, reused, skipped.
    `unneeded`: why the stages `until` does not need are skipped, when a caller (not --until) chose it.
    `on_event`: gets the same progress as ProgressEvents (the console lines are made as without it)."""
    until = until or recipe.run.until
    cache = Cache(recipe.cache.dir)
    results: list[StageResult] = []
    artifacts: dict[str, Artifact] = {}
    log.info("d2build: recipe %s (%s), cache %s", recipe.name, recipe.source, cache.root)
    from d2build.schema import config_setting_notes

    for note in config_setting_notes(recipe):
        log.info("d2build: note: %s", note)
    planned = plan(recipe, cache)
    wanted = _ancestors(planned, until) if until else {p.name for p in planned}
    problems = [prob for p in planned if p.name in wanted for prob in p.stage.preflight(recipe)]
    if problems:
        raise RecipeError(problems)
    for i, p in enumerate(planned, 1):
        if p.name not in wanted:
            res = StageResult(p.name, p.key, "skipped", 0.0, reason=unneeded or f"--until {until}")
        else:
            res = _run_one(p, cache, artifacts, run_dir, on_event)
        results.append(res)
        (log.error if res.status == "failed" else log.info)(stage_line(p.stage, res))
        _write_run_json(run_dir, recipe, overrides, results)
        if on_event is not None:
            on_event(ProgressEvent(p.name, res.status, i, len(planned), done=True))
    log.info("d2build: %s", outcome_line(results))
    return results


def stage_line(stage: Stage, res: StageResult) -> str:
    line = f"{res.name:<15} {res.status:<7} {res.seconds:7.1f}s  {res.key[:12]}"
    said = stage.describe(res.info, Path(res.dir)) if res.dir and res.status in ("built", "hit") else None
    if said:
        line += f"  {said}"
    elif res.dir and res.status != "failed":
        line += f"  {res.dir}"
    if res.reason:
        first = res.reason.splitlines()[0]
        where = f"; evidence in {res.dir}" if res.status == "failed" and res.dir else ""
        line += f"  ({first}{where})"
    return line


def outcome_line(results: list[StageResult]) -> str:
    """What a run did, in one line: built, reused, skipped (and why), failed."""
    def names(status: str) -> list[str]:
        return [r.name for r in results if r.status == status]

    parts = [f"built {', '.join(names('built')) or 'nothing'}", f"reused {', '.join(names('hit')) or 'nothing'}"]
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        reasons: dict[str, list[str]] = {}
        for r in skipped:
            reasons.setdefault((r.reason or "").split(":")[0], []).append(r.name)
        parts.append("skipped " + "; ".join(f"{', '.join(n)} ({why})" for why, n in reasons.items()))
    failed = names("failed")
    if failed:
        parts.append(f"FAILED {', '.join(failed)}")
    return "; ".join(parts)


def _ancestors(planned: list[PlannedStage], until: str) -> set[str]:
    needs = {p.name: p.needs for p in planned}
    if until not in needs:
        raise ValueError(f"--until {until}: no such stage (stages: {', '.join(needs)})")
    keep, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(needs[name])
    return keep


def _run_one(p: PlannedStage, cache: Cache, artifacts: dict[str, Artifact], run_dir: Path,
             on_event: OnEvent | None = None) -> StageResult:
    missing = [n for n in p.needs if n not in artifacts]
    if missing:
        return StageResult(p.name, p.key, "skipped", 0.0, reason=f"needs {', '.join(missing)}")
    if p.skip:
        return StageResult(p.name, p.key, "skipped", 0.0, reason=p.skip)
    t0 = time.monotonic()
    inputs = {role: artifacts[node] for role, node in p.stage.needs.items()}
    ctx = Context(p.name, cache) if on_event is None else _ReportingContext(p.name, cache, on_event)

    def build(out_dir: Path) -> dict[str, Any]:
        log.info("%s: building %s", p.name, p.key[:12])
        if on_event is not None:
            on_event(ProgressEvent(p.name, "building"))
        return p.stage.run(p.cfg, inputs, out_dir, ctx)

    def waiting() -> None:
        log.info("%s: another process is building %s; waiting for it", p.name, p.key[:12])
        if on_event is not None:
            on_event(ProgressEvent(p.name, "waiting"))

    try:
        art, status = cache.get_or_build(p.stage.kind, p.key, p.material, build, on_wait=waiting)
    except StageFailed as e:
        evidence = run_dir / f"{p.name}-failed"
        for name, text in e.files.items():
            evidence.mkdir(parents=True, exist_ok=True)
            (evidence / name).write_text(text)
        return StageResult(p.name, p.key, "failed", time.monotonic() - t0,
                           str(evidence) if e.files else None, sorted(e.files), reason=str(e))
    except CacheError as e:  # the cache folder's own words: which folder, what is wrong, what to do
        return StageResult(p.name, p.key, "failed", time.monotonic() - t0, reason=str(e))
    except Exception as e:  # noqa: BLE001 - a stage crash is reported per stage, then the run fails
        log.debug("%s", traceback.format_exc())
        return StageResult(p.name, p.key, "failed", time.monotonic() - t0,
                           reason=f"{type(e).__name__}: {e}")
    artifacts[p.name] = art
    return StageResult(p.name, p.key, status, time.monotonic() - t0, str(art.dir),
                       sorted(art.manifest["files"]), art.info)


def _write_run_json(run_dir: Path, recipe: Recipe, overrides: list[str], results: list[StageResult]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "recipe": recipe.name,
        "recipe_file": recipe.source,
        "overrides": overrides,
        "config": recipe.to_dict(),
        "stages": {r.name: asdict(r) for r in results},
        "ok": all(r.status != "failed" for r in results),
    }
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(run_dir / "run.json")
