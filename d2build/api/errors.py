"""The errors the Python API raises, each with what a caller needs to act on it.

    RecipeError      a recipe or override that cannot be built (`.problems`: file, key, message, fix);
                     raised before anything runs. The class the command line prints as one line each.
    InputError       a RecipeError whose every problem is a file the user handed in (a checkpoint, a
                     Detectron2 config, an image folder, a COCO json, an image, a bundle): missing,
                     unreadable, corrupt or of the wrong kind. `except RecipeError` catches it too.
    StageFailed      a stage ran and failed (`.stage`, `.reason`, `.report`: its report file, if it wrote
                     one); raised by `Build.raise_for_status()` and by the calls that need a stage's output.
    ModelUnavailable a built model that cannot be opened here (no TensorRT for an engine, say).

Stages raise their own `d2build.stages.base.StageFailed` inside a run; the runner turns it into a
failed stage of the run (nothing published, evidence kept), which is what the API's StageFailed reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build.commands._runtime import ModelUnavailable
from d2build.recipe import Problem, RecipeError

__all__ = ["InputError", "ModelUnavailable", "Problem", "RecipeError", "StageFailed", "input_or_recipe_error"]


class InputError(RecipeError):
    """A file the user handed in is wrong: every problem names the file (its `source` or its message) and
    says what would fix it. A subclass of RecipeError: nothing ran."""


class StageFailed(RuntimeError):
    """A stage of a build failed: `stage` (its name), `reason` (its one line), `report` (the report it wrote,
    e.g. verify's report.md with the per-image numbers; None when it wrote none) and `build` (the Build
    it came from; typed Any here because builds.py imports this module)."""

    def __init__(self, stage: str, reason: str, report: Path | None = None, build: Any = None):
        self.stage = stage
        self.reason = reason
        self.report = report
        self.build = build
        where = f"; report {report}" if report is not None else ""
        super().__init__(f"stage {stage} failed: {reason.splitlines()[0] if reason else 'no reason given'}{where}")


def _file_keys() -> frozenset[str]:
    from d2build.compose import PATH_KEYS

    return frozenset(f"{section}.{key}" for section, key in PATH_KEYS)


def input_or_recipe_error(e: RecipeError) -> RecipeError:
    """`e` as an InputError when every problem is about a file the recipe names (model.weights,
    model.config, verify/calibration/eval images, eval.annotations); else `e` itself."""
    if isinstance(e, InputError) or not e.problems:
        return e
    keys = _file_keys()
    if all(p.key in keys for p in e.problems):
        out = InputError(list(e.problems))
        out.__cause__ = e.__cause__
        return out
    return e
