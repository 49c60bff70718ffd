"""A built model that detects: letterbox -> backend runner -> the family's decode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2build.processing import Detections, Letterbox, letterbox, resize_shortest_edge
from d2build.runtime.info import ModelInfo


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
            chws, lbs = zip(*(resize_shortest_edge(im, info.min_size, info.max_size, info.size_divisibility,
                                                   info.pixel_mean) for im in images_bgr))
            hw = (max(c.shape[1] for c in chws), max(c.shape[2] for c in chws))
            lo, hi = info.input_min or hw, info.input_max or hw
            if not (lo[0] <= hw[0] <= hi[0] and lo[1] <= hw[1] <= hi[1]):
                raise ValueError(f"images resized to {hw[0]}x{hw[1]} (short side {info.min_size}, long side at most "
                                 f"{info.max_size}) are outside the graph's input range {lo[0]}x{lo[1]} .. "
                                 f"{hi[0]}x{hi[1]}: widen model.dynamic.min/max and rebuild")
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
                out.append(self.family.decode(outputs, lb, i, self.info.mask_threshold))
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
