"""A built model that detects: letterbox -> backend runner -> the family's decode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2build.processing import Detections, Letterbox, letterbox, resize_shortest_edge, shortest_edge_size
from d2build.runtime.info import ModelInfo


def input_size(info: ModelInfo, hw: tuple[int, int]) -> tuple[int, int]:
    """The [H, W] a model takes for an image of size `hw` (original pixels): the letterbox canvas, or for a
    dynamic graph Detectron2's ResizeShortestEdge of it padded up to a multiple of size_divisibility (what
    `Model.prepare` makes of the image), computed from the size alone."""
    if info.resize == "letterbox":
        return tuple(info.input_hw)  # type: ignore[return-value]
    rh, rw = shortest_edge_size(int(hw[0]), int(hw[1]), info.min_size, info.max_size)
    d = info.size_divisibility
    return -(-rh // d) * d, -(-rw // d) * d


def _in_range(info: ModelInfo, hw: tuple[int, int]) -> bool:
    lo, hi = info.input_min or hw, info.input_max or hw
    return lo[0] <= hw[0] <= hi[0] and lo[1] <= hw[1] <= hi[1]


def outside_range(info: ModelInfo, sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """The images (name -> original [h, w]) a dynamic graph cannot take: name -> (original size, input size),
    in the order given. Empty for a letterbox model (every image fits its canvas). A batch is padded to its
    largest image, so a batch of images that are each in range is in range too: checking each image before
    the first one runs is enough."""
    out = {}
    for name, hw in sizes.items():
        size = input_size(info, hw)
        if not _in_range(info, size):
            out[name] = (tuple(hw), size)
    return out  # type: ignore[return-value]


def range_message(info: ModelInfo, outside: dict[str, tuple[tuple[int, int], tuple[int, int]]], total: int) -> str:
    """One line for `outside_range`'s answer: how many, an example, and the model.dynamic that holds them all."""
    return ": ".join(range_problem(info, outside, total))


def range_problem(info: ModelInfo, outside: dict[str, tuple[tuple[int, int], tuple[int, int]]],
                  total: int) -> tuple[str, str]:
    """`range_message` as (what is wrong, the fix), for a recipe Problem."""
    lo, hi = info.input_min, info.input_max
    assert lo is not None and hi is not None
    sizes = [size for _, size in outside.values()]
    new_lo = (min(lo[0], *(s[0] for s in sizes)), min(lo[1], *(s[1] for s in sizes)))
    new_hi = (max(hi[0], *(s[0] for s in sizes)), max(hi[1], *(s[1] for s in sizes)))
    name, (hw, size) = next(iter(outside.items()))
    example = f"{name}: {hw[0]}x{hw[1]} -> {size[0]}x{size[1]}"
    return (f"{len(outside)} of {total} images resize to an input outside the graph's range {lo[0]}x{lo[1]} .. "
            f"{hi[0]}x{hi[1]} (Detectron2's resize: short side {info.min_size}, long side at most {info.max_size}, "
            f"padded to a multiple of {info.size_divisibility}; {example})",
            f"widen it to model.dynamic={{min:[{new_lo[0]},{new_lo[1]}],max:[{new_hi[0]},{new_hi[1]}]}} and rebuild, "
            "or change model.dynamic.min_size/max_size")


@dataclass
class Model:
    runner: Any  # a d2build.backends Runner
    info: ModelInfo
    source: str = ""  # where the graph or engine came from, for messages
    path: Any = None  # the graph or engine file

    def __post_init__(self) -> None:
        from d2build.families import family

        self.family = family(self.info.family)

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.info.input_hw

    def prepare(self, images_bgr: list[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """The batch tensor [N, 3, H, W] for up to `info.batch` images (the rest of the batch padded
        with copies of the last image) and each image's letterbox.

        `letterbox`: every image fitted into the fixed input_hw. `shortest_edge` (a dynamic graph): each
        image resized as Detectron2's ResizeShortestEdge does and padded to a multiple of 32; the batch is
        padded to its largest image (bottom/right, like ImageList), which must lie in the graph's range."""
        info = self.info
        if not images_bgr:
            raise ValueError("no images")
        if len(images_bgr) > info.batch:
            raise ValueError(f"{len(images_bgr)} images for a model of batch {info.batch}")
        if info.resize == "letterbox":
            chws, lbs = zip(*(letterbox(im, info.input_hw, info.pixel_mean) for im in images_bgr))
        else:
            outside = outside_range(info, {f"image {i + 1}": im.shape[:2] for i, im in enumerate(images_bgr)})
            if outside:  # commands check every image before the first (outside_range); this is the last guard
                raise ValueError(range_message(info, outside, len(images_bgr)))
            chws, lbs = zip(*(resize_shortest_edge(im, info.min_size, info.max_size, info.size_divisibility,
                                                   info.pixel_mean) for im in images_bgr))
            hw = (max(c.shape[1] for c in chws), max(c.shape[2] for c in chws))
            chws = [_pad_to(c, hw, info.pixel_mean) for c in chws]
            lbs = [Letterbox(lb.original_hw, hw, lb.scale, lb.resized_hw) for lb in lbs]
        batch = list(chws) + [chws[-1]] * (info.batch - len(chws))
        return np.stack(batch), list(lbs)

    def detect_batch(self, images_bgr: list[np.ndarray]) -> tuple[list[Detections], list[Letterbox], float]:
        """Detections (original pixels) per image, letterboxes, seconds spent in the backend."""
        out: list[Detections] = []
        lbs: list[Letterbox] = []
        seconds = 0.0
        for start in range(0, len(images_bgr), self.info.batch):
            chunk = images_bgr[start:start + self.info.batch]
            x, chunk_lbs = self.prepare(chunk)
            t0 = time.perf_counter()
            outputs = self.runner.run({self.runner.input_name: x})
            seconds += time.perf_counter() - t0
            for i, lb in enumerate(chunk_lbs):
                out.append(self.family.decode(outputs, lb, i, self.info.mask_threshold, info=self.info))
                lbs.append(lb)
        return out, lbs, seconds

    def detect(self, bgr: np.ndarray) -> tuple[Detections, Letterbox, float]:
        dets, lbs, seconds = self.detect_batch([bgr])
        return dets[0], lbs[0], seconds


def _pad_to(chw: np.ndarray, hw: tuple[int, int], pad: tuple[float, float, float]) -> np.ndarray:
    if chw.shape[1:] == tuple(hw):
        return chw
    out = np.empty((3, *hw), np.float32)
    out[:] = np.asarray(pad, np.float32)[:, None, None]
    out[:, :chw.shape[1], :chw.shape[2]] = chw
    return out
