"""Content-addressed artifact store: outputs/cache/<stage>/<key>/ with a manifest of file digests.

An entry is published by building it in a sibling temp folder and renaming it into place under a
per-key file lock, so a reader sees a whole entry or none; a killed build leaves only a temp folder,
which the next builder of that key removes. A hit re-hashes every file against the manifest: an
entry whose files were edited after publication is moved aside and rebuilt, never used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

MANIFEST = "manifest.json"
_CHUNK = 1 << 22
_PROBE_BYTES = 1 << 20  # after a failed build: can the cache folder still take a 1 MiB file?
log = logging.getLogger("d2build")


class CacheError(RuntimeError):
    """The cache folder cannot be used (unwritable, full disk); says which folder and what to do."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def make_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A published entry: its folder and manifest. Stages read upstream files through `path()`."""

    stage: str
    key: str
    dir: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise KeyError(f"{self.stage} artifact {self.key[:12]} has no file {name!r}")
        return self.dir / name

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.get("info", {})


class Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    # ---------------------------------------------------------------- reading

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def lock(self, stage: str, key: str) -> FileLock:
        """The per-key lock every builder (and `cache gc`) of this entry takes."""
        return FileLock(str(self.stage_dir(stage) / f".{key}.lock"))

    def gpu_lock(self, identity: str) -> FileLock:
        """The lock GPU jobs (engine builds, benchmarks) of every process using this cache take per GPU."""
        self._mkdir(self.root)
        return FileLock(str(self.root / f".gpu-{identity}.lock"))

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The published entry if present and intact; None if absent or if any digest differs."""
        d = self.entry_dir(stage, key)
        return self._hit(stage, key, d) if self.check(stage, key) is None else None

    def check(self, stage: str, key: str) -> str | None:
        """None when the entry is published and every file matches its digest; else what is wrong."""
        return self._check(self.entry_dir(stage, key))

    @staticmethod
    def _hit(stage: str, key: str, d: Path) -> Artifact:
        """An intact entry as an Artifact, its last use recorded for `d2build cache gc --older-than`."""
        try:
            os.utime(d / MANIFEST)
        except OSError:  # a read-only cache is fine
            pass
        return Artifact(stage, key, d, json.loads((d / MANIFEST).read_text()))

    def _check(self, d: Path) -> str | None:
        mf = d / MANIFEST
        if not mf.is_file():
            return "absent"
        try:
            manifest = json.loads(mf.read_text())
            files = {name: (meta["size"], meta["sha256"]) for name, meta in manifest["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or JSON of the wrong shape
            return "unreadable manifest"
        for name, (size, sha256) in files.items():
            p = d / name
            if not p.is_file() or p.stat().st_size != size:
                return f"{name} missing or resized"
            if file_digest(p) != sha256:
                return f"{name} digest mismatch"
        return None

    def is_published(self, stage: str, key: str) -> bool:
        """Cheap check for `plan`: the manifest exists (digests are checked when it is used)."""
        return (self.entry_dir(stage, key) / MANIFEST).is_file()

    # ---------------------------------------------------------------- writing

    def get_or_build(
        self,
        stage: str,
        key: str,
        material: dict[str, Any],
        build: Callable[[Path], dict[str, Any]],
        on_wait: Callable[[], None] | None = None,
    ) -> tuple[Artifact, str]:
        """Return (artifact, "hit" | "built"). `build(tmp_dir)` writes files and returns manifest info."""
        hit = self.lookup(stage, key)
        if hit is not None:
            return hit, "hit"
        stage_dir = self.stage_dir(stage)
        self._mkdir(stage_dir)
        lock = self.lock(stage, key)
        try:  # `lock.is_locked` only says whether *this* object holds it: try once to see who does
            held = lock.acquire(blocking=False)
        except Timeout:
            if on_wait is not None:
                on_wait()
            held = lock.acquire()
        with held:
            final = self.entry_dir(stage, key)
            problem = self._check(final)  # built by someone else while we waited?
            if problem is None:
                return self._hit(stage, key, final), "hit"
            if final.exists():
                log.warning("%s %s: the published entry fails its check (%s); moving it aside and rebuilding",
                            stage, key[:12], problem)
            self._remove_stale(stage_dir, key, final)
            tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._mkdir(tmp)
            try:
                t0 = time.monotonic()
                info = build(tmp) or {}
                seconds = time.monotonic() - t0
                manifest = self._write_manifest(tmp, stage, key, material, info, seconds)
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    # Published meanwhile by a builder our lock did not exclude (file locks that do not work
                    # across the machines sharing an NFS cache, or a stale NFS directory cache): use theirs.
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    theirs = self.lookup(stage, key)
                    if theirs is None:
                        raise
                    log.warning("%s %s: published by another builder while this one built; using theirs",
                                stage, key[:12])
                    shutil.rmtree(tmp, ignore_errors=True)
                    return theirs, "hit"
            except BaseException as e:
                unusable = self._storage_problem(stage_dir, tmp, e) if isinstance(e, Exception) else None
                shutil.rmtree(tmp, ignore_errors=True)
                if unusable is not None:
                    raise unusable from e
                raise
        return Artifact(stage, key, final, manifest), "built"

    def _remove_stale(self, stage_dir: Path, key: str, final: Path) -> None:
        """Under the key's lock: temp folders of killed builds, and a corrupt published entry."""
        for leftover in stage_dir.glob(f".tmp-{key}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():
            trash = stage_dir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _write_manifest(self, tmp: Path, stage: str, key: str, material: dict[str, Any],
                        info: dict[str, Any], seconds: float) -> dict[str, Any]:
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = {"sha256": file_digest(p), "size": p.stat().st_size}
        manifest = {
            "stage": stage,
            "key": key,
            "material": material,
            "files": files,
            "info": info,
            "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return manifest

    def _mkdir(self, d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise _cache_error(d, e, "is not writable") from e

    def _storage_problem(self, stage_dir: Path, tmp: Path, e: Exception) -> CacheError | None:
        """A build failed: was it the cache's storage (full, read-only, file-size limit)? Libraries often
        hide the errno (torch.save says `unexpected pos`), so look at the chain, then try a write."""
        seen, cur = set(), e
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if isinstance(cur, CacheError):
                return None
            if isinstance(cur, OSError) and cur.errno in _STORAGE_ERRNOS:
                where = os.path.abspath(cur.filename) if isinstance(cur.filename, str) else None
                if where is None and cur.errno in _FULL_OR_READ_ONLY or (
                        where is not None and where.startswith(str(self.root) + os.sep)):
                    return _cache_error(stage_dir, cur, "could not take the build")
            cur = cur.__cause__ or cur.__context__
        if type(e).__name__ == "StageFailed":  # the stage judged its own output: not a storage problem
            return None
        probe = stage_dir / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * _PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            return _cache_error(stage_dir, err, "could not take the build")
        finally:
            probe.unlink(missing_ok=True)
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        except (ImportError, OSError, ValueError):
            return None
        if limit != resource.RLIM_INFINITY and any(p.is_file() and p.stat().st_size >= limit for p in tmp.rglob("*")):
            return _cache_error(stage_dir, OSError(errno.EFBIG, os.strerror(errno.EFBIG)), "could not take the build")
        return None

    # ---------------------------------------------------------------- listing and removing

    def entries(self, stage: str | None = None, check: bool = False) -> list["Entry"]:
        """Published entries (optionally of one stage); `check` re-hashes every file (slow)."""
        out: list[Entry] = []
        if not self.root.is_dir():
            return out
        for sd in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if stage and sd.name != stage:
                continue
            for d in sorted(p for p in sd.iterdir() if p.is_dir() and not p.name.startswith(".")):
                mf = d / MANIFEST
                created, state, used = "-", "ok", None
                try:
                    used = mf.stat().st_mtime
                    created = json.loads(mf.read_text()).get("created", "-")
                except FileNotFoundError:
                    state = "no manifest"
                except (OSError, ValueError, AttributeError):
                    state = "unreadable manifest"
                if check and state == "ok":
                    state = self._check(d) or "ok"
                out.append(Entry(sd.name, d.name, d, dir_size(d), created,
                                 used if used is not None else d.stat().st_mtime, state))
        return out

    def leftovers(self) -> list["Leftover"]:
        """Temp folders of killed builds (`.tmp-<key>-*`) and of interrupted removals (`.trash-*`)."""
        if not self.root.is_dir():
            return []
        out = []
        for sd in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for p in sorted(sd.iterdir()):
                if p.is_dir() and p.name.startswith((".tmp-", ".trash-")):
                    kind, _, rest = p.name[1:].partition("-")
                    out.append(Leftover(sd.name, rest.split("-", 1)[0], p, kind))
        return out

    def remove(self, stage: str, key: str, paths: list[Path] | None = None) -> bool:
        """Remove an entry (or given temp folders of its key) under the key's lock, renaming each aside
        first so a concurrent reader sees it whole or not at all; False when the lock is held."""
        stage_dir = self.stage_dir(stage)
        lock = self.lock(stage, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            for p in paths if paths is not None else [self.entry_dir(stage, key)]:
                if not p.exists():
                    continue
                trash = stage_dir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(p, trash)
                shutil.rmtree(trash, ignore_errors=True)
        finally:
            lock.release()
        return True


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    dir: Path
    size: int
    created: str
    last_used: float  # epoch seconds: the last build or hit (a hit refreshes the manifest's mtime)
    state: str  # ok | no manifest | unreadable manifest | (checked) what fails the digest check


@dataclass(frozen=True)
class Leftover:
    stage: str
    key: str
    dir: Path
    kind: str  # tmp (a killed build) | trash (an interrupted removal)


def dir_size(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _cache_error(d: Path, e: OSError, what: str) -> CacheError:
    """One sentence: which folder, what is wrong with it, what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason, fix = "the disk is full", "free some space there, or set cache.dir=/a/folder/with/space"
    elif e.errno == errno.EFBIG:
        reason, fix = ("a file hit the file-size limit (ulimit -f)",
                       "raise the limit (ulimit -f unlimited), or set cache.dir=/another/folder")
    elif e.errno == errno.EROFS:
        reason, fix = "the file system is read-only", "set cache.dir=/a/writable/folder"
    elif e.errno in (errno.EACCES, errno.EPERM):
        reason, fix = "permission denied", "make it writable for this user, or set cache.dir=/a/writable/folder"
    elif e.errno == errno.ENOTDIR:
        reason, fix = "a part of its path is a file, not a folder", "set cache.dir=/a/writable/folder"
    else:
        reason, fix = e.strerror or str(e), "set cache.dir=/a/writable/folder or free some space"
    return CacheError(f"cache folder {d} {what} ({reason}): {fix}")
