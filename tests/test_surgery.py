"""Surgery refuses graphs that do not look as expected, and verify fails loudly and usefully."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import d2build
from d2build import detectron, photos
from d2build.families.surgery.rcnn import rcnn_surgeon
from d2build.families.surgery.spec import head_spec
from d2build.graph import GraphMismatch
from d2build.recipe import NmsConfig, RpnConfig, SurgeryConfig

CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
SURGERY = SurgeryConfig("plugins", NmsConfig(iou_threshold=0.5, score_threshold=0.05, max_detections=100),
                        RpnConfig(pre_nms_topk=1000, post_nms_topk=1000, iou_threshold=0.7))
SMALL = ["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[640,640]"]


@pytest.fixture(scope="module")
def export_640(shared_cache, tmp_path_factory) -> onnx.ModelProto:
    run = d2build(SMALL, shared_cache, tmp_path_factory.mktemp("run"), until="export")
    return onnx.load(str(Path(run.stage("export")["dir"]) / "model.onnx"))


def test_anchors_for_another_size_are_refused(export_640):
    spec = head_spec(detectron.load_cfg(CONFIG), SURGERY, (1344, 1344), with_masks=True)
    with pytest.raises(GraphMismatch, match=r"RPN level 0 predicts 76800 anchors .* but 338688 anchors were "
                                            r"generated for input 1344x1344"):
        rcnn_surgeon(export_640, spec, "plugins").run()


def test_missing_module_is_named(export_640):
    broken = onnx.ModelProto()
    broken.CopyFrom(export_640)
    keep = [n for n in broken.graph.node if "/roi_heads/box_predictor/bbox_pred/" not in n.name]
    del broken.graph.node[:]
    broken.graph.node.extend(keep)
    spec = head_spec(detectron.load_cfg(CONFIG), SURGERY, (640, 640), with_masks=True)
    with pytest.raises(GraphMismatch, match=r"module 'roi_heads.box_predictor.bbox_pred'"):
        rcnn_surgeon(broken, spec, "plugins").run()


def test_unsupported_pooler_is_refused():
    cfg = detectron.load_cfg(CONFIG, {"MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIPool"})
    with pytest.raises(GraphMismatch, match="POOLER_TYPE='ROIPool' is not supported"):
        head_spec(cfg, SURGERY, (640, 640), with_masks=True)


def test_verify_failure_names_the_image_and_keeps_the_report(shared_cache, tmp_path):
    run = d2build([*SMALL, "verify.count=1", "verify.min_detections=101"], shared_cache, tmp_path / "r",
                  check=False)
    assert run.returncode != 0
    assert run.status("verify") == "failed" and run.status("surgery") in ("hit", "built")
    assert "astronaut: Detectron2 found 100 detections (< verify.min_detections=101)" in run.output
    report = Path(run.stage("verify")["dir"]) / "report.md"
    assert "**Verdict: FAILED**" in report.read_text()
    assert not list((shared_cache / "verify").glob(run.stage("verify")["key"]))  # nothing published


def test_verify_on_a_folder_of_the_users_images(shared_cache, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("rocket", "coffee"):
        Image.fromarray(np.ascontiguousarray(photos.bundled(name).bgr[:, :, ::-1])).save(folder / f"{name}.png")
    run = d2build([*SMALL, f"verify.images={folder}", "verify.count=2"], shared_cache, tmp_path / "r")
    rows = run.stage("verify")["info"]["images"]
    assert [r["image"] for r in rows] == ["coffee.png", "rocket.png"]
    assert all(r["matched"] >= 20 and r["recovered"] >= 0.99 for r in rows), rows
