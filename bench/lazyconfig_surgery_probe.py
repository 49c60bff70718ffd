"""Probe: the LazyConfig baselines through the prototype surgery (d2build/lazy_surgery.py), both flavours, verified
against Detectron2 eager on the bundled photographs as d2build's verify stage does (same matcher and gates).

    nice -n 10 .venv/bin/python bench/lazyconfig_surgery_probe.py --size 512 [--only r50_lsj vitdet_b] [--photos 3]
        [--flavours plugins standard] [--fp16 --tag _fp16]

Random weights that behave (d2build/random_norms.py), the export of families.mask_rcnn (TracingAdapter),
`lazy_surgery.surgery` (plugins: the CPU reference executor of the plugin semantics; standard: ONNX Runtime),
then per photograph Detectron2's detections matched at IoU >= 0.98 and |score difference| <= 0.01, and the
mean mask IoU. Writes bench/results/lazyconfig_surgery_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lazyconfig_probe import MODELS  # noqa: E402

SURGERY = {"nms": {"iou_threshold": 0.5, "score_threshold": 0.05, "max_detections": 100},
           "rpn": {"pre_nms_topk": 1000, "post_nms_topk": 1000, "iou_threshold": 0.7}}


def probe(key: str, size: int, photos_n: int, tmp: Path, flavours=("plugins", "standard"),
          fp16: bool = False) -> dict:
    import numpy as np
    import onnx
    import torch

    from d2build import backends, lazy_surgery, lazyconfig, model_facts, photos, random_norms
    from d2build.compare import match_detections
    from d2build.families.base import in_model_format
    from d2build.families.mask_rcnn import MaskRCNN
    from d2build.processing import detections_from_instances, letterbox
    from d2build.runtime import Model, ModelInfo

    config, overrides = MODELS[key]
    overrides = dict(overrides)
    cfg = lazyconfig.load(config)
    if cfg.model.backbone.get("square_pad", 0) not in (0, size):
        overrides["model.backbone.square_pad"] = size
        cfg = lazyconfig.load(config, overrides)
    torch.manual_seed(0)
    model = lazyconfig.build_model(cfg, config)
    model_facts.apply_test_settings(model, SURGERY)
    pad = [float(v) for v in model.pixel_mean.flatten()]
    pad_bgr = tuple(pad[::-1] if model.input_format == "RGB" else pad)
    chw, _ = letterbox(photos.bundled("astronaut").bgr, (size, size), pad_bgr)
    chw = np.ascontiguousarray(chw, dtype=np.float32)
    random_norms.behave(model, in_model_format(model, torch.as_tensor(chw)).numpy(), seed=0)
    fam = MaskRCNN()
    path = tmp / f"{key}.onnx"
    t = time.perf_counter()
    fam.export(model, chw, path)
    row: dict = {"model": key, "input": [size, size], "overrides": overrides, "export_s": round(time.perf_counter() - t, 1)}
    export = onnx.load(str(path))
    row["export_nodes"] = len(export.graph.node)
    info = ModelInfo(family="mask_rcnn", input_hw=(size, size), pixel_mean=pad_bgr, num_classes=80,
                     pixel_std=tuple(float(v) for v in model.pixel_std.flatten()))

    def check(graph, min_recovered: float, min_mask_iou: float) -> dict:
        runtime = Model(backends.open_graph(graph), info)
        images = []
        for name in photos.BUNDLED[:photos_n]:
            bgr = photos.bundled(name).bgr
            x, (lb,) = runtime.prepare([bgr])
            t0 = time.perf_counter()
            inst = fam.eager(model, x[0])
            t1 = time.perf_counter()
            got, _, graph_s = runtime.detect(bgr)
            ref = detections_from_instances(inst, lb)
            m = match_detections(ref, got, iou_min=0.98, score_tol=0.01)
            images.append({"image": name, "detectron2": len(ref), "graph": len(got), "matched": len(m.pairs),
                           "recovered": round(m.recovered, 4), "mean_box_iou": round(m.mean_box_iou, 5),
                           "mean_mask_iou": None if m.mean_mask_iou is None else round(m.mean_mask_iou, 4),
                           "max_score_diff": m.max_score_diff, "eager_s": round(t1 - t0, 2),
                           "graph_s": round(graph_s, 2)})
        passed = all(i["recovered"] >= min_recovered and (i["mean_mask_iou"] or 1) >= min_mask_iou
                     and i["detectron2"] >= 20 for i in images)
        return {"images": images, "passed": passed}

    for ops in flavours:
        t = time.perf_counter()
        graph, facts = lazy_surgery.surgery(export, model, {**SURGERY, "ops": ops}, (size, size))
        row[ops] = {"surgery_s": round(time.perf_counter() - t, 1), "nodes": len(graph.graph.node),
                    "vit_ops": facts.get("ops_added_to_the_standard_list"), **check(graph, 0.99, 0.95)}
        if fp16:  # d2build's fp16 policy (autocast.to_fp16) and verify's fp16 gates (conf/precision/fp16.yaml)
            from d2build import autocast

            half = autocast.to_fp16(graph)
            row[f"{ops}_fp16"] = {"fp16_nodes": half.facts.get("fp16_nodes"), "casts": half.casts,
                                  **check(half.model, 0.97, 0.9)}
    path.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=list(MODELS))
    ap.add_argument("--photos", type=int, default=3)
    ap.add_argument("--flavours", nargs="*", default=["plugins", "standard"])
    ap.add_argument("--fp16", action="store_true", help="also the fp16 graph of each flavour (verify's fp16 gates)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    a = ap.parse_args()
    import logging
    import warnings

    import torch

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in a.only:
            t = time.perf_counter()
            row = probe(key, a.size, a.photos, Path(tmp), tuple(a.flavours), a.fp16)
            row["total_s"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print("RESULT " + json.dumps(row), flush=True)
    out = REPO / "bench" / "results" / f"lazyconfig_surgery_{a.size}{a.tag}.json"
    doc = {"machine": f"{platform.machine()}, 2 threads, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
           "rows": rows}
    if out.exists() and set(a.only) != set(MODELS):
        doc["rows"] = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in a.only] + rows
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
