"""Hydra sweeps for real: the basic (serial), joblib (parallel) and submitit (local executor)
launchers, the shared cache under each, the sweep summary (CSV, Markdown, plot) and its exit code.

All at 320x320 with random weights on the session's 320x320 cache (weights and export built once).
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SMALL_320

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def sweep(args: list[str], cache: Path, sweep_dir: Path, until: str | None = None,
          timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "d2build", "-m"]
    if until:
        cmd += ["--until", until]
    cmd += [*SMALL_320, *args, f"cache.dir={cache}", f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_serial_sweep_shares_upstream_and_writes_summary(tmp_path, cache_320):
    d = tmp_path / "sweep"
    proc = sweep(["verify.count=1", "surgery.nms.iou_threshold=0.4,0.6"], cache_320, d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rows(d)
    assert [r["job"] for r in table] == ["0", "1"]
    assert [r["surgery.nms.iou_threshold"] for r in table] == ["0.4", "0.6"]
    assert [(r["weights_status"], r["export_status"], r["surgery_status"], r["verify_status"]) for r in table] == [
        ("hit", "hit", "built", "built")] * 2
    runs = [json.loads((d / r["job"] / "run.json").read_text()) for r in table]
    assert len({r["stages"]["export"]["key"] for r in runs}) == 1  # one export for the whole sweep
    assert len({r["stages"]["surgery"]["key"] for r in runs}) == 2
    for r, run in zip(table, runs):
        summ = run["stages"]["verify"]["info"]["summary"]
        assert float(r["min_recovered"]) == summ["min_recovered"] >= 0.99
        assert float(r["mean_mask_iou"]) == summ["mean_mask_iou"] >= 0.95
        assert int(r["detections"]) == run["stages"]["verify"]["info"]["images"][0]["graph"] > 10
        assert int(r["graph_nodes"]) == run["stages"]["surgery"]["info"]["nodes"] > 200
        assert float(r["surgery_s"]) > 0.5 and float(r["export_s"]) < float(r["surgery_s"])
        assert r["ok"] == "True" and r["engine"] == ""
        assert "surgery.nms.iou_threshold=" + r["surgery.nms.iou_threshold"] in r["overrides"]
    md = (d / "summary.md").read_text()
    for part in ("weights: 2 hit;", "export: 2 hit;", "surgery: 2 built;", "verify: 2 built"):
        assert part in md
    assert md.count("\n| 0 | 0.4 |") == 1 and md.count("\n| 1 | 0.6 |") == 1
    w, h = png_size(d / "summary.png")
    assert w >= 600 and h >= 600

    # `d2build summarize` rewrites the same table from the run.json files
    before = (d / "summary.csv").read_text()
    for name in ("summary.csv", "summary.md", "summary.png"):
        (d / name).unlink()
    again = subprocess.run([sys.executable, "-m", "d2build", "summarize", str(d)], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env=ENV)
    assert again.returncode == 0, again.stderr
    assert (d / "summary.csv").read_text() == before
    assert (d / "summary.png").is_file() and "| 1 | 0.6 |" in again.stdout


def test_parallel_joblib_sweep_shares_one_surgery_and_reports_a_failed_job(tmp_path, cache_320):
    """Two joblib workers: verify thresholds differ, the surgery (not keyed on them) is built once;
    the job whose verify threshold cannot be met fails, and the sweep's exit code says so."""
    d = tmp_path / "sweep"
    proc = sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "verify.count=1",
                  "surgery.nms.iou_threshold=0.55", "verify.min_detections=1,1000"], cache_320, d)
    assert proc.returncode == 1, proc.stderr[-3000:]
    table = rows(d)
    assert [r["verify.min_detections"] for r in table] == ["1", "1000"]  # 1000: more than max_detections
    assert sorted(r["surgery_status"] for r in table) == ["built", "hit"]  # one builder, one waiter
    runs = [json.loads((d / r["job"] / "run.json").read_text()) for r in table]
    assert len({r["stages"]["surgery"]["key"] for r in runs}) == 1
    assert [r["verify_status"] for r in table] == ["built", "failed"]
    assert [r["ok"] for r in table] == ["True", "False"]
    assert (d / "1" / "verify-failed" / "report.md").is_file()
    assert {os.path.basename(p) for p in (d / "0").iterdir()} >= {"run.json", ".hydra"}
    md = (d / "summary.md").read_text()
    assert "2 job(s), 1 failed." in md and "surgery: 1 built, 1 hit" in md


def test_submitit_local_sweep(tmp_path, cache_320):
    """Hydra's submitit launcher with its local executor (what runs on SLURM, minus SLURM): each job is
    its own process; --until reaches them; the summary is written by the launching process."""
    d = tmp_path / "sweep"
    proc = sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15",
                  "surgery.nms.iou_threshold=0.35,0.65"], cache_320, d, until="surgery")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rows(d)
    assert [r["surgery.nms.iou_threshold"] for r in table] == ["0.35", "0.65"]
    assert [(r["weights_status"], r["export_status"], r["surgery_status"], r["verify_status"]) for r in table] == [
        ("hit", "hit", "built", "skipped")] * 2
    assert (d / ".submitit").is_dir()  # it really went through submitit
    pids = {json.loads((d / r["job"] / "run.json").read_text())["stages"]["surgery"]["dir"] for r in table}
    assert len(pids) == 2


def test_summarize_engine_path_and_a_job_that_died(tmp_path):
    """From files alone: a job whose build made an engine, and one killed before it wrote run.json."""
    d = tmp_path / "sweep"

    def job(num: int, overrides: list[str], stages: dict | None) -> None:
        (d / str(num) / ".hydra").mkdir(parents=True)
        (d / str(num) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if stages is not None:
            doc = {"overrides": overrides, "ok": True, "stages": stages}
            (d / str(num) / "run.json").write_text(json.dumps(doc))

    def stage(status: str, seconds: float, **kw) -> dict:
        return {"status": status, "seconds": seconds, "dir": kw.pop("dir", None), "artifacts": kw.pop("artifacts", []),
                "info": kw}

    job(0, ["precision=fp16"], {  # `precision` is also a stage's name: both columns must survive
        "precision": stage("built", 1.5),
        "surgery": stage("built", 3.0, nodes=219),
        "verify": stage("built", 9.0, summary={"min_recovered": 0.99, "mean_box_iou": 0.999, "mean_mask_iou": 0.98,
                                               "max_score_diff": 0.002}, images=[{"graph": 97}, {"graph": 100}]),
        "build": stage("built", 60.0, dir="/cache/build/abc", artifacts=["engine.plan", "io.json"]),
    })
    job(10, ["precision=int8"], None)  # killed: Hydra's files, no run.json
    job(2, ["precision=fp32"], {"surgery": stage("hit", 0.1, nodes=219), "verify": stage("hit", 0.1),
                                "build": stage("skipped", 0.0)})
    proc = subprocess.run([sys.executable, "-m", "d2build", "summarize", str(d)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 1, proc.stderr  # a job failed (no run.json)
    table = rows(d)
    assert [r["job"] for r in table] == ["0", "2", "10"]  # numeric order
    assert [r["precision"] for r in table] == ["fp16", "fp32", "int8"]
    assert [r["precision_status"] for r in table] == ["built", "-", "no run.json"]
    assert table[0]["engine"] == "/cache/build/abc/engine.plan" and table[1]["engine"] == ""
    assert (table[0]["detections"], table[0]["images"], table[0]["graph_nodes"]) == ("197", "2", "219")
    assert table[2]["ok"] == "False" and table[2]["surgery_status"] == "no run.json"
    assert "build: 1 built, 1 skipped, 1 no run.json" in (d / "summary.md").read_text()
    assert png_size(d / "summary.png")[0] >= 600  # categorical x axis (precision) works too
