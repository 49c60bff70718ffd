"""The runner contract: named numpy arrays in, named numpy arrays out.

`run(feeds, outputs=None)` is what verify, calibration, infer and eval call. `prepare`, `execute`
and `synchronize` let `d2build bench` time the model alone on an input already in place (for a
GPU runner that excludes the copies; CPU runners just keep the feeds).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np


class RunnerError(RuntimeError):
    """A model that cannot be opened or run here; the message says why and what to do."""


class Runner:
    backend: str = "?"
    input_name: str = "input_tensor"
    #: float16 nodes run as float32 arithmetic on float16 values (no CPU kernel): {"node", "op"} each
    emulated: list[dict[str, str]]
    input_shape: tuple[Any, ...]  # [N, 3, H, W]; a symbolic dimension is a str (dynamic shapes)
    output_names: list[str]

    def __init__(self) -> None:
        self.emulated = []
        self._feeds: dict[str, np.ndarray] | None = None

    @property
    def input_hw(self) -> tuple[Any, Any]:
        return self.input_shape[2], self.input_shape[3]

    @property
    def batch(self) -> Any:
        return self.input_shape[0]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # bench: the model alone, on an input already in place
    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        self._feeds = dict(feeds)

    def execute(self) -> None:
        assert self._feeds is not None, "prepare() first"
        self.run(self._feeds)

    def synchronize(self) -> None:
        pass
