"""Model families: all Detectron2 knowledge about one family lives in its module here.

Adding a family means a module here (registered below), a recipe and tests; the runner, the
stages and the cache do not change.
"""

from __future__ import annotations

import importlib
from typing import Any

FAMILIES = {
    "mask_rcnn": "d2build.families.mask_rcnn:MaskRCNN",
    "keypoint_rcnn": "d2build.families.keypoint_rcnn:KeypointRCNN",
    "faster_rcnn": "d2build.families.faster_rcnn:FasterRCNN",
    "retinanet": "d2build.families.retinanet:RetinaNet",
    "cascade_rcnn": "d2build.families.cascade_rcnn:CascadeRCNN",
}


def family(name: str) -> Any:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} has no implementation; supported: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
