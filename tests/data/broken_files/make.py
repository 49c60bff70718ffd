"""Writes the broken input files next to this script (committed; rerun only to change the corpus).

Each file is something a user might hand d2build by mistake; tests/test_inputs.py says what d2build
must answer for each. Run with the project's venv: `.venv/bin/python tests/data/broken_files/make.py`.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


class _Shell:  # pickles as a call of posix.system: what a malicious checkpoint looks like
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def zip_checkpoint(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def main() -> None:
    good = io.BytesIO()
    torch.save({"model": {"w": torch.arange(64, dtype=torch.float32)}}, good)
    files = {
        "weights_posix_system.pth": zip_checkpoint(pickle.dumps({"model": _Shell()}, protocol=2)),
        "weights_eval.pkl": pickle.dumps({"model": {"w": _Eval()}}, protocol=2),
        "weights_truncated.pth": good.getvalue()[: len(good.getvalue()) // 2],
        "weights_empty.pth": b"",
        "weights_text.pth": b"model_final.pth was not copied; this is a placeholder\n",
        "weights_list.pkl": pickle.dumps([1, 2, 3], protocol=2),
        "config_invalid.yaml": b"MODEL:\n  META_ARCHITECTURE: [GeneralizedRCNN\n",
        "config_list.yaml": b"- MODEL\n- INPUT\n",
        "config_missing_base.yaml": b"_BASE_: no_such_base.yaml\nMODEL:\n  MASK_ON: true\n",
        "images_corrupt/a_photo.png": (HERE.parent / "tiny.png").read_bytes() if (HERE.parent / "tiny.png").exists()
        else _tiny_png(),
        "images_corrupt/b_broken.jpg": b"\xff\xd8\xff\xe0 this is not really a JPEG",
        "images_none/README.txt": b"a folder with no images in it\n",
        "coco_not_json.json": b"{'images': [",
        "coco_no_lists.json": b'{"images": [], "info": {}}',
        "coco_missing_image.json": (b'{"images": [{"id": 1, "file_name": "a_photo.png", "height": 8, "width": 8},'
                                    b' {"id": 2, "file_name": "gone.png", "height": 8, "width": 8}],'
                                    b' "annotations": [], "categories": [{"id": 1, "name": "thing"}]}'),
    }
    for name, data in files.items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{name}: {len(data)} bytes")


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
