"""`d2build validate`, as CI runs it: shipped recipes pass; a corpus of broken recipes is rejected,
each with the key its `# expect:` comment names, one line per problem, in seconds, without torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

BROKEN = REPO / "tests" / "data" / "broken_recipes"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}  # this checkout, from any cwd


def validate(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2build", "validate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=ENV)


def expected_keys() -> dict[str, str]:
    out = {}
    for f in sorted(BROKEN.glob("*.yaml")):
        m = re.search(r"^# expect: (\S+)\s*$", f.read_text(), flags=re.M)
        assert m, f"{f.name} has no '# expect: KEY' line"
        out[f.name] = m.group(1)
    return out


def problem_lines(stderr: str) -> dict[str, list[tuple[str, str]]]:
    """file name -> [(key, rest of the line)] for every `FILE: KEY: message. Fix: ...` line."""
    out: dict[str, list[tuple[str, str]]] = {}
    for line in stderr.splitlines():
        parts = line.split(": ", 2)
        if len(parts) == 3 and parts[0].endswith(".yaml"):
            out.setdefault(Path(parts[0]).name, []).append((parts[1], parts[2]))
    return out


def test_shipped_recipes_pass_fast_without_torch():
    t0 = time.monotonic()
    proc = validate()
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert len(shipped) >= 1
    for name in shipped:
        assert re.search(rf"^ok  {name}\s.*\(weights -> .*verify", proc.stdout, flags=re.M), proc.stdout
    assert proc.stderr.strip() == ""
    assert seconds < 30, f"validate took {seconds:.1f}s"

    probe = subprocess.run([sys.executable, "-c", "import sys; from d2build.commands import validate; "
                            "rc = validate.main([]); print(rc, 'torch' in sys.modules, 'detectron2' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert probe.stdout.split()[-3:] == ["0", "False", "False"], probe.stdout + probe.stderr


def test_broken_corpus_each_rejected_with_its_key():
    expected = expected_keys()
    assert len(expected) >= 20
    mistakes = [re.search(r"^# mistake: (.+)$", (BROKEN / n).read_text(), flags=re.M) for n in expected]
    assert all(mistakes) and len({m.group(1) for m in mistakes}) == len(expected)  # each a distinct mistake

    t0 = time.monotonic()
    proc = validate(str(BROKEN.relative_to(REPO)))
    seconds = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""  # nothing in the corpus passed
    assert "Traceback" not in proc.stderr
    got = problem_lines(proc.stderr)
    wrong = {}
    for name, key in expected.items():
        keys = [k for k, _ in got.get(name, [])]
        if keys != [key]:  # exactly one problem, naming the expected key
            wrong[name] = (key, keys)
        for _, rest in got.get(name, []):
            assert ". Fix: " in rest, f"{name}: no fix in {rest!r}"
    assert wrong == {}, "expected key vs reported keys: " + repr(wrong)
    assert f"validate: {len(expected)} recipe(s), 0 ok, {len(expected)} with problems" in proc.stderr
    assert seconds < 60, f"validate took {seconds:.1f}s for {len(expected)} recipes"


def test_single_file_and_name_clash(tmp_path):
    # a file given by path is checked, and a broken copy named like a shipped recipe wins the clash
    clash = tmp_path / "mask_rcnn_r50.yaml"
    shutil.copy(BROKEN / "nms_iou_as_percent.yaml", clash)
    proc = validate(str(clash), "mask_rcnn_r50", str(BROKEN / "key_typo.yaml"), "no_such_recipe")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert any(line.startswith(f"{clash}: surgery.nms.iou_threshold: ") for line in lines), proc.stderr
    assert re.search(r"^ok  mask_rcnn_r50\s+recipes/mask_rcnn_r50.yaml", proc.stdout, flags=re.M)
    assert any(": model.inptu: unknown key. Fix: did you mean model.input?" in line for line in lines)
    assert any(line.startswith("no_such_recipe: no such recipe") for line in lines)


def test_local_recipes_folder_is_validated_by_default(tmp_path):
    (tmp_path / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "mask_rcnn_r50.yaml", tmp_path / "recipes" / "mine.yaml")
    shutil.copy(BROKEN / "seed_negative.yaml", tmp_path / "recipes" / "theirs.yaml")
    proc = validate(cwd=tmp_path)
    assert proc.returncode == 1
    assert re.search(r"^ok  mine\s", proc.stdout, flags=re.M) and re.search(r"^ok  mask_rcnn_r50\s", proc.stdout, flags=re.M)
    assert [line.split(": ")[:2] for line in proc.stderr.splitlines() if ": model." in line] == [
        ["recipes/theirs.yaml", "model.seed"]]


@pytest.mark.parametrize("name", ["yaml_bad_indent.yaml", "precision_unknown.yaml"])
def test_line_names_the_fix(name):
    proc = validate(str(BROKEN / name))
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"tests/data/broken_recipes/{name}: ")]
    if name.startswith("yaml"):
        assert "line 11" in line
    else:
        assert "Fix: " in line and line.endswith("use one of: fp16, fp32, int8")  # each option once
