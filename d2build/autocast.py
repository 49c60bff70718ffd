"""fp16 graphs with FP32 islands: precision decided per node, expressed in the graph by Cast nodes.

TensorRT 10/11 networks are strongly typed: a tensor's ONNX type *is* its precision. So an fp16
engine is built from a graph whose tensors are float16 where fp16 is wanted, with `Cast` nodes at
the borders of the regions that must stay float32 (what NVIDIA ModelOpt's AutoCast produces too).

The policy, node by node (`classify`), first match wins:

1. **Plugins stay FP32.** `PyramidROIAlign_TRT` accepts FP32 only. `EfficientNMS_TRT` accepts
   FP16 too, but its inputs are box corners in input pixels (up to 2048, where float16's spacing
   is 1-2 px, while verify matches boxes at IoU >= 0.98) and scores it sorts globally; so FP32.
2. **`precision.keep_fp32`** (recipe): op types, node names or `fnmatch` patterns of names.
3. **Ranked values are computed in FP32.** The producers of what a `TopK` ranks (through
   data-movement ops) stay FP32: in R-CNN graphs these are the merged RPN predictor convs, whose
   output rows hold the objectness logits ranked among 100k-450k anchors (at |logit| ~ 4 float16's
   spacing is 0.004: thousands of ties decide which anchors become proposals), the -1e4 rows
   that keep levels apart, and the anchor deltas that go into `exp`.
4. **fp16 compute:** Conv, ConvTranspose, Gemm (whatever feeds them; a Cast is inserted).
5. **fp16 when fed fp16:** Relu, MaxPool, Resize, Add, and data movement (Reshape, Concat,
   Gather, Transpose, ...) run in fp16 when every float data input is fp16; a float32 constant
   (an anchor table, a clip limit) keeps them FP32. This keeps residual and FPN top-down adds in
   fp16 and the RPN's anchor tables in FP32.
6. **Everything else is FP32**: the input centring `Sub(PIXEL_MEAN)` (the input stays float32),
   `Exp`, `Softmax`, `Sigmoid` (exponentials: exp overflows float16 above 11.09, and class
   probabilities are compared with thresholds of 0.05), `TopK`, and the box decode/clip
   arithmetic (`Min`, `Max`, `Where`, `MatMul`, `Mul`, `Split`, comparisons): coordinates up to
   2048 px need float32's 24 bits.

Graph inputs and outputs keep their types (float32 `input_tensor`, float32/int32 outputs).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build import plugins
from d2build.graph import matches

FP16_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm"})
FP16_WHEN_FED = frozenset({"Relu", "MaxPool", "Resize", "Add"})
MOVEMENT = frozenset({"Reshape", "Concat", "Gather", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                      "Identity", "Slice", "Split"})
# Which inputs carry the data (float) a node computes on; others (shapes, indices, Resize scales,
# split sizes) keep their types. Absent: every input.
DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Resize": (0,), "Reshape": (0,), "Gather": (0,), "Slice": (0,), "Split": (0,), "TopK": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Where": (1, 2),
}

REASONS = {
    "plugin_fp32_only": plugins.PYRAMID_ROI_ALIGN.why_fp32,
    "plugin_nms": plugins.EFFICIENT_NMS.why_fp32,
    "keep_fp32": "precision.keep_fp32 in the recipe",
    "ranked": "TopK, and what it ranks (objectness logits among 100k+ anchors: float16 ties "
              "change the proposals; also the -1e4 level rows and the deltas that go into exp)",
    "exp": "exponential (exp, softmax, sigmoid): float16 overflows above exp(11.09); probabilities "
           "are compared with thresholds",
    "input": "graph input centring: input_tensor stays float32, cast after Sub(PIXEL_MEAN)",
    "box_math": "box decode/clip/masking arithmetic: pixel coordinates up to 2048 need float32",
    "fed_fp32": "fed by FP32 values (or a float32 constant such as an anchor table)",
}
_EXP_OPS = frozenset({"Exp", "Softmax", "Sigmoid", "LogSoftmax"})


def _data_inputs(node: gs.Node) -> list[int]:
    idx = DATA_INPUTS.get(node.op, tuple(range(len(node.inputs))))
    return [i for i in idx if i < len(node.inputs) and _is_float(node.inputs[i])]


def _is_float(t: gs.Tensor) -> bool:
    if isinstance(t, gs.Constant):
        return t.values.dtype in (np.float32, np.float16)
    return t.dtype in (np.float32, np.float16) and t.name != ""


@dataclass
class Decision:
    precision: dict[str, str]  # node name -> "fp16" | "fp32"
    reasons: dict[str, str]  # FP32 node name -> reason key


def _ranked_producers(graph: gs.Graph) -> set[str]:
    """Compute nodes whose outputs a TopK ranks, found through data-movement ops."""
    out: set[str] = set()
    for node in graph.nodes:
        if node.op != "TopK":
            continue
        todo = [node.inputs[0]]
        seen: set[str] = set()
        while todo:
            t = todo.pop()
            if t.name in seen or not t.inputs:
                continue
            seen.add(t.name)
            prod = t.inputs[0]
            if prod.op in MOVEMENT:
                todo.extend(prod.inputs[i] for i in _data_inputs(prod))
            else:
                out.add(prod.name)
    return out


def classify(graph: gs.Graph, keep_fp32: Iterable[str] = ()) -> Decision:
    """Decide each node's precision (see the module docstring); nodes must be topologically sorted."""
    keep = tuple(keep_fp32)
    ranked = _ranked_producers(graph)
    prec: dict[str, str] = {}
    reasons: dict[str, str] = {}
    tensor_prec: dict[str, str] = {}

    def fp32(node: gs.Node, why: str) -> None:
        prec[node.name], reasons[node.name] = "fp32", why

    for node in graph.nodes:
        data = [node.inputs[i] for i in _data_inputs(node)]
        if not data and not any(_is_float(o) for o in node.outputs):
            prec[node.name] = "none"  # integer-only (e.g. an index Add): no float precision to decide
        elif node.domain == plugins.DOMAIN or node.op in plugins.PLUGINS:
            fp32(node, "plugin_nms" if node.op == plugins.EFFICIENT_NMS.op else "plugin_fp32_only")
        elif matches(node.op, node.name, keep):
            fp32(node, "keep_fp32")
        elif node.name in ranked or node.op == "TopK":
            fp32(node, "ranked")
        elif node.op in FP16_COMPUTE:
            prec[node.name] = "fp16"
        elif node.op in FP16_WHEN_FED or node.op in MOVEMENT:
            fed16 = bool(data) and all(
                isinstance(t, gs.Variable) and tensor_prec.get(t.name) == "fp16" for t in data)
            if fed16:
                prec[node.name] = "fp16"
            else:
                fp32(node, "fed_fp32")
        elif node.op in _EXP_OPS:
            fp32(node, "exp")
        elif any(isinstance(t, gs.Variable) and not t.inputs for t in data):  # reads a graph input
            fp32(node, "input")
        else:
            fp32(node, "box_math")
        for o in node.outputs:
            tensor_prec[o.name] = prec[node.name]
    return Decision(prec, reasons)


def _cast(graph: gs.Graph, src: gs.Variable, to: type, cache: dict[tuple[str, Any], gs.Variable]) -> gs.Variable:
    key = (src.name, to)
    if key not in cache:
        tag = "fp16" if to is np.float16 else "fp32"
        out = gs.Variable(f"{src.name}/to_{tag}", dtype=to, shape=src.shape)
        onnx_to = onnx.TensorProto.FLOAT16 if to is np.float16 else onnx.TensorProto.FLOAT
        graph.nodes.append(gs.Node("Cast", f"{src.name}/cast_{tag}", {"to": onnx_to}, [src], [out]))
        cache[key] = out
    return cache[key]


@dataclass
class Fp16Result:
    model: onnx.ModelProto
    decision: Decision
    casts: int
    facts: dict[str, Any] = field(default_factory=dict)


def to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = ()) -> Fp16Result:
    """The fp16 graph: weights and activations of fp16 nodes in float16, Casts at island borders."""
    graph = gs.import_onnx(model)
    graph.toposort()
    decision = classify(graph, keep_fp32)
    nodes = list(graph.nodes)
    producer_prec: dict[str, str] = {}
    for node in nodes:
        for o in node.outputs:
            producer_prec[o.name] = decision.precision[node.name]
    casts: dict[tuple[str, Any], gs.Variable] = {}
    consts16: dict[str, gs.Constant] = {}
    for node in nodes:
        want16 = decision.precision[node.name] == "fp16"
        for i in _data_inputs(node):
            t = node.inputs[i]
            if isinstance(t, gs.Constant):
                if want16 and t.values.dtype == np.float32:
                    if t.name not in consts16:
                        consts16[t.name] = gs.Constant(t.name + "/fp16", t.values.astype(np.float16))
                    node.inputs[i] = consts16[t.name]
                continue
            is16 = producer_prec.get(t.name) == "fp16"
            if want16 and not is16:
                node.inputs[i] = _cast(graph, t, np.float16, casts)
            elif not want16 and is16:
                node.inputs[i] = _cast(graph, t, np.float32, casts)
        if want16:
            for o in node.outputs:
                if o.dtype == np.float32:
                    o.dtype = np.float16
    # Graph outputs keep their types: an fp16 output gets a Cast that takes over its name.
    outputs = []
    for o in graph.outputs:
        if o.dtype == np.float16:
            name = o.name
            o.name = name + "/fp16"
            cast = _cast(graph, o, np.float32, casts)
            cast.name = name
            outputs.append(cast)
        else:
            outputs.append(o)
    graph.outputs = outputs
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(out, full_check=True)
    return Fp16Result(out, decision, len(casts), summarize(decision, graph))


def summarize(decision: Decision, graph: gs.Graph) -> dict[str, Any]:
    """Facts for the manifest: every FP32 node by reason, and what runs in fp16."""
    ops = {n.name: n.op for n in graph.nodes}
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, why in decision.reasons.items():
        by_reason[why].append(name)
    fp16_ops = Counter(ops[n] for n, p in decision.precision.items() if p == "fp16")
    fp32_ops = Counter(ops[n] for n, p in decision.precision.items() if p == "fp32")
    return {
        "fp16_nodes": sum(fp16_ops.values()),
        "fp32_nodes": sum(fp32_ops.values()),
        "fp16_ops": dict(sorted(fp16_ops.items())),
        "fp32_ops": dict(sorted(fp32_ops.items())),
        "fp32_islands": {
            why: {"why": REASONS[why], "nodes": sorted(names),
                  "ops": dict(sorted(Counter(ops[n] for n in names).items()))}
            for why, names in sorted(by_reason.items())
        },
    }


def node_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """What a graph actually computes in, read from its tensor types: node name -> fp16 | fp32 | other.

    A node is fp16 when any float input or output is float16, fp32 when its floats are all float32;
    Casts are "cast". Used by tests and reports to check a graph against what its manifest claims.
    """
    types: dict[str, int] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    out = {}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for n in model.graph.node:
        if n.op_type == "Cast":
            out[n.name] = "cast"
            continue
        ts = {types.get(t) for t in list(n.input) + list(n.output) if t}
        out[n.name] = "fp16" if f16 in ts else ("fp32" if f32 in ts else "other")
    return out
