"""A built model that detects: letterbox -> backend runner -> the family's decode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2build.processing import Detections, Letterbox, letterbox
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
        with copies of the last image) and each image's letterbox."""
        if not images_bgr:
            raise ValueError("no images")
        chws, lbs = zip(*(letterbox(im, self.info.input_hw, self.info.pixel_mean) for im in images_bgr))
        batch = list(chws) + [chws[-1]] * (self.info.batch - len(chws))
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
