"""What d2build costs on this machine: cold runs, cached reruns, sweeps, and peak memory per stage.

Every measurement is a real `python -m d2build` process (wall time of the whole process, peak RSS
from getrusage), on a fresh cache folder unless reuse is the point:

  cold          one run of the full pipeline on an empty cache
  cached        the identical run again (everything hits)
  stage memory  `--until STAGE` run by run on an empty cache: each process builds one more stage,
                so its peak RSS is that stage's (plus the interpreter and imports)
  sweep         a Hydra multirun over N NMS IoU thresholds on a cache that already holds the weights
                and export, against N cold runs of the same variants (each on an empty cache)

    .venv/bin/python bench/pipeline_cost.py --size 640 --variants 9 [--cold-variants 9] [-- KEY=VALUE ...]
    .venv/bin/python bench/pipeline_cost.py --size 640 --no-sweep --tag int8 -- precision=int8 calibration=bundled

Writes bench/results/pipeline_cost_<size>[_<tag>].json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = (
    "import os, resource, runpy, sys\n"
    "sys.argv = ['d2build', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('d2build', run_name='__main__')\n"
    "finally:\n"
    "    with open(os.environ['D2B_RSS'], 'w') as f:\n"
    "        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
)


def d2build(args: list[str], cache: Path, workdir: Path) -> dict:
    """Run the CLI once; return wall seconds, peak RSS (MiB), exit code and run.json (if any)."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    rss_file = workdir / "rss.txt"
    cmd = [sys.executable, "-c", LAUNCH, *args, f"cache.dir={cache}"]
    if "-m" not in args:
        cmd.append(f"hydra.run.dir={run_dir}")
    else:
        cmd.append(f"hydra.sweep.dir={run_dir}")
    env = {**os.environ, "D2B_RSS": str(rss_file), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"d2build {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rj = run_dir / "run.json"
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(rss_file.read_text()) / 1024, 1),
            "stages": {k: {"status": v["status"], "seconds": round(v["seconds"], 2)}
                       for k, v in json.loads(rj.read_text())["stages"].items()} if rj.exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--variants", type=int, default=9)
    ap.add_argument("--cold-variants", type=int, default=None,
                    help="how many of the variants to run cold for the comparison (default: all)")
    ap.add_argument("--no-sweep", action="store_true", help="cold, cached and stage memory only")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. the precision)")
    ap.add_argument("overrides", nargs="*", default=[])
    args = ap.parse_args()
    base = ["recipe=mask_rcnn_r50", "model.weights=random", f"model.input=[{args.size},{args.size}]",
            *args.overrides]
    work = Path(tempfile.mkdtemp(prefix="d2build-bench-"))
    doc: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "python": platform.python_version(), "base": base}
    try:
        cache = work / "cache"
        doc["cold"] = d2build(base, cache, work)
        doc["cached"] = d2build(base, cache, work)
        print("cold", doc["cold"], "\ncached", doc["cached"], flush=True)

        mem_cache = work / "mem-cache"
        stages = list(doc["cold"]["stages"])
        doc["stage_memory"] = {}
        for stage in stages:
            r = d2build(["--until", stage, *base], mem_cache, work)
            doc["stage_memory"][stage] = {"peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"],
                                          "built": r["stages"][stage]["status"]}
        print("stage memory", doc["stage_memory"], flush=True)

        if not args.no_sweep:
            doc["sweep"] = measure_sweep(base, cache, work, args)
            print("sweep", doc["sweep"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish(doc, args)


def measure_sweep(base: list[str], cache: Path, work: Path, args: argparse.Namespace) -> dict:
    """A multirun over N NMS IoU thresholds on the warm cache against N cold runs of the same variants."""
    values = [round(0.3 + 0.4 * i / max(1, args.variants - 1), 3) for i in range(args.variants)]
    sweep = d2build(["-m", *base, "surgery.nms.iou_threshold=" + ",".join(map(str, values))], cache, work)
    cold_n = args.cold_variants or args.variants
    cold_runs = []
    for v in values[:cold_n]:
        c = work / f"cold-{v}"
        cold_runs.append(d2build([*base, f"surgery.nms.iou_threshold={v}"], c, work)["wall_s"])
        shutil.rmtree(c, ignore_errors=True)
    cold_total = sum(cold_runs) * (args.variants / cold_n)
    return {"values": values, "sweep_wall_s": sweep["wall_s"], "cold_runs_wall_s": cold_runs,
            "cold_total_s": round(cold_total, 1), "cold_measured": cold_n,
            "reuse_ratio": round(cold_total / sweep["wall_s"], 2)}


def finish(doc: dict, args: argparse.Namespace) -> None:
    out = REPO / "bench" / "results" / f"pipeline_cost_{args.size}{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    cold, cached = doc["cold"]["wall_s"], doc["cached"]["wall_s"]
    if "sweep" not in doc:
        print(f"| input | cold s | cached s | cached/cold |\n|---|---:|---:|---:|\n"
              f"| {args.size} | {cold} | {cached} | {cached / cold:.3f} |")
    else:
        s = doc["sweep"]
        print(f"| input | cold s | cached s | cached/cold | {args.variants}-variant sweep s | "
              f"{args.variants} cold runs s | reuse ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| {args.size} | {cold} | {cached} | {cached / cold:.3f} | {s['sweep_wall_s']} | "
              f"{s['cold_total_s']} | {s['reuse_ratio']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
