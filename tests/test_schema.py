"""Recipe checks: a corpus of malformed recipes and overrides, each rejected naming file, key and fix.

Recipe-file cases write `recipes/bad.yaml` into a temporary folder and chdir there, so compose finds
it through the `./recipes` ConfigSource exactly as it finds a user's recipes. Command-line cases
override the shipped recipe. Nothing here imports torch or builds anything; the subprocess tests run
the real `python -m d2build` command line.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from d2build import cli
from d2build.compose import compose, list_recipes, shipped_recipes_dir
from d2build.recipe import Problem, RecipeError

ZOO_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
DELETE = object()  # in a patch: remove this key from the base recipe

# A complete, valid recipe; each file case patches one thing into it.
GOOD: dict[str, Any] = {
    "model": {"family": "mask_rcnn", "config": ZOO_CONFIG, "weights": "random", "input": [640, 640]},
    "surgery": {
        "nms": {"iou_threshold": 0.5, "score_threshold": 0.05, "max_detections": 100},
        "rpn": {"pre_nms_topk": 1000, "post_nms_topk": 1000, "iou_threshold": 0.7},
    },
}


def _patched(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is DELETE:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _patched(out[k], v)
        else:
            out[k] = v
    return out


def write_recipe(folder: Path, name: str, tree: dict) -> Path:
    """recipes/<name>.yaml under `folder`, as a user writes one."""
    path = folder / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n" + yaml.safe_dump(tree, sort_keys=False))
    return path


def problem_for(err: RecipeError, key: str) -> Problem:
    found = [p for p in err.problems if p.key == key]
    assert found, f"no problem names {key!r}; got:\n{err}"
    return found[0]


def assert_has_fix(p: Problem) -> None:
    assert p.fix.strip(), p
    assert f"Fix: {p.fix}" in str(p)
    assert str(p).startswith(f"{p.source}: {p.key}: ")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: its ./recipes (if a test writes one) is the user's recipe folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- #
# corpus (a): recipe files
# --------------------------------------------------------------------------- #

# (patch into GOOD, key the problem must name, text str(problem) must contain)
FILE_CASES = [
    # typos: unknown keys, with a suggestion
    pytest.param({"surgery": {"nms": {"iou_treshold": 0.4}}}, "surgery.nms.iou_treshold",
                 "did you mean surgery.nms.iou_threshold?", id="typo-nms-iou_treshold"),
    pytest.param({"model": {"wieghts": "random"}}, "model.wieghts", "did you mean model.weights?",
                 id="typo-model-wieghts"),
    pytest.param({"modle": {"family": "mask_rcnn"}}, "modle", "did you mean model?", id="typo-top-level-section"),
    # wrong types
    pytest.param({"surgery": {"nms": {"score_threshold": "high"}}}, "surgery.nms.score_threshold",
                 "'high' is not a number", id="string-for-float"),
    pytest.param({"surgery": {"nms": {"max_detections": 100.5}}}, "surgery.nms.max_detections",
                 "100.5 is not an integer", id="float-for-max_detections"),
    pytest.param({"surgery": {"nms": {"max_detections": True}}}, "surgery.nms.max_detections",
                 "True is not an integer", id="bool-for-max_detections"),
    pytest.param({"model": {"input": [640, 640, 640]}}, "model.input", "has 3 items", id="input-list-of-3"),
    pytest.param({"model": {"input": True}}, "model.input", "True is not list of an integer", id="input-bool"),
    pytest.param({"model": {"input": [640, "wide"]}}, "model.input[1]", "'wide' is not an integer",
                 id="input-string-item"),
    pytest.param({"surgery": {"nms": {"iou_threshold": None}}}, "surgery.nms.iou_threshold",
                 "None is not a number", id="null-threshold"),
    pytest.param({"model": {"input": None}}, "model.input", "None is not list", id="null-input"),
    pytest.param({"surgery": None}, "surgery", "is not a section", id="null-section"),
    pytest.param({"surgery": 5}, "surgery", "5 is not a section", id="scalar-for-section"),
    # out of range
    pytest.param({"surgery": {"nms": {"iou_threshold": 1.5}}}, "surgery.nms.iou_threshold",
                 "1.5 is outside [0, 1]", id="nms-iou-above-1"),
    pytest.param({"surgery": {"nms": {"score_threshold": -0.05}}}, "surgery.nms.score_threshold",
                 "-0.05 is outside [0, 1]", id="score-threshold-negative"),
    pytest.param({"surgery": {"nms": {"score_threshold": 0.001}}}, "surgery.nms.score_threshold",
                 "dense mode", id="score-threshold-in-plugin-dense-mode"),
    pytest.param({"surgery": {"rpn": {"iou_threshold": 1.2}}}, "surgery.rpn.iou_threshold",
                 "1.2 is outside [0, 1]", id="rpn-iou-above-1"),
    pytest.param({"model": {"input": [640, 650]}}, "model.input[1]", "use 640 or 672", id="input-not-divisible-by-32"),
    pytest.param({"model": {"input": [128, 640]}}, "model.input[0]", "outside 256..2048", id="input-too-small"),
    pytest.param({"model": {"input": [640, 2080]}}, "model.input[1]", "outside 256..2048", id="input-too-large"),
    pytest.param({"surgery": {"nms": {"max_detections": 0}}}, "surgery.nms.max_detections", "outside 1..1000",
                 id="max-detections-0"),
    pytest.param({"surgery": {"rpn": {"pre_nms_topk": 2000}}}, "surgery.rpn.pre_nms_topk", "EfficientNMS_TRT",
                 id="rpn-pre-nms-topk-2000"),
    pytest.param({"surgery": {"rpn": {"post_nms_topk": 0}}}, "surgery.rpn.post_nms_topk", "outside 1..5000",
                 id="rpn-post-nms-topk-0"),
    pytest.param({"model": {"seed": -1}}, "model.seed", "negative", id="negative-seed"),
    # families and configs
    pytest.param({"model": {"family": "yolo"}}, "model.family", "unknown family 'yolo'", id="unknown-family"),
    pytest.param({"model": {"family": "fcos"}}, "model.family", "is not supported", id="family-not-supported"),
    pytest.param({"model": {"family": "retinanet"}}, "model.config", "which model.family=retinanet does not build",
                 id="retinanet-family-rcnn-config"),
    pytest.param({"model": {"family": "keypoint_rcnn"}}, "model.config", "which model.family=keypoint_rcnn does not build",
                 id="family-config-mismatch"),
    pytest.param({"model": {"config": "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml"}}, "model.config",
                 "not supported", id="c4-config"),
    pytest.param({"model": {"config": "COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_3x.yaml"}}, "model.config",
                 "not supported", id="dc5-config"),
    pytest.param({"model": {"config": "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"}}, "model.config",
                 "use model.family=cascade_rcnn", id="cascade-config"),
    pytest.param({"model": {"config": "new_baselines/mask_rcnn_R_50_FPN_1000ep_LSJ.py"}}, "model.config",
                 "nor a LazyConfig of the model zoo", id="lazyconfig-py-missing"),
    pytest.param({"model": {"config_overrides": {"model.roi_heads.num_classes": 3}}}, "model.config_overrides",
                 "LazyConfig models only", id="config-overrides-yacs"),
    pytest.param({"model": {"config": "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
                            "config_overrides": {"roi_heads.num_classes": 3}}}, "model.config_overrides",
                 "dotted keys", id="config-overrides-not-from-the-root"),
    pytest.param({"model": {"config": "COCO-InstanceSegmentation/mask_rcnn_R_51_FPN_3x.yaml"}}, "model.config",
                 "neither a local file nor a model-zoo config", id="nonexistent-zoo-config"),
    pytest.param({"model": {"weights": "model_final_nowhere.pkl"}}, "model.weights",
                 "is not `random`, a URL, or an existing file", id="weights-missing-file"),
    pytest.param({"model": {"weights": "ftp://example.com/model.pkl"}}, "model.weights",
                 "is not `random`, a URL, or an existing file", id="weights-ftp-url"),
    pytest.param({"model": {"config": DELETE}}, "model.config", "is missing", id="missing-model-config"),
    # verify, build, cache
    pytest.param({"verify": {"iou_threshold": 1.5}}, "verify.iou_threshold", "outside [0, 1]", id="verify-iou-above-1"),
    pytest.param({"verify": {"min_mask_iou": -0.1}}, "verify.min_mask_iou", "outside [0, 1]",
                 id="verify-min-mask-iou-negative"),
    pytest.param({"verify": {"min_detections": 0}}, "verify.min_detections", "proves nothing",
                 id="verify-min-detections-0"),
    pytest.param({"verify": {"images": "no/such/folder"}}, "verify.images", "not `bundled` or an existing folder",
                 id="verify-images-missing-folder"),
    pytest.param({"build": {"batch_size": 2}}, "build.batch_size", "has moved to model.batch_size", id="batch-size-moved"),
    pytest.param({"model": {"batch_size": 0}}, "model.batch_size", "outside 1..64", id="batch-size-0"),
    pytest.param({"model": {"dynamic": {"min": [384, 384], "max": [704, 704]}}}, "model.dynamic",
                 "need the standard-op graph", id="dynamic-plugins"),
    pytest.param({"model": {"dynamic": {"min": [704, 384], "max": [384, 704]}}, "surgery": {"ops": "standard"}},
                 "model.dynamic.min", "above max", id="dynamic-min-above-max"),
    pytest.param({"model": {"dynamic": {"min": [384, 400], "max": [704, 704]}}, "surgery": {"ops": "standard"}},
                 "model.dynamic.min[1]", "not divisible by 32", id="dynamic-not-32"),
    pytest.param({"model": {"input": [800, 800], "dynamic": {"min": [384, 384], "max": [704, 704]}},
                  "surgery": {"ops": "standard"}}, "model.input", "outside model.dynamic", id="dynamic-opt-outside"),
    pytest.param({"build": {"optimization_level": 7}}, "build.optimization_level", "outside 0..5",
                 id="optimization-level-7"),
    pytest.param({"cache": {"dir": ""}}, "cache.dir", "is empty", id="empty-cache-dir"),
]


@pytest.mark.parametrize(("patch", "key", "says"), FILE_CASES)
def test_bad_recipe_file_is_rejected(in_tmp, patch, key, says):
    path = write_recipe(in_tmp, "bad", _patched(GOOD, patch))
    with pytest.raises(RecipeError) as info:
        compose(["recipe=bad"])
    p = problem_for(info.value, key)
    assert Path(p.source).resolve() == path.resolve(), p  # the file, not the command line
    assert says in str(p), p
    assert_has_fix(p)


def test_missing_key_fix_says_what_to_set(in_tmp):
    write_recipe(in_tmp, "bad", _patched(GOOD, {"model": {"config": DELETE}}))
    with pytest.raises(RecipeError) as info:
        compose(["recipe=bad"])
    assert "set model.config in the recipe" in problem_for(info.value, "model.config").fix


def test_every_problem_of_a_recipe_is_reported_one_line_each(in_tmp):
    path = write_recipe(in_tmp, "bad", _patched(GOOD, {
        "model": {"input": [640, 650]},
        "surgery": {"nms": {"iou_treshold": 0.4, "max_detections": 0}},
    }))
    with pytest.raises(RecipeError) as info:
        compose(["recipe=bad"])
    keys = sorted(p.key for p in info.value.problems)
    assert keys == ["model.input[1]", "surgery.nms.iou_treshold", "surgery.nms.max_detections"]
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(os.path.relpath(path)) for line in lines)


def test_recipe_file_can_set_calibration(in_tmp):
    write_recipe(in_tmp, "bad", _patched(GOOD, {"calibration": {"method": "median"}}))
    with pytest.raises(RecipeError) as info:
        compose(["recipe=bad"])
    problem_for(info.value, "calibration.method")


# --------------------------------------------------------------------------- #
# corpus (b): command-line overrides on the shipped recipe
# --------------------------------------------------------------------------- #

OVERRIDE_CASES = [
    pytest.param(["surgery.nms.iou_threshold=1.5"], "surgery.nms.iou_threshold", "outside [0, 1]",
                 id="cli-nms-iou-above-1"),
    pytest.param(["surgery.nms.score_threshold=-0.1"], "surgery.nms.score_threshold", "outside [0, 1]",
                 id="cli-score-threshold-negative"),
    pytest.param(["surgery.nms.max_detections=0"], "surgery.nms.max_detections", "outside 1..1000",
                 id="cli-max-detections-0"),
    pytest.param(["surgery.nms.max_detections=1.5"], "surgery.nms.max_detections", "not an integer",
                 id="cli-float-for-max-detections"),
    pytest.param(["surgery.rpn.pre_nms_topk=2000"], "surgery.rpn.pre_nms_topk", "EfficientNMS_TRT",
                 id="cli-rpn-pre-nms-topk-2000"),
    pytest.param(["surgery.rpn.iou_threshold=abc"], "surgery.rpn.iou_threshold", "'abc' is not a number",
                 id="cli-string-for-float"),
    pytest.param(["+surgery.nms.iou_treshold=0.3"], "surgery.nms.iou_treshold",
                 "did you mean surgery.nms.iou_threshold?", id="cli-appended-typo"),
    pytest.param(["model.input=[640,650]"], "model.input[1]", "use 640 or 672", id="cli-input-not-divisible-by-32"),
    pytest.param(["model.input=[4096,4096]"], "model.input[0]", "outside 256..2048", id="cli-input-too-large"),
    pytest.param(["model.input=[640,640,640]"], "model.input", "has 3 items", id="cli-input-list-of-3"),
    pytest.param(["model.input=true"], "model.input", "is not list of an integer", id="cli-input-bool"),
    pytest.param(["model.family=faster_rcnn"], "model.family", "MODEL.MASK_ON=True", id="cli-family-config-mismatch"),
    pytest.param(["model.config=COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml"], "model.config",
                 "not supported", id="cli-c4-config"),
    pytest.param(["model.weights=nothere.pkl"], "model.weights", "is not `random`, a URL, or an existing file",
                 id="cli-weights-missing-file"),
    pytest.param(["precision=int8"], "calibration.images", "calibration=bundled", id="cli-int8-without-calibration"),
    pytest.param(["precision.mode=int8"], "calibration.images", "calibration=bundled",
                 id="cli-int8-mode-without-calibration"),
    pytest.param(["precision.mode=bf16"], "precision.mode", "unknown precision", id="cli-unknown-precision-mode"),
    pytest.param(["calibration.method=median"], "calibration.method", "unknown method 'median'",
                 id="cli-bad-calibration-method"),
    pytest.param(["calibration.count=0"], "calibration.count", "cannot calibrate", id="cli-calibration-count-0"),
    pytest.param(["verify.min_recovered=1.01"], "verify.min_recovered", "outside [0, 1]", id="cli-verify-above-1"),
    pytest.param(["verify.score_tolerance=-0.01"], "verify.score_tolerance", "outside [0, 1]",
                 id="cli-verify-tolerance-negative"),
    pytest.param(["verify.min_detections=0"], "verify.min_detections", "proves nothing",
                 id="cli-verify-min-detections-0"),
    pytest.param(["build.batch_size=2"], "build.batch_size", "has moved to model.batch_size", id="cli-batch-size-moved"),
    pytest.param(["build.workspace_gib=0"], "build.workspace_gib", "not positive", id="cli-workspace-0"),
    pytest.param(["cache.dir="], "cache.dir", "is empty", id="cli-empty-cache-dir"),
]


@pytest.mark.parametrize(("overrides", "key", "says"), OVERRIDE_CASES)
def test_bad_override_is_rejected(in_tmp, overrides, key, says):
    with pytest.raises(RecipeError) as info:
        compose(overrides)
    p = problem_for(info.value, key)
    assert p.source.startswith("command line"), p
    assert overrides[0].lstrip("+") in p.source, p  # which override it was
    assert says in str(p), p
    assert_has_fix(p)


def test_int8_fix_mentions_bundled_calibration_and_bundled_passes(in_tmp):
    with pytest.raises(RecipeError) as info:
        compose(["precision=int8"])
    assert "calibration=bundled" in problem_for(info.value, "calibration.images").fix
    r = compose(["precision=int8", "calibration=bundled"])
    assert (r.precision.mode, r.calibration.images) == ("int8", "bundled")


# Typos of keys not in the config never reach the schema: Hydra refuses the override itself, and
# compose turns that into one problem naming the key (with a suggestion) or the group option.
HYDRA_CASES = [
    pytest.param(["surgery.nms.iou_treshold=0.3"], "surgery.nms.iou_treshold", "did you mean surgery.nms.iou_threshold",
                 id="cli-typo-nms-iou_treshold"),
    pytest.param(["model.wieghts=random"], "model.wieghts", "did you mean model.weights", id="cli-typo-model-wieghts"),
    pytest.param(["precision=int9"], "precision", "no precision option 'int9'", id="cli-unknown-precision-option"),
    pytest.param(["recipe=no_such_recipe"], "recipe", "no recipe option 'no_such_recipe'", id="cli-unknown-recipe"),
]


@pytest.mark.parametrize(("overrides", "key", "says"), HYDRA_CASES)
def test_hydra_rejects_unknown_command_line_keys(in_tmp, capsys, overrides, key, says):
    with pytest.raises(RecipeError) as info:
        compose(overrides)
    (p,) = info.value.problems
    assert p.key == key and says in str(p), p
    # ... and `d2build plan` reports it in one message and exits non-zero, without a traceback
    assert cli.main(["plan", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d2build: ") and says in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- #
# good recipes
# --------------------------------------------------------------------------- #


def test_shipped_recipe_composes_with_detectron2_defaults(in_tmp):
    r = compose([])
    assert r.name == "mask_rcnn_r50"
    assert Path(r.source).resolve() == (shipped_recipes_dir() / "mask_rcnn_r50.yaml").resolve()
    assert r.model.family == "mask_rcnn"
    assert r.model.config == ZOO_CONFIG
    assert r.model.input == (1344, 1344)
    assert (r.surgery.nms.iou_threshold, r.surgery.nms.score_threshold, r.surgery.nms.max_detections) == (0.5, 0.05, 100)
    assert (r.surgery.rpn.pre_nms_topk, r.surgery.rpn.post_nms_topk, r.surgery.rpn.iou_threshold) == (1000, 1000, 0.7)
    assert isinstance(r.surgery.nms.max_detections, int) and isinstance(r.surgery.nms.iou_threshold, float)
    assert (r.precision.mode, r.calibration.images, r.model.batch_size) == ("fp32", None, 1)
    # overrides land typed
    r2 = compose(["model.input=[640,480]", "surgery.nms.iou_threshold=0.6", "model.weights=random"])
    assert r2.model.input == (640, 480) and r2.surgery.nms.iou_threshold == 0.6 and r2.model.weights == "random"


def test_good_base_recipe_of_the_corpus_composes(in_tmp):
    write_recipe(in_tmp, "good", GOOD)
    r = compose(["recipe=good"])
    assert (r.name, r.source, r.model.input) == ("good", os.path.join("recipes", "good.yaml"), (640, 640))


def _d2build(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2build", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_user_recipes_are_found_and_override_shipped_names(in_tmp):
    mine = write_recipe(in_tmp, "mine", GOOD)
    shadow = write_recipe(in_tmp, "mask_rcnn_r50", _patched(GOOD, {"model": {"input": [800, 800]}}))
    known = list_recipes()
    assert known["mine"].resolve() == mine.resolve()
    assert known["mask_rcnn_r50"].resolve() == shadow.resolve()  # ./recipes wins the name clash

    r = compose(["recipe=mine"])
    assert (r.name, r.model.input) == ("mine", (640, 640))
    assert Path(r.source).resolve() == mine.resolve()
    default = compose([])  # the default recipe name now resolves to the user's file
    assert default.model.input == (800, 800) and default.model.weights == "random"
    assert Path(default.source).resolve() == shadow.resolve()

    ok = _d2build(["validate"], in_tmp)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"^ok\s+mine\s+recipes/mine\.yaml", ok.stdout, re.M), ok.stdout
    assert re.search(r"^ok\s+mask_rcnn_r50\s+recipes/mask_rcnn_r50\.yaml", ok.stdout, re.M), ok.stdout

    write_recipe(in_tmp, "broken", _patched(GOOD, {"model": {"input": [640, 650]},
                                                    "surgery": {"nms": {"iou_threshold": 5}}}))
    bad = _d2build(["validate"], in_tmp)
    assert bad.returncode != 0
    problem_lines = [ln for ln in bad.stderr.splitlines() if ln.strip().startswith("recipes/broken.yaml: ")]
    assert len(problem_lines) == 2, bad.stderr
    assert any("model.input[1]:" in ln and "Fix: use 640 or 672" in ln for ln in problem_lines)
    assert any("surgery.nms.iou_threshold:" in ln and "Fix: " in ln for ln in problem_lines)
    assert "(2 problem(s))" in bad.stderr
    assert re.search(r"^ok\s+mine\b", bad.stdout, re.M)  # the good ones are still checked and reported

    only_good = _d2build(["validate", "mine"], in_tmp)
    assert only_good.returncode == 0 and "broken" not in only_good.stdout + only_good.stderr


def test_rejecting_a_bad_recipe_imports_neither_torch_nor_detectron2(tmp_path):
    snippet = textwrap.dedent("""
        import json, sys, time
        t0 = time.perf_counter()
        from d2build.compose import compose
        from d2build.recipe import RecipeError
        try:
            compose(["model.input=[640,650]", "surgery.nms.iou_threshold=2", "model.family=keypoint_rcnn"])
            rejected = []
        except RecipeError as e:
            rejected = [p.key for p in e.problems]
        print(json.dumps({"rejected": rejected, "torch": "torch" in sys.modules,
                          "detectron2": "detectron2" in sys.modules, "seconds": time.perf_counter() - t0}))
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out["rejected"]) == ["model.family", "model.input[1]", "surgery.nms.iou_threshold"]
    assert out["torch"] is False
    assert out["detectron2"] is False
    assert wall < 20, f"rejecting a recipe took {wall:.1f}s"


# --------------------------------------------------------------------------- #
# plan: stage keys
# --------------------------------------------------------------------------- #

_PLAN_LINE = re.compile(r"^(weights|export|surgery|calibration|precision|verify|build)\s+([0-9a-f]{12})\s+"
                        r"(build|hit|skip)\b", re.M)


def _plan_keys(tmp_path: Path, *extra: str) -> dict[str, str]:
    cache = tmp_path / "cache"
    proc = _d2build(["plan", "model.weights=random", "model.input=[640,640]", f"cache.dir={cache}", *extra],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(cache) in proc.stdout
    rows = _PLAN_LINE.findall(proc.stdout)
    assert [r[0] for r in rows] == ["weights", "export", "surgery", "precision", "verify", "build"], proc.stdout
    # fresh cache: everything to build (the engine build is skipped where TensorRT is missing)
    assert all(would == "build" for name, _, would in rows if name != "build"), proc.stdout
    assert not cache.exists() or not any(cache.iterdir()), "plan must not write artifacts"
    return {name: key for name, key, _ in rows}


def test_plan_keys_follow_what_each_stage_reads(tmp_path):
    base = _plan_keys(tmp_path)
    assert len(set(base.values())) == 6

    nms = _plan_keys(tmp_path, "surgery.nms.iou_threshold=0.6")
    assert nms["weights"] == base["weights"] and nms["export"] == base["export"]
    assert nms["surgery"] != base["surgery"] and nms["verify"] != base["verify"]

    bigger = _plan_keys(tmp_path, "model.input=[672,672]")
    assert bigger["weights"] == base["weights"]
    assert bigger["export"] != base["export"]
    assert bigger["surgery"] != base["surgery"] and bigger["verify"] != base["verify"]
