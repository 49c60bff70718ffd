"""The standard-op graph's verify matrix: every family x input size x precision, against Detectron2.

Runs the real command line for each combination (random weights that behave, the bundled photographs,
today's gates: same class, IoU >= 0.98, |score difference| <= 0.01, >= 99% recovered at fp32, 97% at
fp16) and collects verify's numbers from run.json, plus the plugin flavour's for comparison with
`--flavours plugins standard`. The suite runs a cheap subset (tests/test_standard.py).

    .venv/bin/python bench/standard_matrix.py [--sizes 512 [640,832] 1024] [--precisions fp32 fp16] \\
        [--recipes mask_rcnn_r50 keypoint_rcnn_r50 faster_rcnn_r50] [--flavours standard] [--cache DIR]

Writes bench/results/standard_matrix.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["512", "[640,832]", "1024"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--recipes", nargs="+", default=["mask_rcnn_r50", "keypoint_rcnn_r50", "faster_rcnn_r50"])
    ap.add_argument("--flavours", nargs="+", default=["standard"])
    ap.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = ap.parse_args()
    rows = []
    for recipe in args.recipes:
        for size in args.sizes:
            hw = size if size.startswith("[") else f"[{size},{size}]"
            for precision in args.precisions:
                for ops in args.flavours:
                    run_dir = Path(tempfile.mkdtemp())
                    argv = [f"recipe={recipe}", "model.weights=random", f"model.input={hw}", f"precision={precision}",
                            f"surgery.ops={ops}", f"cache.dir={args.cache}", f"hydra.run.dir={run_dir}"]
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-m", "d2build", *argv], cwd=REPO, capture_output=True,
                                          text=True)
                    seconds = time.perf_counter() - t0
                    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
                    v = (run.get("stages", {}).get("verify") or {})
                    info = v.get("info") or {}
                    summary = info.get("summary") or {}
                    row = {"recipe": recipe, "input": hw, "precision": precision, "flavour": ops,
                           "verify": v.get("status"), "exit": proc.returncode, "seconds": round(seconds, 1),
                           "detectron2": [r["detectron2"] for r in info.get("images", [])],
                           "min_recovered": summary.get("min_recovered"),
                           "matched_share": summary.get("matched_share"),
                           "mean_box_iou": summary.get("mean_box_iou"), "max_score_diff": summary.get("max_score_diff"),
                           "graph_nodes": ((run.get("stages", {}).get("surgery") or {}).get("info") or {}).get("nodes")}
                    if v.get("status") == "failed":
                        row["reason"] = (v.get("reason") or "").splitlines()[0]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    doc = {"date": time.strftime("%Y-%m-%d"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=REPO).stdout.strip(),
           "command": "bench/standard_matrix.py " + " ".join(sys.argv[1:]), "rows": rows}
    out = REPO / "bench" / "results" / "standard_matrix.json"
    out.write_text(json.dumps(doc, indent=2))
    print("| recipe | input | precision | flavour | verify | Detectron2 detections | min recovered | mean box IoU "
          "| max score diff | nodes |\n|---|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        fmt = (lambda x, d=4: "-" if x is None else f"{x:.{d}f}")
        print(f"| {r['recipe']} | {r['input']} | {r['precision']} | {r['flavour']} | {r['verify']} | "
              f"{r['detectron2']} | {fmt(r['min_recovered'], 3)} | {fmt(r['mean_box_iou'])} | "
              f"{fmt(r['max_score_diff'], 5)} | {r['graph_nodes']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
