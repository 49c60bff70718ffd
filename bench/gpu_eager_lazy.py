"""GPU baseline for Detectron2's LazyConfig models: Detectron2 eager latency of the LSJ Mask R-CNNs (R50, R101,
RegNetX-4GF) and ViTDet-B Mask R-CNN, random weights that behave (d2build/random_norms.py), batch 1, fp32 and
autocast fp16, TF32 off (d2build's policy), at their native 1024x1024 and at 512x512.

What is timed is `GeneralizedRCNN.inference(..., do_postprocess=False)` on a letterboxed CUDA tensor: what an
engine computes (boxes, scores, classes, 28x28 masks), as bench/gpu_eager.py times the yacs families. Warm-up,
then the median (p10, p90) of --iters runs with CUDA synchronisation; detections per photograph at score >= 0.05.

    python bench/gpu_eager_lazy.py --out bench/results/gpu_eager_lazy.json [--iters 40] [--sizes 1024 512]

ViTDet pads every input to `square_pad` (1024); at 512 the config is overridden to square_pad=512, as the recipe
does. It needs a CUDA GPU and timm (pure Python).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timing import calls_ms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "mask_rcnn_r50_lsj": "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
    "mask_rcnn_r101_lsj": "new_baselines/mask_rcnn_R_101_FPN_100ep_LSJ.py",
    "mask_rcnn_regnetx_4gf_lsj": "new_baselines/mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ.py",
    "mask_rcnn_vitdet_b": "common/models/mask_rcnn_vitdet.py",
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gpu_eager_lazy.json")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; later models are skipped past it")
    p.add_argument("--device", default="cuda", help="cuda (the baseline) or cpu (a smoke test)")
    a = p.parse_args()
    t_start = time.monotonic()

    from d2build import detectron, lazyconfig, photos, random_norms
    from d2build.backends.detectron2 import set_tf32
    from d2build.processing import letterbox

    set_tf32(False)
    torch.manual_seed(0)
    doc = {"what": __doc__.splitlines()[0], "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__, "python": platform.python_version(),
           "tf32": False, "rows": [], "errors": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ("astronaut", "coffee", "rocket")
    for name in a.models:
        for size in a.sizes:
            if time.monotonic() - t_start > a.deadline:
                doc["errors"].append({"model": name, "size": size, "error": "skipped: deadline"})
                continue
            try:
                overrides = {"model.backbone.square_pad": size} if "vitdet" in name else {}
                cfg = lazyconfig.load(MODELS[name], overrides)
                torch.manual_seed(0)
                model = lazyconfig.build_model(cfg, MODELS[name])
                mean = tuple(float(v) for v in model.pixel_mean.flatten())
                bgr = photos.bundled("astronaut").bgr
                chw, _ = letterbox(bgr, (size, size), mean)
                t0 = time.perf_counter()
                random_norms.behave(model, chw, seed=0, family=None, predictor_spread=detectron.PREDICTOR_SPREAD,
                                    rescale=detectron.rescale_outputs)
                random_s = time.perf_counter() - t0
                model = model.to(a.device).eval()
                inputs = {n: torch.as_tensor(letterbox(photos.bundled(n).bgr, (size, size), mean)[0], device=a.device)
                          for n in names}
                for precision in ("fp32", "fp16"):
                    x = [{"image": inputs["astronaut"]}]

                    def call(x=x, fp16=precision == "fp16", m=model):
                        with torch.no_grad(), torch.autocast(a.device, dtype=torch.float16,
                                                             enabled=fp16 and a.device == "cuda"):
                            return m.inference(x, do_postprocess=False)

                    ms = calls_ms(call, sync, a.iters, a.warmup)
                    dets = []
                    for n in names:
                        with torch.no_grad(), torch.autocast(a.device, dtype=torch.float16,
                                                             enabled=precision == "fp16" and a.device == "cuda"):
                            inst = model.inference([{"image": inputs[n]}], do_postprocess=False)[0]
                        dets.append(int((inst.scores >= 0.05).sum()))
                    q = np.percentile(ms, [10, 50, 90])
                    row = {"model": name, "config": MODELS[name], "input": size, "precision": precision,
                           "median_ms": round(float(q[1]), 2), "p10_ms": round(float(q[0]), 2),
                           "p90_ms": round(float(q[2]), 2), "mean_ms": round(statistics.mean(ms), 2),
                           "images_per_s": round(1000 / float(q[1]), 1), "iters": a.iters,
                           "detections_per_photo": dets, "random_weights_s": round(random_s, 1),
                           "parameters_m": round(sum(t.numel() for t in model.parameters()) / 1e6, 2)}
                    doc["rows"].append(row)
                    print(json.dumps(row), flush=True)
                del model
                if a.device == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - one model that fails is a finding, not the end of the run
                doc["errors"].append({"model": name, "size": size, "error": f"{type(e).__name__}: {e}"[:500]})
                print(json.dumps(doc["errors"][-1]), flush=True)
            out.write_text(json.dumps(doc, indent=1))
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
