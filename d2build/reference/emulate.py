"""float16 nodes run as float16 storage with float32 arithmetic where ONNX Runtime has no fp16 kernel.

ONNX Runtime's CPU provider has float16 kernels for few ops on most CPUs (1.32 on x86-64 without
AVX512-FP16: none of Conv, Gemm, Relu, Add, MaxPool, Resize, Sigmoid); for the others it silently
inserts Casts around the node. Which kernels exist depends on version and CPU, so it is probed,
not assumed: each distinct (op type, attributes, input/output types) of the graph's float16 nodes is
tried in a one-node model, and a node is *native* when ONNX Runtime runs it without inserting
Casts. Every other float16 node is rewritten here, explicitly, to `Cast(float32) -> op ->
Cast(float16)`: its float16 inputs are exact in float32, the op computes in float32 and its result
is rounded to float16 once -- float16 storage, float32 arithmetic, which is also how TensorRT's
float16 kernels accumulate. The rewritten nodes are returned, so verify can report them.
"""

from __future__ import annotations

from functools import lru_cache

import onnx
from onnx import TensorProto, helper

F16 = TensorProto.FLOAT16


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        out[vi.name] = vi.type
    for init in model.graph.initializer:
        out[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return out


def _is_f16(t: onnx.TypeProto | None) -> bool:
    return t is not None and t.tensor_type.elem_type == F16


@lru_cache(maxsize=None)
def _ort_runs(op_type: str, domain: str, opset: int, attrs: bytes, in_types: tuple[bytes, ...],
              out_types: tuple[bytes, ...]) -> bool:
    """Does ONNX Runtime (CPU) run this node natively, without casting its float16 values?"""
    import os
    import tempfile

    import onnxruntime as ort

    node = onnx.NodeProto()
    node.op_type, node.domain = op_type, domain
    node.attribute.extend(onnx.NodeProto.FromString(attrs).attribute)
    inputs, outputs = [], []
    for i, raw in enumerate(in_types):
        name = f"i{i}" if raw else ""
        node.input.append(name)
        if raw:
            inputs.append(helper.make_value_info(name, onnx.TypeProto.FromString(raw)))
    for i, raw in enumerate(out_types):
        node.output.append(f"o{i}")
        outputs.append(helper.make_value_info(f"o{i}", onnx.TypeProto.FromString(raw)))
    graph = helper.make_graph([node], "probe", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    options.optimized_model_filepath = path
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ran = onnx.load(path)
    except Exception:  # noqa: BLE001 - no kernel at all: emulate
        return False
    finally:
        os.unlink(path)
    return not any(n.op_type == "Cast" for n in ran.graph.node)


def emulate_unsupported_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """(executable copy, names of the nodes run in float32 on float16 values)."""
    types = _types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    new_nodes: list[onnx.NodeProto] = []
    emulated: list[str] = []
    for node in out.graph.node:
        f16_in = [i for i in node.input if i and _is_f16(types.get(i))]
        f16_out = [o for o in node.output if _is_f16(types.get(o))]
        if node.domain not in ("", "ai.onnx") or node.op_type == "Cast" or not (f16_in or f16_out):
            new_nodes.append(node)
            continue
        attrs = onnx.NodeProto()
        attrs.attribute.extend(node.attribute)
        in_t = tuple(types[i].SerializeToString() if i else b"" for i in node.input)
        out_t = tuple(types[o].SerializeToString() for o in node.output)
        if None in (types.get(i) for i in node.input if i) or _ort_runs(
                node.op_type, node.domain, opset, attrs.SerializeToString(), in_t, out_t):
            new_nodes.append(node)
            continue
        emulated.append(node.name)
        for k, name in enumerate(node.input):
            if name in f16_in:
                wide = f"{name}/emulate_fp32/{node.name}"
                new_nodes.append(helper.make_node("Cast", [name], [wide], to=TensorProto.FLOAT,
                                                  name=f"{node.name}/emulate_in{k}"))
                node.input[k] = wide
        for k, name in enumerate(node.output):
            if name in f16_out:
                wide = f"{name}/emulate_fp32"
                node.output[k] = wide
                new_nodes.append(node)
                new_nodes.append(helper.make_node("Cast", [wide], [name], to=F16, name=f"{node.name}/emulate_out{k}"))
        if not f16_out:
            new_nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(_dedupe(new_nodes))
    if emulated:  # value_info of the renamed outputs no longer applies; let ORT infer
        keep = [vi for vi in out.graph.value_info if not vi.name.endswith("/emulate_fp32")]
        del out.graph.value_info[:]
        out.graph.value_info.extend(keep)
    return out, emulated


def _dedupe(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    seen: set[int] = set()
    out = []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out
