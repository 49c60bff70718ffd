"""Backend `reference`: a graph with TensorRT plugin nodes, run on the CPU by ONNX Runtime with
d2build's reference plugin implementations as custom ops (d2build/reference/)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from d2build.backends import graphs
from d2build.backends.base import Runner


class ReferenceRunner(Runner):
    backend = "reference"

    def __init__(self, model: Any, threads: int | None = None):
        super().__init__()
        from d2build.reference import ReferenceSession

        proto = graphs.load(model)
        self.input_shape = graphs.input_shape(proto)
        self.output_names = [o.name for o in proto.graph.output]
        proto, self.emulated = graphs.executable(proto, cpu=True)
        self.session = ReferenceSession(proto, threads=threads)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        return self.session.run(feeds, outputs)
