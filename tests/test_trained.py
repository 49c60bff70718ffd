"""A user's own trained models: the project's two small models (models/), evaluated in AP on held-out data.

The models were trained here with Detectron2's own trainer (models/README.md) and come in as a user's
would: Detectron2's config dump and model_final.pth. The eval set is the synthetic val split the
project generates (d2build/synthetic.py, deterministic). Gates as MMDeploy gates its regressions: the
graph's AP against Detectron2 eager on the same input, |box AP difference| and |mask AP difference|
<= 0.1 points at fp32, 0.3 at fp16, 1.0 at int8; the models' own AP must be that of trained models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, d2build
from d2build import synthetic
from d2build.compose import compose
from d2build.recipe import RecipeError

SHAPES = ["recipe=shapes_mask_rcnn"]
HOUSES = ["recipe=houses_keypoint_rcnn"]
EVAL_IMAGES = 6  # every orientation of the val split (they cycle every 4) and two more
LAZY_MIN_AP = {"bbox": 0.85, "segm": 0.85}  # the LazyConfig model: 92.9 and 94.8 on the first 6 val images
INT8_IMAGES = 24  # int8 moves AP by tenths of a point either way: a gate of 1 point needs more images


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A cache for the trained models and their data: val splits (eval) and a few train images (verify and
    int8 calibration: images of the models' own domain; the bundled photographs hold no shapes)."""
    root = tmp_path_factory.mktemp("trained")
    data = {}
    for ds in ("shapes", "houses"):
        val = synthetic.write_coco(ds, "val", INT8_IMAGES if ds == "shapes" else EVAL_IMAGES, root / f"{ds}_val")
        train = root / f"{ds}_train"
        synthetic.write_coco(ds, "train", 6, train)
        data[ds] = [f"eval.annotations={val}", f"eval.images={val.parent}", f"eval.count={EVAL_IMAGES}",
                    f"verify.images={train}", f"calibration.images={train}"]
    return root / "cache", data


def _eval(run) -> dict:
    return run.stage("eval")["info"]


def _gates(info: dict, limit: float) -> None:
    for t, d in info["delta_ap"].items():
        assert abs(d) * 100 <= limit, (t, d, info["ap"])


def test_mask_model_fp32_graph_ap_equals_detectron2(trained, tmp_path):
    cache, data = trained
    run = d2build([*SHAPES, *data["shapes"], "surgery.ops=standard"], cache, tmp_path / "run")
    info = _eval(run)
    assert info["images"] == EVAL_IMAGES and set(info["ap"]) == {"bbox", "segm"}
    assert info["ap"]["bbox"]["detectron2"] >= 0.75 and info["ap"]["segm"]["detectron2"] >= 0.8, info["ap"]
    _gates(info, 0.1)
    assert "bbox AP" in run.output and "Detectron2" in run.output


def test_lazyconfig_model_graph_ap_equals_detectron2(trained, tmp_path):
    """The LazyConfig model (LazyConfig.save's config.yaml and its checkpoint, 4conv1fc BN box head) through
    verify and eval: the graph's AP equals Detectron2's on the same input (issue 21 asks within 0.2 points;
    the fp32 gate here is 0.1), and its own AP is that of a trained model."""
    cache, data = trained
    run = d2build(["recipe=shapes_lazy_mask_rcnn", *data["shapes"], "surgery.ops=standard"], cache, tmp_path / "run")
    for r in json.loads((Path(run.stage("verify")["dir"]) / "metrics.json").read_text())["images"]:
        assert r["detectron2"] >= 2 and r["recovered"] >= 0.99 and r["mean_mask_iou"] >= 0.95, r
    info = _eval(run)
    assert info["images"] == EVAL_IMAGES and set(info["ap"]) == {"bbox", "segm"}
    assert info["ap"]["bbox"]["detectron2"] >= LAZY_MIN_AP["bbox"] and \
        info["ap"]["segm"]["detectron2"] >= LAZY_MIN_AP["segm"], info["ap"]
    _gates(info, 0.1)


@pytest.mark.parametrize(("precision", "limit"), [("fp16", 0.3), ("int8", 1.0)])
def test_mask_model_lower_precision_within_gates(trained, tmp_path, precision, limit):
    cache, data = trained
    base = data["shapes"]
    if precision == "int8":
        base = [o for o in base if not o.startswith("eval.count=")] + ["calibration.method=entropy",
                                                                       f"eval.count={INT8_IMAGES}"]
    run = d2build([*SHAPES, *base, f"precision={precision}", "surgery.ops=standard"], cache, tmp_path / "run")
    _gates(_eval(run), limit)


def test_eval_stage_equals_running_the_graph_per_image(trained, tmp_path):
    """The candidates shortcut (one model run per image for every NMS variant) gives the AP of running the
    variant's own graph on every image (the candidates are the fp32 test's: a hit here)."""
    cache, data = trained
    variant = [*SHAPES, *data["shapes"], "surgery.ops=standard", "surgery.nms.iou_threshold=0.3"]
    stage = _eval(d2build(variant, cache, tmp_path / "run"))
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "d2build", "eval", *variant, "runtime.backend=onnxruntime",
                           f"cache.dir={cache}", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    direct = json.loads((out / "eval.json").read_text())
    for t in ("bbox", "segm"):
        assert abs(direct["metrics"][t]["AP"] - stage["metrics"]["graph"][t]["AP"]) <= 5e-4, t
        assert abs(direct["by_backend"]["detectron2"][t]["AP"] - stage["metrics"]["detectron2"][t]["AP"]) <= 5e-4


def test_nms_sweep_with_eval_runs_the_model_once_and_reports_ap_per_variant(trained, tmp_path):
    cache, data = trained
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "d2build", "-m", *SHAPES, *data["shapes"],
                           "surgery.nms.score_threshold=0.05,0.5,0.9", f"cache.dir={cache}",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (sweep / "summary.csv").read_text().splitlines()
    header = rows[0].split(",")
    table = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert {r["candidates_status"] for r in table} <= {"built", "hit"}
    assert sum(r["candidates_status"] == "built" for r in table) <= 1  # one model run per image for all three
    ap = [float(r["box_AP"]) for r in table]
    dets = [float(r["dets_per_image"]) for r in table]
    assert dets[0] > dets[1] > dets[2] and ap[0] > ap[2], (ap, dets)  # a 0.9 threshold loses recall
    # the default (plugin) flavour at fp32 holds the same gate as the standard one, at every threshold
    assert all(abs(float(r["box_AP_vs_detectron2"])) <= 0.1 for r in table), table
    assert (sweep / "summary.png").stat().st_size > 10_000


def test_keypoint_model_oks_ap_and_named_keypoints(trained, tmp_path):
    cache, data = trained
    run = d2build([*HOUSES, *data["houses"]], cache, tmp_path / "run")
    info = _eval(run)
    assert set(info["ap"]) == {"bbox", "keypoints"}
    assert info["ap"]["keypoints"]["detectron2"] >= 0.8, info["ap"]
    _gates(info, 0.1)
    out = tmp_path / "infer"
    proc = subprocess.run([sys.executable, "-m", "d2build", "infer", *HOUSES, "runtime.backend=reference",
                           f"cache.dir={cache}", "--images", data["houses"][1].split("=", 1)[1], "--count", "2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "detections.json").read_text())
    det = max((d for im in doc["images"] for d in im["detections"]), key=lambda d: d["score"])
    assert det["class"] == "house" and det["score"] > 0.9
    assert [k["name"] for k in det["keypoints"]] == list(synthetic.HOUSE_KEYPOINTS)
    x1, y1, x2, y2 = det["box"]
    inside = [x1 - 2 <= k["x"] <= x2 + 2 and y1 - 2 <= k["y"] <= y2 + 2 for k in det["keypoints"]]
    assert all(inside) and min(k["score"] for k in det["keypoints"]) > 0.05


@pytest.mark.parametrize(("override", "key", "says"), [
    (["model.class_names=[circle,square]"], "model.class_names", "2 names for the 3 classes"),
    (["model.keypoint_names=[a,b,c]"], "model.keypoint_names", "model.family=mask_rcnn has no keypoints"),
    (["eval.score_floor=0.001"], "eval.score_floor", "below 0.007"),
])
def test_recipe_names_and_eval_keys_are_checked(override, key, says):
    with pytest.raises(RecipeError) as info:
        compose([*SHAPES, *override])
    assert any(p.key == key and says in str(p) for p in info.value.problems), info.value.problems


def test_eval_files_are_checked_before_any_stage(trained, tmp_path):
    cache, data = trained
    val = Path(data["shapes"][0].split("=", 1)[1])
    doc = json.loads(val.read_text())
    doc["categories"] = [{"id": 7, "name": "dog"}]  # neither names nor count match the model's classes
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    run = d2build([*SHAPES, f"eval.annotations={bad}", f"eval.images={val.parent}"], cache, tmp_path / "r",
                  check=False)
    assert run.returncode == 2 and "match neither" in run.output and "Traceback" not in run.output
    missing = tmp_path / "missing.json"
    doc = json.loads(val.read_text())
    doc["images"][0]["file_name"] = "gone.png"
    missing.write_text(json.dumps(doc))
    with pytest.raises(RecipeError, match="gone.png"):
        compose([*SHAPES, f"eval.annotations={missing}", f"eval.images={val.parent}"])


def test_dynamic_graph_reaches_detectron2s_own_ap_on_mixed_orientations(trained, tmp_path):
    """The val images are 512x512, 480x640, 640x480 and 384x704: one letterbox canvas shrinks some of them,
    a dynamic graph resizes each as Detectron2 does and must reach Detectron2's own AP."""
    cache, data = trained
    run = d2build([*SHAPES, *data["shapes"], "surgery.ops=standard", "model.dynamic={min:[384,384],max:[704,704]}"],
                  cache, tmp_path / "run")
    info = _eval(run)
    for t, d in info["delta_ap_native"].items():
        assert abs(d) * 100 <= 0.3, (t, info["ap"])


def test_candidates_key_follows_the_eval_images_bytes(tmp_path):
    """Replacing an image in the eval folder (same name, same json) rebuilds the candidates and everything after."""
    from d2build.cache import Cache
    from d2build.runner import plan

    val = synthetic.write_coco("shapes", "val", 3, tmp_path / "val")
    recipe = compose([*SHAPES, f"eval.annotations={val}", f"eval.images={val.parent}", f"cache.dir={tmp_path / 'c'}"])

    def keys() -> dict[str, str]:
        return {p.name: p.key for p in plan(recipe, Cache(recipe.cache.dir))}

    before = keys()
    assert keys() == before  # stable
    other = synthetic.write_coco("shapes", "val", 4, tmp_path / "other").parent / "shapes_val_000003.png"
    (val.parent / "shapes_val_000001.png").write_bytes(other.read_bytes())
    after = keys()
    assert after["candidates"] != before["candidates"] and after["eval"] != before["eval"]
    assert after["export"] == before["export"] and after["verify"] == before["verify"]
