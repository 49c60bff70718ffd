"""What a built model is, beyond its graph: the facts pre- and post-processing need.

Written into a deploy bundle's model.json and read back by the runtime; built from a recipe by
`d2build.detectron.model_info`. Plain data: no torch, no Detectron2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    family: str
    input_hw: tuple[int, int]  # [H, W] the graph takes (letterbox canvas)
    pixel_mean: tuple[float, float, float]  # BGR; letterbox padding that normalises to 0
    num_classes: int
    class_names: tuple[str, ...] | None = None  # None: unknown (eval maps by position, pictures say "class k")
    keypoint_names: tuple[str, ...] = ()
    keypoint_skeleton: tuple[tuple[int, int], ...] = ()  # 0-based index pairs
    batch: int = 1
    #: how an image becomes the input: `letterbox` (fit into input_hw, pad) or `shortest_edge` (Detectron2's
    #: ResizeShortestEdge to min_size/max_size, pad to a multiple of size_divisibility; a dynamic graph)
    resize: str = "letterbox"
    min_size: int = 0
    max_size: int = 0
    size_divisibility: int = 32
    input_min: tuple[int, int] | None = None  # a dynamic graph's smallest and largest [H, W]
    input_max: tuple[int, int] | None = None
    input_format: str = "BGR"  # what input_tensor takes (the graph flips channels for RGB models itself)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # folded into the graph's first conv
    mask_threshold: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)

    def class_name(self, k: int) -> str:
        names = self.class_names
        return names[k] if names is not None and 0 <= k < len(names) else f"class {k}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("input_hw", "pixel_mean", "pixel_std", "keypoint_names", "input_min", "input_max"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        if d.get("class_names") is not None:
            d["class_names"] = tuple(d["class_names"])
        d["keypoint_skeleton"] = tuple(tuple(p) for p in d.get("keypoint_skeleton") or ())
        return cls(**d)
