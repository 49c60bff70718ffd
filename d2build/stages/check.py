"""check: run the built engine on verify's photographs and prove it computes what the graph computes.

verify proves the precision graph reproduces Detectron2 (on the CPU, plugins by reference
implementations). The engine is TensorRT's compilation of that graph for one GPU: kernels,
fusions, tactics and plugin code that the CPU never ran. An engine that "detects nothing" (the
failure NVIDIA's own Detectron2 sample is known for at other input sizes) or that drifted must
never reach a user silently, so after the build, on the same photographs and letterboxed inputs:

1. per output tensor, engine against the precision graph's reference outputs (as Polygraphy's
   comparator would, but on detections): `num_detections` on both sides; rows paired one-to-one
   (same class, box IoU and score difference within verify's gates, as sets: tied detections
   may come out in another order); the largest absolute and relative differences of boxes,
   scores, masks and heatmaps over paired rows; row-by-row (aligned) agreement of classes; mask
   IoU of the paired 28x28 masks;
2. the engine against Detectron2 eager through `stages.verify.compare_one`, the comparison verify
   runs, at the precision's gates (verify.*).

The stage fails (publishing nothing; report in `<run>/check-failed/`) when fewer than
`verify.min_recovered` of either side's rows pair up, when the engine finds nothing where the
graph finds something, when mean mask IoU falls below `verify.min_mask_iou`, or when the
Detectron2 comparison fails as verify would. `d2build deploy` refuses to bundle an engine whose
check failed. Without TensorRT or a GPU the stage is skipped with the build's reason.

`check_engine` (the comparison) takes any Runner for the engine side, so the tests drive it with
ONNX Runtime and reference runners (a good graph, and deliberately broken ones) where no GPU is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from d2build.cache import Artifact
from d2build.families.base import Outputs
from d2build.recipe import Files, Recipe, VerifyConfig, VerifySlice
from d2build.stages.base import Context, Stage, StageFailed



class EngineCheckStage(Stage):
    """Reads `weights`, `graph` (the precision graph) and `engine` (the build)."""

    kind = "check"
    VERSION = 3  # 2: the engine's batch and dynamic range in its ModelInfo (as verify's); 3: image-level outputs compared
    tools = ("torch", "torchvision", "sal-detectron2", "onnxruntime", "onnxruntime-extensions")

    def __init__(self, needs=None, *, device: int = 0, environment=None, **kw):
        super().__init__(needs, **kw)
        self.device = device
        self._env = environment

    def environment(self):
        if self._env is not None:
            return self._env
        from d2build.backends.tensorrt import environment

        return environment(self.device)

    def slice(self, recipe: Recipe) -> VerifySlice:
        from d2build.stages.verify import verify_slice

        return verify_slice(recipe)  # the engine's identity comes in through build's key

    def skip_reason(self, recipe: Recipe) -> str | None:
        from d2build.backends.tensorrt import skip_reason

        return skip_reason(self.environment())

    def run(self, cfg: VerifySlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        from d2build import backends, photos
        from d2build.backends import tensorrt as trt
        from d2build.stages.verify import eager_and_info

        v = cfg.verify
        fam, model, info = eager_and_info(cfg, inputs["weights"])
        graph = backends.open_graph(inputs["graph"].path(Files.GRAPH))
        refs = photos.list_images(v.images, v.count)
        lock = ctx.cache.gpu_lock(trt.gpu_identity(self.device)) if ctx.cache is not None else None
        if lock is not None:
            ctx.step(f"waiting for GPU {self.device} ({lock.lock_file})")
            lock.acquire()
        try:
            engine = backends.open_engine(inputs["engine"].path(Files.ENGINE), self.device)
            outcome = check_engine(engine, graph, info, [photos.load(r) for r in refs], v, out_dir,
                                   fam=fam, d2_model=model, progress=ctx.count)
        finally:
            if lock is not None:
                lock.release()
        meta = {"family": cfg.model.family, "input": list(cfg.model.graph.input), "precision": cfg.precision,
                "engine": inputs["engine"].info.get("tensorrt"), "gpu": inputs["engine"].info.get("gpu"),
                "tf32": inputs["engine"].info.get("tf32")}
        report = render_report(meta, outcome, v)
        metrics = outcome.metrics()
        (out_dir / Files.REPORT).write_text(report)
        (out_dir / Files.METRICS).write_text(json.dumps(metrics, indent=2))
        if outcome.failures:
            raise StageFailed(outcome.headline() + "\n" + "\n".join(outcome.failures),
                              files={Files.REPORT: report, Files.METRICS: json.dumps(metrics, indent=2)})
        return {"summary": outcome.summary()}

    def describe(self, info: dict[str, Any], folder: Path) -> str:
        s = info["summary"]
        return (f"passed: engine vs graph {s['paired']}/{s['rows']} rows paired, vs Detectron2 "
                f"{s['matched']}/{s['detectron2']} matched on {s['images']} images; report {folder / Files.REPORT}")


# ----------------------------------------------------------------------------- the comparison


@dataclass
class CheckOutcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        t = [r["tensors"] for r in self.rows]
        d = [r["detectron2"] for r in self.rows if r.get("detectron2")]
        return {
            "images": len(self.rows),
            "passed": not self.failures,
            "rows": sum(max(x["graph_rows"], x["engine_rows"]) for x in t),
            "paired": sum(x["paired"] for x in t),
            "min_paired_share": min((x["paired_share"] for x in t), default=1.0),
            "max_box_abs_px": max((x["boxes"]["max_abs"] for x in t), default=0.0),
            "max_score_abs": max((x["scores"]["max_abs"] for x in t), default=0.0),
            "detectron2": sum(x["detectron2"] for x in d),
            "matched": sum(x["matched"] for x in d),
            "min_recovered": min((x["recovered"] for x in d), default=None),
        }

    def headline(self) -> str:
        bad = [r["image"] for r in self.rows if r["failed"]]
        return f"engine check FAILED on {len(bad)} of {len(self.rows)} images ({', '.join(bad)})"

    def metrics(self) -> dict[str, Any]:
        return {"summary": self.summary(), "images": self.rows, "failures": self.failures}


def _stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Largest absolute and relative difference (|a - b| / max(|a|, 1e-6)) and mean absolute difference."""
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0}
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a - b)
    return {"max_abs": float(diff.max()), "max_rel": float((diff / np.maximum(np.abs(a), 1e-6)).max()),
            "mean_abs": float(diff.mean())}


def _rows_as_detections(out: dict[str, np.ndarray], b: int = 0, mask_threshold: float = 0.5):
    """The valid rows of one image's raw outputs as Detections in input pixels (28x28 masks thresholded)."""
    from d2build.processing import Detections

    n = int(np.asarray(out[Outputs.NUM])[b].reshape(-1)[0])
    n = max(0, min(n, np.asarray(out[Outputs.BOXES]).shape[1]))
    masks = None
    if Outputs.MASKS in out:
        masks = np.asarray(out[Outputs.MASKS])[b, :n] >= mask_threshold
    return Detections(np.asarray(out[Outputs.BOXES])[b, :n], np.asarray(out[Outputs.SCORES])[b, :n],
                      np.asarray(out[Outputs.CLASSES])[b, :n], masks=masks), n


def compare_tensors(graph_out: dict[str, np.ndarray], engine_out: dict[str, np.ndarray], v: VerifyConfig,
                    class_names=None, b: int = 0) -> tuple[dict[str, Any], list[str]]:
    """Engine outputs against the precision graph's, per output tensor, on the valid rows of image `b`.

    Returns (metrics, problems): row counts, rows paired as sets at verify's gates (class, IoU,
    score), max abs/rel differences of every row tensor over paired rows, and (Polygraphy-like)
    over rows aligned by index; problems are lines naming the rows that differ."""
    from d2build.compare import describe_mismatches, match_detections

    missing = [n for n in graph_out if n not in engine_out]
    if missing:
        return {"graph_rows": 0, "engine_rows": 0, "paired": 0, "paired_share": 0.0,
                "boxes": _stats(np.zeros(0), np.zeros(0)), "scores": _stats(np.zeros(0), np.zeros(0))}, [
            f"the engine lacks output(s) {', '.join(missing)} of the graph"]
    ref, n_ref = _rows_as_detections(graph_out, b)
    got, n_got = _rows_as_detections(engine_out, b)
    m = match_detections(ref, got, iou_min=v.iou_threshold, score_tol=v.score_tolerance)
    ii = np.array([i for i, _ in m.pairs], dtype=np.int64)
    jj = np.array([j for _, j in m.pairs], dtype=np.int64)
    rows = max(n_ref, n_got)
    share = len(m.pairs) / rows if rows else 1.0
    out: dict[str, Any] = {"graph_rows": n_ref, "engine_rows": n_got, "paired": len(m.pairs),
                           "paired_share": share, "num_detections_equal": n_ref == n_got}
    k = min(n_ref, n_got)
    aligned_classes = (np.asarray(graph_out[Outputs.CLASSES])[b, :k]
                       == np.asarray(engine_out[Outputs.CLASSES])[b, :k])
    out["aligned_class_equal"] = float(aligned_classes.mean()) if k else 1.0
    for name in (o for o in Outputs.ROWS if o != Outputs.CLASSES):
        if name not in graph_out:
            continue
        g, e = np.asarray(graph_out[name])[b], np.asarray(engine_out[name])[b]
        key = name.replace("detection_", "")
        out[key] = _stats(g[ii], e[jj])  # paired rows
        out[key]["aligned_max_abs"] = _stats(g[:k], e[:k])["max_abs"]  # row i against row i
    for name in (o for o in graph_out if o not in (*Outputs.ROWS, Outputs.NUM)):  # image-level (semantic_logits)
        out[name.replace("detection_", "")] = _stats(np.asarray(graph_out[name])[b], np.asarray(engine_out[name])[b])
    if m.mask_ious is not None:
        out["mask_iou_28"] = float(np.mean(m.mask_ious)) if m.mask_ious else (1.0 if not rows else 0.0)
    problems = []
    if n_ref > 0 and n_got == 0:
        problems.append(f"the engine detects nothing where the precision graph finds {n_ref} detections")
    elif share < v.min_recovered:
        problems.append(f"engine and graph pair only {len(m.pairs)} of {rows} detection rows ({share:.3f} < "
                        f"verify.min_recovered={v.min_recovered}; same class, IoU >= {v.iou_threshold}, "
                        f"|score diff| <= {v.score_tolerance})")
    if out.get("mask_iou_28") is not None and m.pairs and out["mask_iou_28"] < v.min_mask_iou:
        problems.append(f"mean IoU of paired 28x28 masks {out['mask_iou_28']:.3f} < "
                        f"verify.min_mask_iou={v.min_mask_iou}")
    if problems:
        problems += ["  " + line for line in describe_mismatches(m, ref, got, class_names, ref_label="graph",
                                                                  got_label="engine")]
    return out, problems


def check_engine(engine, graph, info, photos: list[Any], v: VerifyConfig, out_dir: Path, *, fam=None,
                 d2_model=None, progress: Callable[[int, int, str], None] | None = None) -> CheckOutcome:
    """Run `engine` (any Runner: TensorRT in the stage, graph backends in tests) and `graph` (the
    precision graph's runner) on each photograph's letterboxed tensor and compare them per output
    tensor; with `fam` and `d2_model`, also compare the engine with Detectron2 eager exactly as verify
    compares the graph (`stages.verify.compare_one`, pictures into `out_dir/pictures`)."""
    from d2build.runtime import Model
    from d2build.stages.verify import compare_one

    engine_model = Model(engine, info)
    outcome = CheckOutcome()
    pictures = out_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos, 1):
        if progress:
            progress(i, len(photos), f"'{photo.name}': engine vs precision graph and Detectron2")
        x, _ = engine_model.prepare([photo.bgr])
        feeds = {engine.input_name: x}
        t0 = time.perf_counter()
        g = graph.run(feeds)
        t1 = time.perf_counter()
        e = engine.run(feeds)
        t2 = time.perf_counter()
        tensors, problems = compare_tensors(g, e, v, info.class_names)
        row: dict[str, Any] = {"image": photo.name, "tensors": tensors, "graph_s": round(t1 - t0, 3),
                               "engine_s": round(t2 - t1, 3)}
        lines = [f"vs precision graph: {p}" if not p.startswith("  ") else p for p in problems]
        if fam is not None and d2_model is not None:
            d2_row, d2_problem = compare_one(fam, d2_model, engine_model, photo, v, pictures)
            row["detectron2"] = {k: d2_row[k] for k in ("detectron2", "graph", "matched", "recovered",
                                                        "mean_box_iou", "mean_mask_iou", "max_score_diff",
                                                        "mean_score_shift", "picture") if k in d2_row}
            if d2_problem:
                lines.append("vs Detectron2: " + d2_problem.strip())
        row["failed"] = bool(lines)
        if lines:
            outcome.failures.append(f"  {photo.name}:\n" + "\n".join("    " + ln for ln in lines))
        outcome.rows.append(row)
    return outcome


def _f(x: Any, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def tf32_line(tf32: bool | None) -> str:
    """What the engine's float32 layers compute in (build.tf32), as the report states it."""
    if tf32 is None:
        return "TF32: not recorded by the build (an engine built before build.tf32 existed)."
    if tf32:
        return ("TF32: ON (build.tf32=true): the engine's float32 convolutions and matmuls round their inputs to 10 "
                "mantissa bits, so its rows may differ from the graph's (computed in float32) beyond float rounding; "
                "the gates above are verify's, not loosened.")
    return "TF32: off (build.tf32=false, the default): the engine's float32 layers compute in float32."


def render_report(meta: dict[str, Any], outcome: CheckOutcome, v: VerifyConfig) -> str:
    h, w = meta["input"]
    lines = [
        f"# engine check: {meta['family']} at {h}x{w}, {meta.get('precision', 'fp32')}"
        + (f", TensorRT {meta['engine']}" if meta.get("engine") else "") + (f" on {meta['gpu']}" if meta.get("gpu") else ""),
        "",
        "The engine against the precision graph (reference outputs, per output tensor) and against Detectron2 "
        "eager (as verify compares the graph), on verify's photographs letterboxed alike. Rows pair when class, "
        f"box IoU >= {v.iou_threshold} and |score difference| <= {v.score_tolerance} agree; each image "
        f"must pair >= {v.min_recovered:.0%} of its rows.",
        "",
        tf32_line(meta.get("tf32")),
        "",
        "**Verdict: " + ("FAILED" if outcome.failures else "passed") + "**",
        "",
        "## Engine vs precision graph (per output tensor, paired rows)",
        "",
        "| image | graph rows | engine rows | paired | boxes max abs px | boxes max rel | scores max abs "
        "| masks max abs | mask IoU 28x28 | aligned classes equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in outcome.rows:
        t = r["tensors"]
        lines.append(f"| {r['image']} | {t['graph_rows']} | {t['engine_rows']} | {t['paired']} | "
                     f"{_f(t['boxes']['max_abs'])} | {_f(t['boxes']['max_rel'])} | {_f(t['scores']['max_abs'])} | "
                     f"{_f(t.get('masks', {}).get('max_abs'))} | {_f(t.get('mask_iou_28'))} | "
                     f"{_f(t.get('aligned_class_equal'))} |")
    d2 = [r for r in outcome.rows if r.get("detectron2")]
    if d2:
        lines += ["", "## Engine vs Detectron2 eager", "",
                  "| image | Detectron2 | engine | matched | recovered | mean box IoU | mean mask IoU | max score diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d2:
            x = r["detectron2"]
            lines.append(f"| [{r['image']}]({x.get('picture', '')}) | {x['detectron2']} | {x['graph']} | "
                         f"{x['matched']} | {x['recovered']:.3f} | {_f(x['mean_box_iou'])} | "
                         f"{_f(x['mean_mask_iou'])} | {_f(x['max_score_diff'])} |")
    if outcome.failures:
        lines += ["", "## What differs", "", "```", *outcome.failures, "```"]
    return "\n".join(lines) + "\n"
