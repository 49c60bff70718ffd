"""d2build cache ls|du|gc: look at the artifact cache and collect what is no longer wanted.

    d2build cache ls [--stage S] [--check]       one line per entry: stage, key, size, created, last used
    d2build cache du                             size per stage, leftovers of killed builds, total
    d2build cache gc [--older-than 7d] [--keep-referenced [--overrides "K=V ..."]...] [--dry-run]

Every form takes `--dir DIR` (or `cache.dir=DIR`); the default is conf/config.yaml's cache.dir.

gc removes entries that match every criterion given:
  --older-than AGE    not used for AGE (s, m, h, d, w: 90m, 12h, 7d). "Used" is the last build or hit:
                      a hit refreshes the manifest's modification time.
  --keep-referenced   not referenced by any current recipe: each shipped and ./recipes recipe is composed
                      (with no overrides, and once more per --overrides set; a set with recipe=NAME is
                      composed once) and its plan's keys are kept.
An entry whose key lock is held (a build of it in progress) is never removed; leftovers of killed
builds (`.tmp-<key>-*`) are removed when their key's lock is free, and `.trash-*` folders always.
Removal renames the entry aside under its lock first, so a concurrent reader sees it whole or not
at all. A job that has already looked up an entry reads it without a lock: combine
--keep-referenced with --older-than (e.g. 1d) when builds may be running.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from d2build.cache import dir_size

SUMMARY = "list (ls), size (du) or garbage-collect (gc --older-than 7d | --keep-referenced) the artifact cache"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 90m, 12h, 7d or 2w")
    return float(m.group(1)) * _UNITS[m.group(2)]


def default_cache_dir() -> str:
    from d2build.compose import conf_default

    return str(conf_default("cache.dir"))


def entries(root: Path, stage: str | None = None, check: bool = False):
    from d2build.cache import Cache

    return Cache(root).entries(stage, check)


def leftovers(root: Path):
    from d2build.cache import Cache

    return Cache(root).leftovers()


# ---------------------------------------------------------------- ls, du

def cmd_ls(root: Path, args) -> int:
    now = time.time()
    es = entries(root, args.stage, args.check)
    print(f"cache {root}")
    print(f"{'stage':<10} {'key':<14} {'size':>10}  {'created':<25} {'last used':>10}  state")
    for e in sorted(es, key=lambda e: (e.stage, e.last_used)):
        print(f"{e.stage:<10} {e.key[:12]:<14} {human(e.size):>10}  {e.created:<25} {age(now - e.last_used) + ' ago':>10}"
              f"  {e.state}")
    lo = leftovers(root)
    for p in lo:
        print(f"{p.stage:<10} {p.dir.name[:40]:<40} {human(dir_size(p.dir)):>10}  (leftover of a killed build or removal)")
    print(f"{len(es)} entries, {human(sum(e.size for e in es))}" + (f"; {len(lo)} leftover folder(s)" if lo else ""))
    bad = [e for e in es if e.state != "ok"]
    return 1 if args.check and bad else 0


def cmd_du(root: Path, args) -> int:
    es = entries(root)
    lo = leftovers(root)
    stages = sorted({e.stage for e in es} | {p.stage for p in lo})
    print(f"cache {root}")
    print(f"{'stage':<10} {'entries':>8} {'size':>11} {'leftovers':>11}")
    total = 0
    for s in stages:
        size = sum(e.size for e in es if e.stage == s)
        left = sum(dir_size(p.dir) for p in lo if p.stage == s)
        total += size + left
        print(f"{s:<10} {sum(1 for e in es if e.stage == s):>8} {human(size):>11} {human(left):>11}")
    print(f"{'total':<10} {len(es):>8} {human(total):>11}")
    return 0


# ---------------------------------------------------------------- gc

def referenced_keys(override_sets: list[list[str]]) -> tuple[set[tuple[str, str]], list[str]]:
    """(stage, key) of every stage of every current recipe under each override set; and problems."""
    from d2build.commands._common import compose_or_report
    from d2build.compose import list_recipes
    from d2build.runner import plan

    keep: set[tuple[str, str]] = set()
    problems: list[str] = []
    names = sorted(list_recipes())
    for overrides in override_sets:
        picks = [overrides] if any(o.startswith("recipe=") for o in overrides) else \
            [[f"recipe={n}", *overrides] for n in names]
        for ov in picks:
            recipe = compose_or_report(ov)
            if recipe is None:
                problems.append(" ".join(ov))
                continue
            keep |= {(p.stage.kind, p.key) for p in plan(recipe)}
    return keep, problems


def cmd_gc(root: Path, args) -> int:
    if args.older_than is None and not args.keep_referenced:
        print("d2build cache gc: say what to collect: --older-than AGE (e.g. 7d) and/or --keep-referenced",
              file=sys.stderr)
        return 2
    if args.overrides and not args.keep_referenced:
        print("d2build cache gc: --overrides only means something with --keep-referenced", file=sys.stderr)
        return 2
    keep: set[tuple[str, str]] | None = None
    if args.keep_referenced:
        sets = [[]] + [shlex.split(s) for s in args.overrides]
        keep, problems = referenced_keys(sets)
        if problems:
            print(f"d2build cache gc: {len(problems)} recipe composition(s) failed ({'; '.join(problems)}), so "
                  "what they reference is unknown; nothing removed. Fix them (d2build validate) or drop those "
                  "--overrides", file=sys.stderr)
            return 2
        print(f"gc: {len(keep)} (stage, key) pairs referenced by current recipes")
    from d2build.cache import Cache

    cache = Cache(root)
    now = time.time()
    verb = "would remove" if args.dry_run else "removed"
    removed = freed = busy = kept = 0
    for e in entries(root):
        reasons = []
        if args.older_than is not None:
            if now - e.last_used < args.older_than:
                kept += 1
                continue
            reasons.append(f"unused {age(now - e.last_used)}")
        if keep is not None:
            if (e.stage, e.key) in keep:
                kept += 1
                continue
            reasons.append("not referenced")
        if not args.dry_run and not cache.remove(e.stage, e.key):
            busy += 1
            print(f"kept         {e.stage:<8} {e.key[:12]}  {human(e.size):>10}  (its lock is held: a build is running)")
            continue
        removed += 1
        freed += e.size
        print(f"{verb:<12} {e.stage:<8} {e.key[:12]}  {human(e.size):>10}  ({', '.join(reasons)})")
    for p in cache.leftovers():
        size = dir_size(p.dir)
        if p.kind == "tmp":
            if not args.dry_run and not cache.remove(p.stage, p.key, [p.dir]):
                busy += 1
                print(f"kept         {p.stage:<8} {p.dir.name[:40]}  (a build of this key is running)")
                continue
        elif not args.dry_run:
            shutil.rmtree(p.dir, ignore_errors=True)
        removed += 1
        freed += size
        print(f"{verb:<12} {p.stage:<8} {p.dir.name[:40]}  {human(size):>10}  (leftover of a killed build)")
    print(f"gc: {verb} {removed}, freeing {human(freed)}; kept {kept}" + (f", {busy} in use" if busy else "")
          + (" (dry run: nothing removed)" if args.dry_run else ""))
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2build cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="the cache folder (default: cache.dir from conf/config.yaml)")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="one line per entry")
    ls.add_argument("--stage", help="only this stage")
    ls.add_argument("--check", action="store_true", help="re-hash every file against its manifest (slow)")
    sub.add_parser("du", help="size per stage")
    gc = sub.add_parser("gc", help="remove old or unreferenced entries")
    gc.add_argument("--older-than", type=parse_age, metavar="AGE", help="not used for AGE: 90m, 12h, 7d, 2w")
    gc.add_argument("--keep-referenced", action="store_true", help="keep only what current recipes reference")
    gc.add_argument("--overrides", action="append", default=[], metavar="'K=V ...'",
                    help="with --keep-referenced: also keep what recipes reference under these overrides")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    for sp in (ls, sub.choices["du"], gc):
        sp.add_argument("--dir", dest="dir_sub", help=argparse.SUPPRESS)

    # `cache.dir=DIR` as elsewhere in d2build, anywhere on the line
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith("cache.dir=")]
    argv = [a for a in argv if not a.startswith("cache.dir=")]
    args = p.parse_args(argv)
    folder = args.dir_sub or args.dir or (dirs[-1] if dirs else None) or default_cache_dir()
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        print(f"d2build cache: {root} is not a folder (nothing cached yet?); pass --dir DIR or cache.dir=DIR",
              file=sys.stderr)
        return 2 if args.cmd == "gc" else 0
    return {"ls": cmd_ls, "du": cmd_du, "gc": cmd_gc}[args.cmd](root, args)
