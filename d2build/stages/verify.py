"""verify: run the TensorRT-ready graph, plugins included, on CPU and compare it with Detectron2.

The graph executes in ONNX Runtime with reference implementations of the plugins' documented
semantics; Detectron2 eager runs on the same letterboxed input with the recipe's thresholds. Both
go through the one shared post-processing (box scaling, mask pasting), detections are matched as
sets, and the stage fails (publishing nothing) if any image misses a threshold. It writes a
side-by-side picture per image, a Markdown report and metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.schema import Recipe
from d2build.stages.base import Progress, Stage, StageFailed


class VerifyStage(Stage):
    name = "verify"
    VERSION = 1
    needs = ("weights", "surgery")
    tools = ("torch", "torchvision", "sal-detectron2", "onnxruntime", "onnxruntime-extensions")

    def config_slice(self, recipe: Recipe) -> dict[str, Any]:
        from d2build import photos

        d = recipe.to_dict()
        return {
            "family": recipe.model.family,
            "config": recipe.model.config,
            "input": list(recipe.model.input),
            "surgery": d["surgery"],
            "verify": d["verify"],
            "images": photos.source_digest(recipe.verify.images, recipe.verify.count),
        }

    def run(self, cfg: dict[str, Any], inputs: dict[str, Artifact], out_dir: Path,
            progress: Progress) -> dict[str, Any]:
        from d2build import detectron, photos
        from d2build.families import family
        from d2build.reference import ReferenceSession
        from d2build.stages.weights import load_state

        fam = family(cfg["family"])
        v = cfg["verify"]
        d2cfg = detectron.load_cfg(cfg["config"], fam.eager_overrides(cfg["surgery"]))
        model = detectron.build_model(d2cfg, load_state(inputs["weights"]))
        session = ReferenceSession(inputs["surgery"].path("model.onnx"))
        names = class_names(d2cfg)
        refs = photos.list_images(v["images"], v["count"])
        (out_dir / "pictures").mkdir()
        rows, failures = [], []
        for i, ref in enumerate(refs, 1):
            photo = photos.load(ref)
            progress.count(i, len(refs), f"'{photo.name}': Detectron2 eager vs TensorRT-ready graph")
            row, problem = compare_one(fam, model, session, photo, tuple(cfg["input"]),
                                       d2cfg.MODEL.PIXEL_MEAN, v, names, out_dir / "pictures")
            rows.append(row)
            if problem:
                failures.append(problem)
        summary = summarize(rows)
        (out_dir / "metrics.json").write_text(json.dumps({"images": rows, "summary": summary}, indent=2))
        report = render_report(cfg, rows, summary, failures)
        (out_dir / "report.md").write_text(report)
        if failures:
            raise StageFailed("verify failed:\n" + "\n".join(failures), files={"report.md": report})
        return {"summary": summary, "images": [{k: r[k] for k in SUMMARY_KEYS} for r in rows]}


SUMMARY_KEYS = ("image", "detectron2", "graph", "matched", "recovered", "mean_box_iou",
                "mean_mask_iou", "max_score_diff", "eager_s", "graph_s")


def class_names(d2cfg) -> list[str] | None:
    from detectron2.data import MetadataCatalog

    datasets = list(d2cfg.DATASETS.TEST) or list(d2cfg.DATASETS.TRAIN)
    for ds in datasets:
        names = MetadataCatalog.get(ds).get("thing_classes", None)
        if names:
            return list(names)
    return None


def compare_one(fam, model, session, photo, hw, pad, v: dict[str, Any], names,
                pictures: Path) -> tuple[dict[str, Any], str | None]:
    from d2build.compare import describe_mismatches, match_detections
    from d2build.processing import decode_outputs, detections_from_instances, letterbox
    from d2build.visualize import side_by_side

    chw, lb = letterbox(photo.bgr, hw, pad)
    t0 = time.perf_counter()
    inst = fam.eager(model, chw)
    t1 = time.perf_counter()
    outputs = session.run({"input_tensor": chw[None]})
    t2 = time.perf_counter()
    ref = detections_from_instances(inst, lb)
    got = decode_outputs(outputs, lb)
    m = match_detections(ref, got, iou_min=v["iou_threshold"], score_tol=v["score_tolerance"])
    stem = Path(photo.name).stem
    side_by_side(photo.bgr, ref, got, names, path=pictures / f"{stem}.png", highlight=m)
    row = {
        "image": photo.name, "detectron2": len(ref), "graph": len(got), "matched": len(m.pairs),
        "recovered": m.recovered, "mean_box_iou": m.mean_box_iou, "mean_mask_iou": m.mean_mask_iou,
        "max_score_diff": m.max_score_diff, "eager_s": round(t1 - t0, 3), "graph_s": round(t2 - t1, 3),
        "picture": f"pictures/{stem}.png", "match": m.to_dict(),
    }
    extra, problems = fam.verify_extra(ref, got, m, v)  # family-specific metrics (e.g. keypoints)
    row.update(extra)
    if len(ref) < v["min_detections"]:
        problems.append(f"Detectron2 found {len(ref)} detections (< verify.min_detections={v['min_detections']})")
    if m.recovered < v["min_recovered"]:
        problems.append(f"recovered {m.recovered:.3f} of Detectron2's detections "
                        f"(< verify.min_recovered={v['min_recovered']})")
    if m.mean_mask_iou is not None and m.mean_mask_iou < v["min_mask_iou"]:
        problems.append(f"mean mask IoU {m.mean_mask_iou:.3f} (< verify.min_mask_iou={v['min_mask_iou']})")
    if not problems:
        return row, None
    detail = "\n".join("    " + line for line in describe_mismatches(m, ref, got, names))
    return row, f"  {photo.name}: " + "; ".join(problems) + ("\n" + detail if detail else "")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    masks = [r["mean_mask_iou"] for r in rows if r["mean_mask_iou"] is not None]
    return {
        "images": n,
        "min_recovered": min(r["recovered"] for r in rows),
        "min_matched": min(r["matched"] for r in rows),
        "mean_box_iou": sum(r["mean_box_iou"] for r in rows) / n,
        "mean_mask_iou": sum(masks) / len(masks) if masks else None,
        "max_score_diff": max(r["max_score_diff"] for r in rows),
        "eager_s_per_image": sum(r["eager_s"] for r in rows) / n,
        "graph_s_per_image": sum(r["graph_s"] for r in rows) / n,
    }


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def render_report(cfg: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any],
                  failures: list[str]) -> str:
    v = cfg["verify"]
    h, w = cfg["input"]
    lines = [
        f"# verify: {cfg['family']} at {h}x{w}",
        "",
        f"TensorRT-ready graph (plugins run by d2build's CPU reference implementations in ONNX Runtime) vs "
        f"Detectron2 eager on the same letterboxed input. A match needs the same class, box IoU >= "
        f"{v['iou_threshold']} and |score difference| <= {v['score_tolerance']}; each image must recover >= "
        f"{v['min_recovered']:.0%} of Detectron2's detections with mean mask IoU >= {v['min_mask_iou']}.",
        "",
        "**Verdict: " + ("FAILED" if failures else "passed") + "**",
        "",
        "| image | Detectron2 | graph | matched | recovered | mean box IoU | mean mask IoU | max score diff "
        "| eager s | graph s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| [{r['image']}]({r['picture']}) | {r['detectron2']} | {r['graph']} | {r['matched']} | "
                     f"{r['recovered']:.3f} | {_fmt(r['mean_box_iou'])} | {_fmt(r['mean_mask_iou'])} | "
                     f"{_fmt(r['max_score_diff'], 5)} | {r['eager_s']:.2f} | {r['graph_s']:.2f} |")
    lines += ["", f"Mean per image: Detectron2 eager {summary['eager_s_per_image']:.2f} s, "
              f"graph on ONNX Runtime {summary['graph_s_per_image']:.2f} s (same CPU, same process)."]
    if failures:
        lines += ["", "## What differs", "", "```", *failures, "```"]
    return "\n".join(lines) + "\n"
