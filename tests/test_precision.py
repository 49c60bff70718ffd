"""Precision: fp16 graphs with FP32 islands, int8 Q/DQ graphs and their calibration, verified on CPU.

Unit tests build tiny graphs with onnx.helper and check the policy, the casts, the Q/DQ and the
calibration arithmetic against numbers computed here in numpy. The end-to-end tests run the real
command line at 640x640 with random weights (session cache shared with test_pipeline.py): fp16
passes verify, the fp16 graph is FP32 exactly where its manifest says, the int8 graph has Q/DQ on
every Conv/Gemm (counts in the manifest), and a sweep of three NMS thresholds calibrates once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, d2build
from d2build.autocast import classify, node_precisions, to_fp16
from d2build.quantize import (RangeCollector, _weight_int8, entropy_amax, insert_qdq, percentile_amax,
                              qdq_coverage, targets)
from d2build.reference.emulate import emulate_unsupported_fp16

SMALL = ["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[640,640]"]
INT8 = [*SMALL, "precision=int8", "calibration=bundled", "calibration.count=3"]
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ tiny graphs

def tiny_detector() -> onnx.ModelProto:
    """input -> Sub(mean) -> Conv -> Relu -> Conv (+ residual Add) -> {TopK branch, Softmax branch}.

    Shaped like the real graph's decisions: a centring Sub on the float32 input, convs whose output
    a TopK ranks (through a Reshape), an Add of a float32 constant (an "anchor" offset), a Softmax.
    """
    w1 = numpy_helper.from_array(RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(RNG.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(RNG.normal(0, 0.3, (2, 8, 1, 1)).astype(np.float32), "w3")
    wg = numpy_helper.from_array(RNG.normal(0, 0.1, (4, 8 * 16 * 16)).astype(np.float32), "wg")
    mean = numpy_helper.from_array(np.full((1, 3, 1, 1), 100, np.float32), "mean")
    anchors = numpy_helper.from_array(np.linspace(0, 2000, 512).astype(np.float32).reshape(1, 512), "anchors")
    shape = numpy_helper.from_array(np.array([1, 512], np.int64), "shape")
    flat = numpy_helper.from_array(np.array([1, -1], np.int64), "flat")
    k = numpy_helper.from_array(np.array([16], np.int64), "k")
    nodes = [
        helper.make_node("Sub", ["input_tensor", "mean"], ["centred"], name="subtract_pixel_mean"),
        helper.make_node("Conv", ["centred", "w1"], ["c1"], name="/backbone/conv1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/backbone/relu1/Relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/backbone/conv2/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="/backbone/residual/Add"),
        helper.make_node("Relu", ["res"], ["feat"], name="/backbone/relu2/Relu"),
        helper.make_node("Conv", ["feat", "w3"], ["logits"], name="rpn_head_level0"),
        helper.make_node("Reshape", ["logits", "shape"], ["rows"], name="rpn_rows"),
        helper.make_node("Add", ["rows", "anchors"], ["shifted"], name="add_anchor_table"),
        helper.make_node("TopK", ["rows", "k"], ["top_scores", "top_idx"], name="rpn_topk", axis=1),
        helper.make_node("Reshape", ["feat", "flat"], ["feat_flat"], name="box_features"),
        helper.make_node("Gemm", ["feat_flat", "wg"], ["cls"], name="/roi_heads/cls_score/Gemm", transB=1),
        helper.make_node("Softmax", ["cls"], ["probs"], name="class_probs", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_tensor", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("shifted", TensorProto.FLOAT, [1, 512]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 8, 16, 16])],
        [w1, w2, w3, wg, mean, anchors, shape, flat, k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_tensor": x})))


def image() -> np.ndarray:
    return RNG.uniform(0, 255, (1, 3, 16, 16)).astype(np.float32)


# ------------------------------------------------------------------ fp16 policy and casts

def test_fp16_policy_keeps_the_right_nodes_fp32():
    d = classify(gs.import_onnx(tiny_detector()))
    p, why = d.precision, d.reasons
    for n in ("/backbone/conv1/Conv", "/backbone/relu1/Relu", "/backbone/conv2/Conv", "/backbone/residual/Add",
              "/backbone/relu2/Relu", "box_features", "/roi_heads/cls_score/Gemm"):
        assert p[n] == "fp16", n
    assert why["subtract_pixel_mean"] == "input"  # the float32 input is centred in FP32
    assert why["rpn_head_level0"] == "ranked"  # its output is what TopK ranks (through a Reshape)
    assert why["rpn_topk"] == "ranked"
    assert why["rpn_rows"] == "fed_fp32"
    assert why["add_anchor_table"] == "fed_fp32"  # a float32 constant keeps an Add FP32
    assert why["class_probs"] == "exp"


def test_keep_fp32_takes_op_types_names_and_patterns():
    g = gs.import_onnx(tiny_detector())
    d = classify(g, ["Gemm", "/backbone/conv2/*"])
    assert d.reasons["/roi_heads/cls_score/Gemm"] == "keep_fp32"
    assert d.reasons["/backbone/conv2/Conv"] == "keep_fp32"
    assert d.reasons["/backbone/residual/Add"] == "fed_fp32"  # one input is FP32 now
    assert d.precision["/backbone/conv1/Conv"] == "fp16"


def test_fp16_graph_types_casts_and_numbers():
    model = tiny_detector()
    result = to_fp16(model)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # input stays float32
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in out.graph.output)
    # what the graph computes in, read from its tensor types, is what the decision says
    actual = node_precisions(out)
    for name, want in result.decision.precision.items():
        if want != "none":
            assert actual[name] == want, (name, actual[name], want)
    # weights of fp16 nodes are float16 initializers; the anchor table stays float32
    inits = {i.name: i.data_type for i in out.graph.initializer}
    assert inits["w1/fp16"] == TensorProto.FLOAT16 and inits["anchors"] == TensorProto.FLOAT
    assert inits["w3"] == TensorProto.FLOAT  # the ranked conv keeps float32 weights
    # casts: into the fp16 region after the Sub, out of it into the ranked conv, the Softmax, "feat"
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == result.casts == 4
    x = image()
    ref, got = run(model, x), run(emulate_unsupported_fp16(out)[0], x)
    for k in ref:
        scale = float(np.abs(ref[k]).max())
        assert np.abs(ref[k] - got[k]).max() <= 5e-3 * scale + 1e-6, k
    assert not np.array_equal(ref["feat"], got["feat"])  # it did compute in float16


def test_emulation_is_float16_storage_with_float32_arithmetic():
    """A Conv -> Relu -> Add chain in float16: the emulated graph must give exactly what numpy gives
    when every tensor is rounded to float16 and each op computes in float32."""
    w = RNG.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float16)
    x = RNG.normal(0, 3, (1, 4, 5, 5)).astype(np.float16)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "x"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 5, 5])],
                          [numpy_helper.from_array(w, "w")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    emulated, names = emulate_unsupported_fp16(model)
    got = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    c = np.einsum("oi,bihw->bohw", w[:, :, 0, 0].astype(np.float32), x.astype(np.float32)).astype(np.float16)
    r = np.maximum(c, 0)
    want = (r.astype(np.float32) + x.astype(np.float32)).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)
    assert set(names) <= {"conv", "relu", "add"}  # only nodes ONNX Runtime has no fp16 kernel for


# ------------------------------------------------------------------ int8: calibration arithmetic

def test_calibration_methods_on_known_distributions():
    rc = RangeCollector()
    u = RNG.uniform(-1, 1, 1_000_000).astype(np.float32)
    u[:3] = [40.0, -35.0, 30.0]  # three outliers
    rc.add("u", u)
    assert rc.amax("u", "minmax") == pytest.approx(40.0)
    # 99.99th percentile of |x|: the outliers are 3 in a million, so it sits near 1, not 40
    assert rc.amax("u", "percentile") == pytest.approx(1.0, abs=0.05)
    # a Gaussian bulk with a sparse tail to 20: KL clips the tail but keeps the bulk (> 4 sigma)
    t = np.concatenate([RNG.normal(0, 1, 1_000_000), RNG.uniform(5, 20, 200)]).astype(np.float32)
    rc.add("tail", t)
    assert 4.0 < rc.amax("tail", "entropy") < 0.75 * rc.amax("tail", "minmax")
    # ReLU-like: half exact zeros must not drag the entropy clip down
    r = np.maximum(RNG.normal(0, 1, 1_000_000), 0).astype(np.float32)
    rc.add("relu", r)
    assert 2.0 <= rc.amax("relu", "entropy") <= rc.amax("relu", "minmax")


def test_histogram_grows_across_images_without_losing_counts():
    rc = RangeCollector()
    rc.add("a", np.full(1000, 1.0, np.float32))
    rc.add("a", np.full(10, 100.0, np.float32))  # 100x the first image's range
    h, w = rc.histogram("a")
    assert h.sum() == 1010 and len(h) <= 2048
    assert rc.absmax["a"] == 100.0
    assert percentile_amax(h, w, 50.0) == pytest.approx(1.0, rel=0.1)


def test_entropy_of_a_gaussian_clips_inside_the_range():
    h, edges = np.histogram(np.abs(RNG.normal(0, 1, 2_000_000)), bins=2048)
    amax = entropy_amax(h, float(edges[1] - edges[0]))
    assert 2.5 < amax < float(edges[-1]), amax


def test_weights_per_channel_int8():
    w = RNG.normal(0, 1, (6, 3, 3, 3)).astype(np.float32)
    w[2] = 0  # an all-zero channel (surgery's merged RPN conv has them)
    q, scale = _weight_int8(w, axis=0)
    assert q.dtype == np.int8 and scale.shape == (6,) and scale[2] == 1.0
    assert np.abs(q).max() == 127
    err = np.abs(q.astype(np.float32) * scale[:, None, None, None] - w)
    assert np.all(err <= scale[:, None, None, None] / 2 + 1e-7)


def test_qdq_on_every_conv_and_gemm_and_numbers_close():
    model = tiny_detector()
    ts = targets(model)
    assert [t.node for t in ts] == ["/backbone/conv1/Conv", "/backbone/conv2/Conv", "rpn_head_level0",
                                    "/roi_heads/cls_score/Gemm"]
    assert {t.axis for t in ts} == {0}
    x = image()
    acts = {t.activation for t in ts}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    infos = {vi.name: vi for vi in probe.graph.value_info}
    probe.graph.output.extend(infos[a] for a in acts if a in infos)
    ref = run(probe, x)
    ref["input_tensor"] = x
    amax = {a: float(np.abs(ref[a]).max()) for a in acts}
    q, facts = insert_qdq(model, amax)
    onnx.checker.check_model(q, full_check=True)
    cov = qdq_coverage(q)
    assert cov and all(v == {"activation": True, "weight": True} for v in cov.values()), cov
    assert facts["quantized_nodes"] == 4 and facts["QuantizeLinear"] == 4  # one pair per activation
    assert facts["DequantizeLinear"] == 4 + 4  # + one per weight
    got = run(q, x)
    assert np.abs(got["feat"] - ref["feat"]).max() <= 0.05 * np.abs(ref["feat"]).max()
    assert not np.array_equal(got["feat"], ref["feat"])
    # keep_fp32 leaves a node unquantized
    q2, f2 = insert_qdq(model, amax, ["Gemm"])
    assert f2["not_quantized"] == ["/roi_heads/cls_score/Gemm"]
    assert not qdq_coverage(q2)["/roi_heads/cls_score/Gemm"]["weight"]


def test_missing_range_is_an_error():
    with pytest.raises(ValueError, match="different graph"):
        insert_qdq(tiny_detector(), {})


# ------------------------------------------------------------------ the real graphs, end to end

def _graph(run_, stage: str = "precision") -> onnx.ModelProto:
    return onnx.load(str(Path(run_.stage(stage)["dir"]) / "model.onnx"))


def test_fp16_run_verifies_and_is_fp32_only_where_the_manifest_says(shared_cache, tmp_path):
    run_ = d2build([*SMALL, "precision=fp16"], shared_cache, tmp_path / "fp16")
    assert run_.run_json["ok"], run_.output[-3000:]
    assert run_.status("build") == "skipped" and "TensorRT is not installed" in run_.stage("build")["reason"]
    assert "pip install 'd2build[trt]'" in run_.stage("build")["reason"]
    rows = run_.stage("verify")["info"]["images"]
    assert len(rows) == 3
    for r in rows:
        assert r["detectron2"] >= 50 and r["recovered"] >= 0.97, r
        assert r["mean_box_iou"] >= 0.99 and r["max_score_diff"] <= 0.01, r
    info = run_.stage("precision")["info"]
    graph = _graph(run_)
    onnx.checker.check_model(graph, full_check=True)
    assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    listed = {n for island in info["fp32_islands"].values() for n in island["nodes"]}
    actual = node_precisions(graph)
    fp32 = {n for n, p in actual.items() if p == "fp32"}
    assert fp32 == listed, (sorted(fp32 - listed), sorted(listed - fp32))
    assert {n for n, p in actual.items() if p == "fp16"} and info["fp16_ops"]["Conv"] >= 70
    ops = {n.name: n.op_type for n in graph.graph.node}
    assert {ops[n] for n in info["fp32_islands"]["plugin_fp32_only"]["nodes"]} == {"PyramidROIAlign_TRT"}
    assert set(info["fp32_islands"]["ranked"]["ops"]) == {"Conv", "TopK"}
    report = (Path(run_.stage("verify")["dir"]) / "report.md").read_text()
    assert "## Precision: fp16" in report and "Emulated on CPU" in report and "PyramidROIAlign_TRT" in report


def test_int8_run_has_qdq_everywhere_and_reports_agreement(shared_cache, tmp_path):
    run_ = d2build(INT8, shared_cache, tmp_path / "int8")
    assert run_.run_json["ok"], run_.output[-3000:]
    assert run_.status("build") == "skipped"
    info = run_.stage("precision")["info"]
    graph = _graph(run_)
    cov = qdq_coverage(graph)
    assert len(cov) == info["quantized_nodes"] >= 80  # backbone, FPN, RPN head, box head, mask head
    assert all(v == {"activation": True, "weight": True} for v in cov.values())
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == info["QuantizeLinear"]
    assert ops.count("DequantizeLinear") == info["DequantizeLinear"]
    assert set(info["per_node"]) == set(cov)
    for name in ("/backbone/bottom_up/stem/conv1/Conv", "/backbone/fpn_output2/Conv",
                 "/roi_heads/box_head/fc1/Gemm", "/roi_heads/mask_head/deconv/ConvTranspose"):
        assert cov[name] == {"activation": True, "weight": True}, name
    assert info["per_node"]["/roi_heads/mask_head/deconv/ConvTranspose"]["weight"]["axis"] == 1
    cal = run_.stage("calibration")["info"]
    assert cal["images"] == ["astronaut", "coffee", "rocket"] and cal["method"] == "percentile"  # the default
    summary = run_.stage("verify")["info"]["summary"]
    assert 0.3 <= summary["matched_share"] <= 1.0 and summary["mean_box_iou"] > 0.7
    assert abs(summary["mean_score_shift"]) < 0.1
    report = (Path(run_.stage("verify")["dir"]) / "report.md").read_text()
    assert "## Precision: int8" in report and "Agreement with fp32" in report


def test_sweep_of_three_nms_thresholds_calibrates_once(shared_cache, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "d2build", "--until", "precision", "-m", *INT8, "calibration.method=minmax",
           "surgery.nms.iou_threshold=0.4,0.5,0.6", f"cache.dir={shared_cache}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = [json.loads((sweep / str(i) / "run.json").read_text())["stages"] for i in range(3)]
    assert [j["calibration"]["status"] for j in jobs] == ["built", "hit", "hit"]
    assert len({j["calibration"]["key"] for j in jobs}) == 1
    assert len({j["surgery"]["key"] for j in jobs}) == 3 and len({j["precision"]["key"] for j in jobs}) == 3
    counts = {(j["precision"]["info"]["QuantizeLinear"], j["precision"]["info"]["DequantizeLinear"]) for j in jobs}
    assert len(counts) == 1
