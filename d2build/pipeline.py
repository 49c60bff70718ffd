"""The DAG every recipe runs: its nodes, what each reads from which, in order (the runner sorts by needs).

    weights -> export -> surgery -> [calibration, int8] -> precision -> verify -> build -> check
                                                                    [-> candidates -> eval, with eval.annotations]

Graphs another stage derives from the recipe's are nodes of their own, named `<stage>[<consumer>]`:
`surgery[cal]` (the graph calibration runs: the default final NMS, batch 1, the fixed input) and, for
the eval stages, `surgery[eval]` and `precision[eval]` (the candidate graph: a final NMS that keeps
every score above eval.score_floor and suppresses nothing, in the recipe's precision). Their keys
compose from their upstream keys and their stages' VERSIONs like every other node's, and a derived
graph equal to the recipe's (calibration with the default NMS) is the same cache entry.

Calibration joins the DAG only at int8; build runs after verify so no engine is built from a graph
that failed verification (verify gates the build without being part of its key); check runs the
engine against the graph and Detectron2 (skipped with build's reason where there is no TensorRT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2build.recipe import STAGES

if TYPE_CHECKING:
    from d2build.recipe import Recipe
    from d2build.stages.base import Stage


def pipeline_for(recipe: "Recipe") -> list["Stage"]:
    from d2build.stages.build import BuildStage
    from d2build.stages.calibration import CalibrationStage, calibration_graph
    from d2build.stages.candidates import CandidatesStage, candidate_graph
    from d2build.stages.check import EngineCheckStage
    from d2build.stages.eval import EvalStage
    from d2build.stages.export import ExportStage
    from d2build.stages.precision import PrecisionStage
    from d2build.stages.surgery import SurgeryStage
    from d2build.stages.verify import VerifyStage
    from d2build.stages.weights import WeightsStage

    int8 = recipe.precision.mode == "int8"
    ranges = {"ranges": "calibration"} if int8 else {}
    device = recipe.build.device
    stages: list[Stage] = [WeightsStage(), ExportStage({"weights": "weights"}), SurgeryStage({"export": "export"})]
    if int8:
        stages += [SurgeryStage({"export": "export"}, name="surgery[cal]", derive=calibration_graph),
                   CalibrationStage({"graph": "surgery[cal]"})]
    stages += [PrecisionStage({"graph": "surgery", **ranges}),
               VerifyStage({"weights": "weights", "graph": "precision"}),
               BuildStage({"graph": "precision"}, after=("verify",), device=device),
               EngineCheckStage({"weights": "weights", "graph": "precision", "engine": "build"}, device=device)]
    if recipe.eval.annotations:
        stages += [SurgeryStage({"export": "export"}, name="surgery[eval]", derive=candidate_graph),
                   PrecisionStage({"graph": "surgery[eval]", **ranges}, name="precision[eval]"),
                   CandidatesStage({"weights": "weights", "graph": "precision[eval]"}),
                   EvalStage({"candidates": "candidates"})]
    assert all(s.kind in STAGES for s in stages)
    return stages
