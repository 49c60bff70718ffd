"""Sub-commands other than a run: each module here has `main(argv: list[str]) -> int` and a
one-line `SUMMARY`; `d2build NAME ...` dispatches to `d2build.commands.NAME`. A run (the default)
is the Hydra app in d2build/cli.py.
"""

from __future__ import annotations

import importlib
import pkgutil


def available() -> dict[str, str]:
    """Command name -> one-line summary (module docstrings are not imported for speed)."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            out[info.name] = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SUMMARY", "")
    return dict(sorted(out.items()))


def dispatch(name: str, argv: list[str]) -> int:
    return importlib.import_module(f"{__name__}.{name}").main(argv)
