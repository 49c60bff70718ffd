"""Benchmark: Panoptic FPN and PointRend through the real command line, at 512x512 and at their native size.

Runs `python -m d2build` (random weights that behave, the three bundled photographs) for each recipe at
512x512 and at the config's test size (800 x 1333, padded to 800x1344), in both graph flavours at fp32,
and at 512x512 also fp16 and int8 (plugins), all into one cache, so each weights and export is built once;
reads each run's run.json. A row: export and graph node counts, the seconds of the stages that were built,
verify's instance agreement (matched / Detectron2's detections, worst image, mean box and mask IoU) and,
for Panoptic FPN, its segmentation agreement (worst image's semantic pixel agreement, panoptic segments
matched, worst panoptic pixel agreement by category).

    .venv/bin/python bench/segmentation_matrix.py [--cache DIR] [--only panoptic_fpn_r50] [--sizes 512]

Writes bench/results/segmentation_matrix.json and prints a Markdown table (docs/BENCHMARKS.md). Native-size
verification of these two recipes lives here, not in the test suite (minutes per configuration on 2 cores).
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
RECIPES = ("panoptic_fpn_r50", "pointrend_mask_rcnn_r50")
NATIVE = "[800,1344]"  # INPUT.MIN_SIZE_TEST 800, MAX_SIZE_TEST 1333, padded to a multiple of 32
INT8 = ["precision=int8", "calibration=bundled", "calibration.count=3"]
VARIANTS = {  # size -> variants
    "[512,512]": [["surgery.ops=plugins"], ["surgery.ops=standard"], ["surgery.ops=plugins", "precision=fp16"],
                  ["surgery.ops=plugins", *INT8]],
    NATIVE: [["surgery.ops=plugins"], ["surgery.ops=standard"]],
}
STAGES = ("weights", "export", "surgery", "calibration", "precision", "verify")


def run_one(recipe: str, size: str, extra: list[str], cache: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="segmentation-"))
    cmd = [sys.executable, "-m", "d2build", "--until", "verify", f"recipe={recipe}", "model.weights=random",
           f"model.input={size}", *extra, f"cache.dir={cache}", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    rj = run_dir / "run.json"
    st = (json.loads(rj.read_text()) if rj.exists() else {}).get("stages", {})
    row = {"recipe": recipe, "input": json.loads(size), "overrides": extra, "ok": proc.returncode == 0,
           "wall_s": round(time.perf_counter() - t0, 1),
           "stages": {k: {"status": st[k]["status"], "seconds": round(st[k]["seconds"], 1)} for k in STAGES if k in st}}
    for stage, key in (("export", "export_nodes"), ("surgery", "graph_nodes")):
        if st.get(stage, {}).get("info"):
            row[key] = st[stage]["info"].get("nodes")
    if st.get("surgery", {}).get("info"):
        row["graph_ops"] = st["surgery"]["info"].get("op_counts")
    v = st.get("verify", {}).get("info") or {}
    if not v and (run_dir / "verify-failed" / "report.md").exists():
        row["verify_report"] = (run_dir / "verify-failed" / "report.md").read_text()[-3000:]
    if v:
        s, imgs = v["summary"], v["images"]
        row["verify"] = {"matched": sum(r["matched"] for r in imgs), "detectron2": sum(r["detectron2"] for r in imgs),
                         "min_recovered": s["min_recovered"], "mean_box_iou": s["mean_box_iou"],
                         "mean_mask_iou": s["mean_mask_iou"], "max_score_diff": s["max_score_diff"],
                         "eager_s_per_image": s["eager_s_per_image"], "graph_s_per_image": s["graph_s_per_image"],
                         "segmentation": s.get("family")}
    if not row["ok"]:
        row["error"] = (proc.stdout + proc.stderr)[-1500:]
    return row


def _cell(row: dict, stage: str) -> str:
    s = row["stages"].get(stage)
    return "-" if not s else (f"{s['seconds']:.0f}" if s["status"] == "built" else s["status"])


def table(rows: list[dict]) -> str:
    lines = ["| recipe | input | variant | export nodes | graph nodes | weights s | export s | surgery s | verify s "
             "| eager / graph s per image | matched | worst image | mask IoU | semantic agreement (worst) "
             "| segments matched | panoptic pixels (worst) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v = r.get("verify") or {}
        g = v.get("segmentation") or {}
        variant = " ".join(o.replace("surgery.ops=", "").replace("calibration=", "cal ")
                           .replace("calibration.count=", "x").replace("precision=", "") for o in r["overrides"])
        fmt = (lambda x, d=4: "-" if x is None else f"{x:.{d}f}")
        matched = f"{v['matched']}/{v['detectron2']}" if v else ("FAILED" if not r["ok"] else "-")
        per = f"{v['eager_s_per_image']:.1f} / {v['graph_s_per_image']:.1f}" if v else "-"
        seg = f"{g['segments_matched']}/{g['segments_detectron2']}" if g else "-"
        lines.append(f"| {r['recipe']} | {r['input'][0]}x{r['input'][1]} | {variant} | {r.get('export_nodes', '-')} | "
                     f"{r.get('graph_nodes', '-')} | {_cell(r, 'weights')} | {_cell(r, 'export')} | "
                     f"{_cell(r, 'surgery')} | {_cell(r, 'verify')} | {per} | {matched} | "
                     f"{fmt(v.get('min_recovered'), 3)} | {fmt(v.get('mean_mask_iou'))} | "
                     f"{fmt(g.get('min_semantic_agreement'))} | {seg} | {fmt(g.get('min_panoptic_agreement'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="cache folder (default: a new temporary one)")
    ap.add_argument("--only", nargs="*", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--sizes", nargs="*", default=list(VARIANTS), help="model.input values, e.g. [512,512]")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "segmentation_matrix.json"))
    args = ap.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="segmentation-cache-"))
    load_before = os.getloadavg()[0]
    rows = []
    for recipe in args.only:
        for size in args.sizes:
            for extra in VARIANTS[size]:
                row = run_one(recipe, size, extra, cache)
                rows.append(row)
                print(json.dumps({k: row.get(k) for k in ("recipe", "input", "overrides", "ok", "wall_s",
                                                           "graph_nodes", "verify")}), flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": "bench/segmentation_matrix.py --only " + " ".join(args.only) + " --sizes " + " ".join(args.sizes),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
