"""Broken files a user hands in: each gets one line naming the file and what is wrong, before any stage.

The corpus is tests/data/broken_files/ (made by its make.py). Every case goes through the same
composition a run uses (so the problem names the key and who set it), and one end-to-end case per
kind runs the real command line to check there is no traceback and nothing was built.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from d2build.compose import compose
from d2build.inputs import checkpoint_problem, coco_problem, image_problem
from d2build.recipe import RecipeError

DATA = REPO / "tests" / "data" / "broken_files"
BASE = ["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[320,320]"]

CASES = [
    ("model.weights", "weights_posix_system.pth", "refers to posix.system: not a plain state dict; refused"),
    ("model.weights", "weights_eval.pkl", "refers to builtins.eval: not a plain state dict; refused"),
    ("model.weights", "weights_truncated.pth", "is truncated or corrupt"),
    ("model.weights", "weights_empty.pth", "is empty (0 bytes)"),
    ("model.weights", "weights_text.pth", "is not a PyTorch (.pth) or pickled (.pkl) checkpoint"),
    ("model.weights", "weights_list.pkl", "holds a list, not a state dict"),
    ("model.config", "config_invalid.yaml", "is not valid YAML at line"),
    ("model.config", "config_list.yaml", "holds a YAML list, not a mapping"),
    ("model.config", "config_missing_base.yaml", "no_such_base.yaml cannot be read (No such file or directory)"),
    ("verify.images", "images_corrupt", "b_broken.jpg cannot be decoded"),
    ("verify.images", "images_none", "holds no images"),
    ("calibration.images", "images_corrupt", "b_broken.jpg cannot be decoded"),
]


def _override(key: str, path: Path) -> list[str]:
    extra = ["precision=int8", "calibration=bundled"] if key.startswith("calibration") else []
    return [*extra, f"{key}={path}"]


@pytest.mark.parametrize(("key", "name", "says"), CASES, ids=[c[1] + "-" + c[0] for c in CASES])
def test_broken_file_is_one_problem_naming_file_and_key(key, name, says):
    path = DATA / name
    with pytest.raises(RecipeError) as info:
        compose([*BASE, *_override(key, path)])
    problems = [p for p in info.value.problems if p.key == key]
    assert len(problems) == 1, info.value.problems
    p = problems[0]
    text = str(p)
    assert says in text and "\n" not in text, text
    assert name.split("/")[0] in text or path.name in text, text  # the file is named
    assert p.source.startswith("command line"), p  # who set the key
    assert "weights_only=False" not in text and "arbitrary code" not in text.lower()


@pytest.mark.parametrize("name", ["weights_posix_system.pth", "weights_truncated.pth"])
def test_run_refuses_broken_weights_in_one_line_and_builds_nothing(name, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "d2build", *BASE, f"model.weights={DATA / name}",
                           f"cache.dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and name in err and "model.weights" in err, err
    assert not cache.exists() or not any(cache.rglob("manifest.json"))


def test_checkpoints_that_load_pass_the_check(tmp_path):
    import pickle

    import numpy as np
    import torch

    torch.save({"model": {"w": torch.zeros(3, dtype=torch.float16)}}, tmp_path / "fp16.pth")
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.pth")
    torch.save({"w": torch.zeros(3)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "zoo.pkl").write_bytes(pickle.dumps({"model": {"w": np.zeros(3, np.float32)},
                                                     "__author__": "zoo"}, protocol=2))
    for f in ("fp16.pth", "plain.pth", "legacy.pth", "zoo.pkl"):
        assert checkpoint_problem(tmp_path / f) is None, f


def test_coco_files():
    images = DATA / "images_corrupt"
    assert "is not valid JSON" in coco_problem(DATA / "coco_not_json.json", images)
    assert "no list annotations, categories" in coco_problem(DATA / "coco_no_lists.json", images)
    assert "missing under" in coco_problem(DATA / "coco_missing_image.json", images) and \
        "gone.png" in coco_problem(DATA / "coco_missing_image.json", images)
    assert image_problem(images / "a_photo.png") is None
