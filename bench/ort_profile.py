"""Where a standard graph's time goes on ONNX Runtime (CPU): kernel time per op type.

Builds (or finds in the cache) the recipe's surgery graph, runs it on one bundled photograph with
ONNX Runtime's profiler (a warm-up run, then the counted run) and sums each op type's kernel time.

    .venv/bin/python bench/ort_profile.py [--threads 2] [--photo coffee] [KEY=VALUE ...]

Writes bench/results/ort_profile_<recipe>_<H>x<W>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--photo", default="coffee")
    ap.add_argument("overrides", nargs="*",
                    default=["model.weights=random", "model.input=[1344,1344]", "surgery.ops=standard"])
    args = ap.parse_args()

    import onnxruntime as ort

    from d2build import console, photos
    from d2build.cache import Cache
    from d2build.compose import compose
    from d2build.detectron import model_info
    from d2build.recipe import ModelSlice
    from d2build.runner import execute, plan
    from d2build.runtime import Model
    from d2build.backends import open_graph

    console.configure()
    recipe = compose(args.overrides)
    execute(recipe, Path(tempfile.mkdtemp()), args.overrides, until="surgery")
    cache = Cache(recipe.cache.dir)
    planned = {p.name: p for p in plan(recipe, cache)}
    graph = cache.lookup("surgery", planned["surgery"].key).path("model.onnx")
    x, _ = Model(open_graph(graph, "onnxruntime"), model_info(ModelSlice.of(recipe))).prepare(
        [photos.bundled(args.photo).bgr])

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(2):  # a warm-up run, then the run that is counted; the profiler records both
        t0 = time.perf_counter()
        session.run(None, {name: x})
        wall = time.perf_counter() - t0
    events = [e for e in json.load(open(session.end_profiling()))
              if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    profiled = events[len(events) // 2:]  # the second (warm) run
    per_op: collections.Counter[str] = collections.Counter()
    for e in profiled:
        per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    h, w = recipe.model.input
    doc = {"date": time.strftime("%Y-%m-%d"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip(),
           "command": "bench/ort_profile.py " + " ".join(args.overrides), "threads": args.threads,
           "photo": args.photo, "wall_s": wall, "kernel_ms": total / 1000,
           "per_op_ms": {k: v / 1000 for k, v in per_op.most_common()}}
    out = Path(__file__).parent / "results" / f"ort_profile_{recipe.name}_{h}x{w}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"{recipe.name} at {h}x{w}: {total / 1000:.0f} ms kernel time, {wall:.2f} s wall (profiled run)")
    print("| op type | ms | share |\n|---|---:|---:|")
    for op, us in per_op.most_common(8):
        print(f"| {op} | {us / 1000:.1f} | {us / total:.1%} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
