"""conf/ and recipes/ ship inside the wheel, and an installed copy composes recipes without the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_carries_conf_and_recipes_and_composes_from_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("d2build-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("d2build/conf/config.yaml", "d2build/conf/precision/fp16.yaml",
                 "d2build/conf/calibration/bundled.yaml", "d2build/recipes/mask_rcnn_r50.yaml",
                 "d2build/cli.py", "d2build/families/surgery/rcnn.py", "d2build/families/mask_rcnn/build.py",
                 "d2build/py.typed", "d2build/__init__.pyi", "d2build/api/builds.py",
                 "d2build/recipes/detectron2/pointrend_rcnn_R_50_FPN_3x_coco.yaml"):
        assert want in names, f"{want} missing from {wheel.name}"

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path = [p for p in sys.path if p != sys.argv[2]]\n"
        "import d2build.compose as c\n"
        "r = c.compose(['recipe=mask_rcnn_r50', 'model.input=[640,640]'])\n"
        "print(c.conf_dir()); print(c.shipped_recipes_dir()); print(r.name, r.model.input)\n"
        "print(c.compose(['recipe=pointrend_mask_rcnn_r50']).model.config)\n"  # the config the wheel ships with it
    )
    # The editable install maps d2build to the checkout; put the extracted wheel first.
    out = subprocess.run([sys.executable, "-c", probe, str(site), str(REPO)], cwd=elsewhere,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith(str(site)), out
    assert out[1].startswith(str(site)), out
    assert out[2] == "mask_rcnn_r50 (640, 640)"
    assert out[3].startswith(str(site)) and out[3].endswith("detectron2/pointrend_rcnn_R_50_FPN_3x_coco.yaml"), out
