"""What every graph backend needs to know about a graph before running it, decided from the graph alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from d2build import plugins
from d2build.backends.base import RunnerError


def load(model: Any) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise RunnerError(f"{path}: no such graph file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so, naming it
        raise RunnerError(f"{path}: not a readable ONNX graph ({type(e).__name__}: {e})") from None


def flavour(model: onnx.ModelProto) -> str:
    """`plugins` when the graph has TensorRT plugin nodes, else `standard`."""
    return "plugins" if any(n.op_type in plugins.PLUGINS for n in model.graph.node) else "standard"


def has_fp16(model: onnx.ModelProto) -> bool:
    f16 = onnx.TensorProto.FLOAT16
    return (any(i.data_type == f16 for i in model.graph.initializer)
            or any(v.type.tensor_type.elem_type == f16 for v in model.graph.value_info))


def executable(model: onnx.ModelProto, cpu: bool = True) -> tuple[onnx.ModelProto, list[dict[str, str]]]:
    """The graph to hand ONNX Runtime, and the float16 nodes emulated in it ({"node", "op"} each).

    On the CPU provider, float16 nodes without a float16 kernel run as float16 storage with float32
    arithmetic (d2build/reference/emulate.py says why it is explicit); elsewhere the graph as is."""
    if not cpu or not has_fp16(model):
        return model, []
    from d2build.reference.emulate import emulate_unsupported_fp16

    ops = {n.name: n.op_type for n in model.graph.node}
    out, names = emulate_unsupported_fp16(model)
    return out, [{"node": n, "op": ops[n]} for n in names]


def input_shape(model: onnx.ModelProto, name: str = "input_tensor") -> tuple[Any, ...]:
    for i in model.graph.input:
        if i.name == name:
            return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                         for d in i.type.tensor_type.shape.dim)
    raise RunnerError(f"the graph has no input named {name!r} (inputs: {[i.name for i in model.graph.input]})")


def quiet_session_options(options: Any) -> Any:
    """ONNX Runtime session options that keep its graph-optimizer notices off the console unless -v."""
    from d2build import console

    if not console.verbose():
        options.log_severity_level = 3
    return options


def value_shape(value: onnx.ValueInfoProto) -> tuple[Any, ...]:
    """A graph input's or output's shape: ints, a symbolic dimension as its name (or "?")."""
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in value.type.tensor_type.shape.dim)


def value_dtype(value: onnx.ValueInfoProto) -> Any:
    """A graph input's or output's element type as a numpy dtype."""
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
