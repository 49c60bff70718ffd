"""Benchmark: throughput (images/s) against batch size for the CPU backends, and graph node counts.

For one recipe (default: the project's trained shapes Mask R-CNN at 512x704), builds the graph of each
batch size in each flavour -- plugins on the reference executor, standard on ONNX Runtime -- through the
normal pipeline (cached), then times `d2build bench`'s model-only loop in this process: the batch tensor
already in place, median of --repeat runs after one warm-up. Images are the synthetic val split's, so the
heads see the few detections a trained model has.

    .venv/bin/python bench/batch_throughput.py [--batches 1 2 4 8] [--repeat 5] [--threads 2] [KEY=VALUE ...]

Writes bench/results/batch_throughput_<recipe>.json and prints a Markdown table.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", default=["recipe=shapes_mask_rcnn"])
    args = ap.parse_args()

    import onnx

    from d2build import backends, console, detectron, synthetic
    from d2build.cache import Cache
    from d2build.compose import compose
    from d2build.runner import execute, plan
    from d2build.recipe import ModelSlice
    from d2build.runtime import Model

    console.configure()
    data = Path(tempfile.mkdtemp()) / "val"
    synthetic.write_coco("shapes", "val", max(args.batches), data)
    images = sorted(str(p) for p in data.glob("*.png"))
    from d2build.processing import load_image_bgr

    bgrs = [load_image_bgr(p) for p in images]
    rows = []
    for ops, backend in (("plugins", "reference"), ("standard", "onnxruntime")):
        for n in args.batches:
            ov = [*args.overrides, f"surgery.ops={ops}", f"model.batch_size={n}"]
            recipe = compose(ov)
            execute(recipe, Path(tempfile.mkdtemp()), ov, until="precision")
            cache = Cache(recipe.cache.dir)
            p = next(p for p in plan(recipe, cache) if p.name == "precision")
            graph = cache.lookup("precision", p.key).path("model.onnx")
            model = Model(backends.open_graph(graph, backend, threads=args.threads),
                          detectron.model_info(ModelSlice.of(recipe)))
            x, _ = model.prepare(bgrs[:n])
            feeds = {model.runner.input_name: x}
            model.runner.run(feeds)  # warm-up
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                model.runner.run(feeds)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            row = {"flavour": ops, "backend": backend, "batch": n, "seconds_per_run": med,
                   "images_per_second": n / med, "nodes": len(onnx.load(str(graph)).graph.node)}
            rows.append(row)
            print(json.dumps(row))
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),
        "machine": f"{platform.machine()}, {args.threads} threads, {platform.processor() or 'cpu'}",
        "command": "bench/batch_throughput.py " + " ".join(args.overrides), "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"batch_throughput_{recipe.name}.json"
    out.write_text(json.dumps(doc, indent=2))
    print("| flavour (backend) | batch | s per run | images/s | nodes |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['flavour']} ({r['backend']}) | {r['batch']} | {r['seconds_per_run']:.3f} | "
              f"{r['images_per_second']:.2f} | {r['nodes']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
