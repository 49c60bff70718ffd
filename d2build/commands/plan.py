"""d2build plan [-v] KEY=VALUE ...: the DAG with each stage's key and whether it would hit or build.

Composes the recipe as a run does (same overrides, same checks; -v: with the library's own message
behind a problem), then prints one line per stage: its key, `build`, `hit` or `skip` (and why), and
the stages it needs. Nothing is built or written. (From Python: d2build.plan, which this prints.)
"""

from __future__ import annotations

from d2build.commands._common import print_problems, split_verbose

SUMMARY = "show the DAG: each stage's key and hit/build; runs nothing"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from d2build.api.builds import compose_recipe, plan_recipe
    from d2build.recipe import RecipeError

    argv, verbose = split_verbose(argv)
    try:
        planned = plan_recipe(compose_recipe(argv))
    except RecipeError as e:
        print_problems(e, verbose)
        return 2
    print(f"recipe {planned.config.name} ({planned.config.source}), cache {planned.cache_dir}")
    print(planned)
    return 0
