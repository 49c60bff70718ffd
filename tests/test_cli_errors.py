"""The command line's bad inputs: each gets one d2build line naming the key and the fix, exit status 2,
no Hydra text (unless -v), before anything runs -- for a run (`d2build KEY=VALUE ...`) as for the
sub-commands. Nothing here builds a model: the run and plan cases only compose; the eval/infer cases
stop at the dynamic-range check, before the first stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from d2build import cli, commands, synthetic
from d2build.compose import check_run, compose
from d2build.processing import image_file_hw, load_image_bgr, resize_shortest_edge
from d2build.runtime.info import ModelInfo
from d2build.runtime.model import Model, input_size, outside_range, range_message

ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout; no PYTHONWARNINGS: what a user sees
HYDRA_TEXT = ("HYDRA_FULL_ERROR", "Config search path", "Traceback", "Could not override", "is not in struct",
              "Error parsing override", "LexerNoViableAltException", "warn")


def d2build(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2build", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ the issue's inputs, as a user runs them

ISSUE_CASES = [
    pytest.param(["recipe=mask_rcnn_r50", "surgery.nms.iou_treshold=0.5"],
                 "d2build: command line (surgery.nms.iou_treshold=0.5): surgery.nms.iou_treshold: unknown key. "
                 "Fix: did you mean surgery.nms.iou_threshold?", id="key-typo"),
    pytest.param(["build.batch_size=2"],
                 "d2build: command line (build.batch_size=2): build.batch_size: has moved to model.batch_size (the "
                 "batch is part of the graph, so it is part of its cache keys). Fix: use model.batch_size instead",
                 id="moved-key"),
    pytest.param(["precision=fp8"],
                 "d2build: command line (precision=fp8): precision: there is no precision option 'fp8'. "
                 "Fix: use one of: fp16, fp32, int8", id="group-option"),
    pytest.param(["bogus"],
                 "d2build: command line: bogus: is neither a sub-command nor a KEY=VALUE override. Fix: sub-commands: "
                 f"{', '.join(commands.available())}; overrides look like recipe=mask_rcnn_r50 or "
                 "surgery.nms.iou_threshold=0.6 (d2build --help)", id="not-an-override"),
]


@pytest.mark.parametrize(("args", "line"), ISSUE_CASES)
def test_run_gets_one_d2build_line(tmp_path, args, line):
    run_dir = tmp_path / "run"
    proc = d2build(*args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line] and proc.stdout == ""
    assert not run_dir.exists()  # refused before Hydra's app made its run folder


def test_verbose_adds_hydras_own_text():
    proc = d2build("-v", "precision=fp8")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == ("d2build: command line (precision=fp8): precision: there is no precision option 'fp8'. "
                        "Fix: use one of: fp16, fp32, int8")
    assert "Could not find 'precision/fp8'" in proc.stderr and "MissingConfigException" in lines[1]


def test_subcommand_help_works_for_every_subcommand(capsys):
    for name in commands.available():
        for flag in ("--help", "-h"):
            try:
                code = cli.main([name, flag])
            except SystemExit as e:  # argparse's --help
                code = e.code
            out, err = capsys.readouterr()
            assert code == 0 and err == "", (name, flag, err)
            assert f"d2build {name}" in out, (name, flag, out)
    assert cli.main(["plan", "--help"]) == 0
    assert capsys.readouterr().out.startswith("d2build plan [-v] KEY=VALUE ...")


# ------------------------------------------------------------------ more of the same, in this process (fast)

RUN_CASES = [
    pytest.param(["infre"], "Fix: did you mean `d2build infer`? sub-commands: ", id="subcommand-typo"),
    pytest.param(["recipe", "mask_rcnn_r50"],
                 "d2build: command line (recipe mask_rcnn_r50): recipe: is not KEY=VALUE. Fix: write "
                 "recipe=mask_rcnn_r50 (no spaces around =)", id="space-for-equals"),
    pytest.param(["precision=fp61"], "d2build: command line (precision=fp61): precision: there is no precision "
                 "option 'fp61'. Fix: did you mean fp16? use one of: fp16, fp32, int8", id="group-option-typo"),
    pytest.param(["recipe=mask_rcnn_r5"], "there is no recipe option 'mask_rcnn_r5'. Fix: did you mean "
                 "mask_rcnn_r50? use one of: cascade_mask_rcnn_r50, ", id="recipe-typo"),
    pytest.param(["precison=fp16"], "d2build: command line (precison=fp16): precison: unknown key. Fix: did you "
                 "mean precision?", id="group-name-typo"),
    pytest.param(["surgery.nms.bogus_setting_xyz=1"], "surgery.nms.bogus_setting_xyz: unknown key. Fix: keys "
                 "under surgery.nms: iou_threshold, max_detections, score_threshold", id="unknown-key-lists-siblings"),
    pytest.param(["surgery.iou_threshold=0.6"], "Fix: did you mean surgery.nms.iou_threshold or "
                 "surgery.rpn.iou_threshold?", id="key-in-another-section"),
    pytest.param(["precision.mdoe=int8"], "precision.mdoe: unknown key. Fix: did you mean precision.mode?",
                 id="group-key-typo"),
    pytest.param(["surgery.ops=standard", "model.dynamic.min_size=600"], "model.dynamic.min_size: cannot be set on "
                 "its own: model.dynamic has no min_size yet", id="key-of-a-null-section"),
    pytest.param(["model.input=[640,640"], "d2build: command line (model.input=[640,640): model.input: cannot be "
                 "parsed (no viable alternative at input '[640,640'). Fix: quote a value", id="grammar"),
    pytest.param(["surgery.nms.iou_threshold=0.4,0.5"], "d2build: command line (surgery.nms.iou_threshold=0.4,0.5): "
                 "surgery.nms.iou_threshold: has several values (a sweep), but this is not a multirun. Fix: add -m",
                 id="sweep-without-m"),
    pytest.param(["-m", "surgery.nms.iou_threshold=0.4,5,0.6"], "d2build: command line (surgery.nms.iou_threshold=5): "
                 "surgery.nms.iou_threshold: 5.0 is outside [0, 1]. Fix: set a value between 0 and 1 (Detectron2 "
                 "uses 0.5)", id="sweep-value-checked"),
    pytest.param(["-m", "precision=fp16,fp8"], "d2build: command line (precision=fp8): precision: there is no "
                 "precision option 'fp8'", id="sweep-group-option"),
    pytest.param(["--foo"], "d2build: command line: --foo: is not an option of a run. Fix: d2build's: -v, --until "
                 "STAGE; Hydra's: -m, --cfg", id="unknown-flag"),
    pytest.param(["--until"], "d2build: command line: --until: needs a stage name. Fix: --until STAGE, one of weights, ",
                 id="until-without-stage"),
    pytest.param(["--until", "bild"], "d2build: command line (run.until=bild): run.until: no stage named 'bild'. Fix: "
                 "did you mean build? stages: ", id="until-typo"),
    pytest.param(["cache.dir=README.md"], "d2build: command line (cache.dir=README.md): cache.dir: README.md is a "
                 "file, not a folder. Fix: point cache.dir at a folder (it is created if missing), e.g. "
                 "cache.dir=outputs/cache", id="cache-dir-is-a-file"),
    pytest.param(["cache.dir=README.md/cache"], "cache.dir: README.md/cache is inside README.md, which is a file, "
                 "not a folder", id="cache-dir-under-a-file"),
]


@pytest.mark.parametrize(("args", "says"), RUN_CASES)
def test_run_problem_is_one_line(monkeypatch, capsys, tmp_path, args, says):
    monkeypatch.chdir(REPO)  # README.md is a file here
    run_dir = tmp_path / "run"
    assert cli.main([*args, f"hydra.run.dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("d2build: ") and says in line, line
    assert not any(t in err for t in HYDRA_TEXT) and out == ""
    assert not run_dir.exists()


@pytest.mark.parametrize("args", [["cache.dir=README.md"], ["surgery.nms.iou_treshold=0.5"], ["--until", "x"]])
def test_plan_says_what_a_run_says(monkeypatch, capsys, args):
    monkeypatch.chdir(REPO)
    assert cli.main(args) == 2
    run_line = capsys.readouterr().err
    if args[0] == "--until":
        assert cli.main(["plan", *args]) == 2
        assert capsys.readouterr().err.splitlines() == [
            "d2build: command line: --until: is not an option of this command. Fix: see its --help; settings are "
            "KEY=VALUE overrides (e.g. surgery.nms.iou_threshold=0.6)"]
        return
    assert cli.main(["plan", *args]) == 2
    assert capsys.readouterr().err == run_line


def test_hydras_own_flags_still_work():
    """--cfg job prints the composed config (overrides given before and after the flag, as Hydra alone
    would refuse); --info and --hydra-help are Hydra's; a good sweep passes the check."""
    proc = d2build("model.input=[320,320]", "--cfg", "job", "surgery.nms.iou_threshold=0.4")
    assert proc.returncode == 0, proc.stderr
    assert "- 320" in proc.stdout and "iou_threshold: 0.4" in proc.stdout
    info = d2build("--info", "defaults", "precision=fp16")
    assert info.returncode == 0 and "precision/fp16" in info.stdout, info.stderr
    assert d2build("--hydra-help").stdout.startswith("Hydra (")
    check_run(["surgery.nms.iou_threshold=0.4,0.6", "precision=fp16,fp32", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2"], multirun=True)  # raises on any problem
    both = d2build("-m", "surgery.nms.iou_threshold=0.4,0.6", "--cfg", "job")
    assert both.returncode == 2 and both.stderr.splitlines() == [
        "d2build: command line: -m --cfg: exclude each other (Hydra runs, sweeps, prints the config or prints its "
        "information). Fix: give one of them"]


def test_infer_and_eval_arguments(capsys, in_tmp):
    assert cli.main(["infer", "bogus"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "d2build: command line: bogus: is not a KEY=VALUE override. Fix: overrides look like recipe=mask_rcnn_r50 "
        "or surgery.nms.iou_threshold=0.6"]
    assert cli.main(["infer", "--images", str(in_tmp / "none"), "model.weights=random"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"d2build infer: --images {in_tmp / 'none'}: not `bundled` or a folder (No such file or directory)"]
    assert cli.main(["eval", "surgery.nms.iou_treshold=0.5"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "d2build: command line (surgery.nms.iou_treshold=0.5): surgery.nms.iou_treshold: unknown key. "
        "Fix: did you mean surgery.nms.iou_threshold?"]


def test_int8_calibrates_with_percentile_by_default(in_tmp):
    """docs/ACCURACY.md: percentile is the method measured inside the 1-point AP gate on both trained models."""
    bundled = compose(["precision=int8", "calibration=bundled"]).calibration
    folder = compose(["precision=int8", "calibration.images=bundled"]).calibration  # the `none` group's default
    assert bundled.method == folder.method == "percentile"
    assert compose(["precision=int8", "calibration=bundled", "calibration.method=entropy"]).calibration.method == "entropy"


# ------------------------------------------------------------------ a dynamic graph's range, before the first image

SHAPES = ModelInfo(family="mask_rcnn", input_hw=(512, 512), pixel_mean=(103.5, 116.3, 123.7), num_classes=3,
                   resize="shortest_edge", min_size=512, max_size=704, input_min=(384, 384), input_max=(640, 640))


def test_input_size_is_what_prepare_makes_of_the_image():
    for hw in [(512, 512), (480, 640), (640, 480), (384, 704), (300, 451), (872, 1000), (100, 2000), (2000, 97)]:
        _, lb = resize_shortest_edge(np.zeros((*hw, 3), np.uint8), 512, 704, 32)
        assert input_size(SHAPES, hw) == lb.input_hw, hw
    letterbox = ModelInfo(family="mask_rcnn", input_hw=(640, 640), pixel_mean=(0, 0, 0), num_classes=3)
    assert input_size(letterbox, (480, 2000)) == (640, 640)
    assert outside_range(letterbox, {"wide": (100, 4000)}) == {}  # a letterbox canvas takes any image


def test_outside_range_names_each_image_and_the_range_that_holds_them_all():
    sizes = {"square": (512, 512), "landscape": (480, 640), "portrait": (640, 480), "wide": (384, 704)}
    outside = outside_range(SHAPES, sizes)
    assert outside == {"landscape": ((480, 640), (512, 704)), "portrait": ((640, 480), (704, 512)),
                       "wide": ((384, 704), (384, 704))}
    assert range_message(SHAPES, outside, len(sizes)) == (
        "3 of 4 images resize to an input outside the graph's range 384x384 .. 640x640 (Detectron2's resize: short "
        "side 512, long side at most 704, padded to a multiple of 32; landscape: 480x640 -> 512x704): widen it to "
        "model.dynamic={min:[384,384],max:[704,704]} and rebuild, or change model.dynamic.min_size/max_size")
    # the last guard in Model.prepare says the same, before it resizes anything
    model = Model.__new__(Model)
    model.info = SHAPES
    with pytest.raises(ValueError, match=r"^1 of 1 images resize to an input outside .* image 1: 480x640 -> 512x704"):
        model.prepare([np.zeros((480, 640, 3), np.uint8)])


def test_image_file_hw_reads_the_header_with_exif_orientation(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6) is 640 wide on disk and 640 tall once loaded."""
    rgb = (np.arange(480 * 640 * 3) % 251).astype(np.uint8).reshape(480, 640, 3)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "turned.jpg", exif=exif)
    im.save(tmp_path / "plain.png")
    for name in ("turned.jpg", "plain.png"):
        assert image_file_hw(tmp_path / name) == load_image_bgr(tmp_path / name).shape[:2], name
    assert image_file_hw(tmp_path / "turned.jpg") == (640, 480)


DYNAMIC = ["surgery.ops=standard", "model.dynamic={min:[384,384],max:[640,640]}", "model.input=[512,512]",
           "runtime.backend=onnxruntime"]


def test_eval_refuses_images_outside_the_range_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """In this process (Detectron2's import, for the config's resize, is the cost); infer's test below
    runs the command as a user does."""
    monkeypatch.chdir(REPO)
    val = synthetic.write_coco("shapes", "val", 4, tmp_path / "val")  # 512x512 (in range), 480x640, 640x480, 384x704
    cache = tmp_path / "cache"
    code = cli.main(["eval", "recipe=shapes_mask_rcnn", *DYNAMIC, f"eval.annotations={val}",
                     f"eval.images={val.parent}", f"cache.dir={cache}", "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "d2build: 3 of 4 images resize to an input outside the graph's range 384x384 .. 640x640 (Detectron2's "
        f"resize: short side 512, long side at most 704, padded to a multiple of 32; {val.parent}/"
        "shapes_val_000001.png: 480x640 -> 512x704): widen it to model.dynamic={min:[384,384],max:[704,704]} and "
        "rebuild, or change model.dynamic.min_size/max_size"]
    assert not cache.exists()


def test_infer_refuses_images_outside_the_range_before_anything_is_built(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((300, 1200, 3), 128, np.uint8)).save(folder / "panorama.png")  # 800 short side: too wide
    cache = tmp_path / "cache"
    proc = d2build("infer", "recipe=mask_rcnn_r50", "model.weights=random", *DYNAMIC, "--images", str(folder),
                   f"cache.dir={cache}", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("d2build: 1 of 1 images resize to an input outside the graph's range 384x384 .. 640x640 "
                           "(Detectron2's resize: short side 800, long side at most 1333")
    assert f"{folder}/panorama.png: 300x1200 -> 352x1344" in line  # 333x1333, padded to multiples of 32
    assert not cache.exists()


def test_run_refuses_verify_photographs_outside_the_range_before_any_stage(tmp_path):
    """verify's preflight: the bundled photographs (512x512 and up, short side 800) do not fit 256..320."""
    cache = tmp_path / "cache"
    proc = d2build("recipe=mask_rcnn_r50", "model.weights=random", "surgery.ops=standard", "model.input=[320,320]",
                   "model.dynamic={min:[256,256],max:[320,320]}", f"cache.dir={cache}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("d2build:")]
    assert line.startswith("d2build: recipes/mask_rcnn_r50.yaml: verify.images: 3 of 3 images resize to an input "
                           "outside the graph's range 256x256 .. 320x320"), line
    assert "astronaut: 512x512 -> 800x800). Fix: widen it to model.dynamic={min:[256,256],max:[800,1216]}" in line
    assert not cache.exists()
