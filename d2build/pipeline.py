"""The DAG every recipe runs: which stages, in which order (the runner sorts them by `needs`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2build.schema import Recipe
    from d2build.stages.base import Stage


def pipeline_for(recipe: "Recipe") -> list["Stage"]:
    from d2build.stages.export import ExportStage
    from d2build.stages.surgery import SurgeryStage
    from d2build.stages.verify import VerifyStage
    from d2build.stages.weights import WeightsStage

    return [WeightsStage(), ExportStage(), SurgeryStage(), VerifyStage()]
