"""The deploy runtime runs where torch, torchvision, Detectron2, Hydra and OmegaConf cannot be imported,
and detects exactly what `d2build infer` detects on the same images.

`python -m d2build.deploy BUNDLE IMAGE...` runs in a subprocess whose sitecustomize puts a meta-path
finder in front of every other that raises ImportError for those five packages (a stray import
anywhere below the runtime -- d2build's own modules, onnxruntime-extensions, Pillow -- fails the
test). Its detections.json is compared with `d2build infer`'s (full d2build, same recipe, same image
files): same count per image, boxes within 1e-3 px, same classes, scores within 1e-5 and identical
mask run-length encodings (the runtime writes them without pycocotools, infer with it). Both graph
flavours: the plugin graph on the CPU reference backend and the standard-op graph on ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from test_deploy import BLOCKED, SMALL, bundles_root, ensure_bundle, no_torch_env, photo_png


def infer(args: list[str], cache, out) -> dict:
    proc = subprocess.run([sys.executable, "-m", "d2build", "infer", *args, f"cache.dir={cache}", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((out / "detections.json").read_text())


RUN_WITHOUT_TORCH = f"""
import sys
from d2build.deploy.__main__ import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})
assert not loaded, loaded
sys.exit(code)
"""


@pytest.mark.parametrize("ops,backend", [("plugins", "reference"), ("standard", "onnxruntime")])
def test_runtime_without_torch_matches_infer(ops, backend, cache_320_dir, tmp_path_factory, tmp_path):
    bundle = ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), ops)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        photo_png(images, name)
    env = no_torch_env(tmp_path / "block")
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr  # the block works
    out = tmp_path / "deployed.json"
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(bundle), str(images / "astronaut.png"),
                           str(images / "coffee.png"), "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["backend"] == backend and got["input"] == [320, 320]
    ref = infer([*SMALL, f"surgery.ops={ops}", f"runtime.backend={backend}", "--images", str(images),
                 "--count", "2"], cache_320_dir, tmp_path / "infer")
    assert ref["backend"] == backend
    assert [i["image"] for i in got["images"]] == [i["image"] for i in ref["images"]] == ["astronaut.png", "coffee.png"]
    for a, b in zip(ref["images"], got["images"], strict=True):
        assert (a["height"], a["width"]) == (b["height"], b["width"])
        assert len(a["detections"]) == len(b["detections"]) >= 30, a["image"]
        for da, db in zip(a["detections"], b["detections"], strict=True):
            assert max(abs(x - y) for x, y in zip(da["box"], db["box"], strict=True)) <= 1e-3
            assert da["class_id"] == db["class_id"] and da["class"] == db["class"]
            assert abs(da["score"] - db["score"]) <= 1e-5
            assert da["mask"] == db["mask"]
