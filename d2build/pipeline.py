"""The DAG every recipe runs: which stages, in which order (the runner sorts them by `needs`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2build.recipe import Recipe
    from d2build.stages.base import Stage


#: Every stage a recipe can run, in order (the schema checks `run.until` against it).
STAGES = ("weights", "export", "surgery", "calibration", "precision", "verify", "build", "check", "candidates", "eval")


def pipeline_for(recipe: "Recipe") -> list["Stage"]:
    """weights -> export -> surgery -> [calibration, int8 only] -> precision -> verify -> build -> check
    [-> candidates -> eval, when eval.annotations is set].

    Calibration joins the DAG only at int8 (it reads the export, not surgery: see its docstring);
    build needs verify so no engine is built from a graph that failed verification; check runs the
    engine against the graph and Detectron2 (skipped with build's reason where there is no TensorRT). Candidates read
    the export (and calibration), not surgery: an NMS sweep evaluates every variant from one run of
    the model per image (see stages/candidates.py).
    """
    from d2build.stages.build import BuildStage
    from d2build.stages.calibration import CalibrationStage
    from d2build.stages.candidates import CandidatesStage
    from d2build.stages.check import EngineCheckStage
    from d2build.stages.eval import EvalStage
    from d2build.stages.export import ExportStage
    from d2build.stages.precision import PrecisionStage
    from d2build.stages.surgery import SurgeryStage
    from d2build.stages.verify import VerifyStage
    from d2build.stages.weights import WeightsStage

    mode = recipe.precision.mode
    calibration = [CalibrationStage()] if mode == "int8" else []
    evaluation = [CandidatesStage(mode), EvalStage()] if recipe.eval.annotations else []
    stages = [WeightsStage(), ExportStage(), SurgeryStage(), *calibration, PrecisionStage(mode), VerifyStage(),
              BuildStage(recipe.build.device), EngineCheckStage(recipe.build.device), *evaluation]
    assert all(s.name in STAGES for s in stages)
    return stages
