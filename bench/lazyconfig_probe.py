"""Probe: Detectron2's LazyConfig models (LSJ R50/R101, RegNetX-4GF LSJ, ViTDet-B) on CPU -- build, random weights
that behave, eager detections, the TracingAdapter export, and what d2build's surgery would keep of it.

Research for issue 21 (docs/design/lazyconfig.md); prototype code only (d2build/lazyconfig.py,
d2build/random_norms.py), no stage runs. Per model and input size it reports:

* load / build seconds, parameters; what `random_norms.behave` did; Detectron2 eager detections (score >= 0.05)
  per bundled photograph, and one eager forward's seconds;
* export seconds, nodes, file size, whether the export reproduces the traced forward in ONNX Runtime (the export
  stage's own check); the export's op histogram per kept part (backbone, RPN head, box head, box predictor, mask
  head), after onnx-graphsurgeon's fold_constants (as surgery starts), and the lines
  `standard_ops.problems` gives for the kept parts;
* the tensors surgery would read: the features (the RPN head's first conv input per level) and the first node of
  each head, by scope;
* sensitivity: the relative rms change of the backbone's features when the input moves by 2^-12 (one float16
  rounding), the number `detectron._scale_residual_branches`' docstring uses.

    nice -n 10 .venv/bin/python bench/lazyconfig_probe.py --size 512 [--only r50_lsj vitdet_b] [--photos 3]

Writes bench/results/lazyconfig_probe_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "r50_lsj": ("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py", {}),
    "r101_lsj": ("new_baselines/mask_rcnn_R_101_FPN_100ep_LSJ.py", {}),
    "regnetx_4gf_lsj": ("new_baselines/mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ.py", {}),
    "vitdet_b": ("common/models/mask_rcnn_vitdet.py", {}),
}
PARTS = ("backbone", "proposal_generator/rpn_head", "roi_heads/box_head", "roi_heads/box_predictor",
         "roi_heads/mask_head")


def part_of(name: str) -> str | None:
    for p in PARTS:
        if name.startswith(f"/{p}/") or name.startswith(f"/{p}.") or name.startswith(f"/{p}_"):
            return p
    return None


def fold_until_static(proto, max_passes: int = 4):
    """onnx-graphsurgeon fold_constants + shape inference, repeated until the node count stops falling.

    Surgery folds once (enough for the ResNet exports); ViT's window partition and relative positions compute
    shapes from `x.shape`, which fold only once shape inference has made the shapes they read static."""
    import onnx
    import onnx_graphsurgeon as gs

    passes = []
    model = proto
    for _ in range(max_passes):
        g = gs.import_onnx(model)
        g.fold_constants().cleanup()
        model = onnx.shape_inference.infer_shapes(gs.export_onnx(g))
        passes.append(len(model.graph.node))
        if len(passes) > 1 and passes[-1] == passes[-2]:
            break
    return model, passes


def probe(key: str, size: int, photos_n: int, out_dir: Path) -> dict:
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    import torch

    from d2build import lazyconfig, photos, random_norms, standard_ops
    from d2build.families.base import in_model_format
    from d2build.families.mask_rcnn import MaskRCNN
    from d2build.processing import letterbox
    from d2build.stages.export import check_export

    config, overrides = MODELS[key]
    overrides = dict(overrides)
    row: dict = {"model": key, "config": config, "input": [size, size]}
    t = time.perf_counter()
    cfg = lazyconfig.load(config)
    sq = cfg.model.backbone.get("square_pad", 0)
    if sq and sq != size:  # ViTDet pads every image to square_pad: the graph's size is the model's (design note)
        overrides["model.backbone.square_pad"] = size
        cfg = lazyconfig.load(config, overrides)
    row["overrides"] = overrides
    row["family"] = lazyconfig.family_of(cfg, config)
    row["load_s"] = round(time.perf_counter() - t, 2)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = lazyconfig.build_model(cfg, config)
    row["build_s"] = round(time.perf_counter() - t, 2)
    row["parameters"] = int(sum(p.numel() for p in model.parameters()))
    pad = [float(v) for v in model.pixel_mean.flatten()]
    pad_bgr = pad[::-1] if model.input_format == "RGB" else pad
    bn_photo = photos.bundled("astronaut")
    chw, lb = letterbox(bn_photo.bgr, (size, size), pad_bgr)
    chw = np.ascontiguousarray(chw, dtype=np.float32)
    t = time.perf_counter()
    model_chw = in_model_format(model, torch.as_tensor(chw)).numpy()
    row["random"] = random_norms.behave(model, model_chw, seed=0)
    row["random_s"] = round(time.perf_counter() - t, 2)

    fam = MaskRCNN()
    dets = {}
    for name in photos.BUNDLED[:photos_n]:
        img, _ = letterbox(photos.bundled(name).bgr, (size, size), pad_bgr)
        t = time.perf_counter()
        inst = fam.eager(model, np.ascontiguousarray(img, dtype=np.float32))
        dt = time.perf_counter() - t
        s = inst.scores.numpy()
        dets[name] = {"detections": int((s >= 0.05).sum()), "median_score": round(float(np.median(s)), 3) if len(s) else None,
                      "classes": int(len(set(inst.pred_classes.tolist()))), "eager_s": round(dt, 2)}
    row["eager"] = dets

    # sensitivity of the backbone to one float16 rounding of the input
    with torch.no_grad():
        x = model.preprocess_image([{"image": torch.as_tensor(model_chw)}]).tensor
        f0 = model.backbone(x)
        f1 = model.backbone(x * (1 + 2.0 ** -12))
    row["sensitivity"] = {k: float((f1[k] - f0[k]).pow(2).mean().sqrt() / f0[k].pow(2).mean().sqrt()) for k in f0}

    path = out_dir / f"{key}_{size}.onnx"
    t = time.perf_counter()
    traced = fam.export(model, chw, path)
    row["export_s"] = round(time.perf_counter() - t, 2)
    row["export_mb"] = round(path.stat().st_size / 2 ** 20, 1)
    t = time.perf_counter()
    row["export_check"] = check_export(fam, model, path, "astronaut", chw, lb, reference=traced)
    row["export_check_s"] = round(time.perf_counter() - t, 2)
    proto = onnx.load(str(path))
    row["export_nodes"] = len(proto.graph.node)
    row["export_ops"] = dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
    t = time.perf_counter()
    folded, passes = fold_until_static(proto)
    row["fold_s"] = round(time.perf_counter() - t, 2)
    row["fold_passes"] = passes  # node count after each fold_constants + shape inference pass
    row["folded_nodes"] = len(folded.graph.node)
    parts: dict[str, Counter] = {p: Counter() for p in PARTS}
    other = Counter()
    for n in folded.graph.node:
        p = part_of(n.name)
        (parts[p] if p else other)[n.op_type] += 1
    row["kept_ops"] = {p: dict(sorted(c.items())) for p, c in parts.items()}
    row["dropped_ops"] = dict(sorted(other.items()))
    kept = onnx.ModelProto()
    kept.CopyFrom(folded)
    del kept.graph.node[:]
    kept.graph.node.extend(n for n in folded.graph.node if part_of(n.name))
    probs = standard_ops.problems(kept)
    row["standard_problems"] = dict(Counter(p.split(": op ")[-1].split(" ")[0] if ": op " in p else p for p in probs))
    row["standard_problem_examples"] = probs[:6]

    # what surgery reads: features = the RPN head's first conv input per level; each head's first node
    gg = gs.import_onnx(folded)
    rpn = [n for n in gg.nodes if n.name.startswith("/proposal_generator/rpn_head/") and n.op == "Conv"]
    def in_rpn(t) -> bool:
        return bool(t.inputs) and t.inputs[0].name.startswith("/proposal_generator/rpn_head/")

    firsts = [n for n in rpn if not in_rpn(n.inputs[0])]
    feats = []
    for n in firsts:
        src = n.inputs[0].inputs[0] if n.inputs[0].inputs else None
        feats.append({"rpn_conv": n.name, "feature_from": src.name if src else None, "op": src.op if src else None,
                      "shape": n.inputs[0].shape})
    row["features"] = feats
    heads = {}
    for part in ("roi_heads/box_head", "roi_heads/mask_head"):
        nodes = [n for n in gg.nodes if part_of(n.name) == part]
        heads[part] = [f"{n.op} {n.name}" for n in nodes[:3]]
    row["head_first_nodes"] = heads
    first_conv = next(n for n in gg.toposort().nodes if n.op == "Conv")
    row["first_conv"] = first_conv.name
    path.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=list(MODELS))
    ap.add_argument("--photos", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import logging
    import warnings

    import torch

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in a.only:
            t = time.perf_counter()
            row = probe(key, a.size, a.photos, Path(tmp))
            row["total_s"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = REPO / "bench" / "results" / f"lazyconfig_probe_{a.size}.json"
    doc = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if out.exists() and set(a.only) != set(MODELS):  # a partial run adds to the file
        old = json.loads(out.read_text())
        keep = [r for r in old["rows"] if r["model"] not in a.only]
        doc["rows"] = keep + rows
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
