"""d2build validate [RECIPE|FILE|FOLDER ...]: compose, check and plan recipes; one line per problem.

With no argument: every shipped recipe and every one in ./recipes. An argument is a recipe name, a
recipe file (anywhere: its folder is searched first, so it wins a name clash) or a folder of them.
Each recipe goes through what a run does before its first stage: YAML parsing, the `@package
_global_` header, Hydra composition (defaults list, group overrides, interpolations), the schema
and its rules, and the plan (every stage's key). No weights are read, torch is not imported, and a
recipe takes a fraction of a second, so CI can run it on every change to recipes/.

Output: `ok  NAME  FILE  (stages)` on stdout per good recipe; for a bad one a header line and then
one line per problem on stderr, `FILE: KEY: what is wrong. Fix: what to do`; exit 1 if any recipe
has a problem, 2 on bad usage.
"""

from __future__ import annotations

import difflib
import re
import sys
import time
from pathlib import Path

SUMMARY = "check recipes (default: all shipped and ./recipes ones; or names, files, folders): one line per problem"

HEADER = "@package _global_"


def _display(path: Path) -> str:
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
        return str(rel)
    except ValueError:
        return str(path)


def targets(args: list[str]) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """(name, file, folder to search first) per recipe to check, and usage errors."""
    from d2build.compose import list_recipes

    known = list_recipes()
    out: list[tuple[str, Path, Path | None]] = []
    errors: list[str] = []
    if not args:
        return [(name, f, None) for name, f in sorted(known.items())], errors
    for a in args:
        p = Path(a)
        if p.is_dir():
            files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not files:
                errors.append(f"{a}: a folder without recipe files (*.yaml)")
            out += [(f.stem, f, p) for f in files]
        elif p.is_file():
            out.append((p.stem, p, p.parent))
        elif a in known:
            out.append((a, known[a], None))
        elif a.endswith((".yaml", ".yml")) and p.stem in known and not p.parent.name:
            out.append((p.stem, known[p.stem], None))
        else:
            near = difflib.get_close_matches(a, list(known), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            errors.append(f"{a}: no such recipe, file or folder ({hint}known recipes: {', '.join(sorted(known))})")
    return out, errors


# ---------------------------------------------------------------- one recipe

def check(name: str, file: Path, first_dir: Path | None):
    """Return (Recipe, planned stages, []) or (None, None, [Problem, ...])."""
    from d2build.compose import extra_recipe_dirs
    from d2build.recipe import Problem

    src = _display(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, None, [Problem(src, "(file)", f"cannot be read ({e})", "make it a readable UTF-8 YAML file")]
    problems = _yaml_problems(src, text)
    if problems:
        return None, None, problems
    if not _has_global_header(text):
        return None, None, [Problem(src, "@package", "the recipe has no `# @package _global_` header, so "
                                    "Hydra puts its keys under `recipe.` where nothing reads them",
                                    f"make `# {HEADER}` the first line")]
    with extra_recipe_dirs([first_dir] if first_dir is not None else []):
        return _compose_and_plan(name, src)


def _has_global_header(text: str) -> bool:
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            return False
        if re.fullmatch(r"#\s*@package\s+_global_\s*", s):
            return True
    return False


def _yaml_problems(src: str, text: str):
    import yaml
    from omegaconf import OmegaConf

    from d2build.recipe import Problem

    try:
        OmegaConf.create(text)  # OmegaConf's loader: YAML errors and duplicate keys, as Hydra sees them
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line if mark is not None else 0
        key = _key_at_line(text, line)
        what = e.problem or e.context or "YAML syntax error"
        return [Problem(src, key, f"YAML error at line {line + 1}: {what}",
                        "fix the indentation or quoting there (keys of one section line up; "
                        "each key once per section)")]
    except yaml.YAMLError as e:
        return [Problem(src, "(yaml)", f"YAML error: {e}", "fix the YAML syntax")]
    except Exception as e:  # noqa: BLE001 - OmegaConf's own errors (e.g. a top-level list)
        return [Problem(src, "(yaml)", f"not a mapping of keys ({type(e).__name__}: {e})",
                        "a recipe is a YAML mapping: model:, surgery:, ...")]
    return []


def _key_at_line(text: str, line: int) -> str:
    """The dotted key of block-style YAML line `line` (0-based), from the indentation above it."""
    lines = text.splitlines()
    if not 0 <= line < len(lines):
        return "(yaml)"
    pat = re.compile(r"^(\s*)(?:-\s+)?([A-Za-z0-9_.\-/]+)\s*:")
    m = pat.match(lines[line])
    if not m:  # e.g. an error reported on the line after the key
        for j in range(line - 1, -1, -1):
            m = pat.match(lines[j])
            if m:
                line = j
                break
        else:
            return "(yaml)"
    indent, path = len(m.group(1)), [m.group(2)]
    for j in range(line - 1, -1, -1):
        mm = pat.match(lines[j])
        if mm and not lines[j].lstrip().startswith("#") and len(mm.group(1)) < indent:
            indent = len(mm.group(1))
            path.insert(0, mm.group(2))
            if indent == 0:
                break
    return ".".join(path)


def _compose_and_plan(name: str, src: str):
    from d2build.compose import RECIPE_GROUP, compose
    from d2build.runner import plan
    from d2build.recipe import Problem, RecipeError

    try:
        recipe = compose([f"{RECIPE_GROUP}={name}"])
    except RecipeError as e:
        return None, None, e.problems
    try:
        planned = plan(recipe)
    except Exception as e:  # noqa: BLE001 - a stage that cannot even key the recipe
        return None, None, [Problem(src, "(plan)", f"the plan cannot be made ({type(e).__name__}: {e})",
                                    "if the message names a recipe value, fix it; otherwise d2build itself is "
                                    "broken here (bash scripts/setup.sh, or report it)")]
    return recipe, planned, []


# ---------------------------------------------------------------- command

def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    t0 = time.monotonic()
    todo, errors = targets(argv)
    for line in errors:
        print(line, file=sys.stderr)
    bad = 0
    for name, file, first_dir in todo:
        recipe, planned, problems = check(name, file, first_dir)
        if problems:
            bad += 1
            print(f"d2build: {_display(file)} cannot be built ({len(problems)} problem(s)):", file=sys.stderr)
            for p in problems:
                print(str(p), file=sys.stderr)
        else:
            stages = " -> ".join(p.name for p in planned)
            print(f"ok  {name:<20} {recipe.source}  ({stages})")
    n = len(todo)
    seconds = time.monotonic() - t0
    if bad or errors:
        print(f"validate: {n} recipe(s), {n - bad} ok, {bad} with problems ({seconds:.1f}s)", file=sys.stderr)
        return 2 if errors and not todo else 1
    print(f"validate: {n} recipe(s) ok ({seconds:.1f}s)")
    return 0
