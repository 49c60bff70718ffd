"""The stage contract.

A stage is a small object: a name, a VERSION bumped by hand whenever its output for the same
inputs would change, the slice of the recipe it reads, the stages it consumes and the packages
whose versions change its output. `run` writes files only into the fresh `out_dir` it is given and
returns JSON-able facts for the manifest. Stages never see the whole Hydra config.
"""

from __future__ import annotations

import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from d2build.cache import Artifact, Cache
from d2build.recipe import Recipe

log = logging.getLogger("d2build")


class StageFailed(RuntimeError):
    """A stage ran and its output is wrong (e.g. verify thresholds not met); nothing is published.

    `files` (name -> text) are written into the run directory so the evidence is not lost.
    """

    def __init__(self, message: str, files: dict[str, str] | None = None):
        super().__init__(message)
        self.files = files or {}


class Context:
    """What a running stage gets besides its config and inputs: progress lines (`step("tracing")`,
    `count(i, n, what)` in loops) and the cache it is built into (for the cache's own locks)."""

    def __init__(self, stage: str, cache: Cache | None = None):
        self.stage = stage
        self.cache = cache
        self.t0 = time.monotonic()

    def step(self, what: str) -> None:
        log.info("  %-11s %6.1fs  %s", self.stage, time.monotonic() - self.t0, what)

    def count(self, i: int, n: int, what: str) -> None:
        self.step(f"[{i}/{n}] {what}")


class Stage:
    name: ClassVar[str]
    VERSION: ClassVar[int]
    needs: ClassVar[tuple[str, ...]] = ()
    tools: ClassVar[tuple[str, ...]] = ()

    def config_slice(self, recipe: Recipe) -> dict[str, Any]:
        raise NotImplementedError

    def skip_reason(self, recipe: Recipe) -> str | None:
        """Why this stage cannot run here (e.g. no TensorRT); None when it can."""
        return None

    def run(self, cfg: dict[str, Any], inputs: dict[str, Artifact], out_dir: Path,
            ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def preflight(self, recipe: Recipe) -> list[Any]:
        """Problems (schema.Problem) this stage can see in the recipe's inputs before anything runs, where
        the schema cannot (they need Detectron2, say); [] when none."""
        return []

    def describe(self, info: dict[str, Any], folder: Path) -> str | None:
        """One line for the console about a built or reused entry (its verdict, say); None: its folder."""
        return None

    def key_material(self, recipe: Recipe, upstream_keys: dict[str, str]) -> dict[str, Any]:
        return {
            "stage": self.name,
            "version": self.VERSION,
            "config": self.config_slice(recipe),
            "upstream": {n: upstream_keys[n] for n in self.needs},
            "tools": {t: tool_version(t) for t in self.tools},
        }


def config_ref(config: str) -> dict[str, Any]:
    """How a stage's key names the Detectron2 config: a model-zoo name as it is (its content is fixed by
    the sal-detectron2 version), a local .yaml also by the sha256 of it and its _BASE_ chain, so editing
    a user's config rebuilds what depends on it."""
    import hashlib

    path = Path(config).expanduser()
    if not path.is_file():
        return {"config": config}
    h = hashlib.sha256()
    for p in _config_chain(path):
        h.update(p.read_bytes())
    return {"config": config, "config_sha256": h.hexdigest()}


def _config_chain(path: Path, depth: int = 0) -> list[Path]:
    import yaml

    class Loader(yaml.SafeLoader):  # Detectron2 dumps may hold !!python tags: never construct them
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    tree = yaml.load(path.read_text(), Loader=Loader) or {}  # noqa: S506 - a SafeLoader subclass
    base = tree.get("_BASE_") if isinstance(tree, dict) else None
    if not base or depth > 10:
        return [path]
    base_path = (path.parent / Path(base).expanduser()).resolve()
    return [path, *(_config_chain(base_path, depth + 1) if base_path.is_file() else [])]


def tool_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"
