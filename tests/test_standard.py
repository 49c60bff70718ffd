"""surgery.ops=standard: the graph without deprecated plugins, checked by ONNX Runtime's own kernels.

End to end on real Detectron2 models (random weights that behave) with the real command line: the
standard graph passes verify for each family (a non-square size among them) in fp32 and fp16, runs in
a plain onnxruntime.InferenceSession with no custom-op library, holds only ops TensorRT imports
natively, and agrees detection for detection with the plugin graph on the same input (which checks
d2build's plugin re-implementations against ONNX Runtime's kernels). The full family x size x
precision matrix is bench/standard_matrix.py's (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import SMALL_320, REPO, d2build
from d2build import backends, photos, standard_ops
from d2build.compare import match_detections
from d2build.families import family
from d2build.processing import letterbox

STANDARD = [*SMALL_320, "surgery.ops=standard"]
PIXEL_MEAN = (103.53, 116.28, 123.675)


def _graph(run, stage: str = "precision") -> Path:
    return Path(run.stage(stage)["dir"]) / "model.onnx"


def test_standard_graph_verifies_and_runs_in_plain_onnxruntime(cache_320, tmp_path):
    run = d2build(STANDARD, cache_320, tmp_path / "run")
    assert run.status("export") == "hit" and run.status("surgery") in ("built", "hit")
    v = run.stage("verify")["info"]
    assert v["summary"]["min_recovered"] >= 0.99 and min(r["detectron2"] for r in v["images"]) >= 20, v["summary"]
    assert "passed:" in run.output and "standard ONNX ops" in (Path(run.stage("verify")["dir"]) / "report.md").read_text()
    model = onnx.load(str(_graph(run)))
    ops = {n.op_type for n in model.graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "NonZero", "TopK"} <= ops and not ops & {"If", "Loop", "Scan"}
    assert {n.domain for n in model.graph.node} <= {""} and standard_ops.problems(model) == []
    for o in model.graph.output:  # static outputs, like the plugin graph's
        assert all(d.HasField("dim_value") for d in o.type.tensor_type.shape.dim), o
    assert run.stage("surgery")["info"]["ops"] == "standard"
    session = ort.InferenceSession(str(_graph(run)), providers=["CPUExecutionProvider"])  # no custom ops
    chw, _ = letterbox(photos.bundled("coffee").bgr, (320, 320), PIXEL_MEAN)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_tensor": chw[None]})))
    n = int(out["num_detections"][0, 0])
    assert n >= 20 and out["detection_masks"].shape == (1, 100, 28, 28)
    assert (out["detection_scores"][0, :n] > 0.05).all() and (out["detection_scores"][0, n:] == 0).all()


def test_flavours_agree_detection_for_detection(cache_320, tmp_path):
    plugin = d2build(SMALL_320, cache_320, tmp_path / "p", until="surgery")
    standard = d2build(STANDARD, cache_320, tmp_path / "s", until="surgery")
    a = backends.open_graph(_graph(plugin, "surgery"))
    b = backends.open_graph(_graph(standard, "surgery"))
    assert (a.backend, b.backend) == ("reference", "onnxruntime")
    fam = family("mask_rcnn")
    for name in ("astronaut", "coffee", "rocket"):
        chw, lb = letterbox(photos.bundled(name).bgr, (320, 320), PIXEL_MEAN)
        da = fam.decode(a.run({"input_tensor": chw[None]}), lb)
        db = fam.decode(b.run({"input_tensor": chw[None]}), lb)
        m = match_detections(da, db, iou_min=0.999, score_tol=1e-4)
        assert len(da) >= 20 and m.recovered >= 0.98 and m.precision >= 0.98, (name, len(da), len(db), len(m.pairs))
        assert m.mean_mask_iou >= 0.999, name


@pytest.mark.parametrize(("recipe", "size", "precision"), [
    ("keypoint_rcnn_r50", "[640,640]", "fp32"),  # the exports test_families.py builds in the shared cache
    ("faster_rcnn_r50", "[640,640]", "fp32"),
    ("mask_rcnn_r50", "[640,640]", "fp16"),
])
def test_families_verify_as_standard_graphs(shared_cache, tmp_path, recipe, size, precision):
    run = d2build([f"recipe={recipe}", "model.weights=random", f"model.input={size}", "surgery.ops=standard",
                   f"precision={precision}"], shared_cache, tmp_path / "run")
    v = run.stage("verify")["info"]
    floor = 0.97 if precision == "fp16" else 0.99
    assert v["summary"]["min_recovered"] >= floor and min(r["detectron2"] for r in v["images"]) >= 20, v
    if recipe.startswith("keypoint"):
        assert max(r["keypoint_median_px"] for r in json.loads(
            (Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]) <= 1.0


def test_onnxruntime_backend_runs_standard_graphs_only(cache_320, tmp_path):
    import subprocess
    import sys

    def infer(args: list[str], out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "d2build", "infer", *args, "runtime.backend=onnxruntime",
                               "--count", "1", f"cache.dir={cache_320}", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    ok = infer(STANDARD, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr[-2000:]
    doc = json.loads((tmp_path / "ok" / "detections.json").read_text())
    assert doc["backend"] == "onnxruntime" and len(doc["images"][0]["detections"]) >= 20
    plugin = infer(SMALL_320, tmp_path / "no")
    assert plugin.returncode == 2 and "surgery.ops=standard" in plugin.stderr and "Traceback" not in plugin.stderr


def test_unsupported_op_is_named_with_its_node():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])
    k = onnx.numpy_helper.from_array(np.array([5000], np.int64), "k")
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="dedupe"),
             helper.make_node("TopK", ["u", "k"], ["y", "i"], name="too_many")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [k]))
    found = standard_ops.problems(model)
    assert any("'dedupe' (Unique)" in p for p in found) and any("'too_many' (TopK)" in p and "3840" in p
                                                                for p in found)
    with pytest.raises(standard_ops.UnsupportedOp, match="dedupe"):
        standard_ops.check(model)
