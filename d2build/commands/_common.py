"""Helpers shared by sub-commands."""

from __future__ import annotations

import sys


def print_problems(err) -> None:
    print(f"d2build: the recipe cannot be built ({len(err.problems)} problem(s)):", file=sys.stderr)
    for p in err.problems:
        print(f"  {p}", file=sys.stderr)


def compose_or_report(overrides: list[str]):
    """A checked Recipe, or None after printing why not (one line per problem)."""
    from d2build.compose import compose
    from d2build.recipe import RecipeError

    try:
        return compose(overrides)
    except RecipeError as e:
        print_problems(e)
    return None
