"""Benchmark: what an NMS sweep with evaluation costs, against one variant alone.

The issue's target: a 9-variant NMS sweep with eval on 50 images costs at most 3x one variant. Measures,
as whole processes on a cold cache each time (fresh cache folder):

  one    `d2build recipe=R eval...`                                   (one variant, everything built)
  sweep  `d2build -m recipe=R eval... surgery.nms.iou_threshold=a,b,c surgery.nms.score_threshold=x,y,z`

and writes the ratio, per-stage built/hit counts and the sweep's AP table.

    .venv/bin/python bench/sweep_eval.py [--images 50] [--recipe shapes_mask_rcnn] [KEY=VALUE ...]

Writes bench/results/sweep_eval_<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--recipe", default="shapes_mask_rcnn")
    ap.add_argument("--iou", default="0.4,0.5,0.6")
    ap.add_argument("--score", default="0.05,0.3,0.6")
    ap.add_argument("overrides", nargs="*", default=[])
    args = ap.parse_args()

    from d2build import synthetic

    tmp = Path(tempfile.mkdtemp())
    dataset = "houses" if "houses" in args.recipe else "shapes"
    val = synthetic.write_coco(dataset, "val", args.images, tmp / "val")
    base = [f"recipe={args.recipe}", f"eval.annotations={val}", f"eval.images={val.parent}", *args.overrides]

    def timed(argv: list[str], cache: Path) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "d2build", *argv, f"cache.dir={cache}"], cwd=REPO, check=True,
                       capture_output=True, text=True)
        return time.perf_counter() - t0

    one = timed([*base, f"hydra.run.dir={tmp / 'one'}"], tmp / "cache_one")
    sweep_dir = tmp / "sweep"
    sweep = timed(["-m", *base, f"surgery.nms.iou_threshold={args.iou}", f"surgery.nms.score_threshold={args.score}",
                   f"hydra.sweep.dir={sweep_dir}"], tmp / "cache_sweep")
    summary = (sweep_dir / "summary.md").read_text()
    variants = len(args.iou.split(",")) * len(args.score.split(","))
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "command": "bench/sweep_eval.py " + " ".join(sys.argv[1:]),
        "images": args.images, "variants": variants, "one_variant_s": one, "sweep_s": sweep,
        "sweep_over_one": sweep / one, "target": 3.0,
        "summary_csv": (sweep_dir / "summary.csv").read_text(),
    }
    out = REPO / "bench" / "results" / f"sweep_eval_{args.recipe}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(summary)
    print(f"one variant {one:.1f} s, {variants}-variant sweep {sweep:.1f} s: {sweep / one:.2f}x (target <= 3x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
