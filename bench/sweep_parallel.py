"""Serial vs parallel sweep wall time: Hydra's basic launcher against the joblib launcher.

A sweep of N jobs at one input size that differ only in `surgery.nms.iou_threshold`: every job hits
the weights and the export (seeded into a fresh cache folder before each sweep, so both launchers
start from the same state) and builds its own surgery and verify. The two launchers are run
alternately (serial, parallel, serial, parallel, ...) so that a change in the machine's load hits
both alike; each sweep is one real `python -m d2build -m ...` process, timed from start to exit.

    .venv/bin/python bench/sweep_parallel.py --size 320 --jobs 4 --repeats 2 [--n-jobs 2] [-- KEY=VALUE ...]

Writes bench/results/sweep_parallel_<size>.json and prints a Markdown table.
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
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "d2build", *cmd], cwd=REPO, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"d2build {' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall


def load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--jobs", type=int, default=4, help="sweep jobs (IoU thresholds)")
    ap.add_argument("--n-jobs", type=int, default=2, help="joblib workers")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more KEY=VALUE overrides for every job")
    a = ap.parse_args()

    base = ["recipe=mask_rcnn_r50", "model.weights=random", f"model.input=[{a.size},{a.size}]", *a.extra]
    thresholds = ",".join(f"{0.3 + 0.4 * i / max(1, a.jobs - 1):.2f}" for i in range(a.jobs))
    work = Path(tempfile.mkdtemp(prefix="d2b-sweep-bench-"))
    seed = work / "seed-cache"
    print(f"seeding weights and export at {a.size}x{a.size} ...", flush=True)
    run(["--until", "export", *base, f"cache.dir={seed}", f"hydra.run.dir={work / 'seed-run'}"])

    launchers = {"serial (basic)": [], f"parallel (joblib, n_jobs={a.n_jobs})":
                 ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={a.n_jobs}"]}
    results = []
    for rep in range(a.repeats):
        for name, extra in launchers.items():
            cache = work / f"cache-{rep}-{len(results)}"
            shutil.copytree(seed, cache)  # same starting state: weights and export published
            sweep_dir = work / f"sweep-{rep}-{len(results)}"
            before = load()
            wall = run(["-m", *base, f"surgery.nms.iou_threshold={thresholds}", *extra,
                        f"cache.dir={cache}", f"hydra.sweep.dir={sweep_dir}"])
            rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/run.json"))]
            statuses = {s: sorted(r["stages"][s]["status"] for r in rows) for s in ("weights", "export", "surgery", "verify")}
            assert len(rows) == a.jobs and statuses["export"] == ["hit"] * a.jobs, statuses
            assert statuses["verify"] == ["built"] * a.jobs, statuses
            results.append({"repeat": rep, "launcher": name, "wall_s": round(wall, 1), "load_before": round(before, 2),
                            "statuses": statuses})
            print(f"  {name:<28} repeat {rep}: {wall:6.1f} s (1-min load before: {before:.2f})", flush=True)
            shutil.rmtree(cache, ignore_errors=True)

    names = list(launchers)
    ratios = [p["wall_s"] / s["wall_s"] for s, p in zip(results[0::2], results[1::2])]
    mean = {n: sum(r["wall_s"] for r in results if r["launcher"] == n) / a.repeats for n in names}
    doc = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["bench/sweep_parallel.py", f"--size {a.size}", f"--jobs {a.jobs}",
                             f"--n-jobs {a.n_jobs}", f"--repeats {a.repeats}", *a.extra]),
        "sweep": f"{a.jobs} jobs: surgery.nms.iou_threshold={thresholds} at {a.size}x{a.size}, weights and export cached",
        "runs": results,
        "mean_wall_s": {n: round(v, 1) for n, v in mean.items()},
        "parallel_over_serial": [round(r, 3) for r in ratios],
        "parallel_over_serial_mean": round(sum(ratios) / len(ratios), 3),
    }
    out = REPO / "bench" / "results" / f"sweep_parallel_{a.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print("| launcher | " + " | ".join(f"run {i + 1} s" for i in range(a.repeats)) + " | mean s |")
    print("|---|" + "---:|" * (a.repeats + 1))
    for n in names:
        walls = [r["wall_s"] for r in results if r["launcher"] == n]
        print(f"| {n} | " + " | ".join(f"{w:.1f}" for w in walls) + f" | {mean[n]:.1f} |")
    print(f"\nparallel / serial wall time: {', '.join(f'{r:.2f}' for r in ratios)} (mean {doc['parallel_over_serial_mean']:.2f})")
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
