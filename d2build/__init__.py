"""d2build: declarative builds of Detectron2 detection models into TensorRT-ready graphs and engines.

The Python API (docs/API.md), the same machinery as the `d2build` command line:

    import d2build

    b = d2build.build("mask_rcnn_r50", ["model.weights=random", "model.input=[320,320]"])
    print(b.ok, b.stages["verify"].status, b.artifact("precision"))
    model = d2build.load(b)                      # the precision graph (or engine) as a Model
    detections = model.detect("photo.jpg")       # a path, a PIL image or an HxWx3 BGR uint8 array
    model.draw("photo.jpg", detections.above(0.5)).save("photo-detections.png")

    build(recipe, overrides, *, until, cache_dir, progress, run_dir) -> Build     run the DAG
    plan(recipe, overrides, *, until, cache_dir) -> Plan                          what a build would do
    sweep(recipe, grid, overrides, ...) -> Sweep (a list of Build, with .rows)   one build per variant
    load(build | bundle folder | .onnx/.plan path, backend, device) -> Model     a model that detects
    evaluate(build, annotations, images, *, count) -> dict                       COCO AP (eval's metrics.json)

Errors: RecipeError (`.problems`: file, key, message, fix), its subclass InputError (a file you handed
in is wrong), StageFailed (`.stage`, `.reason`, `.report`), ModelUnavailable.

Importing d2build is cheap and imports neither torch, Detectron2 nor Hydra (the deploy runtime and
Triton's model import this package where those are not installed); each name is imported from d2build.api
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The types of these names, for mypy and editors: __init__.pyi (this module imports nothing of d2build, so
# every layer may import the package -- the deploy runtime does, for __version__)
__all__ = ["Build", "Detection", "Detections", "ImageLike", "InputError", "Model", "ModelInfo", "ModelUnavailable",
           "Plan", "PlannedStage", "Problem", "ProgressEvent", "Recipe", "RecipeError", "StageFailed", "StageResult",
           "Sweep", "__version__", "build", "evaluate", "load", "plan", "sweep"]


def __getattr__(name: str) -> Any:
    """The public names, from d2build.api on first use (so `import d2build` stays light)."""
    if name in __all__ and name != "__version__":
        try:
            api = importlib.import_module("d2build.api")
        except ImportError as e:  # e.g. a vendored copy of the runtime modules (a Triton repository)
            raise AttributeError(f"d2build.{name} needs d2build.api, which cannot be imported here ({e})") from e
        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd2build' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
