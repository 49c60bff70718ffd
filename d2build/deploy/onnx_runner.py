"""A standard-op graph file in ONNX Runtime, with numpy and onnxruntime only (no `onnx` package).

`backends.onnxruntime.OnnxRuntimeRunner` parses the graph with `onnx` first (to read its input
shape and, for float16 graphs on the CPU, to rewrite nodes ONNX Runtime has no float16 kernel for).
A bundle says in model.json whether its graph holds float16 tensors; when it does not, nothing needs
the `onnx` package, so this runner opens the file directly and reads the I/O from the session. The
bundle runtime (`load_bundle`) and the Triton Python-backend model (`triton_model.py`, role
`onnxruntime`) both run bundles through this class: the server computes what the runtime computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from d2build.backends.base import Runner, RunnerError

PREFERRED = ("CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers(device: int | None = None) -> list[Any]:
    """CUDA (TF32 off, so a GPU computes what the CPU does within float32 rounding) when this
    onnxruntime has it, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    out: list[Any] = []
    if "CUDAExecutionProvider" in have:
        out.append(("CUDAExecutionProvider", {"device_id": int(device or 0), "use_tf32": 0}))
    out.append("CPUExecutionProvider")
    return out


class OnnxFileRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[Any] | None = None,
                 spinning: bool = True):
        """`spinning=False`: idle intra-op threads sleep instead of spinning (ONNX Runtime's
        session.intra_op.allow_spinning), for a process sharing the CPU with others; results are the same."""
        super().__init__()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise RunnerError(f"{path}: no such graph file")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # graph-optimizer notices stay off the console
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so, naming it
            raise RunnerError(f"{path}: ONNX Runtime cannot open it ({type(e).__name__}: {e})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else str(d) for d in inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        names = list(self.output_names if outputs is None else outputs)
        return dict(zip(names, self.session.run(names, dict(feeds)), strict=True))
