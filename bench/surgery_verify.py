"""Benchmark: surgery cost, graph size, and the TensorRT-ready graph on CPU vs Detectron2 eager.

Times, for one recipe and input size (default mask_rcnn_r50 with random weights at 1344x1344):
  - the surgery stage (export -> TensorRT-ready graph), median of --repeat runs;
  - node counts of the export and the graph;
  - per-image latency of Detectron2 eager and of the graph on ONNX Runtime with the reference
    plugins, same process, same photographs, same thread count, interleaved, median of --repeat.
Writes bench/results/surgery_verify_<H>x<W>.json and prints a Markdown table.

    .venv/bin/python bench/surgery_verify.py [--repeat 3] [--threads 2] [KEY=VALUE ...] [--precisions fp32 fp16 int8]

(overrides before --precisions, which takes every word after it)
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
    ap.add_argument("--precisions", nargs="+", default=["fp32"],
                    help="also time the precision stage's graph for these (fp16, int8 need that stage)")
    ap.add_argument("overrides", nargs="*", default=["model.weights=random", "model.input=[1344,1344]"])
    args = ap.parse_args()
    if bad := [p for p in args.precisions if p not in ("fp32", "fp16", "int8")]:
        ap.error(f"--precisions takes fp32, fp16, int8; got {bad} (put KEY=VALUE overrides before --precisions)")

    import onnx
    import torch

    from d2build import detectron, photos
    from d2build.cache import Cache
    from d2build.compose import compose
    from d2build.families import builder
    from d2build.processing import letterbox
    from d2build.reference import ReferenceSession
    from d2build.runner import execute, plan
    from d2build.stages.base import Context
    from d2build.stages.surgery import SurgeryStage
    from d2build.stages.weights import load_state

    torch.set_num_threads(args.threads)
    recipe = compose(args.overrides)
    results_dir = Path(__file__).parent / "results"
    execute(recipe, Path(tempfile.mkdtemp()), args.overrides, until="surgery")
    cache = Cache(recipe.cache.dir)
    arts = {p.name: cache.lookup(p.stage.kind, p.key) for p in plan(recipe, cache)}
    surgery = next(p for p in plan(recipe, cache) if p.name == "surgery")

    seconds = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            SurgeryStage({"export": "export"}).run(surgery.cfg, {"export": arts["export"]}, Path(tmp), Context("surgery"))
            seconds.append(time.perf_counter() - t0)
    export_nodes = len(onnx.load(str(arts["export"].path("model.onnx")), load_external_data=False).graph.node)
    graph = onnx.load(str(arts["surgery"].path("model.onnx")))

    fam = builder(recipe.model.family)
    cfg = detectron.load_cfg(recipe.model.config, fam.eager_overrides(recipe.surgery))
    model = detectron.build_model(cfg, load_state(arts["weights"]))
    graphs = {"surgery (fp32)": graph}
    for precision in args.precisions:
        if precision == "fp32":
            continue
        extra = [f"precision={precision}"] + (["calibration=bundled"] if precision == "int8" else [])
        r = compose([*args.overrides, *extra])
        execute(r, Path(tempfile.mkdtemp()), [*args.overrides, *extra], until="precision")
        p = next(p for p in plan(r, cache) if p.name == "precision")
        graphs[precision] = onnx.load(str(cache.lookup("precision", p.key).path("model.onnx")))
    sessions = {name: ReferenceSession(g, threads=args.threads) for name, g in graphs.items()}
    per_image = []
    for name in photos.BUNDLED[:3]:
        chw, _ = letterbox(photos.bundled(name).bgr, recipe.model.input, cfg.MODEL.PIXEL_MEAN)
        fam.eager(model, chw)  # warm-up
        for s in sessions.values():
            s.run({"input_tensor": chw[None]})
        times: dict[str, list[float]] = {"eager": [], **{k: [] for k in sessions}}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fam.eager(model, chw)
            times["eager"].append(time.perf_counter() - t0)
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run({"input_tensor": chw[None]})
                times[k].append(time.perf_counter() - t0)
        per_image.append({"image": name, **{f"{k}_s": statistics.median(v) for k, v in times.items()}})

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
        "mean_s": {k: float(np.mean([r[f"{k}_s"] for r in per_image])) for k in ["eager", *sessions]},
    }
    doc["over_eager"] = {k: v / doc["mean_s"]["eager"] for k, v in doc["mean_s"].items()}
    results_dir.mkdir(exist_ok=True)
    out = results_dir / f"surgery_verify_{h}x{w}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"input {h}x{w}: surgery {doc['surgery_s_median']:.2f} s (median of {args.repeat}), "
          f"export {export_nodes} nodes -> graph {doc['graph_nodes']} nodes")
    print("| per image, same process and threads | seconds | / Detectron2 eager |")
    print("|---|---:|---:|")
    for k, v in doc["mean_s"].items():
        label = "Detectron2 eager" if k == "eager" else f"graph on ONNX Runtime, {k}"
        print(f"| {label} | {v:.2f} | {doc['over_eager'][k]:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
