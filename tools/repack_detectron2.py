"""Turn PyPI's ``sal-detectron2==0.7.2`` wheel into an installable pure-Python wheel.

The only published file is tagged cp310-linux_x86_64 and carries a ``_C`` extension built for
torch 2.3, so pip refuses it on Python 3.11+. Everything d2build uses (Mask/Keypoint/Faster R-CNN
build, CPU inference, TracingAdapter export) is pure Python. This tool downloads the wheel,
drops ``_C*.so`` and the stray top-level ``tools`` package, drops the ``numpy<2``, ``black`` and
``tensorboard`` requirements, retags the wheel ``py3-none-any`` (purelib) and rewrites RECORD.
Every kept source file stays byte-identical. Nothing third-party is committed to d2build.

Usage: python tools/repack_detectron2.py OUT_DIR   (prints the path of the repacked wheel)
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME, VERSION = "sal_detectron2", "0.7.2"
DIST_INFO = f"{NAME}-{VERSION}.dist-info"
DROPPED_REQUIREMENTS = ("numpy<2", "black", "tensorboard")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _keep(name: str) -> bool:
    if name.startswith("tools/"):
        return False
    if name.startswith("detectron2/_C") and name.endswith(".so"):
        return False
    return name != f"{DIST_INFO}/RECORD"


def _metadata(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip().replace(" ", "")
            if req.startswith(DROPPED_REQUIREMENTS):
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def repack(src: Path, out_dir: Path) -> Path:
    dst = out_dir / f"{NAME}-{VERSION}-py3-none-any.whl"
    tmp = dst.with_suffix(".tmp")
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if not _keep(info.filename):
                continue
            data = zin.read(info)
            if info.filename == f"{DIST_INFO}/WHEEL":
                data = (
                    "Wheel-Version: 1.0\nGenerator: d2build-repack\n"
                    "Root-Is-Purelib: true\nTag: py3-none-any\n"
                ).encode()
            elif info.filename == f"{DIST_INFO}/METADATA":
                data = _metadata(data.decode()).encode()
            elif info.filename == f"{DIST_INFO}/top_level.txt":
                data = b"detectron2\n"
            zout.writestr(info.filename, data)
            records.append(_record_line(info.filename, data))
        records.append(f"{DIST_INFO}/RECORD,,")
        zout.writestr(f"{DIST_INFO}/RECORD", "\n".join(records) + "\n")
    tmp.replace(dst)
    return dst


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out_dir = Path(argv[1]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{NAME}-{VERSION}-py3-none-any.whl"
    if dst.exists():
        print(dst)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.10", "--dest", tmp, f"sal-detectron2=={VERSION}"],
            check=True, stdout=subprocess.DEVNULL,
        )
        (src,) = Path(tmp).glob("sal_detectron2-*.whl")
        print(repack(src, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
