"""Helpers shared by sub-commands and the run: how a rejected recipe is reported."""

from __future__ import annotations

import sys

VERBOSE_FLAGS = ("-v", "--verbose")


def print_problems(err, verbose: bool = False) -> None:
    """One line for one problem (`d2build: SOURCE: KEY: what. Fix: what to do`); a count and one line each
    for several. `verbose` (-v): then the library's own message (Hydra's, OmegaConf's) that led to it."""
    if len(err.problems) == 1:
        print(f"d2build: {err.problems[0]}", file=sys.stderr)
    else:
        print(f"d2build: the recipe cannot be built ({len(err.problems)} problems):", file=sys.stderr)
        for p in err.problems:
            print(f"  {p}", file=sys.stderr)
    cause = err.__cause__
    if verbose and cause is not None:
        import traceback

        print(f"d2build -v: {type(cause).__module__}.{type(cause).__name__}, as raised:", file=sys.stderr)
        print("".join(traceback.format_exception(cause)).rstrip(), file=sys.stderr)


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """argv without -v/--verbose, and whether it was there (or run.verbose=true)."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    return rest, len(rest) != len(argv) or "run.verbose=true" in rest


def compose_or_report(overrides: list[str], verbose: bool = False):
    """A checked Recipe, or None after printing why not (one line per problem)."""
    from d2build.compose import compose
    from d2build.recipe import RecipeError

    try:
        return compose(overrides)
    except RecipeError as e:
        print_problems(e, verbose)
    return None
