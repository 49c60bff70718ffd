"""Running built models: `d2build infer / bench / eval` with runtime.backend=reference on the CPU.

The commands run for real on the recipe's cached artifacts (session cache shared with the
pipeline tests, 640x640, random weights). eval is checked end to end on a tiny COCO-format file
made from Detectron2's own predictions on two bundled photographs: the fp32 graph reproduces
Detectron2, so its box and mask AP must come out near 1 -- a number that would fall if boxes were
mapped back wrongly, classes mis-mapped or masks mis-pasted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, d2build
from d2build.commands._runtime import percentiles

SMALL = ["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[640,640]"]
REFERENCE = [*SMALL, "runtime.backend=reference"]


def command(name: str, args: list[str], cache: Path, out: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "d2build", name, *args, f"cache.dir={cache}", "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_percentiles():
    p = percentiles([10.0] * 98 + [20.0, 30.0])
    assert p["p50"] == 10.0 and p["max"] == 30.0 and p["min"] == 10.0
    assert p["mean"] == pytest.approx(10.3) and p["fps"] == pytest.approx(1000 / 10.3)
    assert 10.0 <= p["p99"] <= 30.0


def test_infer_reference_writes_detections_and_pictures(shared_cache, tmp_path):
    out = tmp_path / "infer"
    proc = command("infer", [*REFERENCE, "--count", "2"], shared_cache, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    doc = json.loads((out / "detections.json").read_text())
    assert doc["backend"] == "reference" and doc["input"] == [640, 640]
    assert [i["image"] for i in doc["images"]] == ["astronaut", "coffee"]
    from pycocotools import mask as mask_util

    for item in doc["images"]:
        assert len(item["detections"]) >= 50
        d = item["detections"][0]
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= item["width"] and 0 <= y1 < y2 <= item["height"]
        assert 0.05 <= d["score"] <= 1 and isinstance(d["class"], str)
        m = mask_util.decode(d["mask"])
        assert m.shape == (item["height"], item["width"]) and m.any()
        assert (out / "pictures" / f"{item['image']}.png").is_file()
    assert json.loads((out / "run.json").read_text())["stages"]["precision"]["status"] in ("built", "hit")


def test_infer_explicit_graph_and_missing_tensorrt(shared_cache, tmp_path):
    first = d2build([*SMALL], shared_cache, tmp_path / "run", until="precision")
    graph = Path(first.stage("precision")["dir"]) / "model.onnx"
    out = tmp_path / "explicit"
    proc = command("infer", [*REFERENCE, "--graph", str(graph), "--count", "1"], shared_cache, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads((out / "detections.json").read_text())["model"] == str(graph)
    # tensorrt (the default backend) on a machine without TensorRT: a clear message, exit 2
    no_trt = command("infer", [*SMALL, "--count", "1"], shared_cache, tmp_path / "trt")
    assert no_trt.returncode == 2
    assert "TensorRT is not installed" in no_trt.stderr and "runtime.backend=reference" in no_trt.stderr
    wrong = command("infer", [*SMALL, "--graph", str(graph)], shared_cache, tmp_path / "wrong")
    assert wrong.returncode == 2 and "--graph needs runtime.backend=reference" in wrong.stderr


def test_bench_reference(shared_cache, tmp_path):
    out = tmp_path / "bench"
    proc = command("bench", [*REFERENCE, "runtime.warmup=0", "runtime.iterations=2"], shared_cache, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["iterations"] == 2 and doc["backend"] == "reference" and doc["cuda_graph"] is False
    for what in ("model_ms", "end_to_end_ms"):
        s = doc[what]
        assert 0 < s["min"] <= s["p50"] <= s["p99"] <= s["max"] and s["fps"] > 0
    assert "images/s" in proc.stderr + proc.stdout and doc["images_per_second"]["model"] > 0


def make_coco_from_detectron2(weights_dir: Path, images: Path, names: list[str]) -> Path:
    """Detectron2's own predictions (640x640 letterbox, random weights) as COCO ground truth."""
    import torch
    from pycocotools import mask as mask_util

    from d2build import detectron, photos
    from d2build.families import builder
    from d2build.processing import detections_from_instances, letterbox

    d2cfg = detectron.load_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    model = detectron.build_model(d2cfg, torch.load(weights_dir / "model.pth", map_location="cpu",
                                                    weights_only=True))
    classes = detectron.dataset_metadata(d2cfg)["thing_classes"]
    categories = [{"id": 1000 + 3 * i, "name": n} for i, n in enumerate(classes)]  # ids unlike indices
    images_json, annotations = [], []
    for image_id, name in enumerate(names, 1):
        photo = photos.bundled(name)
        from PIL import Image

        Image.fromarray(photo.bgr[:, :, ::-1]).save(images / f"{name}.png")
        chw, lb = letterbox(photo.bgr, (640, 640), d2cfg.MODEL.PIXEL_MEAN)
        det = detections_from_instances(builder("mask_rcnn").eager(model, chw), lb)
        h, w = photo.bgr.shape[:2]
        images_json.append({"id": image_id, "file_name": f"{name}.png", "height": h, "width": w})
        for k in range(len(det)):
            x1, y1, x2, y2 = (float(v) for v in det.boxes[k])
            rle = mask_util.encode(np.asfortranarray(det.masks[k].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": categories[int(det.classes[k])]["id"],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(det.masks[k].sum()),
                                "segmentation": rle, "iscrowd": 0})
    path = images / "instances.json"
    path.write_text(json.dumps({"images": images_json, "annotations": annotations, "categories": categories}))
    return path


def test_eval_reference_on_detectron2_predictions_gives_high_ap(shared_cache, tmp_path):
    run_ = d2build([*SMALL], shared_cache, tmp_path / "run", until="precision")
    images = tmp_path / "images"
    images.mkdir()
    annotations = make_coco_from_detectron2(Path(run_.stage("weights")["dir"]), images, ["astronaut", "coffee"])
    out = tmp_path / "eval"
    proc = command("eval", [*REFERENCE, "--annotations", str(annotations), "--images", str(images)],
                   shared_cache, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    doc = json.loads((out / "eval.json").read_text())
    assert doc["images"] == 2 and doc["detections"] >= 100
    box, segm = doc["metrics"]["bbox"], doc["metrics"]["segm"]
    assert box["AP"] > 0.9 and box["AP50"] > 0.95, box
    assert segm["AP"] > 0.85, segm
    dets = json.loads((out / "detections_coco.json").read_text())
    assert {d["category_id"] for d in dets} <= {1000 + 3 * i for i in range(80)}  # mapped by name
