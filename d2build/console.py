"""What d2build prints: its own lines, with the third-party notices it is known to trigger kept quiet.

A normal run shows d2build's lines only. The warnings listed in `KNOWN` are ones d2build's own
calls trigger inside libraries (importing Detectron2's model zoo, tracing for the export, anchor
generation, ONNX Runtime's graph optimizer during constant folding); each filter matches one exact
message, so a warning from anything else (a user's own code, a new library deprecation) still
shows. `-v` (or `run.verbose=true`) leaves everything on.
"""

from __future__ import annotations

import logging
import warnings

# (category, start of the message) of warnings d2build's own calls trigger in libraries
KNOWN: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, "pkg_resources is deprecated as an API"),  # detectron2.model_zoo imports pkg_resources
    (FutureWarning, "`torch.jit.script` is deprecated"),  # detectron2 decorates functions at import
    (UserWarning, "torch.meshgrid: in an upcoming release"),  # Detectron2's anchor generator
    (DeprecationWarning, "`torch.jit.script` is deprecated"),
)
# loggers whose warnings are library notices about d2build's own (correct) use
QUIET_LOGGERS = ("torch.fx._symbolic_trace",  # "is_fx_tracing will return true for both ..." (export)
                 # "Weight format of PointRend models have changed!": d2build's own weights file (a state dict
                 # without torch's version metadata) already has the current names; the conversion changes nothing
                 "detectron2.projects.point_rend.mask_head")

_state = {"verbose": False, "configured": False}


def verbose() -> bool:
    return _state["verbose"]


def configure(verbose: bool = False) -> None:
    """Set this process's console: quiet known third-party notices unless `verbose`. Idempotent."""
    _state["verbose"] = bool(verbose)
    if verbose:
        return
    if not _state["configured"]:
        for category, message in KNOWN:
            warnings.filterwarnings("ignore", message=__import__("re").escape(message), category=category)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        _state["configured"] = True
    try:  # ONNX Runtime's own logger (graph-optimizer notices while onnx-graphsurgeon folds constants)
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass
