"""Backend `onnxruntime`: a standard-op graph in a plain `onnxruntime.InferenceSession`.

No custom-op library: NonMaxSuppression and RoiAlign are ONNX Runtime's own kernels. The providers
are the installed onnxruntime's best (CUDA, then CPU) unless given; float16 nodes are emulated only
where the CPU provider runs the graph (see graphs.executable).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from d2build.backends import graphs
from d2build.backends.base import Runner

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    # ONNX Runtime's own TensorRT provider needs TensorRT; d2build's tensorrt backend covers engines
    return [p for p in PREFERRED[1:] if p in have] or ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model: Any, threads: int | None = None, providers: list[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        proto = graphs.load(model)
        self.input_shape = graphs.input_shape(proto)
        self.output_names = [o.name for o in proto.graph.output]
        self.providers = list(providers or default_providers())
        proto, self.emulated = graphs.executable(proto, cpu=self.providers[0] == "CPUExecutionProvider")
        options = graphs.quiet_session_options(ort.SessionOptions())
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=self.providers)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        names = list(self.output_names if outputs is None else outputs)
        return dict(zip(names, self.session.run(names, dict(feeds)), strict=True))
