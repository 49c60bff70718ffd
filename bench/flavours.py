"""Benchmark: the two graph flavours against Detectron2 eager, per image, same process, same photographs.

For one recipe at one input size: the plugin graph (surgery.ops=plugins) on ONNX Runtime with
d2build's reference plugins, the standard graph (surgery.ops=standard) on a plain ONNX Runtime
session, and Detectron2 eager, timed interleaved (median of --repeat per image), plus node counts
and how many detections each image has (the heads' cost follows it in the standard graph). Also
checks that the two flavours agree detection for detection on every image.

    .venv/bin/python bench/flavours.py [--repeat 3] [--threads 2] [--images bundled|DIR] [--count 3] \\
        [--tag NAME] [KEY=VALUE ...]

Writes bench/results/flavours_<tag or recipe>_<H>x<W>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", default="bundled")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--tag", default=None)
    ap.add_argument("overrides", nargs="*", default=["model.weights=random", "model.input=[1344,1344]"])
    args = ap.parse_args()

    import torch

    from d2build import backends, console, detectron, photos
    from d2build.cache import Cache
    from d2build.compare import match_detections
    from d2build.compose import compose
    from d2build.families import builder
    from d2build.processing import letterbox
    from d2build.runner import execute, plan
    from d2build.stages.weights import load_state

    console.configure()
    torch.set_num_threads(args.threads)
    graphs, recipe = {}, None
    for ops in ("plugins", "standard"):
        ov = [*args.overrides, f"surgery.ops={ops}"]
        recipe = compose(ov)
        execute(recipe, Path(tempfile.mkdtemp()), ov, until="surgery")
        cache = Cache(recipe.cache.dir)
        planned = {p.name: p for p in plan(recipe, cache)}
        graphs[ops] = cache.lookup("surgery", planned["surgery"].key).path("model.onnx")
        weights = cache.lookup("weights", planned["weights"].key)
    assert recipe is not None
    fam = builder(recipe.model.family)
    cfg = detectron.load_cfg(recipe.model.config, fam.eager_overrides(recipe.surgery))
    model = detectron.build_model(cfg, load_state(weights))
    runners = {ops: backends.open_graph(path, threads=args.threads) for ops, path in graphs.items()}
    nodes = {ops: len(__import__("onnx").load(str(p)).graph.node) for ops, p in graphs.items()}
    hw = tuple(recipe.model.input)
    per_image = []
    for ref in photos.list_images(args.images, args.count):
        photo = photos.load(ref)
        chw, lb = letterbox(photo.bgr, hw, cfg.MODEL.PIXEL_MEAN)
        feeds = {"input_tensor": chw[None]}
        fam.eager(model, chw)  # warm-up
        outs = {ops: r.run(feeds) for ops, r in runners.items()}
        dets = {ops: fam.family.decode(o, lb) for ops, o in outs.items()}
        m = match_detections(dets["plugins"], dets["standard"], iou_min=0.999, score_tol=1e-4)
        times: dict[str, list[float]] = {"eager": [], **{ops: [] for ops in runners}}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fam.eager(model, chw)
            times["eager"].append(time.perf_counter() - t0)
            for ops, r in runners.items():
                t0 = time.perf_counter()
                r.run(feeds)
                times[ops].append(time.perf_counter() - t0)
        row = {"image": photo.name, "detections": len(dets["standard"]),
               **{f"{k}_s": statistics.median(v) for k, v in times.items()},
               "flavours_matched": len(m.pairs), "plugin_detections": len(dets["plugins"])}
        per_image.append(row)
        print(json.dumps(row))
    mean = {k: float(np.mean([r[f"{k}_s"] for r in per_image])) for k in ("eager", *runners)}
    h, w = hw
    tag = args.tag or recipe.name
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),
        "machine": f"{platform.machine()}, {args.threads} threads (torch and ONNX Runtime), "
                   f"{platform.processor() or 'cpu'}",
        "command": "bench/flavours.py " + " ".join(
            [f"--repeat {args.repeat}", f"--images {args.images}", f"--count {args.count}", *args.overrides]),
        "input": [h, w], "nodes": nodes, "per_image": per_image, "mean_s": mean,
        "over_eager": {k: v / mean["eager"] for k, v in mean.items()},
    }
    out = Path(__file__).parent / "results" / f"flavours_{tag}_{h}x{w}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"{tag} at {h}x{w}: nodes plugins {nodes['plugins']}, standard {nodes['standard']}; "
          f"detections per image {[r['detections'] for r in per_image]}")
    print("| per image | seconds | / Detectron2 eager |\n|---|---:|---:|")
    labels = {"eager": "Detectron2 eager", "plugins": "plugin graph, reference plugins",
              "standard": "standard graph, ONNX Runtime"}
    for k, v in mean.items():
        print(f"| {labels[k]} | {v:.3f} | {doc['over_eager'][k]:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
