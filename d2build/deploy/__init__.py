"""Deploying what d2build built: bundles, their torch-free runtime, a Triton model repository.

    from d2build.deploy import load_bundle
    model, bundle = load_bundle("outputs/deploy/mask_rcnn_r50-640x640-fp32-plugins-1a2b3c4d5e6f")
    detections, letterbox, seconds = model.detect(bgr)          # original-image pixels

    python -m d2build.deploy BUNDLE IMAGE... [--backend auto|tensorrt|onnxruntime|reference]
    python BUNDLE/detect.py IMAGE...          # the same, with the runtime the bundle carries

bundle.py writes and opens bundles (manifest digests, format version, backend choice), runtime.py
decodes images and writes detections (numpy + Pillow), onnx_runner.py opens a float32 graph in ONNX
Runtime without the `onnx` package, vendor.py says which d2build files a bundle carries, triton.py
writes the Triton repository and triton_model.py is its Python-backend model; tritonserver.py runs a
local Triton server (`d2build serve`) and load.py sends it a bounded load. Importing this package
imports none of them until asked (bundles vendor it with the runtime).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_bundle": "bundle", "open_bundle": "bundle", "write_bundle": "bundle", "Bundle": "bundle",
    "BundleError": "bundle", "BundleSource": "bundle", "FORMAT_VERSION": "bundle",
    "decode_image": "runtime", "load_image": "runtime", "detections_to_dict": "runtime", "ImageError": "runtime",
    "encode_mask": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
