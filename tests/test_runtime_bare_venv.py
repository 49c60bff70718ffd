"""A bundle runs in a bare virtual environment holding only what docs/DEPLOY.md lists: no torch, no
Detectron2, no `onnx`, not even d2build (the bundle carries its runtime: runtime/d2build + detect.py).

The test makes a fresh venv, installs exactly the `pip install` line that DEPLOY.md marks for this
test (at the versions this full install runs, so the comparison can be exact), runs the session's
standard-op bundle's detect.py on real photographs there, and compares the detections document with
the full install's `python -m d2build.deploy` on the same files: equal, apart from the timings.
A plugin-graph bundle there is refused in one line naming the missing package.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO
from test_deploy import bundles_root, ensure_bundle

MARK = "<!-- tests/test_runtime_bare_venv.py installs exactly the next pip line -->"


def documented_requirements() -> list[str]:
    text = (REPO / "docs" / "DEPLOY.md").read_text()
    assert MARK in text, "docs/DEPLOY.md lost the runtime's dependency line"
    line = next(ln for ln in text.split(MARK, 1)[1].splitlines() if "pip install" in ln)
    words = shlex.split(line.strip())
    return words[words.index("install") + 1:]


def strip_seconds(doc: dict) -> dict:
    return {**doc, "images": [{k: v for k, v in image.items() if k != "seconds"} for image in doc["images"]]}


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    reqs = documented_requirements()
    names = [re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in reqs]
    assert sorted(n.lower() for n in names) == ["numpy", "onnxruntime", "pillow"], reqs
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    pins = venv.parent / "same-versions.txt"  # what this full install runs, so the comparison can be exact
    pins.write_text("".join(f"{n}=={metadata.version(n)}\n" for n in names))
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                           *reqs, "-c", str(pins)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_bundle_runs_in_a_bare_venv_like_the_full_install(bare_venv, cache_320_dir, tmp_path_factory, tmp_path):
    import skimage

    py = str(bare_venv / "bin" / "python")
    absent = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'detectron2', "
                                       "'onnx', 'd2build', 'hydra', 'onnxruntime_extensions') if u.find_spec(m)])"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    bundle = ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "standard")
    folder = Path(skimage.__file__).parent / "data"
    images = [str(folder / name) for name in ("astronaut.png", "rocket.jpg")]
    proc = subprocess.run([py, str(bundle / "detect.py"), *images, "--out", str(tmp_path / "bare.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = json.loads((tmp_path / "bare.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "d2build.deploy", str(bundle), *images, "--out",
                           str(tmp_path / "full.json")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((tmp_path / "full.json").read_text())
    assert bare["backend"] == full["backend"] == "onnxruntime"
    assert [len(i["detections"]) for i in bare["images"]] == [len(i["detections"]) for i in full["images"]]
    assert min(len(i["detections"]) for i in bare["images"]) >= 30
    assert strip_seconds(bare) == strip_seconds(full)


def test_plugin_bundle_in_a_bare_venv_names_what_is_missing(bare_venv, cache_320_dir, tmp_path_factory, tmp_path):
    import skimage

    bundle = ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "plugins")
    image = Path(skimage.__file__).parent / "data" / "coffee.png"
    proc = subprocess.run([str(bare_venv / "bin" / "python"), str(bundle / "detect.py"), str(image)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"d2build: {bundle / 'model.onnx'}: backend reference needs the Python package onnx, which is not installed "
        "here: pip install onnx"]
