"""Benchmark: every family through the real command line -- node counts, stage costs and verify per configuration.

Runs `python -m d2build` (random weights that behave, bundled photographs) for a matrix of recipes x
input sizes x graph flavours x precisions (and batch / dynamic variants), all into one cache, so each
weights and export is built once; reads each run's run.json. A row: export and surgery node counts,
the seconds of the stages that were built (export, surgery, precision, verify; `hit` stages are shown
as such), and verify's agreement with Detectron2 (matched / Detectron2's detections, worst image's
share, mean box and mask IoU, largest score difference).

    .venv/bin/python bench/families_matrix.py [--cache DIR] [--only retinanet_r50 ...] [--quick]

Writes bench/results/families_matrix.json and prints a Markdown table. Each configuration is a separate
process (cold start included in the wall seconds, not in the stage seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (recipe, input, extra overrides): the cost table (each family at 640x640, both flavours, fp16), then the
# new families at other sizes, with a batch and with dynamic shapes.
MATRIX = [
    *[(r, "[640,640]", ops) for r in ("mask_rcnn_r50", "retinanet_r50", "cascade_mask_rcnn_r50")
      for ops in (["surgery.ops=plugins"], ["surgery.ops=standard"], ["surgery.ops=plugins", "precision=fp16"])],
    *[(r, size, ops) for r in ("retinanet_r50", "cascade_mask_rcnn_r50") for size in ("[320,320]", "[480,640]")
      for ops in (["surgery.ops=plugins"], ["surgery.ops=standard"])],
    *[(r, "[320,320]", ["surgery.ops=standard", "precision=fp16"]) for r in ("retinanet_r50", "cascade_mask_rcnn_r50")],
    *[(r, "[320,320]", ["surgery.ops=plugins", "precision=int8", "calibration=bundled", "calibration.count=3",
                         "calibration.method=entropy"])  # as docs/BENCHMARKS.md measured it
      for r in ("retinanet_r50", "cascade_mask_rcnn_r50")],
    *[(r, "[320,320]", ["model.batch_size=2", f"surgery.ops={ops}"]) for r in ("retinanet_r50", "cascade_mask_rcnn_r50")
      for ops in ("plugins", "standard")],
    *[(r, "[320,320]", ["surgery.ops=standard", "model.dynamic={min:[256,256],max:[480,480],min_size:320,max_size:480}"])
      for r in ("retinanet_r50", "cascade_mask_rcnn_r50")],
    ("retinanet_r101", "[320,320]", ["surgery.ops=plugins"]),
]
QUICK = [row for row in MATRIX if row[1] == "[320,320]"]
STAGES = ("weights", "export", "surgery", "calibration", "precision", "verify", "candidates", "eval")


def run_one(recipe: str, size: str, extra: list[str], cache: Path, random_weights: bool = True) -> dict:
    """One configuration through `python -m d2build` (random weights that behave, or the recipe's own)."""
    run_dir = Path(tempfile.mkdtemp(prefix="families-"))
    cmd = [sys.executable, "-m", "d2build", f"recipe={recipe}", *(["model.weights=random"] if random_weights else []),
           f"model.input={size}", *extra, f"cache.dir={cache}", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    rj = run_dir / "run.json"
    doc = json.loads(rj.read_text()) if rj.exists() else {"stages": {}}
    st = doc.get("stages", {})
    row = {"recipe": recipe, "input": json.loads(size), "overrides": extra, "ok": proc.returncode == 0,
           "wall_s": round(wall, 1),
           "stages": {k: {"status": st[k]["status"], "seconds": round(st[k]["seconds"], 1)} for k in STAGES if k in st}}
    if "export" in st and st["export"].get("info"):
        row["export_nodes"] = st["export"]["info"].get("nodes")
    if "surgery" in st and st["surgery"].get("info"):
        row["graph_nodes"] = st["surgery"]["info"].get("nodes")
        row["graph_ops"] = st["surgery"]["info"].get("op_counts")
    v = st.get("verify", {}).get("info") or {}
    if v:
        s, imgs = v["summary"], v["images"]
        row["verify"] = {"matched": sum(r["matched"] for r in imgs), "detectron2": sum(r["detectron2"] for r in imgs),
                         "min_detectron2": min(r["detectron2"] for r in imgs), "min_recovered": s["min_recovered"],
                         "mean_box_iou": s["mean_box_iou"], "mean_mask_iou": s["mean_mask_iou"],
                         "max_score_diff": s["max_score_diff"], "batch": (s.get("batch") or {}).get("ok")}
    e = st.get("eval", {}).get("info") or {}
    if e:
        row["eval"] = {k: e.get(k) for k in ("images", "ap", "delta_ap")}
    if not row["ok"]:
        out = proc.stdout + proc.stderr
        cut = out.rfind("d2build: stage")  # the failure's own summary line and what follows, else the tail
        row["error"] = out[cut:][:1500] if cut >= 0 else out[-1500:]
    return row


def header(command: str, load_before: float) -> dict:
    """What a results file records beside its rows: date, commit, machine, load average before and now, command."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": command,
    }


def _cell(row: dict, stage: str) -> str:
    s = row["stages"].get(stage)
    if not s:
        return "-"
    return f"{s['seconds']:.1f}" if s["status"] == "built" else s["status"]


def table(rows: list[dict]) -> str:
    lines = ["| recipe | input | variant | export nodes | graph nodes | export s | surgery s | verify s | matched "
             "| worst image | box IoU | mask IoU | max Δscore |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v = r.get("verify") or {}
        variant = " ".join(o.replace("surgery.ops=", "").replace("model.", "") for o in r["overrides"])
        fmt = (lambda x, d=4: "-" if x is None else f"{x:.{d}f}")
        matched = f"{v['matched']}/{v['detectron2']}" if v else ("FAILED" if not r["ok"] else "-")
        lines.append(f"| {r['recipe']} | {r['input'][0]}x{r['input'][1]} | {variant} | {r.get('export_nodes', '-')} | "
                     f"{r.get('graph_nodes', '-')} | {_cell(r, 'export')} | {_cell(r, 'surgery')} | "
                     f"{_cell(r, 'verify')} | {matched} | {fmt(v.get('min_recovered'), 3)} | "
                     f"{fmt(v.get('mean_box_iou'))} | {fmt(v.get('mean_mask_iou'))} | {fmt(v.get('max_score_diff'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="cache folder (default: a new temporary one)")
    ap.add_argument("--only", nargs="*", default=None, help="recipes to run (default: all in the matrix)")
    ap.add_argument("--quick", action="store_true", help="the 320x320 rows only")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "families_matrix.json"))
    ap.add_argument("--retry-failed", action="store_true",
                    help="re-run only the rows --out holds as failed (same --cache), keeping the others")
    args = ap.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="families-cache-"))
    matrix = [m for m in (QUICK if args.quick else MATRIX) if not args.only or m[0] in args.only]
    load_before = os.getloadavg()[0]
    old = {}
    if args.retry_failed:
        prev = json.loads(Path(args.out).read_text())["rows"]
        old = {(r["recipe"], json.dumps(r["input"]), tuple(r["overrides"])): r for r in prev if r["ok"]}
    rows = []
    for recipe, size, extra in matrix:
        kept = old.get((recipe, json.dumps(json.loads(size)), tuple(extra)))
        row = kept or {**run_one(recipe, size, extra, cache), **({"retried": True} if args.retry_failed else {})}
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("recipe", "input", "overrides", "ok", "wall_s", "graph_nodes",
                                                   "verify")}), flush=True)
    doc = {**header("bench/families_matrix.py" + (" --quick" if args.quick else "")
                    + (f" --only {' '.join(args.only)}" if args.only else ""), load_before), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
