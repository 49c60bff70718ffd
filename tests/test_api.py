"""The Python API (docs/API.md): build, plan, sweep, load, evaluate, the typed errors, its types (mypy), and the
examples of docs/API.md and docs/api_tour.ipynb executed as written.

One small build is shared: mask_rcnn_r50 at 320x320 with random weights in the session's 320x320 cache
(tests/conftest.py), which the docs and the notebook reuse through the same cache (their working folder's
outputs/cache links to it). The command line's run, `d2build plan` and the API must agree on every key.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SMALL_320, d2build as d2build_cli

import d2build

SMALL = SMALL_320[1:]  # without recipe=: the API takes the recipe as its first argument
RECIPE = SMALL_320[0].split("=", 1)[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}


@pytest.fixture(scope="session")
def api_build(cache_320_dir, tmp_path_factory) -> d2build.Build:
    """The shared build, made through the API (verify passes; no TensorRT here: build and check are skipped)."""
    return d2build.build(RECIPE, SMALL, cache_dir=cache_320_dir, run_dir=tmp_path_factory.mktemp("api-run"),
                         progress=False)


@pytest.fixture(scope="session")
def rocket(tmp_path_factory) -> tuple[np.ndarray, Path]:
    """A bundled photograph as the BGR array verify ran and as a lossless file of the same pixels."""
    from PIL import Image

    from d2build import photos

    bgr = photos.bundled("rocket").bgr
    path = tmp_path_factory.mktemp("photos") / "rocket.png"
    Image.fromarray(bgr[:, :, ::-1].copy()).save(path)
    return bgr, path


# ---------------------------------------------------------------------------------- the package


def test_import_is_light_and_public_names_are_not_shadowed_by_modules():
    code = ("import sys, d2build\n"
            "heavy = lambda: sorted(m for m in ('torch', 'detectron2', 'hydra', 'omegaconf', 'onnx', 'onnxruntime') "
            "if m in sys.modules)\n"
            "assert heavy() == [] and 'numpy' not in sys.modules, heavy()\n"
            "f = d2build.sweep\n"
            "import d2build.deploy.runtime\n"
            "assert callable(d2build.build) and heavy() == [], heavy()\n"
            "import d2build.sweep_summary\n"  # a submodule binds a package attribute of its name on import
            "assert d2build.sweep is f\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    for name in d2build.__all__:  # `import d2build.NAME` would replace the function with a module
        assert not (REPO / "d2build" / f"{name}.py").exists() and not (REPO / "d2build" / name).is_dir(), name
    stub = ast.parse((REPO / "d2build" / "__init__.pyi").read_text())
    typed = {a.asname for node in stub.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert typed | {"__version__"} == set(d2build.__all__)
    assert set(d2build.__all__) - {"__version__"} == set(__import__("d2build.api").api.__all__)


def test_mypy_is_clean_on_the_public_api_and_catches_misuse(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("import d2build\n"
                    "b: d2build.Build = d2build.build('mask_rcnn_r50', ['model.weights=random'], until='precision')\n"
                    "status: str = b.stages['verify'].status\n"
                    "dets = d2build.load(b).detect('photo.jpg').above(0.5)\n"
                    "names: tuple[str, ...] = dets.class_names\n"
                    "rows: list[dict[str, object]] = d2build.sweep('mask_rcnn_r50', {'model.seed': [0, 1]}).rows\n"
                    "ap: dict[str, object] = d2build.evaluate(b, 'a.json', 'images')\n")
    bad.write_text("import d2build\n"
                   "b = d2build.build('mask_rcnn_r50')\n"
                   "n: int = b.report('verify')\n"
                   "d2build.build(3)\n"
                   "d2build.load(b).detect(3.5)\n")
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    for files in (["d2build/__init__.pyi", "d2build/api/", str(good)], ["d2build/__init__.py"]):  # one module each
        clean = subprocess.run([*cmd, *files], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert clean.returncode == 0, clean.stdout + clean.stderr
    wrong = subprocess.run([*cmd, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = sorted(int(m) for m in re.findall(r"bad\.py:(\d+): error", wrong.stdout))
    assert lines == [3, 4, 5], wrong.stdout


# ---------------------------------------------------------------------------------- build, plan


def test_build_is_what_the_command_line_runs(api_build, cache_320_dir, tmp_path, capsys):
    b = api_build
    assert b.ok and b.name == RECIPE and b.config.model.input == (320, 320)
    assert b.stages["verify"].status in ("built", "hit") and b.stages["build"].status == "skipped"
    assert b.stages["verify"].info["summary"]["min_recovered"] >= 0.99
    run = b.to_dict()
    assert json.loads((b.run_dir / "run.json").read_text()) == run and run["ok"] is True
    assert run["overrides"][0] == f"recipe={RECIPE}" and run["overrides"][-1] == f"cache.dir={cache_320_dir}"
    assert {k: v["key"] for k, v in run["stages"].items()} == {k: s.key for k, s in b.stages.items()}
    graph = b.artifact("precision")
    assert graph.is_file() and graph.parent.name == b.stages["precision"].key
    assert b.artifact("weights", "model.pth").is_file()
    assert b.report("verify").startswith("# verify: mask_rcnn at 320x320, fp32")
    with pytest.raises(LookupError, match="skipped"):
        b.artifact("build", "engine.plan")
    with pytest.raises(LookupError, match="no stage 'verfy'"):
        b.artifact("verfy")
    assert b.raise_for_status() is b

    # d2build plan prints d2build.plan's table: every stage a hit under the same keys
    from d2build import cli

    assert cli.main(["plan", *SMALL_320, f"cache.dir={cache_320_dir}"]) == 0
    printed = capsys.readouterr().out
    p = d2build.plan(RECIPE, SMALL, cache_dir=cache_320_dir)
    assert printed == f"recipe {RECIPE} ({p.config.source}), cache {cache_320_dir}\n{p}\n"
    assert {n: s.key for n, s in p.stages.items()} == {n: s.key for n, s in b.stages.items()}
    assert [s.would for s in p.stages.values()] == ["hit"] * 5 + ["skip"] * 2 and p.to_build == []

    # the command line's run (Hydra's app -> cli._job -> the API's run_recipe) reuses every stage, same keys
    cli_run = d2build_cli(SMALL_320, cache_320_dir, tmp_path / "cli")
    assert {k: (v["key"], v["status"]) for k, v in cli_run.run_json["stages"].items()} == {
        k: (s.key, "hit" if s.status in ("built", "hit") else "skipped") for k, s in b.stages.items()}
    assert "verify          hit" in cli_run.output and "d2build: built nothing; reused weights" in cli_run.output


def test_progress_events_and_a_sweep_summary(api_build, cache_320_dir, tmp_path, capsys):
    events: list[d2build.ProgressEvent] = []
    grid = {"surgery.nms.max_detections": [100, 50]}
    s = d2build.sweep(RECIPE, grid, SMALL, until="surgery", cache_dir=cache_320_dir, progress=events.append,
                      sweep_dir=tmp_path / "sweep")
    assert capsys.readouterr().out == ""  # a callable gets the progress instead of the console
    assert s.ok and len(s) == 2 and all(isinstance(b, d2build.Build) for b in s)
    assert s[0].stages["surgery"].key == api_build.stages["surgery"].key  # the same key as the build's
    assert s[1].stages["surgery"].key != s[0].stages["surgery"].key
    ends = [e for e in events if e.done]
    assert [(e.stage, e.i, e.n) for e in ends[:7]] == [(n, i, 7) for i, n in enumerate(api_build.stages, 1)]
    assert [e.what for e in ends[:3]] == ["hit"] * 3 and ends[3].what == "skipped"
    if s[1].stages["surgery"].status == "built":  # (a later run of the session may find it in the cache)
        steps = [e for e in events if e.stage == "surgery" and not e.done]
        assert steps[0].what == "building" and any("nodes" in e.what for e in steps[1:]), steps

    from d2build import sweep_summary

    assert s.rows == sweep_summary.collect(s.dir).rows  # the rows a `d2build -m` sweep's summary has
    assert [r["surgery.nms.max_detections"] for r in s.rows] == ["100", "50"]
    assert [r["surgery_status"] for r in s.rows][0] == "hit" and s.rows[0]["graph_nodes"] > 200
    assert {f.name for f in s.files} == {"summary.csv", "summary.md", "summary.png"} and all(f.is_file() for f in s.files)
    assert "| 1 | 50 |" in s.markdown
    assert json.loads((s.dir / "1" / "run.json").read_text())["overrides"][-1] == "surgery.nms.max_detections=50"

    # every variant is checked before the first runs
    with pytest.raises(d2build.RecipeError) as e:
        d2build.sweep(RECIPE, {"surgery.nms.iou_threshold": [0.5, 7]}, SMALL, cache_dir=cache_320_dir,
                      progress=False, sweep_dir=tmp_path / "never")
    assert [p.key for p in e.value.problems] == ["surgery.nms.iou_threshold"] and "7" in str(e.value)
    assert not (tmp_path / "never").exists()


def test_errors_are_typed_and_name_what_to_fix(cache_320_dir, tmp_path):
    with pytest.raises(d2build.RecipeError) as e:
        d2build.build(RECIPE, ["surgery.nms.iou_treshold=0.6"], cache_dir=cache_320_dir)
    assert not isinstance(e.value, d2build.InputError)
    (p,) = e.value.problems
    assert (p.key, p.message, p.fix) == ("surgery.nms.iou_treshold", "unknown key",
                                         "did you mean surgery.nms.iou_threshold?")
    assert p.source == "d2build.build() (surgery.nms.iou_treshold=0.6)"

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(d2build.InputError) as e:
        d2build.build(RECIPE, [f"model.weights={broken}"], cache_dir=cache_320_dir)
    assert e.value.problems[0].key == "model.weights" and "is not a PyTorch (.pth)" in e.value.problems[0].message
    with pytest.raises(d2build.InputError, match="no such recipe file"):
        d2build.plan(tmp_path / "mine.yaml")
    with pytest.raises(d2build.RecipeError, match="did you mean mask_rcnn_r50"):
        d2build.plan("mask_rcnn_r5")
    with pytest.raises(d2build.RecipeError, match="'verfy' is not a stage of this recipe. Fix: use one of: weights"):
        d2build.build(RECIPE, SMALL, until="verfy", cache_dir=cache_320_dir)
    with pytest.raises(d2build.RecipeError, match=r"has several values \(a sweep\). Fix: use d2build.sweep"):
        d2build.plan(RECIPE, ["surgery.nms.iou_threshold=0.5,0.6"])
    with pytest.raises(d2build.RecipeError, match="not a list of overrides"):
        d2build.plan(RECIPE, "model.input=[320,320]")  # type: ignore[arg-type]

    # a recipe file of one's own, anywhere: its folder is searched first
    mine = tmp_path / "recipes" / "my_detector.yaml"
    mine.parent.mkdir()
    mine.write_text("# @package _global_\nmodel:\n  family: mask_rcnn\n"
                    "  config: COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml\n  input: [320, 320]\n")
    planned = d2build.plan(mine, cache_dir=cache_320_dir)  # conf's default model.weights is random
    assert planned.config.name == "my_detector" and planned.stages["export"].would == "hit"


def test_a_failed_stage_is_reported_then_raised(cache_320_dir, tmp_path):
    strict = d2build.build(RECIPE, [*SMALL, "verify.count=1", "verify.min_detections=1000"], cache_dir=cache_320_dir,
                           run_dir=tmp_path / "run", progress=False)
    assert not strict.ok and [s.name for s in strict.failed] == ["verify"]
    verify = strict.stages["verify"]
    assert verify.status == "failed" and "1000" in (verify.reason or "")
    assert strict.stages["build"].status == "skipped" and strict.to_dict()["ok"] is False
    with pytest.raises(d2build.StageFailed) as e:
        strict.raise_for_status()
    assert e.value.stage == "verify" and e.value.build is strict
    assert e.value.report == tmp_path / "run" / "verify-failed" / "report.md" and e.value.report.is_file()
    assert strict.report("verify") == e.value.report.read_text()
    with pytest.raises(d2build.StageFailed):
        strict.artifact("verify")
    assert strict.artifact("precision").is_file()  # what did build is there to look at


# ---------------------------------------------------------------------------------- load, detect, draw


def test_load_detects_what_verify_ran(api_build, rocket):
    from PIL import Image

    model = d2build.load(api_build)
    assert model.backend == "reference" and model.path == api_build.artifact("precision")
    assert model.info.family == "mask_rcnn" and model.info.input_hw == (320, 320)
    bgr, path = rocket
    dets = model.detect(bgr)
    verified = {r["image"]: r for r in api_build.stages["verify"].info["images"]}["rocket"]
    assert 10 < len(dets) == verified["graph"] < 100  # the graph verify ran, on the same pixels
    assert dets.image_hw == bgr.shape[:2] and dets.masks is not None and dets.masks.shape[1:] == bgr.shape[:2]
    assert dets.class_names == tuple(model.class_names[int(c)] for c in dets.classes)  # type: ignore[index]
    assert list(dets)[0].class_name == dets.class_names[0] and list(dets)[0].score == float(dets.scores[0])
    from_file, from_pil = model.detect_batch([path, Image.open(path)])
    for other in (from_file, from_pil):
        assert np.array_equal(other.boxes, dets.boxes) and np.array_equal(other.classes, dets.classes)
    strong = dets.above(0.3)
    assert 0 < len(strong) < len(dets) and float(strong.scores.min()) >= 0.3
    record = dets.to_dict("rocket")
    assert len(record["detections"]) == len(dets) and record["detections"][0]["class"] == dets.class_names[0]
    picture = model.draw(bgr, dets, score_threshold=0.3)
    assert picture.size == (bgr.shape[1], bgr.shape[0])
    assert np.abs(np.asarray(picture, np.int16) - bgr[:, :, ::-1]).max() > 100  # something was drawn

    # the same graph as a bare file, with the model's description
    bare = d2build.load(api_build.artifact("precision"), info=model.info.to_dict())
    assert np.array_equal(bare.detect(bgr).boxes, dets.boxes)
    # and the Detectron2 model it came from, eager: what verify compared it with
    eager = d2build.load(api_build, backend="detectron2")
    assert eager.backend == "detectron2" and len(eager.detect(bgr)) == verified["detectron2"]


def test_load_refuses_what_it_cannot_run(api_build, tmp_path):
    with pytest.raises(ValueError, match="device='gpu': use cpu, cuda or cuda:N"):
        d2build.load(api_build, device="gpu")
    with pytest.raises(ValueError, match="backend='reference': d2build's plugin implementations run on the CPU"):
        d2build.load(api_build, backend="reference", device="cuda")
    assert api_build.config.surgery.ops == "plugins"
    with pytest.raises(d2build.ModelUnavailable, match="this build's graph has TensorRT plugin nodes"):
        d2build.load(api_build, device="cuda:0")
    with pytest.raises(d2build.ModelUnavailable, match="reference backend .* runs on the CPU only"):
        d2build.load(api_build.artifact("precision"), device="cuda", info=d2build.load(api_build).info)
    with pytest.raises(ValueError, match="backend='bogus': use one of auto, tensorrt"):
        d2build.load(api_build, backend="bogus")
    with pytest.raises(d2build.ModelUnavailable, match="backend='tensorrt': no engine was built"):
        d2build.load(api_build, backend="tensorrt")
    with pytest.raises(d2build.InputError, match="a bare graph or engine does not say what model it is"):
        d2build.load(api_build.artifact("precision"))
    with pytest.raises(d2build.InputError, match="no such file or folder"):
        d2build.load(tmp_path / "nothing.onnx")
    not_a_graph = tmp_path / "model.onnx"
    not_a_graph.write_text("hello")
    with pytest.raises(d2build.InputError, match="not a readable ONNX graph"):
        d2build.load(not_a_graph, info=d2build.load(api_build).info)

    model = d2build.load(api_build)
    text = tmp_path / "photo.jpg"
    text.write_text("not an image")
    for image, words in ((tmp_path / "none.jpg", "no such file"), (text, "is not an image PIL can decode"),
                         (np.zeros((8, 8, 3), np.float32), "dtype float32, not [h, w, 3] uint8 BGR"),
                         (np.zeros((8, 8), np.uint8), "shape [8, 8]")):
        with pytest.raises(d2build.InputError, match=re.escape(words)) as e:
            model.detect(image)  # type: ignore[arg-type]
        assert e.value.problems[0].key == "image"


def test_load_a_bundle_detects_as_the_build(api_build, cache_320_dir, tmp_path_factory, tmp_path, rocket):
    from test_deploy import bundles_root, ensure_bundle

    bundle = ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "plugins")
    model = d2build.load(bundle)
    assert model.backend == "reference" and model.bundle is not None and model.bundle.path == bundle
    bgr, _ = rocket
    dets = model.detect(bgr)
    ours = d2build.load(api_build).detect(bgr)
    assert np.array_equal(dets.boxes, ours.boxes) and dets.class_names == ours.class_names
    assert d2build.load(bundle / "model.onnx").bundle is not None  # a bundle's graph loads its bundle

    damaged = tmp_path / bundle.name
    shutil.copytree(bundle, damaged)
    (damaged / "model.json").write_text((damaged / "model.json").read_text().replace('"batch": 1', '"batch": 2'))
    with pytest.raises(d2build.InputError) as e:
        d2build.load(damaged)
    (p,) = e.value.problems
    assert p.source == str(damaged / "model.json") and "does not match its sha256 in manifest.json" in p.message


def test_evaluate_refuses_bad_annotations_before_running(api_build, tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(d2build.InputError) as e:
        d2build.evaluate(api_build, bad, tmp_path, progress=False)
    assert e.value.problems[0].key == "eval.annotations" and "no list annotations" in e.value.problems[0].message
    with pytest.raises(TypeError, match="evaluates a Build"):
        d2build.evaluate("mask_rcnn_r50", bad, tmp_path)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- docs/API.md, the notebook

DRIVER = """
import json, sys
blocks = json.loads(open(sys.argv[1]).read())
scope = {"__name__": "__main__"}
for where, first_line, code in blocks:
    print(f"=== {where}:{first_line}", flush=True)
    exec(compile("\\n" * (first_line - 1) + code, where, "exec"), scope)
print("=== all blocks ran", flush=True)
"""


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line, code) of each ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M):
        out.append((markdown.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return out


def run_blocks(blocks: list[tuple[str, int, str]], cache: Path, work: Path, timeout: float = 900) -> str:
    """Run code blocks in order in one interpreter, from the empty folder `work` whose outputs/cache is the
    session's cache (what the examples build by default lands there)."""
    (work / "outputs").mkdir(parents=True)
    (work / "outputs" / "cache").symlink_to(cache, target_is_directory=True)
    (work / "blocks.json").write_text(json.dumps(blocks))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(work / "blocks.json")], cwd=work, capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "=== all blocks ran" in proc.stdout, out[-6000:]
    return out


def test_docs_api_examples_run_as_written(api_build, cache_320_dir, tmp_path):
    blocks = python_blocks((REPO / "docs" / "API.md").read_text())
    assert len(blocks) >= 9
    out = run_blocks([(str(REPO / "docs" / "API.md"), line, code) for line, code in blocks], cache_320_dir,
                     tmp_path / "work")
    assert "True hit" in out  # the first example's build, found in the shared cache
    assert f"d2build: recipe {RECIPE}" in out and "verify          hit" in out  # progress=True: the usual lines
    assert "surgery.nms.iou_treshold | unknown key | did you mean surgery.nms.iou_threshold?" in out
    assert "False failed" in out and "verify-failed/report.md" in out
    assert (tmp_path / "work" / "photo-detections.png").is_file()


def test_the_notebook_runs_end_to_end(api_build, cache_320_dir, tmp_path):
    nb = json.loads((REPO / "docs" / "api_tour.ipynb").read_text())
    assert nb["nbformat"] == 4 and all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    cells = [(f"{REPO / 'docs' / 'api_tour.ipynb'}[cell {i}]", 1, "".join(c["source"]))
             for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    out = run_blocks(cells, cache_320_dir, tmp_path / "work")
    m = re.search(r"fp16 recovers (\d+) of fp32's (\d+) detections", out)
    assert m and int(m.group(2)) > 10, out[-3000:]
    assert (tmp_path / "work" / "fp32-vs-fp16.png").is_file()
