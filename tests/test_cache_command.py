"""`d2build cache ls|du|gc` on a real cache folder (real files, real locks held by another process),
and the cache's fallback when a builder it did not exclude published the same key first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from d2build.cache import Cache, make_key

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
DAY = 86400


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2build", "cache", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV)


def put(cache: Cache, stage: str, name: str, size: int, days_unused: float = 0.0) -> str:
    key = make_key({"stage": stage, "name": name})

    def build(out: Path) -> dict:
        (out / "blob.bin").write_bytes(os.urandom(size))
        return {}

    cache.get_or_build(stage, key, {"name": name}, build)
    if days_unused:
        t = time.time() - days_unused * DAY
        os.utime(cache.entry_dir(stage, key) / "manifest.json", (t, t))
    return key


@pytest.fixture
def filled(tmp_path):
    cache = Cache(tmp_path / "cache")
    keys = {
        "old": put(cache, "export", "old", 1 << 20, days_unused=10),
        "new": put(cache, "export", "new", 2 << 20),
        "mid": put(cache, "surgery", "mid", 512 << 10, days_unused=3),
    }
    leftover = cache.root / "export" / f".tmp-{make_key({'dead': 1})}-4242-deadbeef"
    leftover.mkdir()
    (leftover / "half.onnx").write_bytes(b"x" * 1000)
    return cache, keys, leftover


def test_ls_and_du(filled):
    cache, keys, leftover = filled
    ls = cli("ls", "--dir", str(cache.root))
    assert ls.returncode == 0, ls.stderr
    lines = {ln.split()[1]: ln for ln in ls.stdout.splitlines() if ln.startswith(("export ", "surgery "))}
    assert set(lines) >= {keys["old"][:12], keys["new"][:12], keys["mid"][:12]}
    assert "1.0 MiB" in lines[keys["old"][:12]] and "10.0d ago" in lines[keys["old"][:12]]
    assert "2.0 MiB" in lines[keys["new"][:12]] and lines[keys["new"][:12]].endswith(" ok")
    assert "3.0d ago" in lines[keys["mid"][:12]]
    assert "leftover of a killed build" in ls.stdout and "3 entries" in ls.stdout

    # a corrupt entry shows with --check (and makes it exit 1)
    blob = cache.entry_dir("export", keys["new"]) / "blob.bin"
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))
    checked = cli("ls", "--check", "--dir", str(cache.root))
    assert checked.returncode == 1 and "blob.bin digest mismatch" in checked.stdout

    du = cli("du", f"cache.dir={cache.root}")
    assert du.returncode == 0, du.stderr
    rows = {ln.split()[0]: ln.split() for ln in du.stdout.splitlines()[2:]}
    assert rows["export"][1] == "2" and rows["export"][2:4] == ["3.0", "MiB"]
    assert rows["export"][4:6] == ["1000", "B"]  # the leftover
    assert rows["surgery"][1] == "1" and rows["total"][1] == "3"


_HOLDER = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1]); lock.acquire()
    print("held", flush=True)
    time.sleep(300)
""")


def test_gc_by_age_never_removes_a_locked_entry(filled):
    cache, keys, leftover = filled
    old = cache.entry_dir("export", keys["old"])

    dry = cli("gc", "--older-than", "7d", "--dry-run", "--dir", str(cache.root))
    assert dry.returncode == 0, dry.stderr
    assert re.search(rf"^would remove +export +{keys['old'][:12]} .*unused 10.0d", dry.stdout, flags=re.M)
    assert keys["mid"][:12] not in dry.stdout and keys["new"][:12] not in dry.stdout
    assert old.is_dir() and leftover.is_dir()  # a dry run removes nothing

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(old.parent / f".{keys['old']}.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = cli("gc", "--older-than", "7d", "--dir", str(cache.root))
        assert busy.returncode == 0, busy.stderr
        assert re.search(rf"^kept +export +{keys['old'][:12]} .*its lock is held", busy.stdout, flags=re.M)
        assert old.is_dir() and cache._check(old) is None  # intact (a lookup would count as a use)
        assert not leftover.exists()  # a killed build's temp folder (its key's lock is free) is removed
        assert "1 in use" in busy.stdout
    finally:
        holder.kill()
        holder.wait()

    done = cli("gc", "--older-than", "7d", "--dir", str(cache.root))
    assert re.search(rf"^removed +export +{keys['old'][:12]} ", done.stdout, flags=re.M), done.stdout
    assert not old.exists()
    intact = lambda stage, k: cache._check(cache.entry_dir(stage, k)) is None  # noqa: E731 - a lookup is a use
    assert intact("export", keys["new"]) and intact("surgery", keys["mid"])
    assert not list((cache.root / "export").glob(".trash-*"))
    assert "removed 1, freeing 1.0 MiB; kept 2" in done.stdout

    assert cli("gc", "--older-than", "2d", "--dir", str(cache.root)).returncode == 0
    assert not cache.entry_dir("surgery", keys["mid"]).exists() and intact("export", keys["new"])


def test_gc_keep_referenced(tmp_path):
    from d2build.compose import compose
    from d2build.runner import plan

    cache = Cache(tmp_path / "cache")
    small = ["model.weights=random", "model.input=[320,320]"]
    wanted = plan(compose(["recipe=mask_rcnn_r50", *small]), cache)
    for p in wanted:  # entries under the very keys the recipe plans (contents do not matter to gc)
        cache.get_or_build(p.name, p.key, p.material, lambda out: (out / "f").write_bytes(b"1") and {})
    stray = put(cache, "export", "stray", 1000)

    dry = cli("gc", "--keep-referenced", "--dry-run", "--dir", str(cache.root))  # recipes as shipped
    assert dry.returncode == 0, dry.stderr
    removable = re.findall(r"^would remove +(\w+) +(\w+) ", dry.stdout, flags=re.M)
    assert ("export", stray[:12]) in removable
    assert ("export", wanted[1].key[:12]) in removable  # 320x320 random is not what recipes ship

    kept = cli("gc", "--keep-referenced", "--overrides", " ".join(small), "--dir", str(cache.root))
    assert kept.returncode == 0, kept.stderr
    assert re.findall(r"^removed +(\w+) +(\w+) ", kept.stdout, flags=re.M) == [("export", stray[:12])]
    for p in wanted:
        assert cache.lookup(p.stage.kind, p.key) is not None

    bad = cli("gc", "--keep-referenced", "--overrides", "model.input=[321,320]", "--dir", str(cache.root))
    assert bad.returncode == 2 and "nothing removed" in bad.stderr
    assert all(cache.lookup(p.stage.kind, p.key) is not None for p in wanted)


def test_gc_needs_a_criterion(tmp_path):
    assert cli("gc", "--dir", str(tmp_path)).returncode == 2
    assert cli("gc", "--older-than", "7 days", "--dir", str(tmp_path)).returncode == 2


def test_publish_race_lost_to_an_unexcluded_builder_uses_theirs(tmp_path):
    """As on an NFS cache whose locks do not reach the other machine: they publish while we build."""
    key = make_key({"race": 1})
    theirs_cache = Cache(tmp_path / "theirs")
    theirs, _ = theirs_cache.get_or_build("export", key, {"race": 1}, lambda out: (out / "m.onnx").write_bytes(b"A") and {})
    ours = Cache(tmp_path / "ours")

    def build(out: Path) -> dict:
        (out / "m.onnx").write_bytes(b"B")
        shutil.copytree(theirs.dir, ours.entry_dir("export", key))  # the other machine publishes first
        return {}

    art, status = ours.get_or_build("export", key, {"race": 1}, build)
    assert status == "hit"
    assert art.path("m.onnx").read_bytes() == b"A" and art.manifest == theirs.manifest
    assert [p.name for p in (ours.root / "export").iterdir() if p.name.startswith(".tmp-")] == []
