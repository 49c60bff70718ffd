"""What TensorRT's ONNX parser imports natively, for the standard-op graph flavour (`surgery.ops=standard`).

Read from onnx-tensorrt's docs/operators.md (the TensorRT 10.15 edition, opset 9-24), its importers
(onnxOpImporters.cpp / onnxOpCheckers.cpp) and NvInfer.h (TensorRT 11.1); TensorRT 11.0 added
parser ops but removed none of these. The ops Panoptic FPN's semantic head and PointRend's point head
added (Abs, GridSample, InstanceNormalization, Neg, ScatterElements) were read from operators.md and
onnxOpImporters.cpp of the 10.0-GA / 10.1-GA editions: all "Y"; GridSample "Input must be 4D input",
its importer reads mode "nearest" | "bilinear" | "bicubic" (GridSample-16's spellings; another string,
such as GridSample-20's "linear", is left at its initial nearest), padding_mode zeros | border |
reflection, align_corners; InstanceNormalization imports natively (kNATIVE_INSTANCENORM is on by
default) when input, scale and bias have one type; ScatterElements without a reduction is
IScatterLayer's element mode (a reduction goes through a plugin). `check(model)` fails a graph with the first node TensorRT could
not import, naming the node, the op and the rule.
"""

from __future__ import annotations

import onnx
from onnx import helper

#: The ops d2build's standard graphs (and their fp16/int8 forms) may contain; all are "supported" in
#: onnx-tensorrt's operator table for TensorRT 10.x (and still in 11.x).
SUPPORTED = frozenset({
    "Abs", "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose",
    "DequantizeLinear", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "GatherElements",
    "GatherND", "Gemm", "Greater", "GreaterOrEqual", "GridSample", "Identity", "InstanceNormalization",
    "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "NonMaxSuppression",
    "NonZero", "Not", "Pad", "Pow", "QuantizeLinear", "Range", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum",
    "Relu", "Reshape", "Resize", "RoiAlign", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Slice", "Softmax",
    "Split", "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where",
})
#: ViTDet's (LazyConfig) ops, from onnx-tensorrt's operators.md (TensorRT 10): LayerNormalization "only the first
#: output", Einsum (IEinsumLayer), Erf, Pow, ReduceMean and Pad "axes must be an initializer" (pads too: a
#: constant-pads Pad is what d2build's static ViT graphs hold), Pad's mode constant, reflect or edge
PAD_MODES = ("constant", "reflect", "edge")
#: GridSample modes TensorRT's importer reads (GridSample-16's spellings)
GRID_SAMPLE_MODES = ("bilinear", "nearest", "bicubic")
#: Standard ops TensorRT's parser implements through a plugin of libnvinfer_plugin (not deprecated ones):
#: RoiAlign -> ROIAlign_TRT version 2 (IPluginV3; version 1 until 10.0). The build still loads the library.
PARSER_PLUGINS = {"RoiAlign": ("ROIAlign_TRT", "2")}
#: TopK's K: "values larger than 3840 will result in a runtime error" (NvInfer.h, ITopKLayer).
TOPK_MAX = 3840
#: INMSLayer ranks at most this many boxes per batch item, across classes (2000 on SM 5.3/6.2).
NMS_TOPK = 5000


class UnsupportedOp(ValueError):
    """A node TensorRT's ONNX parser would reject or import with other semantics."""


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const_ints(model: onnx.ModelProto, name: str) -> list[int] | None:
    for init in model.graph.initializer:
        if init.name == name:
            return [int(v) for v in onnx.numpy_helper.to_array(init).reshape(-1)]
    return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def problems(model: onnx.ModelProto) -> list[str]:
    """One line per node TensorRT 10/11 could not import as d2build needs it."""
    out = []
    shapes = {vi.name: vi.type.tensor_type.shape for vi in list(model.graph.value_info) + list(model.graph.input)}
    for n in model.graph.node:
        label = f"node {n.name!r} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            out.append(f"{label} is in domain {n.domain!r}: a plugin, not a standard op")
            continue
        if n.op_type not in SUPPORTED:
            out.append(f"{label}: op {n.op_type} is not in d2build's list of ops TensorRT 10/11's ONNX parser imports")
            continue
        a = _attrs(n)
        if n.op_type == "TopK":
            k = _const_ints(model, n.input[1])
            if k is None or k[0] > TOPK_MAX:
                out.append(f"{label}: K={k} must be a constant <= {TOPK_MAX} for TensorRT's TopK layer")
            if a.get("sorted", 1) != 1:
                out.append(f"{label}: TensorRT requires sorted=1")
        elif n.op_type == "ScatterND" and "reduction" in a:
            out.append(f"{label}: TensorRT's importer rejects the reduction attribute (even 'none'); omit it")
        elif n.op_type == "ScatterElements" and _text(a.get("reduction", "none")) != "none":
            out.append(f"{label}: a reduction makes TensorRT import it through a plugin; d2build's graphs use none")
        elif n.op_type == "GridSample":
            mode = _text(a.get("mode", "bilinear"))
            if mode not in GRID_SAMPLE_MODES:
                out.append(f"{label}: mode {mode!r} is not one TensorRT's importer reads ({', '.join(GRID_SAMPLE_MODES)}; "
                           "GridSample-20's 'linear' would import as nearest)")
            shape = shapes.get(n.input[0])
            if shape is not None and len(shape.dim) != 4:
                out.append(f"{label}: TensorRT's GridSample takes 4-D input only")
        elif n.op_type == "LayerNormalization" and any(n.output[1:]):
            out.append(f"{label}: TensorRT imports only the first output (mean and inverse std must be unused)")
        elif n.op_type == "Einsum" and len(n.input) > 2:
            out.append(f"{label}: {len(n.input)} operands; d2build's graphs use two")
        elif n.op_type == "Pad":
            if _text(a.get("mode", "constant")) not in PAD_MODES:
                out.append(f"{label}: mode {_text(a.get('mode'))!r} is not one of {', '.join(PAD_MODES)}")
            if len(n.input) < 2 or _const_ints(model, n.input[1]) is None:
                out.append(f"{label}: pads must be an initializer (a static graph)")
            if len(n.input) > 3 and n.input[3] and _const_ints(model, n.input[3]) is None:
                out.append(f"{label}: axes must be an initializer")
        elif n.op_type == "ReduceMean" and len(n.input) > 1 and n.input[1] and _const_ints(model, n.input[1]) is None:
            out.append(f"{label}: axes must be an initializer")
        elif n.op_type == "RoiAlign":
            if a.get("coordinate_transformation_mode", b"half_pixel") not in (b"half_pixel", "half_pixel"):
                out.append(f"{label}: coordinate_transformation_mode must be half_pixel (Detectron2's ROIAlignV2)")
            if "sampling_ratio" not in a:
                out.append(f"{label}: set sampling_ratio explicitly (TensorRT's importer defaults it to 1, ONNX to 0)")
        elif n.op_type == "NonMaxSuppression":
            shape = shapes.get(n.input[0])
            if shape is not None and len(shape.dim) != 3:
                out.append(f"{label}: boxes must be 3-D [batch, boxes, 4] for TensorRT's INMSLayer")
            dim = shape.dim[1] if shape is not None and len(shape.dim) == 3 else None
            if dim is not None and dim.HasField("dim_value") and dim.dim_value > NMS_TOPK:
                out.append(f"{label}: {dim.dim_value} boxes per batch item, but TensorRT's INMSLayer ranks only "
                           f"the top {NMS_TOPK}: put a TopK before it")
            if len(n.input) < 5 or not n.input[4]:
                out.append(f"{label}: give score_threshold (TensorRT defaults it to 0 and drops scores <= 0; "
                           "ONNX Runtime keeps everything)")
    return out


def check(model: onnx.ModelProto) -> None:
    found = problems(model)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UnsupportedOp(f"the standard-op graph cannot be imported by TensorRT: {found[0]}{more}")
