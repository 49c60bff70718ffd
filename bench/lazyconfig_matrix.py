"""Benchmark: the LazyConfig recipes through the real command line at their native 1024x1024 and at 512x512.

Issue 21's acceptance matrix: each LazyConfig recipe (Mask R-CNN R50 / R101 / RegNetX-4GF LSJ, ViTDet-B) at
1024x1024 and 512x512, both graph flavours, fp32, random weights that behave (d2build.random_norms), verify on
the three bundled photographs (>= 99 % of Detectron2's detections matched per image, masks too); then the other
build options at 512: fp16 and int8 (bundled calibration) for LSJ R50 and ViTDet-B, batch 2 and dynamic shapes
for LSJ R50 (ViTDet builds at one size and batch 1: refused in one line). `--trained`: the trained LazyConfig
model (models/shapes_lazy_mask_rcnn) with eval on 24 synthetic val images instead, fp32 in both flavours, fp16
and int8: its AP beside Detectron2's on the same input (random weights say nothing about int8 accuracy). Rows
as bench/families_matrix.py writes them (its run_one and table), one process per row, one cache, so each
weights and export is built once.

    nice -n 10 .venv/bin/python bench/lazyconfig_matrix.py [--cache DIR] [--only mask_rcnn_vitdet_b ...]
        [--sizes 512] [--core] [--trained] [--out FILE]

Writes bench/results/lazyconfig_matrix.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families_matrix import REPO, header, run_one, table  # noqa: E402

RECIPES = ("mask_rcnn_r50_lsj", "mask_rcnn_r101_lsj", "mask_rcnn_regnetx_4gf_lsj", "mask_rcnn_vitdet_b")
FLAVOURS = (["surgery.ops=plugins"], ["surgery.ops=standard"])
INT8 = ["precision=int8", "calibration=bundled", "calibration.count=3", "calibration.method=entropy"]
TRAINED_EVAL_IMAGES = 24


def _size(recipe: str, side: int) -> list[str]:
    """ViTDet's backbone pads every image to square_pad (1024 in the zoo's config): another size sets it too."""
    if recipe == "mask_rcnn_vitdet_b" and side != 1024:
        return [f"model.config_overrides={{model.backbone.square_pad:{side}}}"]
    return []


def matrix(sizes: list[int], core: bool = False) -> list[tuple[str, str, list[str]]]:
    rows = [(r, f"[{s},{s}]", [*ops, *_size(r, s)]) for s in sizes for r in RECIPES for ops in FLAVOURS]
    if 512 in sizes and not core:
        for r in ("mask_rcnn_r50_lsj", "mask_rcnn_vitdet_b"):
            pad = _size(r, 512)
            rows += [(r, "[512,512]", ["surgery.ops=standard", "precision=fp16", *pad]),
                     (r, "[512,512]", ["surgery.ops=plugins", "precision=fp16", *pad]),
                     (r, "[512,512]", ["surgery.ops=plugins", *INT8, *pad])]
        rows.append(("mask_rcnn_r50_lsj", "[512,512]", ["surgery.ops=standard", "model.batch_size=2"]))
        # batch and dynamic shapes: LSJ only (ViTDet's square_pad fixes the input size and the batch)
        dynamic = "model.dynamic={min:[384,384],max:[640,640],min_size:512,max_size:640}"
        rows.append(("mask_rcnn_r50_lsj", "[512,512]", ["surgery.ops=standard", dynamic]))
    return rows


def trained(data: Path) -> list[tuple[str, str, list[str]]]:
    """The trained LazyConfig model (models/shapes_lazy_mask_rcnn) with eval on the synthetic val split: its AP beside
    Detectron2's on the same input, fp32 in both flavours, fp16 and int8 (calibration on train images: the
    photographs hold no shapes)."""
    from d2build import synthetic

    val = synthetic.write_coco("shapes", "val", TRAINED_EVAL_IMAGES, data / "shapes_val")
    train = data / "shapes_train"
    synthetic.write_coco("shapes", "train", 6, train)
    ev = [f"eval.annotations={val}", f"eval.images={val.parent}", f"verify.images={train}",
          f"calibration.images={train}"]
    return [("shapes_lazy_mask_rcnn", "[512,704]", [*ops, *ev]) for ops in
            (["surgery.ops=standard"], ["surgery.ops=plugins"], ["surgery.ops=standard", "precision=fp16"],
             ["surgery.ops=standard", "precision=int8", "calibration.method=entropy"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="cache folder (default: a new temporary one)")
    ap.add_argument("--only", nargs="*", default=None, help="recipes to run (default: all four)")
    ap.add_argument("--sizes", nargs="*", type=int, default=[1024, 512])
    ap.add_argument("--core", action="store_true", help="fp32, both flavours only (no fp16/int8/batch/dynamic rows)")
    ap.add_argument("--trained", action="store_true", help="only the trained LazyConfig model's eval rows "
                    f"(fp32 both flavours, fp16, int8; {TRAINED_EVAL_IMAGES} synthetic val images)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "lazyconfig_matrix.json"))
    args = ap.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="lazy-cache-"))
    rows_in = trained(cache / "data") if args.trained else \
        [m for m in matrix(args.sizes, args.core) if not args.only or m[0] in args.only]
    load_before = os.getloadavg()[0]
    command = ("bench/lazyconfig_matrix.py" + (f" --only {' '.join(args.only)}" if args.only else "")
               + f" --sizes {' '.join(map(str, args.sizes))}" + (" --core" if args.core else "")
               + (" --trained" if args.trained else ""))
    out = Path(args.out)
    rows = []
    for i, (recipe, size, extra) in enumerate(rows_in, 1):
        row = run_one(recipe, size, extra, cache, random_weights=not args.trained)
        rows.append(row)
        print(f"[{i}/{len(rows_in)}]", json.dumps({k: row.get(k) for k in ("recipe", "input", "overrides", "ok",
                                                                         "wall_s", "graph_nodes", "verify")}),
              flush=True)
        doc = {**header(command, load_before), "rows": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))  # after every row: a long run that stops keeps what it measured
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
