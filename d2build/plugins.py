"""The TensorRT plugin contract: every fact d2build relies on about EfficientNMS_TRT and PyramidROIAlign_TRT.

Surgery builds plugin nodes with the builders below, the reference executor validates and runs them
from the same field lists, autocast keeps them in FP32 for the reasons recorded here, the schema
checks recipes against the limits here, and `d2build doctor` asks TensorRT's registry for these op
names. Read from NVIDIA's plugin sources (TensorRT OSS 11.1, `plugin/efficientNMSPlugin/`,
`plugin/pyramidROIAlignPlugin/`); the semantics themselves live in `reference/plugins.py`.

Pure Python (no numpy, onnx or torch): `d2build.schema` imports it to reject a recipe in a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: Domain of plugin nodes in d2build graphs. TensorRT's ONNX parser resolves a node whose op type it
#: does not know through the plugin registry, whatever its domain; a domain of its own keeps the
#: graph valid ONNX (onnx.checker accepts unknown domains declared in opset_import).
DOMAIN = "trt.plugins"
DOMAIN_VERSION = 1
#: Attributes the parser itself consumes to look up the creator (never passed to the plugin).
PARSER_ATTRIBUTES = {"plugin_version": "1", "plugin_namespace": ""}

REQUIRED = object()  # a field without a default: the creator rejects a node that lacks it


@dataclass(frozen=True)
class Field:
    """One plugin field as the creator reads it: ONNX attribute kind, default (or REQUIRED), check."""

    name: str
    kind: str  # "float" (FLOAT), "int" (INT) or "int2" (INTS of length 2)
    default: Any = REQUIRED
    check: Callable[[Any], bool] = lambda _: True
    expectation: str = ""


_BOOL = {"check": lambda v: v in (0, 1), "expectation": "expected 0 or 1"}


@dataclass(frozen=True)
class Plugin:
    op: str
    version: str
    fields: tuple[Field, ...]
    num_inputs: tuple[int, ...]
    num_outputs: int
    fp32_only: bool  # TensorRT accepts only float32 inputs
    why_fp32: str  # why d2build's fp16 graphs keep it in FP32 (written to the precision manifest)
    deprecated: str  # since which TensorRT release

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields if f.default is not REQUIRED}


#: EfficientNMSPluginCreator: six required fields, class_agnostic optional.
EFFICIENT_NMS = Plugin(
    op="EfficientNMS_TRT",
    version="1",
    fields=(
        Field("score_threshold", "float", check=lambda v: v >= 0, expectation="TensorRT requires >= 0"),
        Field("iou_threshold", "float", check=lambda v: v > 0, expectation="TensorRT requires > 0"),
        Field("max_output_boxes", "int", check=lambda v: v > 0, expectation="TensorRT requires > 0"),
        Field("background_class", "int"),
        Field("score_activation", "int", **_BOOL),
        Field("class_agnostic", "int", default=0, **_BOOL),
        Field("box_coding", "int", **_BOOL),
    ),
    num_inputs=(2, 3),
    num_outputs=4,
    fp32_only=False,
    why_fp32="EfficientNMS_TRT: box corners up to 2048 px (float16 spacing 1-2 px) and globally sorted scores",
    deprecated="10.12",
)

#: PyramidROIAlignPluginCreator: every field optional.
PYRAMID_ROI_ALIGN = Plugin(
    op="PyramidROIAlign_TRT",
    version="1",
    fields=(
        Field("fpn_scale", "int", 224, lambda v: v >= 1, "TensorRT requires >= 1"),
        Field("pooled_size", "int", 7, lambda v: v >= 1, "TensorRT requires >= 1"),
        Field("image_size", "int2", (1024, 1024), lambda v: min(v) >= 1, "TensorRT requires [H, W] >= 1"),
        Field("roi_coords_absolute", "int", 1),
        Field("roi_coords_swap", "int", 0),
        Field("roi_coords_plusone", "int", 0),
        Field("roi_coords_transform", "int", 2, lambda v: v in (-1, 0, 1, 2), "expected -1, 0, 1 or 2"),
        Field("sampling_ratio", "int", 0, lambda v: v >= 0, "TensorRT requires >= 0"),
        Field("legacy", "int", 0),
    ),
    num_inputs=(5,),
    num_outputs=1,
    fp32_only=True,
    why_fp32="PyramidROIAlign_TRT accepts FP32 only",
    deprecated="11.0",
)

PLUGINS: dict[str, Plugin] = {p.op: p for p in (EFFICIENT_NMS, PYRAMID_ROI_ALIGN)}

# ---------------------------------------------------------------- limits that shape recipes

#: EfficientNMS_TRT considers at most this many (box, class) candidates before NMS: the header's
#: 4096 is raised to 5000 in initialize() on every GPU with >= 64K registers per block (2000 on TX1/TX2).
PRE_NMS_TOPK = 5000
#: Below this probability-space score threshold the plugin switches to its dense filter kernel, which
#: pads its output with sub-threshold candidates (scores -32768 before the activation).
DENSE_MODE_BELOW = 0.007
#: Score the dense kernel writes over filtered-out candidates: -(1 << 15).
DENSE_FILL_SCORE = -32768.0
#: PyramidROIAlign_TRT pools from exactly four feature maps (P2..P5).
ROI_ALIGN_LEVELS = 4
#: Legacy image size PyramidROIAlign_TRT assumes when `image_size` is absent (MaskRCNNConfig).
ROI_ALIGN_LEGACY_IMAGE_SIZE = (1024, 1024)

# ---------------------------------------------------------------- node builders


def _node(b: Any, plugin: Plugin, inputs: list[Any], attrs: dict[str, Any], name: str) -> Any:
    unknown = sorted(set(attrs) - {f.name for f in plugin.fields})
    if unknown:
        raise ValueError(f"{plugin.op}: unknown attribute(s) {unknown}")
    missing = [f.name for f in plugin.fields if f.default is REQUIRED and f.name not in attrs]
    if missing:
        raise ValueError(f"{plugin.op}: missing required attribute(s) {missing}")
    full = {"plugin_version": plugin.version, **attrs}
    return b.op(plugin.op, inputs, full, outputs=plugin.num_outputs, name=name, domain=DOMAIN)


def efficient_nms(b: Any, boxes: Any, scores: Any, *, name: str, max_output_boxes: int, score_threshold: float,
                  iou_threshold: float, background_class: int = -1, score_activation: int = 0,
                  class_agnostic: int = 0, box_coding: int = 0) -> list[Any]:
    """An EfficientNMS_TRT node (via a `graph.Builder`); returns (num, boxes, scores, classes)."""
    return _node(b, EFFICIENT_NMS, [boxes, scores], {
        "background_class": int(background_class), "max_output_boxes": int(max_output_boxes),
        "score_threshold": float(score_threshold), "iou_threshold": float(iou_threshold),
        "score_activation": int(score_activation), "class_agnostic": int(class_agnostic),
        "box_coding": int(box_coding)}, name)


def pyramid_roi_align(b: Any, rois: Any, features: list[Any], *, name: str, pooled_size: int,
                      image_size: tuple[int, int], sampling_ratio: int, fpn_scale: int = 224) -> Any:
    """A PyramidROIAlign_TRT node with Detectron2's ROIAlignV2 geometry (absolute corner ROIs,
    half-pixel transform); returns the pooled [B, R, C, P, P] tensor."""
    if len(features) != ROI_ALIGN_LEVELS:
        raise ValueError(f"{PYRAMID_ROI_ALIGN.op} pools {ROI_ALIGN_LEVELS} levels; got {len(features)}")
    return _node(b, PYRAMID_ROI_ALIGN, [rois, *features], {
        "fpn_scale": int(fpn_scale), "pooled_size": int(pooled_size), "image_size": [int(v) for v in image_size],
        "roi_coords_absolute": 1, "roi_coords_swap": 0, "roi_coords_transform": 2,
        "sampling_ratio": int(sampling_ratio)}, name)
