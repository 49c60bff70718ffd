# The types of d2build's public names (d2build/__init__.py imports them lazily from d2build.api; a stub
# rather than TYPE_CHECKING imports, so the package module depends on nothing of d2build). Keep in step
# with __init__.py's __all__ (tests/test_api.py checks both list the same names).
from d2build.api import Build as Build
from d2build.api import Detection as Detection
from d2build.api import Detections as Detections
from d2build.api import ImageLike as ImageLike
from d2build.api import InputError as InputError
from d2build.api import Model as Model
from d2build.api import ModelInfo as ModelInfo
from d2build.api import ModelUnavailable as ModelUnavailable
from d2build.api import Plan as Plan
from d2build.api import PlannedStage as PlannedStage
from d2build.api import Problem as Problem
from d2build.api import ProgressEvent as ProgressEvent
from d2build.api import Recipe as Recipe
from d2build.api import RecipeError as RecipeError
from d2build.api import StageFailed as StageFailed
from d2build.api import StageResult as StageResult
from d2build.api import Sweep as Sweep
from d2build.api import build as build
from d2build.api import evaluate as evaluate
from d2build.api import load as load
from d2build.api import plan as plan
from d2build.api import sweep as sweep

__version__: str
__all__: list[str]
