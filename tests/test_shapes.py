"""Batch size N and dynamic input sizes, end to end on real Detectron2 models.

A batch graph (either flavour) must give each image of a batch of different photographs exactly the
detections it gets alone (verify checks that, and Detectron2's at the usual gates); a dynamic
standard-op graph must verify at several input sizes through one graph, each image resized as
Detectron2's ResizeShortestEdge does; `infer` feeds N images per run. The trained model's AP with a
dynamic graph is in test_trained.py; throughput per batch size in bench/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

from conftest import REPO, SMALL_320, d2build

DYNAMIC = ["surgery.ops=standard", "model.dynamic={min:[256,256],max:[480,480],min_size:320,max_size:480}"]


def _dims(path: Path) -> list:
    (inp,) = onnx.load(str(path), load_external_data=False).graph.input
    return [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]


def test_plugin_graph_batch_of_two_equals_each_image_alone(cache_320, tmp_path):
    run = d2build([*SMALL_320, "model.batch_size=2"], cache_320, tmp_path / "run")
    assert run.status("export") == "hit"  # the export is traced once; the batch is surgery's
    v = run.stage("verify")["info"]["summary"]
    assert v["min_recovered"] >= 0.99 and v["batch"]["ok"] and v["batch"]["batch"] == 2, v
    assert len(set(v["batch"]["images"])) == 2  # two different photographs in one batch
    assert _dims(Path(run.stage("precision")["dir"]) / "model.onnx") == [2, 3, 320, 320]
    assert "a batch of 2 = each image alone" in run.output


def test_dynamic_standard_graph_verifies_at_several_sizes_through_one_graph(cache_320, tmp_path):
    run = d2build([*SMALL_320, *DYNAMIC, "model.batch_size=2"], cache_320, tmp_path / "run")
    info = run.stage("verify")["info"]
    sizes = {tuple(r["input"]) for r in info["images"]}
    assert len(sizes) >= 2 and all(256 <= h <= 480 and 256 <= w <= 480 and h % 32 == w % 32 == 0 for h, w in sizes)
    assert info["summary"]["min_recovered"] >= 0.99 and info["summary"]["batch"]["ok"], info["summary"]
    assert min(r["detectron2"] for r in info["images"]) >= 20
    assert _dims(Path(run.stage("precision")["dir"]) / "model.onnx") == [2, 3, "height", "width"]
    assert run.stage("surgery")["info"]["anchors"]["per_level"].startswith("from each feature map")

    out = tmp_path / "infer"  # infer: three images in runs of two, each resized its own way
    proc = subprocess.run([sys.executable, "-m", "d2build", "infer", *SMALL_320, *DYNAMIC, "model.batch_size=2",
                           "runtime.backend=onnxruntime", f"cache.dir={cache_320}", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "detections.json").read_text())
    assert doc["batch"] == 2 and len(doc["images"]) == 3
    assert all(len(im["detections"]) >= 20 for im in doc["images"])
