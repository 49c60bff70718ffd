"""Faults, with real `d2build` processes: SIGKILL in the middle of every stage, artifacts edited after
publication, a full disk, an unusable cache folder, and eight jobs racing for one key.

All at 320x320 with random weights and one verify photograph, so the whole file takes a few minutes
on 2 cores. After each kill the cache must hold nothing corrupt (every published entry passes its
digest check) and nothing of the killed stage; the next run must build it and remove the killed
build's temp folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL_320, d2build, published
from d2build.cache import Cache

STAGES = ["weights", "export", "surgery", "verify"]
ARGS = [*SMALL_320, "verify.count=1"]
# seconds to wait after a stage's temp folder appears before the kill: well inside the stage
# (at 320x320 on 2 cores: weights ~20 s, export ~15 s, surgery ~5 s, verify ~10 s)
INSIDE = {"weights": 3.0, "export": 2.0, "surgery": 1.0, "verify": 2.0}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def start(cache: Path, run_dir: Path, until: str, extra: list[str] = (), **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "d2build", "--until", until, *ARGS, *extra, f"cache.dir={cache}",
           f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=ENV, **kw)


def temp_folders(cache: Path, stage: str) -> list[Path]:
    d = cache / stage
    return sorted(d.glob(".tmp-*")) if d.exists() else []


def wait_for_temp(proc: subprocess.Popen, cache: Path, stage: str, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while not temp_folders(cache, stage):
        if proc.poll() is not None:
            raise AssertionError(f"d2build exited {proc.returncode} before {stage} started:\n"
                                 + proc.stdout.read()[-3000:])
        assert time.monotonic() < deadline, f"{stage} never started building"
        time.sleep(0.1)
    return temp_folders(cache, stage)[0]


def assert_nothing_corrupt(cache: Path) -> None:
    c = Cache(cache)
    for stage_dir in (p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in published(cache, stage_dir.name):
            assert c._check(entry) is None, f"corrupt entry published: {entry}: {c._check(entry)}"


def test_sigkill_inside_each_stage_then_next_run_builds_cleanly(tmp_path, cache_320_dir):
    cache = tmp_path / "cache"
    previous_temp: Path | None = None
    for i, stage in enumerate(STAGES):
        run_dir = tmp_path / f"killed-in-{stage}"
        proc = start(cache, run_dir, until=stage)
        try:
            temp = wait_for_temp(proc, cache, stage)
            time.sleep(INSIDE[stage])
            assert proc.poll() is None, f"the run finished {stage} before the kill"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

        assert published(cache, stage) == [], f"a {stage} killed mid-build was published"
        assert temp.is_dir(), "SIGKILL leaves the temp folder (nothing can clean up)"
        assert_nothing_corrupt(cache)
        if i:  # this run rebuilt the stage killed last time, cleanly, and removed that build's temp folder
            before = STAGES[i - 1]
            status = json.loads((run_dir / "run.json").read_text())["stages"][before]["status"]
            assert status == "built", (before, status)
            assert len(published(cache, before)) == 1
            assert not previous_temp.exists() and temp_folders(cache, before) == []
        previous_temp = temp

    final = d2build(ARGS, cache, tmp_path / "final")
    assert [final.status(s) for s in STAGES] == ["hit", "hit", "hit", "built"]
    assert final.run_json["ok"]
    assert not previous_temp.exists()
    for stage in STAGES:
        assert len(published(cache, stage)) == 1 and temp_folders(cache, stage) == []
    assert_nothing_corrupt(cache)
    info = final.stage("verify")["info"]["images"][0]
    assert info["matched"] >= 20 and info["recovered"] >= 0.99

    # the edited-artifact check below and the sweep tests reuse these weights and this export
    for stage in ("weights", "export"):
        for entry in published(cache, stage):
            target = cache_320_dir / stage / entry.name
            if not target.exists():
                shutil.copytree(entry, target)


def test_artifacts_edited_after_publication_are_detected_and_rebuilt(tmp_path, cache_320):
    first = d2build(ARGS, cache_320, tmp_path / "first")
    assert first.run_json["ok"]
    graph = Path(first.stage("surgery")["dir"]) / "model.onnx"
    report = Path(first.stage("verify")["dir"]) / "report.md"
    original = graph.read_bytes()
    data = bytearray(original)
    data[len(data) // 3] ^= 0x01  # one bit, same size: only a digest can tell
    graph.write_bytes(bytes(data))
    report.write_text(report.read_text().replace("passed", "PASSED (edited by hand)"))

    again = d2build(ARGS, cache_320, tmp_path / "again")
    assert [again.status(s) for s in STAGES] == ["hit", "hit", "built", "built"]
    assert again.stage("surgery")["key"] == first.stage("surgery")["key"]
    warnings = [ln for ln in again.output.splitlines() if "fails its check" in ln]
    assert any(" surgery " in w and "(model.onnx digest mismatch)" in w for w in warnings), warnings  # by digest
    assert any(" verify " in w and "(report.md missing or resized)" in w for w in warnings), warnings
    assert graph.read_bytes() == original  # rebuilt bit for bit
    assert "edited by hand" not in report.read_text()
    assert_nothing_corrupt(cache_320)
    assert temp_folders(cache_320, "surgery") == [] and not list((cache_320 / "surgery").glob(".trash-*"))


# ------------------------------------------------------------------ storage that cannot take the build

def _run_export(cache: Path, run_dir: Path, preexec=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "d2build", "--until", "export", *ARGS, f"cache.dir={cache}",
           f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV, preexec_fn=preexec)


def _assert_one_clear_line(proc: subprocess.CompletedProcess, folder: Path, reason: str, fix: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("d2build: stage")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"d2build: stage export failed: cache folder {folder} "), lines[0]
    assert reason in lines[0] and fix in lines[0], lines[0]


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_gives_one_clear_line(tmp_path, cache_320, how):
    """The export (170 MB) does not fit: a tmpfs just larger than the weights, or RLIMIT_FSIZE (EFBIG)."""
    import d2build as api

    # the session cache holds other tests' weights too: this recipe's by its planned key
    key = api.plan(SMALL_320[0].split("=", 1)[1], SMALL_320[1:], cache_dir=cache_320).stages["weights"].key
    weights = Cache(cache_320).entry_dir("weights", key)
    assert weights.is_dir(), weights
    size = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())
    cache = tmp_path / "cache"
    preexec = None
    if how == "tmpfs":
        if not _mount_tmpfs(cache, f"size={size + (4 << 20)}"):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the rlimit case covers it")
    else:
        def limit_file_size() -> None:  # Python ignores SIGXFSZ, so writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))
        preexec = limit_file_size
    try:
        shutil.copytree(weights, cache / "weights" / weights.name)
        proc = _run_export(cache, tmp_path / "run", preexec)
        folder = (cache / "export").resolve()
        if how == "tmpfs":
            _assert_one_clear_line(proc, folder, "(the disk is full)", "free some space there, or set cache.dir=")
        else:
            _assert_one_clear_line(proc, folder, "file-size limit", "set cache.dir=")
        assert published(cache, "export") == [] and temp_folders(cache, "export") == []
        assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["export"]["status"] == "failed"
    finally:
        if how == "tmpfs":
            _umount(cache)


def test_cache_folder_below_a_file_is_refused_before_any_stage(tmp_path):
    blocker = tmp_path / "not-a-folder"  # fails for root too (permission bits do not)
    blocker.write_text("a file")
    cache = blocker / "cache"
    proc = subprocess.run([sys.executable, "-m", "d2build", "--until", "weights", *ARGS, f"cache.dir={cache}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("d2build:")]
    assert line == (f"d2build: command line (cache.dir={cache}): cache.dir: {cache} is inside {blocker}, which is a "
                    "file, not a folder. Fix: point cache.dir at a folder (it is created if missing), e.g. "
                    "cache.dir=outputs/cache")
    assert not (tmp_path / "run" / "run.json").exists()


def test_read_only_cache_folder_gives_one_clear_line(tmp_path):
    cache, reason = tmp_path / "ro", "(the file system is read-only)"
    if not _mount_tmpfs(cache, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        cmd = [sys.executable, "-m", "d2build", "--until", "weights", *ARGS, f"cache.dir={cache}",
               f"hydra.run.dir={tmp_path / 'run'}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("d2build: stage")]
        assert line == (f"d2build: stage weights failed: cache folder {cache.resolve() / 'weights'} is not writable "
                        f"{reason}: set cache.dir=/a/writable/folder")
    finally:
        _umount(cache)


# ------------------------------------------------------------------ eight jobs, one key

def test_eight_concurrent_jobs_on_one_key_build_once(tmp_path):
    cache = tmp_path / "cache"
    seed = ["model.seed=8"]  # weights no other test builds
    procs = [start(cache, tmp_path / f"job{i}", until="weights", extra=seed) for i in range(8)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    runs = [json.loads((tmp_path / f"job{i}" / "run.json").read_text())["stages"]["weights"] for i in range(8)]
    assert sorted(r["status"] for r in runs) == ["built"] + ["hit"] * 7
    assert len({r["key"] for r in runs}) == 1 and len({r["dir"] for r in runs}) == 1
    assert len(published(cache, "weights")) == 1 and temp_folders(cache, "weights") == []
    assert sum("another process is building" in o for o in outs) >= 1  # the late ones were told and waited
    builder = [o for o, r in zip(outs, runs) if r["status"] == "built"][0]
    assert "another process is building" not in builder
    assert sum("weights: building" in o for o in outs) == 1
    assert_nothing_corrupt(cache)
