"""d2build plan KEY=VALUE ...: the DAG with each stage's key and whether it would hit or build."""

from __future__ import annotations

from pathlib import Path

from d2build.commands._common import compose_or_report

SUMMARY = "show the DAG: each stage's key and hit/build; runs nothing"


def main(argv: list[str]) -> int:
    from d2build.runner import format_plan, plan

    recipe = compose_or_report(argv)
    if recipe is None:
        return 2
    print(f"recipe {recipe.name} ({recipe.source}), cache {Path(recipe.cache.dir).resolve()}")
    print(format_plan(plan(recipe)))
    return 0
