"""GPU benchmark: d2build's standard-op graph on ONNX Runtime's CUDA provider vs Detectron2 eager, one process.

Two steps, so the CPU work (building graphs) can run while other things happen on the GPU machine:

    # build the graphs through d2build's own pipeline (weights -> export -> surgery -> precision), CPU only;
    # --variants also writes the graph variants below (post-processed surgery output) and their fp16 forms
    python bench/gpu_runtime.py prepare --work DIR [--models mask_rcnn_r50 retinanet_r50] [--sizes 640 1344] \\
        [--batches 1 8] [--variants] [--cpu-check]

    # measure on the GPU: the graph (fp32, fp16) against Detectron2 eager (fp32, autocast fp16), same weights,
    # same letterboxed photographs, batch 1 and 8, TF32 off (d2build's policy) and on (every library's default)
    python bench/gpu_runtime.py run --work DIR --out bench/results/gpu_runtime.json [--variants] [--deadline 500]

`run` reports per model, input and batch: latency (median, p10, p90 of --iters runs, interleaved in --rounds
rounds with the eager side), images/s, GPU busy time (torch.profiler with CUDA activities sees every kernel in
the process, ONNX Runtime's too), detections matched per side against eager fp32 with TF32 off on both sides
(compare.match_detections, verify's iou 0.98 / score 0.01, over --photos), and which nodes ran where (ONNX
Runtime's profiler records each node's provider; warm-up runs come first, since the first runs include cuDNN's
algorithm search). The graph is timed with IO binding (the input already on the GPU, outputs left there): the
model alone, as `d2build bench` times it; eager on a CUDA tensor.

`--variants` measures, at batch 1 on the first model, what might make the graph faster, each checked for the
same detections as the unmodified graph (on the GPU, TF32 off; `prepare --cpu-check` also on the CPU):
provider options (cudnn_conv_algo_search HEURISTIC / DEFAULT, prefer_nhwc, no max workspace), ONNX Runtime's
graph optimization level (basic: no Conv fusions), CUDA graph capture, and two formulations of ROI pooling:

* `one_nonzero`: every row pooled at every FPN level (4 RoiAlign on all rows), the row's level picked with
  Where, then one NonZero for the valid rows instead of one NonZero per level;
* `static_pool`: the same without any NonZero: every row goes through the heads, invalid proposals are kept
  out of the class NMS (image index -1) and invalid detections' masks are zeroed before the scatter; the only
  data-dependent shapes left are NonMaxSuppression's outputs.

Results: one JSON (device, versions, command, commit, date), written again after every step so a run stopped
at --deadline keeps what it measured; a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from timing import calls_ms, host_cpu, spread

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("mask_rcnn_r50", "retinanet_r50")
PHOTOS = ("astronaut", "coffee", "rocket")
POOL_VARIANTS = ("one_nonzero", "static_pool")


def stamp(msg: str) -> None:
    """A progress line on stdout and a marker on stderr (ONNX Runtime's and cuDNN's messages land between)."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    print(f"=== {line}", file=sys.stderr, flush=True)


# ============================================================================ prepare: graphs on the CPU


def overrides(model: str, size: int, batch: int, precision: str, cache: Path) -> list[str]:
    return [f"recipe={model}", "model.weights=random", f"model.input=[{size},{size}]", "surgery.ops=standard",
            f"model.batch_size={batch}", f"precision={precision}", f"cache.dir={cache}"]


def build(work: Path, model: str, size: int, batch: int, precision: str) -> dict[str, str]:
    """The recipe's graphs through d2build's pipeline (cached under work/cache)."""
    from d2build.compose import compose
    from d2build.runner import execute

    ov = overrides(model, size, batch, precision, work / "cache")
    recipe = compose(ov)
    run_dir = work / "runs" / f"{model}_{size}_b{batch}_{precision}"
    run_dir.mkdir(parents=True, exist_ok=True)
    res = {r.name: r for r in execute(recipe, run_dir, ov, until="precision")}
    bad = [r for r in res.values() if r.status == "failed"]
    if bad:
        raise RuntimeError(f"{bad[0].name} failed: {bad[0].reason}")
    return {"precision": str(Path(res["precision"].dir) / "model.onnx"),
            "surgery": str(Path(res["surgery"].dir) / "model.onnx"),
            "weights": str(Path(res["weights"].dir) / "model.pth")}


def key(model: str, size: int, batch: int) -> str:
    return f"{model}/{size}/b{batch}"


def prepare(args) -> None:
    from d2build import console

    console.configure()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    index_path = work / f"graphs{args.tag}.json"
    index: dict[str, Any] = json.loads(index_path.read_text()) if index_path.exists() else {}
    for model in args.models:
        for size in args.sizes:
            for batch in args.batches:
                entry: dict[str, Any] = {"model": model, "size": size, "batch": batch, "graphs": {}}
                for precision in ("fp32", "fp16"):
                    t0 = time.monotonic()
                    got = build(work, model, size, batch, precision)
                    entry["graphs"][precision] = got["precision"]
                    entry["surgery"], entry["weights"] = got["surgery"], got["weights"]
                    stamp(f"built {key(model, size, batch)} {precision} in {time.monotonic() - t0:.0f} s")
                if args.variants and batch == 1 and model.startswith(("mask_rcnn", "keypoint_rcnn", "faster_rcnn")):
                    entry["variants"] = write_variants(work, entry)
                index[key(model, size, batch)] = entry
                index_path.write_text(json.dumps(index, indent=1))
    if args.cpu_check:
        index["cpu_check"] = cpu_check(index, args.photos)
        index_path.write_text(json.dumps(index, indent=1))
    stamp(f"wrote {index_path}")


def write_variants(work: Path, entry: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The ROI-pooling variants of the surgery graph, fp32 and fp16 (d2build's own fp16 transform)."""
    import onnx

    from d2build import standard_ops
    from d2build.stages.precision import transform

    out: dict[str, dict[str, str]] = {}
    surgery = onnx.load(entry["surgery"])
    for mode in POOL_VARIANTS:
        fp32 = dense_pooling(surgery, mode)
        standard_ops.check(fp32)  # TensorRT 10/11's parser imports every node (the surgery check)
        onnx.checker.check_model(fp32, full_check=True)
        fp16, _ = transform(fp32, "fp16", [], None)
        d = work / "variants" / f"{entry['model']}_{entry['size']}_{mode}"
        d.mkdir(parents=True, exist_ok=True)
        onnx.save(fp32, str(d / "fp32.onnx"))
        onnx.save(fp16, str(d / "fp16.onnx"))
        out[mode] = {"fp32": str(d / "fp32.onnx"), "fp16": str(d / "fp16.onnx"),
                     "nonzero_nodes": sum(n.op_type == "NonZero" for n in fp32.graph.node),
                     "nodes": len(fp32.graph.node)}
        stamp(f"variant {mode} of {entry['model']} {entry['size']}: {out[mode]['nodes']} nodes, "
              f"{out[mode]['nonzero_nodes']} NonZero")
    return out


# ---------------------------------------------------------------------------- the ROI pooling variants


def dense_pooling(model: Any, mode: str) -> Any:
    """The standard surgery's ROI pooling (rcnn_standard.StandardSurgeon.pool: one NonZero and one RoiAlign per
    FPN level on the rows of that level) rewritten so every row is pooled at every level and the row's own level
    is picked with Where; `one_nonzero` then keeps the valid rows with one NonZero, `static_pool` keeps every row
    and masks the invalid ones downstream (module docstring). Works on the surgery graph's node names."""
    import onnx
    from onnx import helper, numpy_helper

    assert mode in POOL_VARIANTS, mode
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = {n.name: n for n in g.node}
    inits = {i.name for i in g.initializer}
    P = "d2build/"
    tags = [n.name[len(P):-len("_pooled")] for n in g.node
            if n.name.startswith(P) and n.name.endswith("_pooled") and n.op_type == "Concat"
            and f"{n.name}_rows" in nodes]
    if any(t.startswith("box") and t != "box" for t in tags):
        raise ValueError("cascade graphs (box stages after the first) are not rewritten by this bench")
    new: list[Any] = []
    counter = [0]

    def const(name: str, value: np.ndarray) -> str:
        full = f"{P}var_{name}"
        g.initializer.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def op(op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        counter[0] += 1
        out = f"{P}var_{name}_out"
        new.append(helper.make_node(op_type, inputs, [out], name=f"{P}var_{name}", **attrs))
        return out

    replaced: dict[str, str] = {}  # old tensor -> new tensor
    for tag in tags:
        pooled_concat, rows_concat = nodes[f"{P}{tag}_pooled"], nodes[f"{P}{tag}_pooled_rows"]
        aligns = [nodes[f"{P}{tag}_roi_align_p{k}"] for k in range(2, 6)]
        boxes = nodes[f"{P}{tag}_rois_p2"].input[0]
        image = nodes[f"{P}{tag}_images_p2"].input[0]
        level = nodes[f"{P}{tag}_level"].output[0]
        take = nodes.get(f"{P}{tag}_take_p2")
        valid = take.input[0] if take is not None else None
        for a in aligns:  # every row at every level
            a.input[1], a.input[2] = boxes, image
        lvl4 = op("Reshape", [level, const(f"{tag}_lvl_shape", np.array([-1, 1, 1, 1], np.int64))], f"{tag}_level_4d")
        sel = aligns[3].output[0]
        for k in (2, 1, 0):  # Where(level == 0, p2, Where(level == 1, p3, Where(level == 2, p4, p5)))
            eq = op("Equal", [lvl4, const(f"{tag}_lvl{k}", np.array(k, np.int64))], f"{tag}_is_level{k}")
            sel = op("Where", [eq, aligns[k].output[0], sel], f"{tag}_pick_level{k}")
        count = op("Squeeze", [op("Shape", [level], f"{tag}_row_count_1d"),
                               const(f"{tag}_axis0", np.array([0], np.int64))], f"{tag}_row_count")
        if mode == "one_nonzero" and valid is not None:
            rows = op("Reshape", [op("NonZero", [valid], f"{tag}_valid_rows_2d"),
                                  const(f"{tag}_flat", np.array([-1], np.int64))], f"{tag}_valid_rows")
            pooled = op("Gather", [sel, rows], f"{tag}_pooled_valid", axis=0)
        else:
            rows = op("Range", [const(f"{tag}_zero", np.array(0, np.int64)), count,
                                const(f"{tag}_one", np.array(1, np.int64))], f"{tag}_all_rows")
            pooled = sel
        replaced[pooled_concat.output[0]] = pooled
        replaced[rows_concat.output[0]] = rows
        if mode == "static_pool" and valid is not None:
            if tag == "box":  # invalid proposals belong to no image in the class NMS
                img_node = nodes[f"{P}pooled_images"]
                masked = op("Where", [valid, img_node.output[0], const("no_image", np.array(-1, np.int64))],
                            "pooled_images_valid")
                for n in g.node:
                    if n.op_type != "Shape" and img_node.output[0] in n.input and n.name != img_node.name:
                        n.input[list(n.input).index(img_node.output[0])] = masked
            else:  # mask / keypoint heads: invalid detections' rows scatter zeros
                scatter = nodes[f"{P}{tag}_scatter"]
                rank = {"mask": 3, "keypoint": 4}[tag]
                shaped = op("Reshape", [valid, const(f"{tag}_valid_shape", np.array([-1] + [1] * (rank - 1),
                                                                                     np.int64))], f"{tag}_valid_nd")
                zero = const(f"{tag}_zero_f", np.array(0, np.float32))
                scatter.input[2] = op("Where", [shaped, scatter.input[2], zero], f"{tag}_scatter_valid")
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in replaced:
                n.input[i] = replaced[name]
    for o in g.output:
        assert o.name not in replaced
    # the new nodes go before their first consumer: append them, then sort topologically
    all_nodes = list(g.node) + new
    del g.node[:]
    g.node.extend(_toposort(all_nodes, {i.name for i in g.input} | inits | {i.name for i in g.initializer}))
    _drop_dead(g)
    del g.value_info[:]  # shapes changed (per-level row counts are gone); inference below recomputes them
    return onnx.shape_inference.infer_shapes(m, data_prop=True)


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    have = set(available) | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in have for i in n.input):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"cycle or missing input near {rest[0].name}: {[i for i in rest[0].input if i not in have]}")
        pending = rest
    return out


def _drop_dead(g: Any) -> None:
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def cpu_check(index: dict[str, Any], photos: list[str]) -> dict[str, Any]:
    """Each pooling variant against the unmodified graph on ONNX Runtime's CPU provider: CPU verify stays exact
    only if every detection is the same (match at IoU 0.999, |score difference| <= 1e-4) on every photograph."""
    from d2build import backends
    from d2build.compare import match_detections
    from d2build.runtime import Model

    out: dict[str, Any] = {}
    for k, entry in index.items():
        if not isinstance(entry, dict) or "variants" not in entry:
            continue
        info = _info(entry)
        for precision in ("fp32", "fp16"):
            ref = Model(backends.open_graph(entry["graphs"][precision], "onnxruntime"), info)
            for mode, paths in entry["variants"].items():
                got = Model(backends.open_graph(paths[precision], "onnxruntime"), info)
                rows = []
                for name in photos:
                    bgr = _photo(name)
                    a, b = ref.detect(bgr)[0], got.detect(bgr)[0]
                    mr = match_detections(a, b, iou_min=0.999, score_tol=1e-4)
                    same = (len(a) == len(b) and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
                            and np.array_equal(a.classes, b.classes)
                            and (a.masks is None or np.array_equal(a.masks, b.masks)))
                    rows.append({"photo": name, "ref": len(a), "variant": len(b), "matched": len(mr.pairs),
                                 "bitwise_equal": bool(same)})
                out[f"{k}/{mode}/{precision}"] = rows
                stamp(f"cpu check {k} {mode} {precision}: {rows}")
    return out


def _photo(name: str) -> np.ndarray:
    from d2build import photos

    return photos.load(name).bgr


def _info(entry: dict[str, Any], batch: int | None = None):
    from d2build import detectron
    from d2build.compose import compose

    recipe = compose(overrides(entry["model"], entry["size"], batch or entry["batch"], "fp32", Path("/tmp")))
    from d2build.recipe import ModelSlice

    return detectron.model_info(ModelSlice.of(recipe))


# ============================================================================ run: measurements on the GPU


def summary(ms: list[float], images: int) -> dict[str, Any]:
    out = spread(ms, 3)
    return {**out, "images_per_s": round(images * 1000.0 / out["median_ms"], 1), "runs": len(ms)}


def gpu_busy_ms(fn: Callable[[], Any], sync: Callable[[], None], n: int) -> dict[str, Any] | None:
    """Kernel and copy time on the device per call (CUPTI through torch.profiler: every kernel of the process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    try:
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            sync()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1000 / n
    except Exception as e:  # noqa: BLE001 - no CUPTI: say so in the results
        return {"error": f"{type(e).__name__}: {e}"}
    events = [e for e in prof.key_averages()]
    us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    kernels = sum(e.count for e in events if (getattr(e, "self_device_time_total", 0) or 0) > 0)
    return {"gpu_busy_ms": round(us / 1000 / n, 3), "wall_ms_profiled": round(wall, 3),
            "device_ops_per_call": round(kernels / n, 1)}


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.t0 = time.monotonic()
        self.work = Path(args.work)
        self.index = {}
        for f in sorted(self.work.glob("graphs*.json")):  # prepare may run as several processes, one index each
            self.index.update(json.loads(f.read_text()))
        self.device = args.device
        self.sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        self.doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
                                    "command": "python bench/gpu_runtime.py " + " ".join(sys.argv[1:]),
                                    "commit": os.environ.get("D2BUILD_COMMIT", ""),
                                    "settings": {k: v for k, v in vars(args).items() if k != "func"},
                                    "policy": "TF32 off on both sides unless a row says tf32=true (runtime.tf32=false)",
                                    "match": "compare.match_detections, IoU >= 0.98, |score diff| <= 0.01",
                                    "rows": [], "agreement": [], "profiles": [], "variants": [], "errors": []}
        self.eager_cache: dict[str, Any] = {}

    # ---------------------------------------------------------------- plumbing

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.t0)

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.doc, indent=1))

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.left() <= 0:
            self.doc["errors"].append({"what": what, "error": "skipped: --deadline reached"})
            stamp(f"SKIP {what} (deadline)")
            return None
        stamp(what)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failure must not lose the rest of the run
            traceback.print_exc()
            self.doc["errors"].append({"what": what, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            return None
        finally:
            self.save()

    def graph(self, path: str, *, tf32: bool = False, cuda: dict[str, Any] | None = None, cuda_graph: bool = False,
              configure: Any = None):
        from d2build import backends

        return backends.open_graph(path, "onnxruntime", device=self.device, tf32=tf32, cuda=cuda,
                                   cuda_graph=cuda_graph, configure=configure)

    def eager(self, entry: dict[str, Any]):
        """(Detectron2 model on the device, family, cfg) with the graph's weights and thresholds."""
        name = entry["model"]
        if name not in self.eager_cache:
            import torch

            from d2build import detectron
            from d2build.backends.detectron2 import on_device
            from d2build.compose import compose
            from d2build.families import builder

            recipe = compose(overrides(name, entry["size"], 1, "fp32", Path("/tmp")))
            fam = builder(recipe.model.family)
            cfg = detectron.load_cfg(recipe.model.config, fam.eager_overrides(recipe.surgery))
            model = detectron.build_model(cfg, torch.load(entry["weights"], map_location="cpu", weights_only=True))
            self.eager_cache[name] = (on_device(model, self.device, tf32=False), fam, cfg)
        return self.eager_cache[name]

    # ---------------------------------------------------------------- one model, input, batch

    def inputs(self, entry: dict[str, Any], batch: int):
        import torch

        from d2build.processing import letterbox

        info = _info(entry, batch)
        bgr = _photo(PHOTOS[0])
        chw, _ = letterbox(bgr, info.input_hw, info.pixel_mean)
        x = np.ascontiguousarray(np.stack([chw] * batch))
        return info, x, torch.as_tensor(x, device=self.device)

    def eager_fn(self, entry: dict[str, Any], xt, batch: int, fp16: bool):
        import torch

        from d2build.families.build import in_model_format

        model, fam, _ = self.eager(entry)
        images = [{"image": in_model_format(model, xt[i])} for i in range(batch)]

        def call():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                return fam.inference(model, images)
        return call

    def measure(self, entry: dict[str, Any], batch: int, tf32_values: tuple[bool, ...]) -> None:
        """Graph fp32/fp16 and eager fp32/fp16 at this batch, interleaved in rounds, for each TF32 setting."""
        from d2build.backends.detectron2 import set_tf32

        a = self.args
        info, x, xt = self.inputs(entry, batch)
        iters = a.iters if batch == 1 else a.batch_iters
        for tf32 in tf32_values:
            sides: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {}
            runners = {}
            for precision in ("fp32", "fp16"):
                t0 = time.perf_counter()
                r = self.graph(entry["graphs"][precision], tf32=tf32)
                r.prepare({r.input_name: x})
                for _ in range(a.warmup):
                    r.execute()
                runners[precision] = r
                sides[f"graph {precision}"] = (r.execute, r.synchronize)
                self.doc.setdefault("session_start_s", {})[f"{key(entry['model'], entry['size'], batch)} {precision} "
                                                            f"tf32={tf32}"] = round(time.perf_counter() - t0, 2)
            set_tf32(tf32)
            for precision in ("fp32", "fp16"):
                fn = self.eager_fn(entry, xt, batch, precision == "fp16")
                for _ in range(a.warmup):
                    fn()
                sides[f"eager {precision}"] = (fn, self.sync)
            samples: dict[str, list[float]] = {s: [] for s in sides}
            per_round = max(1, iters // a.rounds)
            for _ in range(a.rounds):
                for s, (fn, sync) in sides.items():
                    samples[s] += calls_ms(fn, sync, per_round)
            for s, (fn, sync) in sides.items():
                row = {"model": entry["model"], "input": entry["size"], "batch": batch, "side": s, "tf32": tf32,
                       **summary(samples[s], batch)}
                if a.busy_iters and self.device.startswith("cuda"):
                    row.update(gpu_busy_ms(fn, sync, a.busy_iters) or {})
                self.doc["rows"].append(row)
                print(json.dumps(row), flush=True)
            if batch == 1 and not tf32:
                self.agreement(entry, info, runners)
            del runners, sides
        set_tf32(False)

    def agreement(self, entry: dict[str, Any], info, runners: dict[str, Any]) -> None:
        """Graph fp32/fp16 vs eager fp32, TF32 off on both sides, over the photographs."""
        from d2build.backends.detectron2 import EagerModel, set_tf32
        from d2build.compare import match_detections
        from d2build.runtime import Model

        set_tf32(False)
        model, fam, cfg = self.eager(entry)
        eager = EagerModel(model, fam, info, cfg)
        refs = {name: eager.detect(_photo(name))[0] for name in self.args.photos}
        for precision, r in runners.items():
            m = Model(r, info)
            counts = {"ref": 0, "got": 0, "matched": 0}
            per = []
            for name, ref in refs.items():
                got = m.detect(_photo(name))[0]
                mr = match_detections(ref, got, iou_min=0.98, score_tol=0.01)
                counts["ref"] += len(ref)
                counts["got"] += len(got)
                counts["matched"] += len(mr.pairs)
                per.append({"photo": name, "eager": len(ref), "graph": len(got), "matched": len(mr.pairs),
                            "mean_mask_iou": None if not mr.mask_ious else round(float(np.mean(mr.mask_ious)), 4)})
            row = {"model": entry["model"], "input": entry["size"], "precision": precision, "tf32": False, **counts,
                   "eager_side_recovered": round(counts["matched"] / max(1, counts["ref"]), 4),
                   "graph_side_matched": round(counts["matched"] / max(1, counts["got"]), 4), "photos": per}
            self.doc["agreement"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "photos"}), flush=True)

    # ---------------------------------------------------------------- ONNX Runtime's profiler

    def profile(self, entry: dict[str, Any], precision: str, path: str | None = None, label: str = "",
                cuda: dict[str, Any] | None = None) -> None:
        import tempfile

        prefix = str(Path(tempfile.mkdtemp()) / "ort")

        def configure(o):
            o.enable_profiling = True
            o.profile_file_prefix = prefix

        info, x, _ = self.inputs(entry, 1)
        r = self.graph(path or entry["graphs"][precision], configure=configure, cuda=cuda)
        r.prepare({r.input_name: x})
        for _ in range(self.args.warmup):
            r.execute()
        for _ in range(3):
            r.execute()
        events = json.load(open(r.session.end_profiling()))
        self.doc["profiles"].append({"model": entry["model"], "input": entry["size"], "precision": precision,
                                     "graph": label or "unmodified", **placement(events)})
        p = self.doc["profiles"][-1]
        print(json.dumps({k: p[k] for k in ("model", "input", "precision", "graph", "nodes_by_provider",
                                            "cpu_nodes", "memcpy_nodes", "run_ms")}), flush=True)

    # ---------------------------------------------------------------- variants

    def variants(self, entry: dict[str, Any], cuda_graphs: bool = False, short: bool = False) -> None:
        """Provider options, optimization level, CUDA graphs and the pooling variants, batch 1, TF32 off; each
        checked against the unmodified graph's detections (same session settings, on the device)."""
        import onnxruntime as ort

        from d2build.compare import match_detections
        from d2build.runtime import Model

        a = self.args
        info, x, _ = self.inputs(entry, 1)
        photos = {n: _photo(n) for n in a.photos}
        refs: dict[str, dict[str, Any]] = {}
        for precision in ("fp32", "fp16"):
            r = self.graph(entry["graphs"][precision])
            refs[precision] = {n: Model(r, info).detect(bgr)[0] for n, bgr in photos.items()}
            del r
        basic = lambda o: setattr(o, "graph_optimization_level", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)  # noqa: E731
        extended = lambda o: setattr(o, "graph_optimization_level", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)  # noqa: E731
        pools = entry.get("variants", {})
        plan: list[tuple[str, str, dict[str, Any]]] = [
            ("unmodified", "fp16", {}),
            ("unmodified", "fp32", {}),
            ("heuristic", "fp16", {"cuda": {"cudnn_conv_algo_search": "HEURISTIC"}}),
            ("heuristic", "fp32", {"cuda": {"cudnn_conv_algo_search": "HEURISTIC"}}),
        ]
        if not short:
            plan += [("nhwc", "fp16", {"cuda": {"prefer_nhwc": True}}),
                     ("opt_basic", "fp16", {"configure": basic}),
                     ("opt_extended", "fp16", {"configure": extended}),
                     ("algo_default", "fp16", {"cuda": {"cudnn_conv_algo_search": "DEFAULT"}}),
                     ("no_max_workspace", "fp16", {"cuda": {"cudnn_conv_use_max_workspace": False}})]
        for mode in pools:
            plan += [(mode, "fp16", {"path": mode}), (mode, "fp32", {"path": mode})]
        if cuda_graphs:  # last in the run: a failed capture may leave the CUDA context unusable
            plan = [("cuda_graph", "fp16", {"cuda_graph": True})]
            if "static_pool" in pools:
                plan.append(("static_pool+cuda_graph", "fp16", {"path": "static_pool", "cuda_graph": True}))
        for label, precision, opts in plan:
            if self.left() <= 0:
                self.doc["errors"].append({"what": f"variant {label} {precision}", "error": "skipped: deadline"})
                continue
            path = pools[opts["path"]][precision] if "path" in opts else entry["graphs"][precision]
            row: dict[str, Any] = {"model": entry["model"], "input": entry["size"], "variant": label,
                                   "precision": precision}
            stamp(f"variant {label} {precision} at {entry['size']}")
            try:
                t0 = time.perf_counter()
                r = self.graph(path, cuda=opts.get("cuda"), cuda_graph=opts.get("cuda_graph", False),
                               configure=opts.get("configure"))
                r.prepare({r.input_name: x})
                for _ in range(a.warmup):
                    r.execute()
                row["session_start_s"] = round(time.perf_counter() - t0, 2)
                row.update(summary(calls_ms(r.execute, r.synchronize, a.iters), 1))
                if a.busy_iters:
                    row.update(gpu_busy_ms(r.execute, r.synchronize, a.busy_iters) or {})
                if opts.get("cuda_graph"):  # a captured graph replays its own buffers: check through fetch()
                    outs = r.fetch()
                    row["cuda_graph_outputs_finite"] = bool(all(np.isfinite(v).all() for v in outs.values()
                                                                if v.dtype.kind == "f"))
                m = Model(r, info)
                same = {"ref": 0, "got": 0, "matched": 0, "strict": 0}
                for n, bgr in photos.items():
                    got = m.detect(bgr)[0]
                    ref = refs[precision][n]
                    same["ref"] += len(ref)
                    same["got"] += len(got)
                    same["matched"] += len(match_detections(ref, got, iou_min=0.98, score_tol=0.01).pairs)
                    same["strict"] += len(match_detections(ref, got, iou_min=0.999, score_tol=1e-4).pairs)
                row["vs_unmodified"] = same
                del r, m
            except Exception as e:  # noqa: BLE001 - a variant that does not run is a finding, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).strip()[:500]}"
            self.doc["variants"].append(row)
            print(json.dumps(row), flush=True)
            self.save()
        for mode in pools if not (cuda_graphs or short) else ():  # where the pooling variants' nodes run
            if self.left() > 0:
                self.guarded(f"profile {mode} fp16 {entry['size']}",
                             lambda mode=mode: self.profile(entry, "fp16", pools[mode]["fp16"], mode))

    # ---------------------------------------------------------------- the whole run

    def run(self) -> None:
        """In order of what the targets need, so a run cut short by --deadline loses the least: the first model
        at batch 1 (with ONNX Runtime's profile), its variants at the first size, batch 8, the other model, the
        variants at the other sizes (a shorter list), CUDA graphs last."""
        a = self.args
        entries = {k: v for k, v in self.index.items() if isinstance(v, dict) and "graphs" in v}
        first = a.models[0]
        pick = lambda models, batches: [entries[key(m, s, b)] for m in models for b in batches for s in a.sizes  # noqa: E731
                                        if key(m, s, b) in entries]
        others = [m for m in a.models if m != first]
        big = [b for b in a.batches if b != 1]
        for e in pick([first], [1]):
            self.guarded(f"measure {key(e['model'], e['size'], 1)}", lambda e=e: self.measure(e, 1, (False, True)))
            for precision in ("fp32", "fp16"):
                self.guarded(f"profile {key(e['model'], e['size'], 1)} {precision}",
                             lambda e=e, p=precision: self.profile(e, p))
        variant_entries = pick([first], [1]) if a.variants else []
        for e in variant_entries[:1]:
            self.guarded(f"variants {key(e['model'], e['size'], 1)}", lambda e=e: self.variants(e))
        for e in pick([first], big):
            self.guarded(f"measure {key(e['model'], e['size'], e['batch'])}",
                         lambda e=e: self.measure(e, e["batch"], (False, True) if a.batch_tf32 else (False,)))
        for e in pick(others, [1]):
            self.guarded(f"measure {key(e['model'], e['size'], 1)}", lambda e=e: self.measure(e, 1, (False, True)))
            self.guarded(f"profile {key(e['model'], e['size'], 1)} fp16", lambda e=e: self.profile(e, "fp16"))
        for e in pick(others, big):
            self.guarded(f"measure {key(e['model'], e['size'], e['batch'])}",
                         lambda e=e: self.measure(e, e["batch"], (False, True) if a.batch_tf32 else (False,)))
        for e in variant_entries[1:]:
            self.guarded(f"variants {key(e['model'], e['size'], 1)}", lambda e=e: self.variants(e, short=True))
        for e in variant_entries[:1]:
            self.guarded(f"cuda graph variants {key(e['model'], e['size'], 1)}",
                         lambda e=e: self.variants(e, cuda_graphs=True))
        self.doc["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.save()
        print(markdown(self.doc))


def placement(events: list[dict[str, Any]]) -> dict[str, Any]:
    """From ONNX Runtime's profile: nodes per provider, the CPU-placed and Memcpy nodes, host time per op type and
    provider (for the CUDA provider that is launch time plus any wait for the device: a NonZero or NMS that
    copies a count to the host shows up here), over the last profiled run."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1] if runs else None
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and (last is None or last["ts"] <= e["ts"] <= last["ts"] + last["dur"])]
    by_provider: dict[str, int] = {}
    per_op: dict[str, float] = {}
    cpu, memcpy = [], []
    for e in nodes:
        prov = e.get("args", {}).get("provider", "?")
        opn = e.get("args", {}).get("op_name", "?")
        by_provider[prov] = by_provider.get(prov, 0) + 1
        per_op[f"{opn} ({prov.replace('ExecutionProvider', '')})"] = per_op.get(
            f"{opn} ({prov.replace('ExecutionProvider', '')})", 0.0) + e["dur"] / 1000
        node = e["name"][:-len("_kernel_time")]
        if prov == "CPUExecutionProvider":
            cpu.append(f"{node} ({opn})")
        if opn.startswith("Memcpy"):
            memcpy.append(f"{node} ({opn})")
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {"nodes_by_provider": by_provider, "cpu_nodes": cpu[:80], "memcpy_nodes": memcpy,
            "run_ms": round(last["dur"] / 1000, 3) if last else None,
            "host_ms_by_op": {k: round(v, 3) for k, v in top}}


def environment() -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
           "onnx": onnx.__version__, "host_cpu": host_cpu()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = None
    return env


def markdown(doc: dict[str, Any]) -> str:
    """Latency and agreement tables (TF32 off unless marked), then the variants."""
    lines = ["| model | input | batch | TF32 | side | median ms | p10 | p90 | images/s | GPU busy ms |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {'on' if r['tf32'] else 'off'} | {r['side']} | "
                     f"{r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r.get('gpu_busy_ms', '')} |")
    lines += ["", "| model | input | graph | matched | eager dets | graph dets | eager side | graph side |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["agreement"]:
        lines.append(f"| {r['model']} | {r['input']} | {r['precision']} | {r['matched']} | {r['ref']} | {r['got']} | "
                     f"{r['eager_side_recovered']:.1%} | {r['graph_side_matched']:.1%} |")
    lines += ["", "| input | variant | precision | median ms | p10 | p90 | GPU busy | same dets (0.98/0.01) | strict | error |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["variants"]:
        s = r.get("vs_unmodified", {})
        lines.append(f"| {r['input']} | {r['variant']} | {r['precision']} | {r.get('median_ms', '')} | "
                     f"{r.get('p10_ms', '')} | {r.get('p90_ms', '')} | {r.get('gpu_busy_ms', '')} | "
                     f"{s.get('matched', '')}/{s.get('ref', '')} | {s.get('strict', '')} | {r.get('error', '')[:80]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "run"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True, help="folder for the cache, the graphs and their index")
        p.add_argument("--models", nargs="+", default=list(MODELS))
        p.add_argument("--sizes", type=int, nargs="+", default=[640, 1344])
        p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
        p.add_argument("--photos", nargs="+", default=list(PHOTOS))
        p.add_argument("--variants", action="store_true")
        p.add_argument("--tag", default="", help="suffix of the graph index file (graphs<tag>.json)")
    pp = sub.choices["prepare"]
    pp.add_argument("--cpu-check", action="store_true", help="check the pooling variants on the CPU provider")
    pr = sub.choices["run"]
    pr.add_argument("--out", default="bench/results/gpu_runtime.json")
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--iters", type=int, default=60, help="timed runs per side at batch 1")
    pr.add_argument("--batch-iters", type=int, default=24, help="timed runs per side at batch > 1")
    pr.add_argument("--rounds", type=int, default=3)
    pr.add_argument("--warmup", type=int, default=5)
    pr.add_argument("--busy-iters", type=int, default=5)
    pr.add_argument("--batch-tf32", action="store_true", help="batch > 1 also with TF32 on")
    pr.add_argument("--deadline", type=float, default=1e9, help="seconds; later steps are skipped past it")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    else:
        Bench(args).run()


if __name__ == "__main__":
    main()
