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
from collections import Counter
from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import Files, GraphDevice, ModelSlice, Problem, Recipe, VerifyConfig, VerifySlice
from d2build.stages.base import Context, Stage, StageFailed


def verify_slice(recipe: Recipe) -> VerifySlice:
    """What verify (and the engine check) read: the model (names too: the pictures show them; the resize
    rule of a dynamic graph: which inputs are fed), its precision, the gates, the photographs' pixels."""
    from d2build import photos

    v = recipe.verify
    return VerifySlice(ModelSlice.of(recipe), recipe.precision.mode, v, photos.source_digest(v.images, v.count),
                       GraphDevice.of(recipe))


def sizes_problems(recipe: Recipe, key: str, refs: list[str]) -> list[Problem]:
    """A dynamic graph's range against every image a stage will feed it (their headers only), before anything
    is built: one Problem naming the key whose images do not fit."""
    if recipe.model.dynamic is None:
        return []
    from d2build import detectron, photos
    from d2build.runtime.model import outside_range, range_problem

    info = detectron.model_info(ModelSlice.of(recipe))
    try:
        sizes = photos.image_sizes(refs)
    except ValueError as e:
        return [Problem(recipe.source, key, str(e), f"remove or replace the image {key} names")]
    outside = outside_range(info, sizes)
    if not outside:
        return []
    message, fix = range_problem(info, outside, len(sizes))
    return [Problem(recipe.source, key, message, fix)]


def eager_and_info(cfg: VerifySlice, weights: Artifact):
    """(the family's build half, Detectron2 eager with the recipe's thresholds, the graph's ModelInfo) for
    verify and check."""
    from d2build import detectron
    from d2build.families import builder
    from d2build.stages.weights import load_state

    build = builder(cfg.model.family)
    d2cfg = detectron.load_cfg(cfg.model.graph.config, build.eager_overrides(cfg.model.graph.surgery))
    model = detectron.build_model(d2cfg, load_state(weights))
    if cfg.device is not None:  # Detectron2 on the GPU the graph runs on, TF32 as the graph's (runtime.tf32)
        from d2build.backends.detectron2 import on_device

        model = on_device(model, cfg.device.device, tf32=cfg.device.tf32)
    return build, model, detectron.model_info(cfg.model, d2cfg)


class VerifyStage(Stage):
    """Reads `weights` and `graph` (the precision graph: fp32 = surgery's graph, fp16, int8)."""

    kind = "verify"
    # 4: class/keypoint names in the key (pictures show them); 5: batch (and its consistency check); 6: device,
    # the family's image-level gates (semantic, panoptic); 7: an RGB model's letterbox pads with its mean in BGR order
    VERSION = 7
    tools = ("torch", "torchvision", "sal-detectron2", "onnxruntime", "onnxruntime-extensions")

    def slice(self, recipe: Recipe) -> VerifySlice:
        return verify_slice(recipe)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        from d2build import photos

        return sizes_problems(recipe, "verify.images", photos.list_images(recipe.verify.images, recipe.verify.count))

    def run(self, cfg: VerifySlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        from d2build import backends, photos
        from d2build.runtime import Model

        v = cfg.verify
        fam, model, info = eager_and_info(cfg, inputs["weights"])
        from d2build.backends import devices

        runner = backends.open_graph(inputs["graph"].path(Files.GRAPH), **devices.stage_options(cfg.device))
        graph = Model(runner, info)
        emulated = graph.runner.emulated
        refs = photos.list_images(v.images, v.count)
        (out_dir / Files.PICTURES).mkdir()
        rows, failures = [], []
        for i, ref in enumerate(refs, 1):
            photo = photos.load(ref)
            ctx.count(i, len(refs), f"'{photo.name}': Detectron2 eager vs TensorRT-ready graph")
            row, problem = compare_one(fam, model, graph, photo, v, out_dir / Files.PICTURES)
            rows.append(row)
            if problem:
                failures.append(problem)
        summary = summarize(rows)
        family_summary, family_line = fam.family.verify_summary(rows)  # e.g. semantic agreement
        if family_summary:
            summary["family"], summary["family_line"] = family_summary, family_line
        if info.batch > 1:
            ctx.step(f"batch of {info.batch}: each image's detections against the same image alone")
            batch = batch_consistency(graph, [photos.load(r) for r in refs])
            summary["batch"] = batch
            if not batch["ok"]:
                failures.append(f"  batch of {info.batch}: {batch['problem']}")
                for r in rows:
                    r["failed"] = r["failed"] or r["image"] in batch["differs"]
        precision = precision_facts(cfg.precision, inputs["graph"].info, emulated)
        (out_dir / Files.METRICS).write_text(json.dumps({"images": rows, "summary": summary,
                                                         "precision": precision}, indent=2))
        report = render_report(cfg, rows, summary, failures, graph.backend) + render_precision(precision)
        (out_dir / Files.REPORT).write_text(report)
        if failures:
            bad = [r for r in rows if r["failed"]]
            head = (f"FAILED on {len(bad)} of {len(rows)} images: "
                    + "; ".join(f"{r['image']} {r['matched']}/{r['detectron2']} matched" for r in bad))
            raise StageFailed(head + "\n" + "\n".join(failures), files={Files.REPORT: report})
        return {"summary": summary, "images": [{k: r[k] for k in SUMMARY_KEYS} for r in rows],
                "precision": {k: v for k, v in precision.items() if k != "emulated_nodes"}}

    def describe(self, info: dict[str, Any], folder: Path) -> str:
        s, images = info["summary"], info["images"]
        matched = sum(r["matched"] for r in images)
        total = sum(r["detectron2"] for r in images)
        masks = f", mean mask IoU {s['mean_mask_iou']:.4f}" if s.get("mean_mask_iou") is not None else ""
        batch = f"; a batch of {s['batch']['batch']} = each image alone" if s.get("batch") else ""
        sizes = sorted({tuple(r["input"]) for r in images if r.get("input")})
        at = f" at {', '.join(f'{h}x{w}' for h, w in sizes)}" + (" (one graph)" if len(sizes) > 1 else "")
        extra = s.get("family_line", "")
        return (f"passed: {matched}/{total} matched on {len(images)} images{at}, mean box IoU "
                f"{s['mean_box_iou']:.4f}{masks}{extra}{batch}; report {folder / 'report.md'}")


SUMMARY_KEYS = ("image", "input", "detectron2", "graph", "matched", "recovered", "mean_box_iou",
                "mean_mask_iou", "max_score_diff", "mean_score_shift", "eager_s", "graph_s")


def batch_consistency(graph, photos_: list) -> dict[str, Any]:
    """A full batch of different photographs (cycled) must give each photograph the detections its own
    input tensor gets alone (a batch of copies of it): nothing may leak between the images of a batch.
    (With dynamic shapes a batch is padded to its largest image, so "its own input" is the padded one.)"""
    import numpy as np

    from d2build.compare import match_detections

    n = graph.info.batch
    chosen = [photos_[i % len(photos_)] for i in range(n)]
    x, lbs = graph.prepare([p.bgr for p in chosen])
    name = graph.runner.input_name
    together = graph.runner.run({name: x})
    differs, worst = [], 1.0
    for i, (p, lb) in enumerate(zip(chosen, lbs)):
        alone = graph.runner.run({name: np.repeat(x[i:i + 1], n, axis=0)})
        m = match_detections(graph.family.decode(alone, lb, 0, info=graph.info),
                             graph.family.decode(together, lb, i, info=graph.info), iou_min=0.999, score_tol=1e-4)
        worst = min(worst, m.recovered, m.precision)
        if not m.all_matched:
            differs.append(p.name)
    problem = (f"{', '.join(sorted(set(differs)))} differ from their batch-1 detections (worst share matched "
               f"{worst:.3f})") if differs else None
    return {"batch": n, "images": [p.name for p in chosen], "ok": not differs, "differs": sorted(set(differs)),
            "worst_matched": worst, "problem": problem}


def precision_facts(mode: str, info: dict[str, Any], emulated: list[dict[str, str]]) -> dict[str, Any]:
    """What the report says about the graph's precision: FP32 islands, Q/DQ counts, emulation."""
    out: dict[str, Any] = {"mode": mode}
    if mode == "fp16":
        out["fp32_islands"] = {k: {"why": v["why"], "ops": v["ops"], "nodes": len(v["nodes"])}
                               for k, v in info.get("fp32_islands", {}).items()}
        out["fp16_nodes"], out["fp32_nodes"], out["casts"] = (info.get("fp16_nodes"), info.get("fp32_nodes"),
                                                              info.get("casts"))
        out["emulated"] = len(emulated)
        out["emulated_ops"] = dict(sorted(Counter(e["op"] for e in emulated).items()))
        out["emulated_nodes"] = [e["node"] for e in emulated]
    elif mode == "int8":
        out.update({k: info.get(k) for k in ("quantized_nodes", "quantized_ops", "QuantizeLinear",
                                             "DequantizeLinear", "calibration", "not_quantized")})
    return out


def compare_one(fam, model, graph, photo, v: VerifyConfig, pictures: Path) -> tuple[dict[str, Any], str | None]:
    """Detectron2 eager and the graph (a runtime Model) on one photograph, letterboxed alike."""
    from d2build.compare import describe_mismatches, match_detections
    from d2build.visualize import side_by_side

    x, (lb,) = graph.prepare([photo.bgr])
    t0 = time.perf_counter()
    ref = fam.eager_detections(model, x[0], lb, graph.info)  # Detectron2's own post-processing, in original pixels
    t1 = time.perf_counter()
    got, _, graph_s = graph.detect(photo.bgr)
    m = match_detections(ref, got, iou_min=v.iou_threshold, score_tol=v.score_tolerance)
    stem = Path(photo.name).stem
    info = graph.info
    side_by_side(photo.bgr, ref, got, info.class_names, path=pictures / f"{stem}.png", highlight=m,
                 skeleton=info.keypoint_skeleton)
    row = {
        "image": photo.name, "detectron2": len(ref), "graph": len(got), "matched": len(m.pairs),
        "recovered": m.recovered, "mean_box_iou": m.mean_box_iou, "mean_mask_iou": m.mean_mask_iou,
        "max_score_diff": m.max_score_diff, "mean_score_shift": m.mean_score_shift,
        "mean_abs_score_diff": m.mean_score_diff, "eager_s": round(t1 - t0, 3), "graph_s": round(graph_s, 3),
        "picture": f"pictures/{stem}.png", "match": m.to_dict(), "input": list(lb.input_hw),
    }
    extra, problems = fam.family.verify_extra(ref, got, m, v)  # family-specific metrics (e.g. keypoints)
    row.update(extra)
    if len(ref) < v.min_detections:
        problems.append(f"Detectron2 found {len(ref)} detections (< verify.min_detections={v.min_detections})")
    if m.recovered < v.min_recovered:
        problems.append(f"recovered {m.recovered:.3f} of Detectron2's detections "
                        f"(< verify.min_recovered={v.min_recovered})")
    if m.mean_mask_iou is not None and m.mean_mask_iou < v.min_mask_iou:
        problems.append(f"mean mask IoU {m.mean_mask_iou:.3f} (< verify.min_mask_iou={v.min_mask_iou})")
    row["failed"] = bool(problems)
    if not problems:
        return row, None
    detail = "\n".join("    " + line for line in describe_mismatches(m, ref, got, info.class_names))
    return row, f"  {photo.name}: " + "; ".join(problems) + ("\n" + detail if detail else "")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    masks = [r["mean_mask_iou"] for r in rows if r["mean_mask_iou"] is not None]
    return {
        "images": n,
        "matched_share": sum(r["matched"] for r in rows) / max(1, sum(r["detectron2"] for r in rows)),
        "mean_score_shift": sum(r["mean_score_shift"] for r in rows) / n,
        "min_recovered": min(r["recovered"] for r in rows),
        "min_matched": min(r["matched"] for r in rows),
        "mean_box_iou": sum(r["mean_box_iou"] for r in rows) / n,
        "mean_mask_iou": sum(masks) / len(masks) if masks else None,
        "max_score_diff": max(r["max_score_diff"] for r in rows),
        "eager_s_per_image": sum(r["eager_s"] for r in rows) / n,
        "graph_s_per_image": sum(r["graph_s"] for r in rows) / n,
    }


def render_precision(p: dict[str, Any]) -> str:
    """The report's precision section: what is FP32 and why (fp16), Q/DQ (int8), what was emulated."""
    if p["mode"] == "fp32":
        return ""
    lines = ["", f"## Precision: {p['mode']}", ""]
    if p["mode"] == "fp16":
        lines += [f"{p['fp16_nodes']} nodes compute in float16, {p['fp32_nodes']} in float32, joined by "
                  f"{p['casts']} Cast nodes. The graph input stays float32. FP32 islands:", "",
                  "| island | nodes | ops | why |", "|---|---:|---|---|"]
        for k, v in p["fp32_islands"].items():
            ops = ", ".join(f"{op} {n}" for op, n in v["ops"].items())
            lines.append(f"| {k} | {v['nodes']} | {ops} | {v['why']} |")
        ops = ", ".join(f"{op} {n}" for op, n in p["emulated_ops"].items()) or "none"
        lines += ["", f"Emulated on CPU: {p['emulated']} float16 nodes ({ops}) have no float16 kernel in "
                  "ONNX Runtime's CPU provider here; each ran as Cast(float32) -> op -> Cast(float16): "
                  "float16 inputs and outputs, float32 arithmetic (as TensorRT's float16 kernels "
                  "accumulate). The plugins ran on float32 inputs, as their TensorRT contract requires."]
    else:
        ops = ", ".join(f"{op} {n}" for op, n in (p.get("quantized_ops") or {}).items())
        cal = p.get("calibration") or {}
        lines += [f"{p['quantized_nodes']} nodes quantized ({ops}): {p['QuantizeLinear']} QuantizeLinear, "
                  f"{p['DequantizeLinear']} DequantizeLinear (per-channel int8 weights, per-tensor activations "
                  f"calibrated with {cal.get('method')} on {', '.join(cal.get('images', []))}). Not quantized: "
                  f"{', '.join(p.get('not_quantized') or []) or 'none'}.", "",
                  "Agreement with fp32 (Detectron2 eager, which the fp32 graph reproduces): the table above "
                  "counts a detection as found at the int8 thresholds; mean score shift is int8 - fp32 over "
                  "matched pairs. ONNX Runtime executes the Q/DQ graph as written: every quantized tensor "
                  "is rounded and clipped to int8 with the calibrated scales."]
    return "\n".join(lines) + "\n"


BASE_ROW_KEYS = (*SUMMARY_KEYS, "mean_abs_score_diff", "picture", "match", "failed")


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


BACKEND_WORDS = {"reference": "plugins run by d2build's CPU reference implementations in ONNX Runtime",
                 "onnxruntime": "standard ONNX ops only, run by ONNX Runtime's own kernels"}


def where(device: GraphDevice | None) -> str:
    """The TF32 policy and the device, as every report states them."""
    if device is None:
        return "the CPU, both sides (float32 is float32: no TF32 on a CPU)"
    if device.tf32:
        return (f"{device.device}, both sides, TF32 ON (runtime.tf32=true): convolutions and matmuls round their "
                "inputs to 10 mantissa bits on both sides, so near-tied detections may swap and the gates above "
                "tolerate what they tolerate; set runtime.tf32=false for an fp32 comparison")
    return f"{device.device}, both sides, TF32 off (ONNX Runtime use_tf32=0, PyTorch's TF32 switches off)"


def render_report(cfg: VerifySlice, rows: list[dict[str, Any]], summary: dict[str, Any],
                  failures: list[str], backend: str = "reference") -> str:
    v = cfg.verify
    h, w = cfg.model.graph.input
    lines = [
        f"# verify: {cfg.model.family} at {h}x{w}, {cfg.precision}",
        "",
        f"TensorRT-ready {cfg.precision} graph ({BACKEND_WORDS.get(backend, backend)}) vs "
        f"Detectron2 eager on the same letterboxed input. A match needs the same class, box IoU >= "
        f"{v.iou_threshold} and |score difference| <= {v.score_tolerance}; each image must recover >= "
        f"{v.min_recovered:.0%} of Detectron2's detections with mean mask IoU >= {v.min_mask_iou}.",
        "",
        f"Where: {where(cfg.device)}.",
        "",
        "**Verdict: " + ("FAILED" if failures else "passed") + "**",
        "",
        "| image | Detectron2 | graph | matched | recovered | mean box IoU | mean mask IoU | max score diff "
        "| mean score shift | eager s | graph s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| [{r['image']}]({r['picture']}) {'x'.join(map(str, r.get('input', [])))} | {r['detectron2']} | {r['graph']} | {r['matched']} | "
                     f"{r['recovered']:.3f} | {_fmt(r['mean_box_iou'])} | {_fmt(r['mean_mask_iou'])} | "
                     f"{_fmt(r['max_score_diff'], 5)} | {r['mean_score_shift']:+.5f} | {r['eager_s']:.2f} | "
                     f"{r['graph_s']:.2f} |")
    extra = [k for k in rows[0] if k not in BASE_ROW_KEYS] if rows else []
    if extra:  # family-specific metrics (keypoint distances, ...) as their own table
        lines += ["", "| image | " + " | ".join(k.replace("_", " ") for k in extra) + " |",
                  "|---|" + "---:|" * len(extra)]
        lines += [f"| {r['image']} | " + " | ".join(_fmt(r.get(k)) for k in extra) + " |" for r in rows]
    if summary.get("batch"):
        bt = summary["batch"]
        lines += ["", f"Batch of {bt['batch']} ({', '.join(bt['images'])}): " + (
            "every image's detections equal its detections alone (IoU >= 0.999, |score difference| <= 1e-4)."
            if bt["ok"] else bt["problem"] + ".")]
    lines += ["", f"All images: {summary['matched_share']:.1%} of Detectron2's detections matched, mean box IoU "
              f"{summary['mean_box_iou']:.4f}, mean score shift {summary['mean_score_shift']:+.5f}.",
              "", f"Mean per image: Detectron2 eager {summary['eager_s_per_image']:.2f} s, "
              f"graph on ONNX Runtime {summary['graph_s_per_image']:.2f} s "
              f"(same {'CPU' if cfg.device is None else 'GPU'}, same process)."]
    if failures:
        lines += ["", "## What differs", "", "```", *failures, "```"]
    return "\n".join(lines) + "\n"
