"""int8 by explicit quantization: calibrated activation ranges and QuantizeLinear/DequantizeLinear.

TensorRT 11 removed implicit INT8 (calibrators, dynamic ranges); an int8 engine is built from a
graph that says where int8 is, with Q/DQ pairs, which is also what TensorRT 10 prefers. The scheme
is the one TensorRT's kernels implement:

* **weights**: symmetric, per output channel (Conv axis 0, Gemm axis 0 with transB=1 / axis 1
  without, ConvTranspose axis 1 -- its weight is [C_in, C_out, kh, kw]), quantized offline to an
  int8 initializer followed by a DequantizeLinear (TensorRT constant-folds a weight's Q anyway);
* **activations**: symmetric, per tensor, a QuantizeLinear -> DequantizeLinear pair on the data
  input of every Conv, ConvTranspose and Gemm, scale = amax / 127 from calibration. A tensor read
  by several quantized nodes gets one pair; other readers (residual Adds) keep the float tensor.

Everything else (plugins, box arithmetic, softmax, the residual Adds) stays FP32. Calibration
(`RangeCollector`) runs the FP32 graph on images with every quantized input added as an output,
keeps |x| maxima and histograms, and turns them into amax by `minmax`, `percentile` (99.99th
percentile of |x|) or `entropy` (TensorRT's KL-divergence search over a 2048-bin histogram).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from d2build.graph import matches

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")
BINS = 2048
QUANT_BINS = 128  # int8 magnitudes 0..127
PERCENTILE = 99.99


@dataclass(frozen=True)
class QuantTarget:
    """One quantized node: its activation input, its weight and the weight's channel axis."""

    node: str
    op: str
    activation: str
    weight: str
    axis: int


def targets(model: onnx.ModelProto, keep_fp32: Iterable[str] = ()) -> list[QuantTarget]:
    """Every Conv/ConvTranspose/Gemm with a constant weight, in graph order, minus `keep_fp32`."""
    keep = tuple(keep_fp32)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS or matches(n.op_type, n.name, keep) or n.input[1] not in inits:
            continue
        if n.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("transA", 0):
                continue
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = 1 if n.op_type == "ConvTranspose" else 0
        out.append(QuantTarget(n.name, n.op_type, n.input[0], n.input[1], axis))
    return out


# ----------------------------------------------------------------------------- calibration


class RangeCollector:
    """|x| statistics of named tensors over calibration images.

    The histogram's bin width is fixed by the first image (its max / 2048); later images extend it
    with more bins of that width when they reach further (as pytorch-quantization does), so one
    pass over the images suffices. `amax()` re-bins to at most 2048 bins first.
    """

    def __init__(self) -> None:
        self.absmax: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.width: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.zeros: dict[str, int] = {}  # exact zeros (ReLU outputs): int8 represents them at any scale

    def add(self, name: str, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32).ravel())
        m = float(a.max()) if a.size else 0.0
        self.absmax[name] = max(self.absmax.get(name, 0.0), m)
        self.count[name] = self.count.get(name, 0) + a.size
        self.zeros[name] = self.zeros.get(name, 0) + int(a.size - np.count_nonzero(a))
        if name not in self.width:
            self.width[name] = (m / BINS) if m > 0 else 1e-8
            self.hist[name] = np.zeros(BINS, np.int64)
        h, w = self.hist[name], self.width[name]
        while m / w >= BINS * 16:  # far beyond the first image's range: coarsen instead of growing
            h = np.pad(h, (0, len(h) % 2)).reshape(-1, 2).sum(axis=1)
            w *= 2
        self.width[name] = w
        idx = (a / w).astype(np.int64)
        nbins = int(idx.max()) + 1 if idx.size else 1
        if nbins > len(h):
            h = np.concatenate([h, np.zeros(nbins - len(h), np.int64)])
        h[:nbins] += np.bincount(idx, minlength=nbins)[:nbins]
        self.hist[name] = h

    def histogram(self, name: str) -> tuple[np.ndarray, float]:
        """(counts, bin width) with at most BINS bins (merged by a whole factor when extended)."""
        h, w = self.hist[name], self.width[name]
        if len(h) > BINS:
            f = -(-len(h) // BINS)
            h = np.pad(h, (0, f * BINS - len(h))).reshape(BINS, f).sum(axis=1)
            w = w * f
        return h, w

    def amax(self, name: str, method: str) -> float:
        if self.absmax[name] == 0.0:
            return 0.0
        if method == "minmax":
            return self.absmax[name]
        h, w = self.histogram(name)
        if method == "percentile":  # never past the largest |x| seen (bin edges can overshoot it)
            return min(percentile_amax(h, w, PERCENTILE), self.absmax[name])
        if method == "entropy":
            # Exact zeros are left out: half of a ReLU output is 0, which int8 represents at any
            # scale, and that spike alone would pull the KL optimum down to ~10% of the range.
            h = h.copy()
            h[0] -= min(self.zeros.get(name, 0), int(h[0]))
            return min(entropy_amax(h, w), self.absmax[name])
        raise ValueError(f"unknown calibration method {method!r} (minmax, entropy, percentile)")


def percentile_amax(hist: np.ndarray, width: float, pct: float) -> float:
    """Upper edge of the bin where the cumulative share of |x| reaches `pct` percent."""
    cdf = np.cumsum(hist, dtype=np.float64)
    i = int(np.searchsorted(cdf, cdf[-1] * pct / 100.0))
    return float((i + 1) * width)


def entropy_amax(hist: np.ndarray, width: float, start: int = QUANT_BINS) -> float:
    """TensorRT's entropy calibration: the clip threshold whose int8 version of the |x|
    distribution loses the least information (KL divergence), searched over bin edges >= 128 bins.

    For each candidate i: P = the first i bins with everything beyond folded into bin i-1; Q = P's
    bins merged into 128 levels, each level's mass spread evenly over its non-empty bins.
    """
    hist = hist.astype(np.float64)
    n = len(hist)
    last_nonzero = int(np.nonzero(hist)[0][-1]) + 1 if hist.any() else n
    if last_nonzero <= start:
        return float(last_nonzero * width)
    best_i, best_kl = n, np.inf
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = sum(hist[i:])
    for i in range(start, n + 1):
        p = hist[:i].copy()
        if i < n:
            p[i - 1] += tail[i]
        total = p.sum()
        if total == 0:
            continue
        # merge i bins into 128 levels (bin j -> level floor(j * 128 / i))
        level = (np.arange(i) * QUANT_BINS) // i
        nonzero = p != 0
        mass = np.bincount(level, weights=hist[:i], minlength=QUANT_BINS)
        support = np.bincount(level, weights=nonzero.astype(np.float64), minlength=QUANT_BINS)
        q = np.where(nonzero, mass[level] / np.maximum(support[level], 1), 0.0)
        pn = p / total
        qs = q.sum()
        if qs == 0:
            continue
        qn = q / qs
        m = pn > 0
        if np.any(qn[m] == 0):  # P has mass where Q has none: infinite divergence
            continue
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i * width)


# ----------------------------------------------------------------------------- Q/DQ insertion


def _weight_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 weights and their scales (an all-zero channel gets scale 1)."""
    other = tuple(d for d in range(w.ndim) if d != axis)
    amax = np.abs(w).max(axis=other)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def insert_qdq(model: onnx.ModelProto, amax: dict[str, float],
               keep_fp32: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of `model` with Q/DQ on every target's activation and weight.

    `amax` maps activation tensor names to calibrated ranges; a target whose activation has no
    range (or a zero one) is an error: calibration and graph disagree.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    found = targets(out, keep_fp32)
    missing = sorted({t.activation for t in found if not amax.get(t.activation)})
    if missing:
        raise ValueError(f"no calibrated range for {len(missing)} quantized input(s), e.g. {missing[:3]}: "
                         "the calibration ranges were computed on a different graph")
    inits = {i.name: i for i in g.initializer}
    nodes = {n.name: n for n in g.node}
    new_nodes: list[onnx.NodeProto] = []
    act_dq: dict[str, str] = {}
    weight_dq: dict[tuple[str, int], str] = {}
    per_node: dict[str, dict[str, Any]] = {}
    zero = "d2build/qdq/zero_point_int8"
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.int8), zero))
    for t in found:
        node = nodes[t.node]
        if t.activation not in act_dq:
            s = np.float32(amax[t.activation] / 127.0)
            base = f"{t.activation}/qdq"
            g.initializer.append(numpy_helper.from_array(np.array(s, np.float32), base + "/scale"))
            new_nodes.append(helper.make_node("QuantizeLinear", [t.activation, base + "/scale", zero],
                                              [base + "/int8"], name=base + "/quantize"))
            new_nodes.append(helper.make_node("DequantizeLinear", [base + "/int8", base + "/scale", zero],
                                              [base + "/dq"], name=base + "/dequantize"))
            act_dq[t.activation] = base + "/dq"
        key = (t.weight, t.axis)
        if key not in weight_dq:
            w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
            q, scale = _weight_int8(w, t.axis)
            base = f"{t.weight}/int8"
            g.initializer.append(numpy_helper.from_array(q, base))
            g.initializer.append(numpy_helper.from_array(scale, base + "/scale"))
            g.initializer.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "/zero_point"))
            new_nodes.append(helper.make_node("DequantizeLinear", [base, base + "/scale", base + "/zero_point"],
                                              [base + "/dq"], name=base + "/dequantize", axis=t.axis))
            weight_dq[key] = base + "/dq"
        node.input[0] = act_dq[t.activation]
        node.input[1] = weight_dq[key]
        per_node[t.node] = {"op": t.op, "activation": {"QuantizeLinear": 1, "DequantizeLinear": 1},
                            "weight": {"DequantizeLinear": 1, "axis": t.axis, "int8": True},
                            "activation_amax": float(amax[t.activation])}
    # weights now read only through their DQ: drop float initializers nobody reads any more
    used = {i for n in list(g.node) + new_nodes for i in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    # put each new node right before its first consumer, keeping the graph topologically sorted
    order: list[onnx.NodeProto] = []
    pending = {n.output[0]: n for n in new_nodes}
    placed: set[str] = set()

    def place(tensor: str) -> None:
        n = pending.get(tensor)
        if n is None or n.name in placed:
            return
        for i in n.input:
            place(i)
        placed.add(n.name)
        order.append(n)

    for n in list(g.node):
        for i in n.input:
            place(i)
        order.append(n)
    del g.node[:]
    g.node.extend(order)
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(out, full_check=True)
    ops = Counter(n.op_type for n in out.graph.node)
    facts = {
        "quantized_nodes": len(per_node),
        "quantized_ops": dict(sorted(Counter(v["op"] for v in per_node.values()).items())),
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
        "activation_qdq_pairs": len(act_dq),
        "weight_dq": len(weight_dq),
        "per_node": per_node,
        "not_quantized": sorted(n.name for n in model.graph.node
                                if n.op_type in QUANTIZED_OPS and n.name not in per_node),
    }
    return out, facts


def qdq_coverage(model: onnx.ModelProto) -> dict[str, dict[str, bool]]:
    """For each Conv/ConvTranspose/Gemm: is its activation fed by Q->DQ and its weight by DQ(int8)?

    Read from the graph itself (tests and reports check a graph against its manifest with this).
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        a = producers.get(n.input[0])
        w = producers.get(n.input[1])
        act = bool(a is not None and a.op_type == "DequantizeLinear"
                   and producers.get(a.input[0]) is not None
                   and producers[a.input[0]].op_type == "QuantizeLinear")
        wq = bool(w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits
                  and inits[w.input[0]].data_type == TensorProto.INT8)
        out[n.name] = {"activation": act, "weight": wq}
    return out
