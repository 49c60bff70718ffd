"""Deploying what d2build built: bundles, their torch-free runtime, a Triton model repository.

    from d2build.deploy import load_bundle
    model, bundle = load_bundle("outputs/deploy/mask_rcnn_r50-640x640-fp32-plugins-1a2b3c4d5e6f")
    detections, letterbox, seconds = model.detect(bgr)          # original-image pixels

    python -m d2build.deploy BUNDLE IMAGE... [--backend auto|tensorrt|onnxruntime|reference]

bundle.py writes and opens bundles (manifest digests, format version, backend choice), runtime.py
decodes images and writes detections (numpy + Pillow), triton.py writes the Triton repository and
triton_model.py is its Python-backend model. Importing this package imports none of them until
asked (the Triton models vendor this file with runtime.py only).
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
