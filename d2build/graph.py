"""Small onnx-graphsurgeon helpers: find nodes by module scope, and add nodes tersely.

The TorchScript ONNX exporter names every node after the module that produced it
(`/roi_heads/box_head/fc1/Gemm`); repeated calls of one module get `_1`, `_2` suffixes. Finding
nodes by that scope instead of by numbered names keeps surgery working across input sizes,
backbones and exporter versions, and lets it say exactly what it could not find.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from d2build import plugins

OPSET = 17


def matches(op: str, name: str, patterns: Iterable[str]) -> bool:
    """Does a node match one of `precision.keep_fp32`'s patterns: an op type, a node name or a glob of names?"""
    return any(op == p or name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


class GraphMismatch(ValueError):
    """The export does not have the structure surgery expects; names what was not found."""


def scope_regex(module_path: str, op: str) -> re.Pattern[str]:
    """Nodes of `op` produced by module `a.b.c` (or its repeated calls `a.b.c_1`, ...).

    A child of a ModuleList or Sequential is scoped as `name.index` by the exporter
    (`/roi_heads/box_head.0/fc1/Gemm` for `roi_heads.box_head.0.fc1`): an index part stays joined to
    the part before it."""
    parts: list[str] = []
    for part in module_path.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    head = "/".join(re.escape(p) for p in parts[:-1])
    last = re.escape(parts[-1])
    prefix = f"/{head}/" if head else "/"
    return re.compile(rf"^{prefix}{last}(?:_(\d+))?/(?:.*/)?{re.escape(op)}(?:_\d+)?$")


def find_calls(graph: gs.Graph, module_path: str, op: str, count: int | None = None) -> list[gs.Node]:
    """The `op` nodes of each call of a module, ordered by call index; checks the count if given."""
    pat = scope_regex(module_path, op)
    hits = []
    for n in graph.nodes:
        m = pat.match(n.name or "")
        if m and n.op == op:
            hits.append((int(m.group(1) or 0), n))
    hits.sort(key=lambda t: t[0])
    nodes = [n for _, n in hits]
    if count is not None and len(nodes) != count:
        raise GraphMismatch(
            f"expected {count} {op} node(s) from module {module_path!r} in the export, found {len(nodes)}"
            + (f": {[n.name for n in nodes]}" if nodes else "") + "; is model.config the config that was exported?")
    return nodes


def find_one(graph: gs.Graph, module_path: str, op: str) -> gs.Node:
    return find_calls(graph, module_path, op, count=1)[0]


class Builder:
    """Adds nodes to a gs.Graph under one name prefix; `op()` returns the output variable(s)."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph = graph
        self.prefix = prefix
        self._n = Counter()

    def name(self, what: str) -> str:
        self._n[what] += 1
        k = self._n[what]
        return f"{self.prefix}/{what}" + (f"_{k - 1}" if k > 1 else "")

    def op(self, op: str, inputs: Sequence[Any], attrs: dict[str, Any] | None = None, *,
           outputs: int = 1, name: str | None = None, domain: str | None = None) -> Any:
        node_name = self.name(name or op)
        ins = [self._as_tensor(x, node_name, i) for i, x in enumerate(inputs)]
        outs = [gs.Variable(f"{node_name}_out{i}" if outputs > 1 else f"{node_name}_out") for i in range(outputs)]
        node = gs.Node(op=op, name=node_name, attrs=attrs or {}, inputs=ins, outputs=outs, domain=domain)
        self.graph.nodes.append(node)
        return outs if outputs > 1 else outs[0]

    def _as_tensor(self, x: Any, node_name: str, i: int) -> gs.Tensor:
        if isinstance(x, gs.Tensor):
            return x
        arr = np.asarray(x)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        # a 0-d ndarray stays a scalar (Range, Gather-to-scalar need one); numpy scalars become [1]
        scalar = isinstance(x, np.ndarray) and x.ndim == 0
        return gs.Constant(f"{node_name}_c{i}", arr if scalar else np.ascontiguousarray(arr))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def io_shapes(model: onnx.ModelProto) -> dict[str, dict[str, list]]:
    def dims(vi: onnx.ValueInfoProto) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]

    return {
        "inputs": {i.name: dims(i) for i in model.graph.input},
        "outputs": {o.name: dims(o) for o in model.graph.output},
    }


def plugin_attributes(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    out = {}
    for n in model.graph.node:
        if n.domain == plugins.DOMAIN:
            out[n.name] = {"op": n.op_type, **{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}}
            for k, v in out[n.name].items():
                if isinstance(v, bytes):
                    out[n.name][k] = v.decode()
    return out
