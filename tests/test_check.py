"""The engine check (stages/check.py) below the TensorRT runner, driven with graph backends.

No GPU or TensorRT here, so the "engine" is a runner over a graph: the precision graph itself (a
faithful engine: must pass, tensors identical), and deliberately broken copies of it -- the final
EfficientNMS_TRT with a 0.999 score threshold (an engine that detects nothing) and with IoU 0.8
instead of 0.5 (an engine that keeps overlapping boxes) -- which the check must fail, naming the
image and the detections that differ, in its report. Also: the stage skips with the build's reason
without TensorRT, and d2build.backends.cuda says clearly that there is no CUDA here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from test_deploy import bundles_root, ensure_bundle


@pytest.fixture(scope="module")
def setup(cache_320_dir, tmp_path_factory):
    """(bundle doc, graph proto, ModelInfo, verify config, family, Detectron2 model, photograph)."""
    from d2build import detectron, photos
    from d2build.cache import Cache
    from d2build.families import builder
    from d2build.runtime import ModelInfo
    from d2build.stages.weights import load_state

    bundle = ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "plugins")
    doc = json.loads((bundle / "model.json").read_text())
    cfg = doc["recipe"]["config"]
    fam = builder(cfg["model"]["family"])
    weights = Cache(cache_320_dir).lookup("weights", doc["cache_keys"]["weights"])
    from d2build.recipe import NmsConfig, RpnConfig, SurgeryConfig, VerifyConfig

    surgery = SurgeryConfig(cfg["surgery"]["ops"], NmsConfig(**cfg["surgery"]["nms"]), RpnConfig(**cfg["surgery"]["rpn"]))
    d2cfg = detectron.load_cfg(cfg["model"]["config"], fam.eager_overrides(surgery))
    model = detectron.build_model(d2cfg, load_state(weights))
    from d2build import backends

    proto = onnx.load(str(bundle / "model.onnx"))
    return {"bundle": bundle, "graph": proto, "runner": backends.open_graph(proto, "reference"),
            "info": ModelInfo.from_dict(doc["model"]), "v": VerifyConfig(**cfg["verify"]), "fam": fam, "d2": model,
            "photo": photos.bundled("astronaut")}


def with_final_nms(proto: onnx.ModelProto, **attrs) -> onnx.ModelProto:
    """A copy of the graph whose final EfficientNMS_TRT (max_output_boxes 100) has other attributes."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    (node,) = [n for n in out.graph.node if n.op_type == "EfficientNMS_TRT"
               and any(a.name == "max_output_boxes" and a.i == 100 for a in n.attribute)]
    for a in node.attribute:
        if a.name in attrs:
            a.f = float(attrs[a.name])
    return out


def run_check(s, engine_proto, tmp_path, with_detectron2=True):
    from d2build import backends
    from d2build.stages.check import check_engine, render_report

    graph = s["runner"]  # the precision graph's reference outputs
    engine = backends.open_graph(engine_proto, "reference")
    outcome = check_engine(engine, graph, s["info"], [s["photo"]], s["v"], tmp_path,
                           fam=s["fam"] if with_detectron2 else None, d2_model=s["d2"] if with_detectron2 else None)
    meta = {"family": "mask_rcnn", "input": [320, 320], "precision": "fp32"}
    return outcome, render_report(meta, outcome, s["v"])


def test_a_faithful_engine_passes(setup, tmp_path):
    outcome, report = run_check(setup, setup["graph"], tmp_path)
    assert not outcome.failures, outcome.failures
    (row,) = outcome.rows
    t = row["tensors"]
    assert t["graph_rows"] == t["engine_rows"] == t["paired"] >= 50 and t["paired_share"] == 1.0
    assert t["boxes"]["max_abs"] == 0.0 and t["scores"]["max_abs"] == 0.0 and t["masks"]["max_abs"] == 0.0
    assert t["aligned_class_equal"] == 1.0 and t["mask_iou_28"] == 1.0
    d2 = row["detectron2"]
    assert d2["matched"] >= 0.99 * d2["detectron2"] and d2["detectron2"] >= 50
    assert (tmp_path / "pictures" / "astronaut.png").is_file()
    assert "**Verdict: passed**" in report and "| astronaut |" in report
    summary = outcome.summary()
    assert summary["passed"] and summary["paired"] == t["paired"] and summary["matched"] == d2["matched"]
    json.dumps(outcome.metrics())


def test_an_engine_that_detects_nothing_fails(setup, tmp_path):
    broken = with_final_nms(setup["graph"], score_threshold=0.999)
    outcome, report = run_check(setup, broken, tmp_path)
    (row,) = outcome.rows
    assert row["failed"] and row["tensors"]["engine_rows"] <= 2 < row["tensors"]["graph_rows"]
    text = "\n".join(outcome.failures)
    assert "astronaut" in text and "the engine detects nothing where the precision graph finds" in text
    assert "vs Detectron2: " in text and "recovered 0.0" in text  # verify's own comparison fails it too
    assert "missing: graph #0:" in text  # the detections that differ, named
    assert outcome.headline() == "engine check FAILED on 1 of 1 images (astronaut)"
    assert "**Verdict: FAILED**" in report and "## What differs" in report


def test_an_engine_with_the_wrong_nms_threshold_fails(setup, tmp_path):
    broken = with_final_nms(setup["graph"], iou_threshold=0.8)
    outcome, _ = run_check(setup, broken, tmp_path, with_detectron2=False)
    (row,) = outcome.rows
    t = row["tensors"]
    assert row["failed"] and t["paired_share"] < setup["v"].min_recovered
    text = "\n".join(outcome.failures)
    assert "engine and graph pair only" in text and ("extra: engine #" in text or "missing: graph #" in text)
    assert t["boxes"]["aligned_max_abs"] > 1.0  # row by row (as Polygraphy compares) the outputs diverge too


def test_compare_tensors_tolerates_reordered_ties_and_reports_drift():
    from d2build.stages.check import compare_tensors

    rng = np.random.default_rng(1)
    n = 20
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 80, (n, 2))], 1).astype(np.float32)
    ref = {"num_detections": np.array([[n]], np.int32), "detection_boxes": np.zeros((1, 100, 4), np.float32),
           "detection_scores": np.zeros((1, 100), np.float32), "detection_classes": np.zeros((1, 100), np.int32),
           "detection_masks": np.zeros((1, 100, 28, 28), np.float32)}
    ref["detection_boxes"][0, :n] = boxes
    ref["detection_scores"][0, :n] = np.sort(rng.uniform(0.1, 0.9, n))[::-1]
    ref["detection_classes"][0, :n] = rng.integers(0, 5, n)
    ref["detection_masks"][0, :n, 4:20, 4:20] = 0.9
    from d2build.recipe import VerifyConfig

    v = VerifyConfig(images="bundled", count=1, iou_threshold=0.98, score_tolerance=0.01, min_recovered=0.99,
                     min_mask_iou=0.95, min_detections=1, keypoint_median_px=1.0, keypoint_p95_px=3.0,
                     min_semantic_agreement=0.995, segment_iou_threshold=0.9, min_segments_matched=0.95)
    got = {k: a.copy() for k, a in ref.items()}
    swap = [1, 0] + list(range(2, 100))  # two rows in the other order, values drifted a little
    for k in ("detection_boxes", "detection_scores", "detection_classes", "detection_masks"):
        got[k][0] = got[k][0][swap]
    got["detection_boxes"][0, :n] += 0.05
    metrics, problems = compare_tensors(ref, got, v)
    assert problems == [] and metrics["paired"] == n and metrics["aligned_class_equal"] <= 1.0
    assert metrics["boxes"]["max_abs"] == pytest.approx(0.05, abs=1e-4) and metrics["masks"]["max_abs"] == 0.0
    got["detection_masks"][0, :n] = 0.0  # masks vanish: boxes pair, masks do not
    _, problems = compare_tensors(ref, got, v)
    assert any("mean IoU of paired 28x28 masks 0.000" in p for p in problems)


def test_check_stage_skips_without_tensorrt_and_is_keyed_on_the_engine():
    from d2build.backends import tensorrt as trt
    from d2build.compose import compose
    from d2build.stages.check import EngineCheckStage

    recipe = compose(["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[320,320]"])
    no_trt = trt.Environment(None, "TensorRT is not installed (...)", False, None, 0, None, None, "not probed")
    h100 = trt.Environment("10.13.0", None, True, "13.0", 0, "NVIDIA H100 80GB HBM3", "9.0")
    def check_stage(env):
        return EngineCheckStage({"weights": "weights", "graph": "precision", "engine": "build"}, environment=env)

    assert check_stage(no_trt).skip_reason(recipe).startswith("TensorRT is not installed")
    assert check_stage(h100).skip_reason(recipe) is None
    stage = check_stage(h100)
    keys = {"weights": "w", "precision": "p", "build": "b1"}
    a = stage.key_material(stage.slice(recipe), keys)
    b = stage.key_material(stage.slice(recipe), {**keys, "build": "b2"})
    assert a != b and a["upstream"]["engine"] == "b1" and a["config"]["verify"]["iou_threshold"] == 0.98
    assert a["config"]["model"]["graph"]["batch"] == 1  # the engine's batch and dynamic range reach its check
    assert check_stage(no_trt).skip_reason(recipe) == trt.skip_reason(no_trt)


# ------------------------------------------------------------------ cuda.py and the engine runner here


def test_cuda_says_clearly_that_there_is_none(monkeypatch):
    from d2build.backends import cuda

    d = cuda.describe(0)
    if d.get("compute_capability"):
        pytest.skip("a CUDA device is visible here")
    assert "error" in d and ("libcudart" in d["error"] or "cuda" in d["error"].lower())
    monkeypatch.setattr(cuda, "_runtime", None)
    monkeypatch.setattr(cuda, "candidates", lambda: ["/nonexistent/libcudart.so.12"])
    with pytest.raises(cuda.CudaUnavailable, match=r"no CUDA runtime library \(libcudart\) could be loaded; tried "
                                                   r"/nonexistent/libcudart.so.12 .*nvidia-cuda-runtime"):
        cuda.runtime()
    monkeypatch.undo()
    monkeypatch.setenv("D2BUILD_CUDART", "/somewhere/libcudart.so")
    assert cuda.candidates()[0] == "/somewhere/libcudart.so"


def test_engine_runner_without_tensorrt_says_how_to_get_it(tmp_path):
    from d2build import backends

    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not an engine")
    with pytest.raises(ImportError, match=r"TensorRT is not installed \(pip install 'd2build\[trt\]'"):
        backends.open_engine(plan)
    Path(plan).unlink()
