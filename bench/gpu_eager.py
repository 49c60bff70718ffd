"""GPU baseline: Detectron2 eager latency and FPS, the numbers a TensorRT engine is compared against.

For Mask R-CNN, Keypoint R-CNN, RetinaNet, Cascade Mask R-CNN, Panoptic FPN and PointRend (R50-FPN, d2build's
random weights that behave), at several square inputs, batch 1, fp32 and autocast fp16: warm-up, then the median (and p10/p90) of many timed runs
with CUDA synchronisation. The configurations are timed in interleaved rounds (--rounds), so a slow
spell of the host (eager Detectron2 is launch- and Python-bound) lands on all of them alike; the
spread of the per-round medians is reported beside the overall median. Two paths are timed: the family's
`inference` (GeneralizedRCNN's `inference(do_postprocess=False)`, RetinaNet's forward without
`detector_postprocess`: what an engine computes, boxes, scores, classes, 28x28 masks / heatmaps; Panoptic
FPN's also the semantic logits, PointRend's its 224x224 subdivided masks) and the full `model([...])` call with
Detectron2's post-processing (mask pasting / keypoint decoding at the original image size; Panoptic FPN's
semantic resize and panoptic combination).

    python bench/gpu_eager.py --out bench/results/gpu_eager.json [--iters 150] [--rounds 5] [--sizes 640 1024 1344] \
        [--models mask_rcnn_r50 retinanet_r50 ...] [--reference mask_rcnn_r50 --reference-size 640]

The segmentation families (issue 22), beside Mask R-CNN at the same sizes:

    python bench/gpu_eager.py --out bench/results/gpu_eager_segmentation.json --sizes 512 800 1344 \
        --models mask_rcnn_r50 panoptic_fpn_r50 pointrend_mask_rcnn_r50

`--reference` models are timed at `--reference-size` only (a point of comparison beside the others).

It needs a CUDA GPU; TensorRT engines are not timed (TensorRT is not installable there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from timing import calls_ms, host_cpu, spread

MODELS = {  # name -> (Detectron2 config, d2build family)
    "mask_rcnn_r50": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "mask_rcnn"),
    "keypoint_rcnn_r50": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml", "keypoint_rcnn"),
    "retinanet_r50": ("COCO-Detection/retinanet_R_50_FPN_3x.yaml", "retinanet"),
    "cascade_mask_rcnn_r50": ("Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml", "cascade_rcnn"),
    "panoptic_fpn_r50": ("COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml", "panoptic_fpn"),
    # sal-detectron2 ships no PointRend config: the one the recipe names (a checkout's recipes/)
    "pointrend_mask_rcnn_r50": (str(Path(__file__).resolve().parents[1] / "recipes" / "detectron2"
                                    / "pointrend_rcnn_R_50_FPN_3x_coco.yaml"), "pointrend"),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_busy_ms(fn, iters: int) -> float | None:
    """GPU time per call: the kernels' and copies' own device time, summed over `iters` profiled calls.
    Set against the wall time it says how much of eager latency is the GPU working (the part an engine
    speeds up) and how much is the host launching work and running Python (the part it removes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - no CUPTI: say so in the results instead of failing the run
        print(f"GPU profiling unavailable: {e}", flush=True)
        return None
    us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in prof.key_averages())
    return round(us / 1000 / iters, 2)


def summary(ms: list[float]) -> dict[str, float]:
    out = spread(ms)
    return {**out, "fps": round(1000.0 / out["median_ms"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_eager.json")
    ap.add_argument("--iters", type=int, default=150, help="timed runs per configuration and path, in all")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the runs are split into")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per configuration and path, per round")
    ap.add_argument("--sizes", type=int, nargs="+", default=[640, 1024, 1344])
    ap.add_argument("--busy-iters", type=int, default=10, help="profiled calls per configuration for GPU busy time")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reference", nargs="*", default=[], help="models timed at --reference-size only")
    ap.add_argument("--reference-size", type=int, default=640)
    ap.add_argument("--photo", default="astronaut.png", help="the astronaut photograph, where scikit-image is missing")
    ap.add_argument("--device", default="cuda", help="cuda (the baseline); cpu only to smoke-test this script")
    args = ap.parse_args()

    from d2build import detectron, photos
    from d2build.families import builder
    from d2build.processing import letterbox

    dev = args.device
    assert dev != "cuda" or torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cudnn.benchmark = True
    try:
        bgr = photos.bundled("astronaut").bgr
    except ImportError:  # no scikit-image on the GPU machine: the same photograph from a file
        from d2build.processing import load_image_bgr

        bgr = load_image_bgr(args.photo)
    chw0 = np.ascontiguousarray(bgr.transpose(2, 0, 1), dtype=np.float32)
    configs = []  # (model name, size, precision, path) -> callable
    for name in args.models:
        config, fam_name = MODELS[name]
        fam = builder(fam_name)
        cfg = detectron.load_cfg(config)
        model = detectron.random_model(cfg, 0, chw0, family=fam).to(dev).eval()
        print(f"{name}: random weights ready", flush=True)
        for size in ([args.reference_size] if name in args.reference else args.sizes):
            chw, lb = letterbox(bgr, (size, size), cfg.MODEL.PIXEL_MEAN)
            x = torch.as_tensor(chw, device=dev)
            h, w = lb.original_hw
            for precision in ("fp32", "fp16"):
                fp16 = precision == "fp16" and dev == "cuda"

                def raw(model=model, x=x, fp16=fp16, fam=fam):
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                        return fam.inference(model, [{"image": x}])

                def full(model=model, x=x, h=h, w=w, fp16=fp16):
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                        return model([{"image": x, "height": h, "width": w}])

                first = raw()[0]  # Instances, or Panoptic FPN's (Instances, semantic logits)
                configs.append({"model": name, "input": size, "precision": precision,
                                "detections": len(first[0] if isinstance(first, tuple) else first),
                                "fns": {"raw": raw, "with_postprocess": full}})
    load_before = os.getloadavg()
    samples = {(i, path): [] for i in range(len(configs)) for path in ("raw", "with_postprocess")}
    per_round = {key: [] for key in samples}
    n = max(1, args.iters // args.rounds)
    for r in range(args.rounds):
        for i, c in enumerate(configs):
            for path, fn in c["fns"].items():
                t = calls_ms(fn, sync, n, args.warmup)
                samples[i, path] += t
                per_round[i, path].append(statistics.median(t))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for i, c in enumerate(configs):
        row = {k: c[k] for k in ("model", "input", "precision", "detections")}
        for path in ("raw", "with_postprocess"):
            row[path] = {**summary(samples[i, path]),
                         "round_medians_ms": [round(m, 2) for m in per_round[i, path]]}
        if args.busy_iters and dev == "cuda":
            row["raw"]["gpu_busy_ms"] = gpu_busy_ms(c["fns"]["raw"], args.busy_iters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "none (cpu smoke test)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu": host_cpu(), "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "command": "python bench/gpu_eager.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v not in (None, [])),
        "commit": os.environ.get("D2BUILD_COMMIT", ""),
        "iters": n * args.rounds, "rounds": args.rounds, "warmup_per_round": args.warmup, "batch": 1,
        "weights": "d2build random weights (seed 0) that behave; timings do not depend on weight values "
                   "except through the number of detections (reported per row)",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
