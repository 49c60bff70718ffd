"""calibration: activation ranges for int8, from the FP32 graph run on real images.

Its own cached artifact, so one calibration serves every int8 build it is valid for. Which graph
the ranges come from decides that: it reads `surgery[cal]`, the graph surgery makes from the export
with the recipe's RPN settings and the default final NMS (conf/config.yaml's surgery.nms), at batch
1 and the fixed input size -- not the recipe's `surgery.nms.*`. Everything before the final NMS
(backbone, FPN, RPN head, box head) is the same graph whatever `surgery.nms.*` says; the mask head
sees the detections of that default NMS. A sweep of NMS thresholds at int8 therefore calibrates
once. The key holds that graph's key, the images' pixel digests, their count and the method. The
ranges are keyed by tensor name: the precision stage checks that the graph it quantizes has every
calibrated tensor, and fails if not.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import CalibrationSlice, ConfigRef, Files, GraphDevice, GraphSpec, NmsConfig, Recipe
from d2build.stages.base import Context, Stage


def calibration_graph(recipe: Recipe, spec: GraphSpec) -> GraphSpec:
    """The graph calibration runs: the recipe's, with the default final NMS, batch 1 and the fixed input."""
    from d2build.compose import conf_default

    nms = NmsConfig(**conf_default("surgery.nms"))
    return dataclasses.replace(spec, batch=1, dynamic=None, surgery=dataclasses.replace(spec.surgery, nms=nms))


class CalibrationStage(Stage):
    kind = "calibration"
    VERSION = 4  # 2: reads the surgery[cal] graph instead of rebuilding it; 3: device; 4: an RGB model's padding
    tools = ("onnxruntime", "onnxruntime-extensions", "numpy")

    def slice(self, recipe: Recipe) -> CalibrationSlice:
        from d2build import photos

        m, c = recipe.model, recipe.calibration
        return CalibrationSlice(ConfigRef.of(m.config, m.config_overrides), m.input, c.method, c.count, c.images,
                                photos.source_digest(c.images, c.count), GraphDevice.of(recipe))

    def run(self, cfg: CalibrationSlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        import onnx

        from d2build import backends, detectron, photos
        from d2build.processing import letterbox
        from d2build.quantize import RangeCollector, targets

        d2cfg = detectron.load_cfg(cfg.config)
        hw = cfg.input
        graph = onnx.load(str(inputs["graph"].path(Files.GRAPH)))
        found = targets(graph)
        tensors = list(dict.fromkeys(t.activation for t in found))
        consumers: dict[str, list[str]] = {}
        for t in found:
            consumers.setdefault(t.activation, []).append(t.node)
        probe = with_outputs(graph, tensors)
        from d2build.backends import devices

        runner = backends.open_graph(probe, **devices.stage_options(cfg.device))
        collector = RangeCollector()
        refs = photos.list_images(cfg.source, cfg.count)
        seconds = []
        for i, ref in enumerate(refs, 1):
            photo = photos.load(ref)
            ctx.count(i, len(refs), f"'{photo.name}': {len(tensors)} activation ranges")
            chw, _ = letterbox(photo.bgr, hw, detectron.bgr_normalisation(d2cfg)[0])
            t0 = time.perf_counter()
            outs = runner.run({runner.input_name: chw[None]}, tensors)
            for name in tensors:
                collector.add(name, outs[name])
            seconds.append(time.perf_counter() - t0)
        ctx.step(f"{cfg.method} ranges from {len(refs)} image(s)")
        ranges = {}
        for name in tensors:
            ranges[name] = {"amax": collector.amax(name, cfg.method), "absmax": collector.absmax[name],
                            "consumers": consumers[name]}
        zero = sorted(n for n, r in ranges.items() if r["amax"] <= 0)
        if zero:
            raise ValueError(f"{len(zero)} activation(s) are zero on every calibration image, e.g. {zero[:3]}; "
                             "int8 cannot be calibrated from these images")
        doc = {"method": cfg.method, "images": [Path(r).name for r in refs], "input": list(hw),
               "graph": inputs["graph"].key, "tensors": ranges}
        (out_dir / Files.RANGES).write_text(json.dumps(doc, indent=1))
        clip = [r["amax"] / r["absmax"] for r in ranges.values()]
        return {
            "method": cfg.method,
            "images": doc["images"],
            "tensors": len(ranges),
            "quantized_nodes": len(found),
            "clip_ratio": {"min": min(clip), "median": sorted(clip)[len(clip) // 2], "max": max(clip)},
            "seconds_per_image": sum(seconds) / len(seconds),
        }


def with_outputs(model, names: list[str]):
    """A copy of `model` that also outputs the named intermediate tensors (types from value_info)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    infos = {vi.name: vi for vi in out.graph.value_info}
    have = {o.name for o in out.graph.output}
    for name in names:
        if name in have:
            continue
        if name not in infos:
            raise ValueError(f"tensor {name!r} has no type information in the graph")
        out.graph.output.append(infos[name])
    return out
