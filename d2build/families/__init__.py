"""Model families: Detectron2 knowledge per family, and the stage pipeline each one builds.

Adding a family means a module here, a recipe and tests; the runner and the cache do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from d2build.schema import Recipe
    from d2build.stages.base import Stage


def family(name: str) -> Any:
    if name == "mask_rcnn":
        from d2build.families.mask_rcnn import MaskRCNN

        return MaskRCNN()
    raise ValueError(f"model.family={name!r} has no implementation; supported: mask_rcnn")


def pipeline_for(recipe: "Recipe") -> list["Stage"]:
    from d2build.stages.export import ExportStage
    from d2build.stages.surgery import SurgeryStage
    from d2build.stages.verify import VerifyStage
    from d2build.stages.weights import WeightsStage

    return [WeightsStage(), ExportStage(), SurgeryStage(), VerifyStage()]
