"""The implementation of d2build's Python API (the names `d2build` exports; docs/API.md).

`builds`: build, plan, sweep, evaluate and their results; `models`: load and the Model it gives;
`errors`: the typed errors. Importing this package imports numpy and Pillow, not torch, Detectron2
or Hydra: those come with the first call that needs them.
"""

from d2build.api.builds import Build, Plan, PlannedStage, StageResult, Sweep, build, evaluate, plan, sweep
from d2build.api.errors import InputError, ModelUnavailable, Problem, RecipeError, StageFailed
from d2build.api.models import Detection, Detections, ImageLike, Model, load
from d2build.recipe import Recipe
from d2build.runner import ProgressEvent
from d2build.runtime.info import ModelInfo

__all__ = ["Build", "Detection", "Detections", "ImageLike", "InputError", "Model", "ModelInfo", "ModelUnavailable",
           "Plan", "PlannedStage", "Problem", "ProgressEvent", "Recipe", "RecipeError", "StageFailed", "StageResult",
           "Sweep", "build", "evaluate", "load", "plan", "sweep"]
