"""d2build bench [--image PATH|NAME] [--engine|--graph PATH] KEY=VALUE ...: latency percentiles and FPS."""

from __future__ import annotations

import json
import sys
import logging
import time
from contextlib import nullcontext

import numpy as np

from d2build.commands import _runtime

SUMMARY = "latency percentiles and images/s of a built model (runtime.warmup, .iterations, .cuda_graph)"
log = logging.getLogger("d2build")


def main(argv: list[str]) -> int:
    p = _runtime.parser("bench", "Time the recipe's model (or an explicit engine/graph): the model alone on an "
                                 "input already in place, and end to end (letterbox, copies, decode, mask paste).")
    p.add_argument("--image", default="astronaut", help="a bundled photograph's name or an image path")
    ready = _runtime.prepare("bench", p, argv, images=lambda args: [args.image])
    if ready is None:
        return 2
    args, recipe, out, model = ready
    from d2build import photos
    from d2build.cache import Cache
    from d2build.commands._runtime import percentiles

    rt = recipe.runtime
    if model.backend == "detectron2":
        print("d2build bench: times built models (runtime.backend=tensorrt|reference|onnxruntime); for Detectron2 "
              "eager see bench/gpu_eager.py", file=sys.stderr)
        return 2
    photo = photos.load(args.image)
    n = model.info.batch
    batch, _ = model.prepare([photo.bgr] * n)
    runner = model.runner
    lock = nullcontext()
    if model.backend == "tensorrt":  # one GPU job at a time, as for builds
        from d2build.backends.tensorrt import gpu_identity

        lock = Cache(recipe.cache.dir).gpu_lock(gpu_identity(recipe.build.device))
    with lock:
        runner.prepare({runner.input_name: batch})
        graph = False
        if rt.cuda_graph:
            if model.backend == "tensorrt":
                runner.capture()
                graph = True
            elif model.backend == "onnxruntime" and rt.device != "cpu":  # ONNX Runtime captures on its first runs
                from d2build import backends

                try:
                    runner = backends.open_graph(model.path, "onnxruntime",
                                                 **_runtime.graph_device(recipe, "onnxruntime", cuda_graph=True))
                    runner.prepare({runner.input_name: batch})
                    runner.execute()
                except backends.RunnerError as e:
                    print(f"d2build bench: runtime.cuda_graph=true: {e}", file=sys.stderr)
                    return 2
                graph = True
            else:
                log.info("runtime.cuda_graph applies to runtime.backend=tensorrt, or onnxruntime on runtime.device=cuda; "
                         "ignored")
        log.info("warm-up: %d run(s)", rt.warmup)
        for _ in range(rt.warmup):
            runner.execute()
        runner.synchronize()
        model_ms = []
        for i in range(rt.iterations):
            t0 = time.perf_counter()
            runner.execute()
            runner.synchronize()
            model_ms.append((time.perf_counter() - t0) * 1000)
        n_e2e = max(1, min(rt.iterations, 20))
        e2e_ms = []
        for _ in range(n_e2e):
            t0 = time.perf_counter()
            model.detect_batch([photo.bgr] * n)
            e2e_ms.append((time.perf_counter() - t0) * 1000)
    doc = {"backend": model.backend, "model": str(model.path), "input": list(model.input_hw), "image": photo.name,
           "recipe": recipe.name, "precision": recipe.precision.mode, "warmup": rt.warmup,
           "device": rt.device if model.backend == "onnxruntime" else None,
           "tf32": rt.tf32 if model.backend == "onnxruntime" else None,
           "iterations": rt.iterations, "cuda_graph": graph, "model_ms": percentiles(model_ms),
           "end_to_end_ms": percentiles(e2e_ms), "end_to_end_iterations": n_e2e,
           "emulated_fp16_nodes": len(runner.emulated), "batch": n,
           "images_per_second": {"model": n * 1000.0 / float(np.mean(model_ms)),
                                 "end_to_end": n * 1000.0 / float(np.mean(e2e_ms))}}
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    for what, s in (("model", doc["model_ms"]), ("end to end", doc["end_to_end_ms"])):
        ips = doc["images_per_second"]["model" if what == "model" else "end_to_end"]
        log.info("%-10s ms per batch of %d: mean %.2f  p50 %.2f  p90 %.2f  p95 %.2f  p99 %.2f  min %.2f  max %.2f"
                 "  |  %.1f images/s", what, n, s["mean"], s["p50"], s["p90"], s["p95"], s["p99"], s["min"], s["max"],
                 ips)
    if model.backend != "tensorrt":
        log.info("(%s backend: ONNX Runtime%s%s; engine timings need runtime.backend=tensorrt)", model.backend,
                 " on this CPU" if model.backend == "reference" else f" ({runner.providers[0]}, "
                 f"TF32 {'on' if rt.tf32 else 'off'})",
                 ", float16 emulated in float32 arithmetic" if runner.emulated else "")
    log.info("wrote %s", out / "bench.json")
    return 0
