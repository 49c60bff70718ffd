"""The content-addressed cache, with real files, real locks and real processes (no mocks).

Covers: build then hit; corrupt entries (edited, deleted, truncated manifest) detected and rebuilt;
failed and killed builds leaving nothing published; eight processes racing for one key; an
unusable cache folder; and key stability.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from d2build.cache import MANIFEST, Cache, CacheError, make_key

STAGE = "export"
MATERIAL = {"stage": STAGE, "version": 1, "config": {"input": [640, 640]}}
KEY = make_key(MATERIAL)
FILES = {"model.onnx": b"\x08\x07onnx-bytes" * 100, "sub/notes.txt": b"exported at 640x640\n"}


def build_files(out: Path) -> dict:
    for name, data in FILES.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return {"nodes": 42}


class Counting:
    """A build function that counts its calls."""

    def __init__(self, fn=build_files):
        self.fn, self.calls = fn, 0

    def __call__(self, out: Path) -> dict:
        self.calls += 1
        return self.fn(out)


def never(out: Path) -> dict:
    raise AssertionError("build called on what should be a hit")


def leftovers(cache: Cache, stage: str = STAGE) -> list[str]:
    """Temp and trash folders left in a stage folder."""
    d = cache.root / stage
    return sorted(p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".trash-"))) if d.exists() else []


def assert_intact(cache: Cache, key: str = KEY) -> None:
    art = cache.lookup(STAGE, key)
    assert art is not None
    for name, data in FILES.items():
        assert art.path(name).read_bytes() == data
    assert set(art.manifest["files"]) == set(FILES)


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


# --------------------------------------------------------------------------- #
# build, hit, manifest
# --------------------------------------------------------------------------- #


def test_build_then_hit(cache):
    build = Counting()
    art, status = cache.get_or_build(STAGE, KEY, MATERIAL, build)
    assert (status, build.calls) == ("built", 1)
    assert art.dir == cache.entry_dir(STAGE, KEY) == cache.root / STAGE / KEY
    assert art.dir.is_dir() and cache.is_published(STAGE, KEY)

    m = json.loads((art.dir / MANIFEST).read_text())
    assert m == art.manifest
    assert (m["stage"], m["key"], m["material"], m["info"]) == (STAGE, KEY, MATERIAL, {"nodes": 42})
    on_disk = {p.relative_to(art.dir).as_posix() for p in art.dir.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk == set(FILES)  # every file, nested ones included
    for name, data in FILES.items():
        assert m["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert art.path("model.onnx").read_bytes() == FILES["model.onnx"]
    with pytest.raises(KeyError):
        art.path("missing.onnx")
    assert art.info == {"nodes": 42}

    again, status = cache.get_or_build(STAGE, KEY, MATERIAL, never)
    assert status == "hit"
    assert again.manifest == art.manifest and again.dir == art.dir
    assert Cache(cache.root).get_or_build(STAGE, KEY, MATERIAL, never)[1] == "hit"  # a new Cache object too
    assert leftovers(cache) == []


def test_lookup_of_absent_entry(cache):
    assert cache.lookup(STAGE, KEY) is None
    assert not cache.is_published(STAGE, KEY)


# --------------------------------------------------------------------------- #
# corruption is detected and rebuilt
# --------------------------------------------------------------------------- #


def _edit_same_size(d: Path) -> None:
    p = d / "model.onnx"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    assert p.stat().st_size == len(FILES["model.onnx"])


def _delete_file(d: Path) -> None:
    (d / "sub" / "notes.txt").unlink()


def _truncate_manifest(d: Path) -> None:
    mf = d / MANIFEST
    text = mf.read_text()
    mf.write_text(text[: len(text) // 2])


def _manifest_wrong_shape(d: Path) -> None:
    (d / MANIFEST).write_text(json.dumps({"files": {"model.onnx": {}}}))  # valid JSON, no digests


def _manifest_not_a_mapping(d: Path) -> None:
    (d / MANIFEST).write_text("[]")


@pytest.mark.parametrize("corrupt", [
    pytest.param(_edit_same_size, id="edited-same-size"),
    pytest.param(_delete_file, id="deleted-file"),
    pytest.param(_truncate_manifest, id="truncated-manifest"),
    pytest.param(_manifest_wrong_shape, id="manifest-without-digests"),
    pytest.param(_manifest_not_a_mapping, id="manifest-not-a-mapping"),
])
def test_corrupt_entry_is_rebuilt(cache, corrupt):
    cache.get_or_build(STAGE, KEY, MATERIAL, build_files)
    corrupt(cache.entry_dir(STAGE, KEY))

    assert cache.lookup(STAGE, KEY) is None  # never handed out
    build = Counting()
    art, status = cache.get_or_build(STAGE, KEY, MATERIAL, build)
    assert (status, build.calls) == ("built", 1)
    assert_intact(cache)
    assert art.manifest == cache.lookup(STAGE, KEY).manifest
    assert leftovers(cache) == []  # the corrupt entry was moved aside and removed
    assert cache.get_or_build(STAGE, KEY, MATERIAL, never)[1] == "hit"


# --------------------------------------------------------------------------- #
# failed, abandoned and killed builds
# --------------------------------------------------------------------------- #


def test_build_that_raises_publishes_nothing(cache):
    def broken(out: Path) -> dict:
        (out / "half.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build(STAGE, KEY, MATERIAL, broken)
    assert not cache.entry_dir(STAGE, KEY).exists()
    assert cache.lookup(STAGE, KEY) is None and not cache.is_published(STAGE, KEY)
    assert leftovers(cache) == []

    def interrupted(out: Path) -> dict:  # Ctrl-C (a BaseException) too
        (out / "half.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build(STAGE, KEY, MATERIAL, interrupted)
    assert leftovers(cache) == [] and not cache.entry_dir(STAGE, KEY).exists()

    assert cache.get_or_build(STAGE, KEY, MATERIAL, build_files)[1] == "built"
    assert_intact(cache)


def test_stale_temp_folder_is_removed_by_next_builder_of_that_key(cache):
    stage_dir = cache.root / STAGE
    stale = stage_dir / f".tmp-{KEY}-999999-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"partial")
    other_key = make_key({"other": True})
    others = stage_dir / f".tmp-{other_key}-999999-cafef00d"  # another key's build: not ours to remove
    others.mkdir()

    art, status = cache.get_or_build(STAGE, KEY, MATERIAL, build_files)
    assert status == "built"
    assert not stale.exists()
    assert others.is_dir()
    assert_intact(cache)
    assert "model.onnx" in art.manifest["files"] and art.path("model.onnx").read_bytes() != b"partial"


_KILLED_BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from d2build.cache import Cache

    root, key, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def build(out):
        (out / "model.onnx").write_bytes(b"partial" * 1000)
        marker.write_text(str(out))
        time.sleep(120)
        return {}

    Cache(root).get_or_build("export", key, {"killed": True}, build)
""")


def test_killed_build_leaves_nothing_published_and_next_build_cleans_up(cache, tmp_path):
    marker = tmp_path / "building"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILDER, str(cache.root), KEY, str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "the builder exited before it started building"
            assert time.monotonic() < deadline, "the builder never started building"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    tmp = Path(marker.read_text())
    assert tmp.parent == cache.root / STAGE and tmp.name.startswith(f".tmp-{KEY}-{proc.pid}-")
    assert (tmp / "model.onnx").is_file()  # the killed build's leftovers ...
    assert not cache.entry_dir(STAGE, KEY).exists()  # ... were never published
    assert cache.lookup(STAGE, KEY) is None

    build = Counting()
    art, status = cache.get_or_build(STAGE, KEY, MATERIAL, build)  # the kernel freed the dead builder's lock
    assert (status, build.calls) == ("built", 1)
    assert not tmp.exists()
    assert leftovers(cache) == []
    assert_intact(cache)


# --------------------------------------------------------------------------- #
# concurrency
# --------------------------------------------------------------------------- #

_RACER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from d2build.cache import Cache

    root, key, counter, start_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])

    def build(out):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (out / "model.onnx").write_bytes(os.urandom(4096))  # two builds could never agree on this
        return {"builder": os.getpid()}

    waited = []
    while time.time() < start_at:
        time.sleep(0.002)
    art, status = Cache(root).get_or_build("export", key, {"race": True}, build,
                                           on_wait=lambda: waited.append(True))
    print(json.dumps({"status": status, "dir": str(art.dir), "manifest": art.manifest, "waited": bool(waited)}))
""")


def test_eight_processes_one_key_one_build(cache, tmp_path):
    counter = tmp_path / "builds.txt"
    start_at = time.time() + 2.0  # every process is up and spinning by then, so they all ask at once
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(cache.root), KEY, str(counter), str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert len(counter.read_text().splitlines()) == 1  # exactly one build
    statuses = sorted(r["status"] for r in results)
    assert statuses == ["built"] + ["hit"] * 7
    assert len({json.dumps(r["manifest"], sort_keys=True) for r in results}) == 1  # all see the same entry
    assert len({r["dir"] for r in results}) == 1
    assert any(r["waited"] for r in results)  # the others were told someone else was building
    assert not any(r["waited"] for r in results if r["status"] == "built")
    assert leftovers(cache) == []
    art = cache.lookup(STAGE, KEY)
    assert art is not None and art.manifest == results[0]["manifest"]


def test_on_wait_is_called_while_another_holds_the_key(cache):
    stage_dir = cache.root / STAGE
    stage_dir.mkdir(parents=True)
    holder = FileLock(str(stage_dir / f".{KEY}.lock"))  # a separate lock object: as another builder's
    holder.acquire()
    waiting = threading.Event()
    result: dict = {}

    def worker() -> None:
        result["status"] = cache.get_or_build(STAGE, KEY, MATERIAL, build_files, on_wait=waiting.set)[1]

    t = threading.Thread(target=worker, daemon=True)
    try:
        t.start()
        assert waiting.wait(10), "on_wait was not called while the key was locked"
        time.sleep(0.2)
        assert t.is_alive() and "status" not in result  # still blocked on the lock
    finally:
        holder.release()
    t.join(10)
    assert result["status"] == "built"

    calls = []
    cache.get_or_build(STAGE, make_key({"free": 1}), {"free": 1}, build_files, on_wait=lambda: calls.append(1))
    assert calls == []  # an uncontended build does not claim to wait


# --------------------------------------------------------------------------- #
# unusable cache folder
# --------------------------------------------------------------------------- #


def test_unwritable_cache_dir_names_folder_and_setting(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a path below a regular file fails for everyone (NotADirectoryError)
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file, not a folder")
        root = blocker / "cache"
        restore = None
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o500)
        root = parent / "cache"
        restore = parent
    try:
        cache = Cache(root)
        build = Counting()
        with pytest.raises(CacheError) as info:
            cache.get_or_build(STAGE, KEY, MATERIAL, build)
        assert build.calls == 0
        msg = str(info.value)
        assert str(cache.root) in msg
        assert "set cache.dir=" in msg
        assert isinstance(info.value.__cause__, NotADirectoryError if restore is None else PermissionError)
    finally:
        if restore is not None:
            restore.chmod(0o700)


# --------------------------------------------------------------------------- #
# keys
# --------------------------------------------------------------------------- #


def test_make_key_is_stable_under_insertion_order_and_sensitive_to_values():
    a = {"stage": "surgery", "config": {"nms": {"iou": 0.5, "score": 0.05}, "input": [640, 640]}, "version": 1}
    b = {"version": 1, "config": {"input": [640, 640], "nms": {"score": 0.05, "iou": 0.5}}, "stage": "surgery"}
    assert list(a) != list(b)
    assert make_key(a) == make_key(b)
    assert len(make_key(a)) == 64 and int(make_key(a), 16) >= 0
    assert make_key(a) == make_key(json.loads(json.dumps(a)))  # survives a JSON round trip (the manifest)

    changed = [
        {**a, "version": 2},
        {**a, "config": {**a["config"], "nms": {"iou": 0.6, "score": 0.05}}},
        {**a, "config": {**a["config"], "input": [672, 672]}},
        {**a, "config": {**a["config"], "input": [640]}},
        {**a, "stage": "verify"},
        {**a, "extra": None},
    ]
    keys = {make_key(c) for c in changed}
    assert make_key(a) not in keys
    assert len(keys) == len(changed)
