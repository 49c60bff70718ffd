"""Which d2build files a bundle carries, so it runs without d2build installed (and without torch).

A bundle vendors the torch-free part of d2build twice over: `runtime/d2build/` beside `detect.py`
(the command-line runtime: `python BUNDLE/detect.py IMAGE...`) and `1/d2build/` inside each Triton
Python-backend model. Both copies are the files `runtime_files()` names, so the code that runs a
deployed model is exactly the code of the d2build that wrote it (no version skew against model.json),
and every copy is in the bundle manifest like any other file.

`runtime_files()` is the one place that decides the list; everything else calls it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import d2build

#: d2build modules the runtime imports (numpy, Pillow and one backend below them), relative to d2build/
_CORE = (
    "__init__.py", "console.py", "plugins.py", "processing.py",
    "runtime/__init__.py", "runtime/info.py", "runtime/model.py",
    "backends/__init__.py", "backends/base.py", "backends/devices.py", "backends/graphs.py", "backends/onnxruntime.py",
    "backends/reference.py", "backends/tensorrt.py", "backends/cuda.py",
    "reference/__init__.py", "reference/emulate.py", "reference/executor.py", "reference/plugins.py",
    "deploy/__init__.py", "deploy/__main__.py", "deploy/bundle.py", "deploy/runtime.py", "deploy/onnx_runner.py",
    "deploy/triton_model.py", "deploy/vendor.py",
)


def package_dir() -> Path:
    return Path(d2build.__file__).parent


def runtime_files() -> list[str]:
    """Paths relative to d2build/ of every module a bundle needs to run on its own: the runtime, the
    backends, the CPU reference plugins, and every family's runtime half (families.runtime_modules)."""
    from d2build.families import runtime_modules

    return [*_CORE, *runtime_modules()]


def copy_runtime(dest: Path) -> list[str]:
    """Copy runtime_files() into `dest/d2build/`; the paths written, relative to `dest`."""
    src = package_dir()
    written = []
    for rel in runtime_files():
        dst = dest / "d2build" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
        written.append(f"d2build/{rel}")
    return written
