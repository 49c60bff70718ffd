"""CPU reference semantics of the TensorRT plugins in d2build graphs (EfficientNMS_TRT, PyramidROIAlign_TRT).

``plugins`` holds the pure numpy/torch implementations; ``executor`` registers them as onnxruntime-extensions
custom ops and runs whole graphs through :class:`ReferenceSession`, so a TensorRT-ready ONNX file can be
checked on a machine without a GPU or TensorRT.
"""

from .executor import (
    EFFICIENT_NMS_OP,
    ORT_CONTRIB_DOMAIN,
    PYRAMID_ROI_ALIGN_OP,
    TRT_PLUGIN_DOMAIN,
    PluginAttributeError,
    ReferenceSession,
    lower_plugin_nodes,
    plugin_attributes,
    plugin_nodes,
    register_reference_ops,
)
from .plugins import DEFAULT_PRE_NMS_TOPK, efficient_nms, pyramid_roi_align, pyramid_roi_levels

__all__ = [
    "DEFAULT_PRE_NMS_TOPK",
    "EFFICIENT_NMS_OP",
    "ORT_CONTRIB_DOMAIN",
    "PYRAMID_ROI_ALIGN_OP",
    "TRT_PLUGIN_DOMAIN",
    "PluginAttributeError",
    "ReferenceSession",
    "efficient_nms",
    "lower_plugin_nodes",
    "plugin_attributes",
    "plugin_nodes",
    "pyramid_roi_align",
    "pyramid_roi_levels",
    "register_reference_ops",
]
