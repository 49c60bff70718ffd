"""Model families: all Detectron2 knowledge about one family lives in its package here.

    families/<name>/__init__.py   the runtime half: outputs, decode, names, verify metrics, what the
                                  schema checks (numpy only; deploy bundles vendor it)
    families/<name>/build.py      the build half: export, eager, random weights, surgery
    families/surgery/             the surgeons the build halves share (one per meta-architecture,
                                  the graph flavour a strategy passed to them)

Adding a family is one new package (both halves), its recipes and tests, and one line below: the
runner, the stages, the cache and the deploy bundle do not change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2build.families.base import Family
    from d2build.families.build import FamilyBuild

#: family name -> its package (the one registry line a new family adds)
FAMILIES = {
    "mask_rcnn": "d2build.families.mask_rcnn",
    "keypoint_rcnn": "d2build.families.keypoint_rcnn",
    "faster_rcnn": "d2build.families.faster_rcnn",
    "retinanet": "d2build.families.retinanet",
    "cascade_rcnn": "d2build.families.cascade_rcnn",
    "panoptic_fpn": "d2build.families.panoptic_fpn",
    "pointrend": "d2build.families.pointrend",
}


def _package(name: str) -> str:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} has no implementation; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family(name: str) -> "Family":
    """The family's runtime half (decode, names, verify metrics, schema facts): numpy only."""
    return importlib.import_module(_package(name)).FAMILY()


def builder(name: str) -> "FamilyBuild":
    """The family's build half (export, eager, random weights, surgery); `.family` is its runtime half."""
    return importlib.import_module(_package(name) + ".build").BUILD()


def runtime_modules() -> list[str]:
    """The d2build modules (paths relative to d2build/) every family's runtime half lives in."""
    return ["families/__init__.py", "families/base.py",
            *(pkg.split(".", 1)[1].replace(".", "/") + "/__init__.py" for pkg in FAMILIES.values())]
