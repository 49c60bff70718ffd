"""d2build plan [-v] KEY=VALUE ...: the DAG with each stage's key and whether it would hit or build.

Composes the recipe as a run does (same overrides, same checks; -v: with the library's own message
behind a problem), then prints one line per stage: its key, `build`, `hit` or `skip` (and why), and
the stages it needs. Nothing is built or written.
"""

from __future__ import annotations

from pathlib import Path

from d2build.commands._common import compose_or_report, split_verbose

SUMMARY = "show the DAG: each stage's key and hit/build; runs nothing"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from d2build.runner import format_plan, plan

    argv, verbose = split_verbose(argv)
    recipe = compose_or_report(argv, verbose)
    if recipe is None:
        return 2
    print(f"recipe {recipe.name} ({recipe.source}), cache {Path(recipe.cache.dir).resolve()}")
    print(format_plan(plan(recipe)))
    return 0
