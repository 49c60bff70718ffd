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

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The published entry if present and intact; None if absent or if any digest differs."""
        d = self.entry_dir(stage, key)
        problem = self._check(d)
        if problem is None:
            return Artifact(stage, key, d, json.loads((d / MANIFEST).read_text()))
        return None

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
        stage_dir = self.root / stage
        self._mkdir(stage_dir)
        lock = FileLock(str(stage_dir / f".{key}.lock"))
        try:  # `lock.is_locked` only says whether *this* object holds it: try once to see who does
            held = lock.acquire(blocking=False)
        except Timeout:
            if on_wait is not None:
                on_wait()
            held = lock.acquire()
        with held:
            hit = self.lookup(stage, key)  # built by someone else while we waited
            if hit is not None:
                return hit, "hit"
            final = self.entry_dir(stage, key)
            self._remove_stale(stage_dir, key, final)
            tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._mkdir(tmp)
            try:
                t0 = time.monotonic()
                info = build(tmp) or {}
                seconds = time.monotonic() - t0
                manifest = self._write_manifest(tmp, stage, key, material, info, seconds)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
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
            reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
            raise CacheError(
                f"cache folder {d} is not writable ({reason}); set cache.dir=/a/writable/folder "
                "or free some space"
            ) from e
