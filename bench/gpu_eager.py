"""GPU baseline: Detectron2 eager latency and FPS, the numbers a TensorRT engine is compared against.

For Mask R-CNN and Keypoint R-CNN (R50-FPN, d2build's random weights that behave), at several square
inputs, batch 1, fp32 and autocast fp16: warm-up, then the median (and p10/p90) of many timed runs
with CUDA synchronisation. Two paths are timed: `inference(do_postprocess=False)` (what an engine
computes: boxes, scores, classes, 28x28 masks / heatmaps) and the full `model([...])` call with
Detectron2's post-processing (mask pasting / keypoint decoding at the original image size).

    python bench/gpu_eager.py --out bench/results/gpu_eager.json [--iters 50] [--sizes 640 1024 1344]

It needs a CUDA GPU; TensorRT engines are not timed (TensorRT is not installable there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "mask_rcnn_r50": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "keypoint_rcnn_r50": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml",
}


def timed(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    med = statistics.median(ms)
    return {"median_ms": round(med, 2), "p10_ms": round(ms[len(ms) // 10], 2),
            "p90_ms": round(ms[(9 * len(ms)) // 10], 2), "fps": round(1000.0 / med, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_eager.json")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[640, 1024, 1344])
    args = ap.parse_args()

    from d2build import detectron, photos
    from d2build.processing import letterbox

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cudnn.benchmark = True
    photo = photos.bundled("astronaut")
    rows = []
    for name, config in MODELS.items():
        cfg = detectron.load_cfg(config)
        chw0 = np.ascontiguousarray(photo.bgr.transpose(2, 0, 1), dtype=np.float32)
        model = detectron.random_model(cfg, 0, chw0).to("cuda").eval()
        for size in args.sizes:
            chw, lb = letterbox(photo.bgr, (size, size), cfg.MODEL.PIXEL_MEAN)
            x = torch.as_tensor(chw, device="cuda")
            h, w = lb.original_hw
            for precision in ("fp32", "fp16"):
                def raw():
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                        return model.inference([{"image": x}], do_postprocess=False)

                def full():
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                        return model([{"image": x, "height": h, "width": w}])

                detections = len(raw()[0])
                row = {"model": name, "input": size, "precision": precision, "detections": detections,
                       "raw": summary(timed(raw, args.iters, args.warmup)),
                       "with_postprocess": summary(timed(full, args.iters, args.warmup))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "iters": args.iters, "warmup": args.warmup, "batch": 1,
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
