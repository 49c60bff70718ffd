"""d2build validate [RECIPE ...]: compose, type-check and plan every recipe; one line per problem."""

from __future__ import annotations

import sys
from pathlib import Path

from d2build.commands._common import compose_or_report

SUMMARY = "check recipes (default: all shipped and ./recipes ones)"


def main(argv: list[str]) -> int:
    from d2build.compose import list_recipes
    from d2build.runner import plan

    known = list_recipes()
    names = argv or sorted(known)
    bad = 0
    for name in names:
        stem = Path(name).stem if name.endswith(".yaml") else name
        if stem not in known:
            print(f"{name}: no such recipe (known: {', '.join(sorted(known))})", file=sys.stderr)
            bad += 1
            continue
        recipe = compose_or_report([f"recipe={stem}"])
        if recipe is None:
            bad += 1
        else:
            stages = " -> ".join(p.name for p in plan(recipe))
            print(f"ok  {stem:<20} {recipe.source}  ({stages})")
    return 1 if bad else 0
