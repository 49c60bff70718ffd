"""The stage contract.

A stage is a small object: a kind, a VERSION bumped by hand whenever its output for the same
inputs would change, the typed slice of the recipe it reads (recipe.py), the nodes it consumes and
the packages whose versions change its output. `run` gets its slice and its inputs, writes files
only into the fresh `out_dir` it is given and returns JSON-able facts for the manifest. Stages never
see the whole Hydra config.
"""

from __future__ import annotations

import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Mapping

from d2build.cache import Artifact, Cache
from d2build.recipe import Problem, Recipe, as_key_data

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
        log.info("  %-15s %6.1fs  %s", self.stage, time.monotonic() - self.t0, what)

    def count(self, i: int, n: int, what: str) -> None:
        self.step(f"[{i}/{n}] {what}")


class Stage:
    """One node of the DAG.

    `kind` names what the stage does (its cache folder, the key's "stage"); `name` names the node
    (the kind, or `kind[consumer]` for a graph derived for one consumer, see pipeline.py). `needs`
    maps the roles `run` reads (`inputs["graph"]`) to the nodes that produce them: their keys are part
    of this node's key. `after` names nodes that must succeed first without feeding it (not keyed).
    """

    kind: ClassVar[str]
    VERSION: ClassVar[int]
    tools: ClassVar[tuple[str, ...]] = ()

    def __init__(self, needs: Mapping[str, str] | None = None, *, name: str | None = None,
                 after: tuple[str, ...] = ()):
        self.name = name or self.kind
        self.needs: dict[str, str] = dict(needs or {})
        self.after = after

    @property
    def upstream(self) -> tuple[str, ...]:
        """Every node this one waits for."""
        return (*self.needs.values(), *self.after)

    def slice(self, recipe: Recipe) -> Any:
        """What the stage reads of the recipe: a frozen dataclass of recipe.py (hashed for the key)."""
        raise NotImplementedError

    def skip_reason(self, recipe: Recipe) -> str | None:
        """Why this stage cannot run here (e.g. no TensorRT); None when it can."""
        return None

    def run(self, cfg: Any, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        """Build the entry from `cfg` (this stage's slice) and `inputs` (role -> artifact) into `out_dir`;
        return JSON-able facts for the manifest."""
        raise NotImplementedError

    def preflight(self, recipe: Recipe) -> list[Problem]:
        """Problems this stage can see in the recipe's inputs before anything runs, where the schema
        cannot (they need Detectron2, say); [] when none."""
        return []

    def describe(self, info: dict[str, Any], folder: Path) -> str | None:
        """One line for the console about a built or reused entry (its verdict, say); None: its folder."""
        return None

    def key_material(self, cfg: Any, upstream_keys: Mapping[str, str]) -> dict[str, Any]:
        return {
            "stage": self.kind,
            "version": self.VERSION,
            "config": as_key_data(cfg),
            "upstream": {role: upstream_keys[node] for role, node in self.needs.items()},
            "tools": {t: tool_version(t) for t in self.tools},
        }


def tool_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"
