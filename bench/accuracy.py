"""The trained models' AP through every graph d2build builds from them (docs/ACCURACY.md's tables).

For each model (shapes Mask R-CNN, houses Keypoint R-CNN) and each variant -- plugin and standard
flavour at fp32, standard at fp16 and int8, the standard graph with dynamic shapes -- runs the real
command line with `eval.*` on N synthetic val images and collects the eval stage's metrics: the
graph, Detectron2 on the same input, Detectron2 with its own resize.

    .venv/bin/python bench/accuracy.py [--images 50] [--cache DIR]

Writes bench/results/accuracy.json and prints the Markdown tables.
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
MODELS = {"shapes_mask_rcnn": "shapes", "houses_keypoint_rcnn": "houses"}
VARIANTS = {
    "plugins fp32": ["surgery.ops=plugins"],
    "standard fp32": ["surgery.ops=standard"],
    "standard fp16": ["surgery.ops=standard", "precision=fp16"],
    "standard int8 (entropy)": ["surgery.ops=standard", "precision=int8", "calibration.method=entropy"],
    "standard int8 (percentile)": ["surgery.ops=standard", "precision=int8", "calibration.method=percentile"],
    "standard fp32, dynamic 384..704": ["surgery.ops=standard", "model.dynamic={min:[384,384],max:[704,704]}"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = ap.parse_args()

    from d2build import synthetic

    tmp = Path(tempfile.mkdtemp())
    rows = []
    for recipe, dataset in MODELS.items():
        val = synthetic.write_coco(dataset, "val", args.images, tmp / f"{dataset}_val")
        train = tmp / f"{dataset}_train"
        synthetic.write_coco(dataset, "train", 6, train)
        data = [f"eval.annotations={val}", f"eval.images={val.parent}", f"verify.images={train}",
                f"calibration.images={train}"]
        for name, extra in VARIANTS.items():
            run_dir = tmp / f"run-{recipe}-{len(rows)}"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "d2build", f"recipe={recipe}", *data, *extra,
                                   f"cache.dir={args.cache}", f"hydra.run.dir={run_dir}"], cwd=REPO,
                                  capture_output=True, text=True)
            run = json.loads((run_dir / "run.json").read_text())
            ev = (run["stages"].get("eval") or {}).get("info") or {}
            row = {"recipe": recipe, "variant": name, "exit": proc.returncode, "seconds": time.perf_counter() - t0,
                   "verify": run["stages"]["verify"]["status"], "metrics": ev.get("metrics"),
                   "detections_per_image": ev.get("detections_per_image")}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("recipe", "variant", "exit", "verify")}),
                  {t: round(v["graph"] * 100, 2) for t, v in (ev.get("ap") or {}).items()}, flush=True)
    doc = {"date": time.strftime("%Y-%m-%d"), "images": args.images,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=REPO).stdout.strip(),
           "command": "bench/accuracy.py " + " ".join(sys.argv[1:]), "rows": rows}
    (REPO / "bench" / "results" / "accuracy.json").write_text(json.dumps(doc, indent=2))
    for recipe in MODELS:
        print(f"\n### {recipe} ({args.images} val images)\n")
        types = [t for t in ("bbox", "segm", "keypoints")
                 if any(r["metrics"] and t in r["metrics"]["graph"] for r in rows if r["recipe"] == recipe)]
        head = " | ".join(f"{t} AP graph | same input | own resize" for t in types)
        print(f"| graph | {head} |\n|---|" + "---:|" * (3 * len(types)))
        for r in rows:
            if r["recipe"] != recipe or not r["metrics"]:
                continue
            cells = []
            for t in types:
                m = r["metrics"]
                cells += [f"{m['graph'][t]['AP'] * 100:.2f}", f"{m['detectron2'][t]['AP'] * 100:.2f}",
                          f"{m['detectron2_native'][t]['AP'] * 100:.2f}"]
            print(f"| {r['variant']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
