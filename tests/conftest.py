"""Shared helpers: run the real `d2build` command line and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    returncode: int
    output: str
    run_json: dict

    def status(self, stage: str) -> str:
        return self.run_json["stages"][stage]["status"]

    def stage(self, stage: str) -> dict:
        return self.run_json["stages"][stage]


def d2build(args: list[str], cache: Path, run_dir: Path, *, until: str | None = None,
            check: bool = True, timeout: float = 1200) -> Run:
    """Run `python -m d2build` as a user would; return its exit code, output and run.json."""
    cmd = [sys.executable, "-m", "d2build"]
    if until:
        cmd += ["--until", until]
    cmd += [*args, f"cache.dir={cache}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = proc.stdout + proc.stderr
    rj = run_dir / "run.json"
    run_json = json.loads(rj.read_text()) if rj.exists() else {}
    if check and proc.returncode != 0:
        raise AssertionError(f"d2build {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
    return Run(proc.returncode, out, run_json)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the pipeline tests, so each export is built once per session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


# ------------------------------------------------------------------ a small (320x320) session cache
# for the sweep and fault tests: weights and export at 320x320 are built (or seeded by
# tests/test_faults.py, which builds them anyway) once per session.

SMALL_320 = ["recipe=mask_rcnn_r50", "model.weights=random", "model.input=[320,320]"]


def published(cache: Path, stage: str) -> list[Path]:
    d = cache / stage
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


@pytest.fixture(scope="session")
def cache_320_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache320")


@pytest.fixture
def cache_320(cache_320_dir, tmp_path) -> Path:
    """The session's 320x320 cache with weights and export published (built here on first use)."""
    if not (published(cache_320_dir, "weights") and published(cache_320_dir, "export")):
        d2build(SMALL_320, cache_320_dir, tmp_path / "seed-320", until="export")
    return cache_320_dir
