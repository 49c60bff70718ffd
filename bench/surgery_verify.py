"""Benchmark: surgery cost, graph size, and the TensorRT-ready graph on CPU vs Detectron2 eager.

Times, for one recipe and input size (default mask_rcnn_r50 with random weights at 1344x1344):
  - the surgery stage (export -> TensorRT-ready graph), median of --repeat runs;
  - node counts of the export and the graph;
  - per-image latency of Detectron2 eager and of the graph on ONNX Runtime with the reference
    plugins, same process, same photographs, same thread count, interleaved, median of --repeat.
Writes bench/results/surgery_verify_<H>x<W>.json and prints a Markdown table.

    .venv/bin/python bench/surgery_verify.py [--repeat 3] [--threads 2] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", default=["model.weights=random", "model.input=[1344,1344]"])
    args = ap.parse_args()

    import onnx
    import torch

    from d2build import detectron, photos
    from d2build.cache import Cache
    from d2build.compose import compose
    from d2build.families import family
    from d2build.processing import letterbox
    from d2build.reference import ReferenceSession
    from d2build.runner import execute, plan
    from d2build.stages.base import Progress
    from d2build.stages.surgery import SurgeryStage
    from d2build.stages.weights import load_state

    torch.set_num_threads(args.threads)
    recipe = compose(args.overrides)
    results_dir = Path(__file__).parent / "results"
    execute(recipe, Path(tempfile.mkdtemp()), args.overrides, until="surgery")
    cache = Cache(recipe.cache.dir)
    arts = {p.name: cache.lookup(p.name, p.key) for p in plan(recipe, cache)}
    surgery = next(p for p in plan(recipe, cache) if p.name == "surgery")

    seconds = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            SurgeryStage().run(surgery.material["config"], {"export": arts["export"]}, Path(tmp), Progress("surgery"))
            seconds.append(time.perf_counter() - t0)
    export_nodes = len(onnx.load(str(arts["export"].path("model.onnx")), load_external_data=False).graph.node)
    graph = onnx.load(str(arts["surgery"].path("model.onnx")))

    fam = family(recipe.model.family)
    cfg = detectron.load_cfg(recipe.model.config, fam.eager_overrides(recipe.to_dict()["surgery"]))
    model = detectron.build_model(cfg, load_state(arts["weights"]))
    session = ReferenceSession(graph, threads=args.threads)
    per_image = []
    for name in photos.BUNDLED[:3]:
        chw, _ = letterbox(photos.bundled(name).bgr, recipe.model.input, cfg.MODEL.PIXEL_MEAN)
        fam.eager(model, chw), session.run({"input_tensor": chw[None]})  # warm-up
        eager, ref = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fam.eager(model, chw)
            t1 = time.perf_counter()
            session.run({"input_tensor": chw[None]})
            t2 = time.perf_counter()
            eager.append(t1 - t0)
            ref.append(t2 - t1)
        per_image.append({"image": name, "eager_s": statistics.median(eager), "graph_s": statistics.median(ref)})

    h, w = recipe.model.input
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "command": "bench/surgery_verify.py " + " ".join(args.overrides),
        "input": [h, w],
        "surgery_s_median": statistics.median(seconds),
        "surgery_s_runs": seconds,
        "export_nodes": export_nodes,
        "graph_nodes": len(graph.graph.node),
        "reference_graph_nodes_nvidia_sample": 219,
        "per_image": per_image,
        "eager_s_mean": float(np.mean([r["eager_s"] for r in per_image])),
        "graph_s_mean": float(np.mean([r["graph_s"] for r in per_image])),
    }
    doc["graph_over_eager"] = doc["graph_s_mean"] / doc["eager_s_mean"]
    results_dir.mkdir(exist_ok=True)
    out = results_dir / f"surgery_verify_{h}x{w}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"| input | surgery s | export nodes | graph nodes | eager s/img | graph s/img | graph/eager |")
    print(f"|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {h}x{w} | {doc['surgery_s_median']:.2f} | {export_nodes} | {doc['graph_nodes']} | "
          f"{doc['eager_s_mean']:.2f} | {doc['graph_s_mean']:.2f} | {doc['graph_over_eager']:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
