"""The whole path, for real: Detectron2 (random weights that behave) -> export -> surgery -> verify.

These run the `d2build` command line on real photographs and assert what a user relies on: cache
hits and reuse across a threshold sweep, one export for concurrent runs, nothing published by a
killed or corrupted build, and the TensorRT-ready graph matching Detectron2 at several input sizes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from conftest import REPO, d2build

RANDOM = ["recipe=mask_rcnn_r50", "model.weights=random"]
SMALL = [*RANDOM, "model.input=[640,640]"]


def published(cache: Path, stage: str) -> list[Path]:
    d = cache / stage
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def graph_of(run) -> onnx.ModelProto:
    return onnx.load(str(Path(run.stage("surgery")["dir"]) / "model.onnx"))


def assert_verified(run, min_matched: int = 20, images: int = 3) -> None:
    assert run.run_json["ok"], run.output[-3000:]
    rows = run.stage("verify")["info"]["images"]
    assert len(rows) == images
    for r in rows:
        assert r["detectron2"] >= min_matched, r
        assert r["matched"] >= min_matched, r
        assert r["recovered"] >= 0.99, r
        assert r["mean_box_iou"] >= 0.98, r
        assert r["mean_mask_iou"] >= 0.95, r


# ------------------------------------------------------------------ cache behaviour at 640x640

def test_cold_run_then_identical_rerun_hits(shared_cache, tmp_path):
    cold = d2build(SMALL, shared_cache, tmp_path / "cold")
    assert_verified(cold)
    export_dir = Path(cold.stage("export")["dir"])
    mtime = (export_dir / "model.onnx").stat().st_mtime_ns

    again = d2build(SMALL, shared_cache, tmp_path / "again")
    assert [again.status(s) for s in ("weights", "export", "surgery", "verify")] == ["hit"] * 4
    assert (export_dir / "model.onnx").stat().st_mtime_ns == mtime  # nothing rewritten
    assert "tracing" not in again.output  # no export work at all
    assert again.stage("export")["key"] == cold.stage("export")["key"]


def test_export_matches_detectron2_on_two_photographs(shared_cache, tmp_path):
    run = d2build(SMALL, shared_cache, tmp_path / "r", until="export")
    checks = run.stage("export")["info"]["check"]
    assert [c["image"] for c in checks] == ["astronaut"]  # the stage checks one; a second one here
    from d2build import detectron, photos
    from d2build.cache import Artifact
    from d2build.families import builder
    from d2build.processing import letterbox
    from d2build.stages.export import check_export
    from d2build.stages.weights import load_state

    cfg = detectron.load_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    weights = Artifact("weights", "", Path(run.stage("weights")["dir"]),
                       json.loads((Path(run.stage("weights")["dir"]) / "manifest.json").read_text()))
    model = detectron.build_model(cfg, load_state(weights))
    chw, lb = letterbox(photos.bundled("coffee").bgr, (640, 640), cfg.MODEL.PIXEL_MEAN)
    export = Path(run.stage("export")["dir"]) / "model.onnx"
    checks.append(check_export(builder("mask_rcnn"), model, export, "coffee", chw, lb))
    assert [c["against"] for c in checks] == ["trace", "eager"]  # the traced forward's values, then eager
    for c in checks:
        assert c["detections"] >= 20 and c["matched"] == c["detections"], c
        assert c["mean_box_iou"] >= 0.99 and c["max_score_diff"] <= 1e-3, c


def test_nms_threshold_change_reuses_export_and_changes_only_that_attribute(shared_cache, tmp_path):
    base = d2build(SMALL, shared_cache, tmp_path / "a", until="surgery")
    swept = d2build([*SMALL, "surgery.nms.iou_threshold=0.4"], shared_cache, tmp_path / "b", until="surgery")
    assert swept.status("weights") == "hit" and swept.status("export") == "hit"
    assert swept.stage("export")["key"] == base.stage("export")["key"]
    assert swept.stage("surgery")["key"] != base.stage("surgery")["key"]

    a, b = graph_of(base), graph_of(swept)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    differing = []
    for na, nb in zip(a.graph.node, b.graph.node):
        for x, y in zip(na.attribute, nb.attribute):
            if onnx.helper.get_attribute_value(x) != onnx.helper.get_attribute_value(y):
                differing.append((na.name, x.name, onnx.helper.get_attribute_value(x),
                                  onnx.helper.get_attribute_value(y)))
    assert differing == [("d2build/detection_nms", "iou_threshold", pytest.approx(0.5), pytest.approx(0.4))]
    for ia, ib in zip(a.graph.initializer, b.graph.initializer):
        assert ia.name == ib.name and ia.raw_data == ib.raw_data


def test_recipe_thresholds_reach_the_plugin_attributes(shared_cache, tmp_path):
    args = [*SMALL, "surgery.nms.score_threshold=0.3", "surgery.nms.max_detections=50",
            "surgery.rpn.iou_threshold=0.6", "surgery.rpn.post_nms_topk=500"]
    run = d2build(args, shared_cache, tmp_path / "r", until="surgery")
    plugins = run.stage("surgery")["info"]["plugins"]
    final, rpn = plugins["d2build/detection_nms"], plugins["d2build/rpn_nms"]
    assert final["score_threshold"] == pytest.approx(0.3) and final["max_output_boxes"] == 50
    assert rpn["iou_threshold"] == pytest.approx(0.6) and rpn["max_output_boxes"] == 500
    assert run.stage("surgery")["info"]["io"]["outputs"]["detection_masks"] == [1, 50, 28, 28]


def test_corrupted_artifact_is_detected_and_rebuilt(shared_cache, tmp_path):
    first = d2build(SMALL, shared_cache, tmp_path / "a", until="surgery")
    graph = Path(first.stage("surgery")["dir"]) / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    graph.write_bytes(bytes(data))
    second = d2build(SMALL, shared_cache, tmp_path / "b", until="surgery")
    assert second.status("export") == "hit"
    assert second.status("surgery") == "built"
    onnx.checker.check_model(onnx.load(str(graph)), full_check=True)


# ------------------------------------------------------------------ processes and faults

def _popen(args: list[str], cache: Path, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "d2build", "--until", "export", *args, f"cache.dir={cache}",
           f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_two_processes_started_together_build_one_export(tmp_path):
    cache = tmp_path / "cache"
    args = [*RANDOM, "model.input=[320,320]"]
    procs = [_popen(args, cache, tmp_path / f"run{i}") for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    statuses = sorted(json.loads((tmp_path / f"run{i}" / "run.json").read_text())["stages"]["export"]["status"]
                      for i in range(2))
    assert statuses == ["built", "hit"]
    assert len(published(cache, "export")) == 1


def test_killed_export_publishes_nothing_and_next_run_builds(tmp_path):
    cache = tmp_path / "cache"
    args = [*RANDOM, "model.input=[320,320]"]
    proc = _popen(args, cache, tmp_path / "killed")
    deadline = time.monotonic() + 600
    while not list((cache / "export").glob(".tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the export
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert published(cache, "export") == []
    assert list((cache / "export").glob(".tmp-*")), "the killed build should have left its temp folder"

    run = d2build(args, cache, tmp_path / "next", until="export")
    assert run.status("export") == "built"
    assert len(published(cache, "export")) == 1
    assert list((cache / "export").glob(".tmp-*")) == []  # the leftover was cleaned up


# ------------------------------------------------------------------ the graph at several sizes

@pytest.mark.parametrize("size", ["[1344,1344]", "[384,640]"])
def test_graph_matches_detectron2(shared_cache, tmp_path, size):
    run = d2build([*RANDOM, f"model.input={size}"], shared_cache, tmp_path / "r")
    assert_verified(run)
    model = graph_of(run)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert not {"If", "Loop", "NonZero", "Scan"} & set(ops)
    assert ops.count("EfficientNMS_TRT") == 2 and ops.count("PyramidROIAlign_TRT") == 2
    h, w = json.loads(size)
    info = run.stage("surgery")["info"]
    assert info["io"]["inputs"] == {"input_tensor": [1, 3, h, w]}
    assert info["io"]["outputs"]["detection_boxes"] == [1, 100, 4]
    strides = (4, 8, 16, 32, 64)
    expected = sum(3 * -(-h // s) * -(-w // s) for s in strides)
    assert info["anchors"]["total"] == expected
    for name, attrs in info["plugins"].items():
        if attrs["op"] == "PyramidROIAlign_TRT":
            assert attrs["image_size"] == [h, w]
    pictures = list(Path(run.stage("verify")["dir"], "pictures").glob("*.png"))
    assert len(pictures) == 3
    if (h, w) == (1344, 1344):
        assert len(ops) <= 219, f"{len(ops)} nodes: more than NVIDIA's reference graph (219)"
        assert info["anchors"]["total"] == 451_143
