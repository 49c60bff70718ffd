"""Run TensorRT-ready ONNX graphs on the CPU, with the plugin nodes served by :mod:`.plugins`.

TensorRT's ONNX parser resolves a plugin node by op type (plus the ``plugin_version`` and
``plugin_namespace`` attributes) whatever its domain; our graphs put them in ``trt.plugins``. ONNX Runtime
only dispatches Python custom ops (onnxruntime-extensions "PyOps") in the ``ai.onnx.contrib`` domain, so
:class:`ReferenceSession` runs an in-memory copy in which every plugin node is *lowered*:

* moved to ``ai.onnx.contrib`` (an opset import for it is added);
* its attributes validated the way TensorRT would treat them (``onnx-tensorrt``'s ``loadFields`` passes
  INT as int32, FLOAT as float32, INTS as an int32 array and silently drops names the plugin creator does not
  list; the creator then checks types and ranges and fills defaults) -- except that unknown attribute names
  are an error here, since TensorRT ignoring them usually hides a typo;
* its attributes rewritten into the canonical form the PyOp is declared with (see :data:`PLUGINS`).

Why the canonical form: the PyOp bridge (``pyop/pyfunc.cc``) reads each *declared* attribute with
``KernelInfoGetAttribute_{int64,float,string}``, formats it with ``std::stringstream`` and hands the Python
function a ``str`` that ``Opdef.cast_attributes`` converts to ``int``/``float``. Consequences:

* a declared attribute missing from the node, or of another ONNX type, fails session creation
  ("Unable to find attribute ..."), so lowering fills every default first;
* int lists (``image_size``) cannot be declared at all, and floats lose digits (``stringstream`` keeps 6
  significant digits: 0.123456789 arrives as 0.123457). Both therefore travel as STRING attributes holding
  the exact value (``"1344,1344"``, ``repr`` of the float32 value);
* every declared input is required, so an ``EfficientNMS_TRT`` node without anchors gets an empty
  placeholder input, which the op turns back into ``anchors=None``.

The bridge also returns outputs as ``ndarray.flatten().tolist()``, which for a 12.5M-element ROIAlign result
costs seconds; the ops hand back :class:`_BridgeArray`, whose ``tolist`` returns the flat array itself (the
C++ side accepts any buffer of the declared dtype).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import AttributeProto, helper, numpy_helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from .. import console
from .. import plugins as contract
from .plugins import efficient_nms, pyramid_roi_align

__all__ = [
    "EFFICIENT_NMS_OP",
    "ORT_CONTRIB_DOMAIN",
    "PLUGINS",
    "PYRAMID_ROI_ALIGN_OP",
    "TRT_PLUGIN_DOMAIN",
    "PluginAttributeError",
    "ReferenceSession",
    "lower_plugin_nodes",
    "plugin_attributes",
    "plugin_nodes",
    "register_reference_ops",
]

TRT_PLUGIN_DOMAIN = contract.DOMAIN
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"
EFFICIENT_NMS_OP = contract.EFFICIENT_NMS.op
PYRAMID_ROI_ALIGN_OP = contract.PYRAMID_ROI_ALIGN.op

_NO_ANCHORS = "d2build.reference/no_anchors"


class PluginAttributeError(ValueError):
    """A plugin node's attributes would not build (or would silently misbehave) in TensorRT."""


# --------------------------------------------------------------------------------------------------
# How each plugin of the contract (d2build/plugins.py) maps onto its reference PyOp
# --------------------------------------------------------------------------------------------------


def _validate(plugin: contract.Plugin, field: contract.Field, value: Any) -> None:
    if not field.check(value):
        raise PluginAttributeError(f"{plugin.op}: attribute '{field.name}' = {value!r} is invalid; {field.expectation}")


@dataclass(frozen=True)
class PluginSpec:
    """A contract plugin plus its PyOp signature and reference computation."""

    plugin: contract.Plugin
    input_types: tuple[int, ...]
    output_types: tuple[int, ...]
    compute: Callable[..., Any]

    @property
    def op_type(self) -> str:
        return self.plugin.op

    @property
    def fields(self) -> tuple[contract.Field, ...]:
        return self.plugin.fields


def _efficient_nms_compute(boxes: np.ndarray, scores: np.ndarray, anchors: np.ndarray, **params: Any) -> tuple:
    no_anchors = anchors.ndim == 1 and anchors.size == 0
    return efficient_nms(boxes, scores, None if no_anchors else anchors, **params)


def _pyramid_roi_align_compute(rois: np.ndarray, *features: np.ndarray, **params: Any) -> np.ndarray:
    return pyramid_roi_align(rois, list(features), **params)


_F, _I = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

PLUGINS: dict[str, PluginSpec] = {
    s.op_type: s for s in (
        PluginSpec(contract.EFFICIENT_NMS, (_F, _F, _F), (_I, _F, _F, _I), _efficient_nms_compute),
        PluginSpec(contract.PYRAMID_ROI_ALIGN, (_F,) * 5, (_F,), _pyramid_roi_align_compute),
    )
}


# --------------------------------------------------------------------------------------------------
# Attribute parsing (source node) and canonical encoding (lowered node)
# --------------------------------------------------------------------------------------------------

_ONNX_KIND = {"float": AttributeProto.FLOAT, "int": AttributeProto.INT, "int2": AttributeProto.INTS}


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or '<unnamed>'}'"


def _parse_parser_attribute(node: onnx.NodeProto, attr: AttributeProto) -> None:
    """``plugin_version`` must name version "1" and ``plugin_namespace`` the default "" namespace."""
    expected = contract.PARSER_ATTRIBUTES[attr.name]
    value = helper.get_attribute_value(attr)
    if attr.type != AttributeProto.STRING or value.decode() != expected:
        raise PluginAttributeError(
            f"{_node_label(node)}: attribute '{attr.name}' must be the string {expected!r} (TensorRT looks the "
            f"creator up by it and the reference implements only that); got {value!r}"
        )


def _parse_field(node: onnx.NodeProto, field: contract.Field, attr: AttributeProto) -> Any:
    if attr.type != _ONNX_KIND[field.kind]:
        got = AttributeProto.AttributeType.Name(attr.type)
        want = AttributeProto.AttributeType.Name(_ONNX_KIND[field.kind])
        raise PluginAttributeError(
            f"{_node_label(node)}: attribute '{field.name}' has ONNX type {got}, but the plugin creator needs "
            f"{want} (TensorRT would fail to create the plugin); re-export it as "
            f"{'a float' if field.kind == 'float' else 'an int' if field.kind == 'int' else 'a list of 2 ints'}"
        )
    value = helper.get_attribute_value(attr)
    if field.kind == "float":
        return float(np.float32(value))
    if field.kind == "int2":
        if len(value) != 2:
            raise PluginAttributeError(f"{_node_label(node)}: '{field.name}' must hold 2 ints [H, W]; got {value}")
        return tuple(int(v) for v in value)
    if not -(2**31) <= value < 2**31:
        raise PluginAttributeError(f"{_node_label(node)}: '{field.name}' = {value} does not fit the plugin's int32")
    return int(value)


def plugin_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Validated plugin parameters of ``node`` as TensorRT's creator would see them, defaults filled in."""
    spec = PLUGINS[node.op_type]
    values: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.name in contract.PARSER_ATTRIBUTES:
            _parse_parser_attribute(node, attr)
            continue
        field = spec.plugin.field(attr.name)
        if field is None:
            known = ", ".join(f.name for f in spec.fields)
            raise PluginAttributeError(
                f"{_node_label(node)}: unknown attribute '{attr.name}'. TensorRT would silently ignore it; "
                f"the plugin reads only: {known}"
            )
        values[field.name] = _parse_field(node, field, attr)
    missing = [f.name for f in spec.fields if f.default is contract.REQUIRED and f.name not in values]
    if missing:
        raise PluginAttributeError(
            f"{_node_label(node)}: missing required attribute(s) {missing}; TensorRT's creator rejects the node"
        )
    if node.op_type == PYRAMID_ROI_ALIGN_OP and "image_size" not in values:
        warnings.warn(
            f"{_node_label(node)} has no 'image_size'; TensorRT then assumes 1024x1024 (MaskRCNNConfig), "
            "which picks wrong FPN levels for any other input size",
            stacklevel=2,
        )
    for field in spec.fields:
        values.setdefault(field.name, field.default)
        _validate(spec.plugin, field, values[field.name])
    return values


def _encode(field: contract.Field, value: Any) -> AttributeProto:
    """Canonical lowered attribute: ints stay INT, floats and int lists become exact STRINGs."""
    if field.kind == "float":
        return helper.make_attribute(field.name, repr(value))
    if field.kind == "int2":
        return helper.make_attribute(field.name, ",".join(str(v) for v in value))
    return helper.make_attribute(field.name, int(value))


def _decode(spec: PluginSpec, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_encode` on what the bridge passes to the Python op (already int for INT fields)."""
    params: dict[str, Any] = {}
    for field in spec.fields:
        if field.name not in attrs:
            raise PluginAttributeError(
                f"{spec.op_type} PyOp called without attribute '{field.name}'; run graphs through "
                "ReferenceSession (or lower_plugin_nodes) so every plugin attribute is present"
            )
        raw = attrs[field.name]
        try:
            if field.kind == "float":
                params[field.name] = float(np.float32(float(raw)))
            elif field.kind == "int2":
                params[field.name] = tuple(int(v) for v in str(raw).split(","))
            else:
                params[field.name] = int(raw)
        except ValueError as exc:
            raise PluginAttributeError(f"{spec.op_type}: cannot parse attribute '{field.name}' = {raw!r}") from exc
    return params


# --------------------------------------------------------------------------------------------------
# PyOp registration
# --------------------------------------------------------------------------------------------------


class _BridgeArray(np.ndarray):
    """ndarray whose ``tolist()`` returns a plain view instead of a Python list.

    ``onnxruntime_extensions._ocos._on_pyop_invocation`` ships every output as ``r.flatten().tolist()``;
    the C++ side then rebuilds an array from the list. Returning the flat buffer itself skips both copies
    (seconds for a [1000, 256, 7, 7] result). The dtype must equal the declared output type exactly,
    because the C++ side memcpy's same-itemsize buffers without converting.
    """

    def tolist(self) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self).reshape(-1)


_NUMPY_TYPES = {PyCustomOpDef.dt_float: np.float32, PyCustomOpDef.dt_int32: np.int32}


def _to_bridge(value: np.ndarray, dt: int) -> _BridgeArray:
    return np.ascontiguousarray(value, dtype=_NUMPY_TYPES[dt]).view(_BridgeArray)


def _make_op(spec: PluginSpec) -> Callable[..., Any]:
    def op(*inputs: np.ndarray, **attrs: Any) -> Any:
        result = spec.compute(*inputs, **_decode(spec, attrs))
        outputs = result if isinstance(result, tuple) else (result,)
        bridged = tuple(_to_bridge(o, dt) for o, dt in zip(outputs, spec.output_types, strict=True))
        return bridged if len(bridged) > 1 else bridged[0]

    op.__name__ = f"reference_{spec.op_type}"
    op.__qualname__ = op.__name__
    return op


def _registered_opdefs() -> dict[str, Any]:
    """PyOps already registered in this process (onnxruntime-extensions keeps them in ``Opdef._odlist``)."""
    from onnxruntime_extensions._ocos import Opdef

    return {od.op_type: od for od in Opdef._odlist.values()}


def register_reference_ops() -> None:
    """Register the plugin PyOps once per process (safe to call repeatedly, also after a module reload).

    onnxruntime-extensions appends every registration to a process-wide list and offers no removal, so a
    second registration of the same op type would create a duplicate kernel.
    """
    existing = _registered_opdefs()
    for spec in PLUGINS.values():
        previous = existing.get(spec.op_type)
        if previous is not None:
            if getattr(previous.body, "__module__", None) != __name__:
                raise RuntimeError(
                    f"A different PyOp named {spec.op_type} is already registered by "
                    f"{previous.body.__module__}; onnxruntime-extensions allows one per op type and process"
                )
            continue
        attrs = {f.name: (PyCustomOpDef.dt_int64 if f.kind == "int" else PyCustomOpDef.dt_string) for f in spec.fields}
        onnx_op(
            op_type=spec.op_type,
            inputs=list(spec.input_types),
            outputs=list(spec.output_types),
            attrs=attrs,
        )(_make_op(spec))


register_reference_ops()


# --------------------------------------------------------------------------------------------------
# Graph lowering and session
# --------------------------------------------------------------------------------------------------


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level nodes of ``model`` that are TensorRT plugins with a reference implementation.

    Matched by op type like TensorRT's parser does (any domain except ``ai.onnx.contrib``, where lowered
    nodes live). Nodes in ``trt.plugins`` with another op type are not listed; :func:`lower_plugin_nodes`
    rejects them.
    """
    return [n for n in model.graph.node if n.op_type in PLUGINS and n.domain != ORT_CONTRIB_DOMAIN]


def _check_unsupported(model: onnx.ModelProto) -> None:
    unknown = sorted({n.op_type for n in model.graph.node if n.domain == TRT_PLUGIN_DOMAIN} - set(PLUGINS))
    if unknown:
        raise NotImplementedError(
            f"No reference implementation for TensorRT plugin(s) {unknown}; supported: {sorted(PLUGINS)}"
        )


def _lower_node(node: onnx.NodeProto, model: onnx.ModelProto) -> None:
    spec = PLUGINS[node.op_type]
    if len(node.input) not in spec.plugin.num_inputs:
        raise PluginAttributeError(
            f"{_node_label(node)} has {len(node.input)} inputs; the plugin takes "
            f"{' or '.join(map(str, spec.plugin.num_inputs))}"
        )
    if len(node.output) != len(spec.output_types):
        raise PluginAttributeError(
            f"{_node_label(node)} has {len(node.output)} outputs; the plugin produces {len(spec.output_types)}"
        )
    values = plugin_attributes(node)
    del node.attribute[:]
    node.attribute.extend(_encode(f, values[f.name]) for f in spec.fields)
    node.domain = ORT_CONTRIB_DOMAIN
    if len(node.input) < len(spec.input_types):
        if not any(init.name == _NO_ANCHORS for init in model.graph.initializer):
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), _NO_ANCHORS))
        node.input.append(_NO_ANCHORS)


def lower_plugin_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose plugin nodes run as the reference PyOps (see the module docstring)."""
    _check_unsupported(model)
    lowered = copy.deepcopy(model)
    nodes = plugin_nodes(lowered)
    for node in nodes:
        _lower_node(node, lowered)
    if nodes and not any(o.domain == ORT_CONTRIB_DOMAIN for o in lowered.opset_import):
        lowered.opset_import.append(helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1))
    return lowered


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    return onnx.load(str(path))


class ReferenceSession:
    """ONNX Runtime (CPU) session over a TensorRT-ready graph, plugins served by the reference ops.

    Args:
        model: path to an ``.onnx`` file, or a ``ModelProto`` (not modified).
        threads: ONNX Runtime intra-op threads (default: ORT's choice). The plugin ops run in Python and
            use torch's own thread pool (``torch.set_num_threads``).
    """

    def __init__(self, model: str | Path | onnx.ModelProto, threads: int | None = None) -> None:
        register_reference_ops()
        source = _load(model)
        self.plugin_count = len(plugin_nodes(source))
        lowered = lower_plugin_nodes(source)
        options = ort.SessionOptions()
        if not console.verbose():
            options.log_severity_level = 3  # graph-optimizer notices
        options.register_custom_ops_library(get_library_path())
        # The plugin ops compute with torch threads inside an ORT kernel; spinning ORT workers would
        # compete with them for the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            lowered.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; returns ``{output name: array}`` for ``output_names`` (default: all outputs)."""
        missing = sorted(set(self.input_names) - set(feeds))
        if missing:
            raise ValueError(f"missing feeds for graph inputs {missing}; inputs are {self.input_names}")
        names = list(self.output_names if output_names is None else output_names)
        results = self._session.run(names, dict(feeds))
        return dict(zip(names, results, strict=True))
