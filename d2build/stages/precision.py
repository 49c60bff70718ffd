"""precision: the graph TensorRT builds from, in the recipe's precision (fp32 | fp16 | int8).

TensorRT 10/11 networks are strongly typed, so precision lives in the ONNX graph:

* fp32: surgery's graph as it is (hard-linked, or copied where links cannot be made);
* fp16: float16 with FP32 islands and Cast nodes at their borders (d2build/autocast.py: which
  nodes stay FP32 and why is written to the manifest, node by node);
* int8: explicit QuantizeLinear/DequantizeLinear on every Conv/ConvTranspose/Gemm activation and
  weight (d2build/quantize.py), with activation ranges from the `calibration` stage.

Every graph passes onnx.checker with full shape inference.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import Files, PrecisionConfig, Recipe
from d2build.stages.base import Context, Stage


class PrecisionStage(Stage):
    """Reads `graph` (a surgery node) and, at int8, `ranges` (the calibration node)."""

    kind = "precision"
    VERSION = 1
    tools = ("onnx", "onnx-graphsurgeon", "numpy")

    def slice(self, recipe: Recipe) -> PrecisionConfig:
        p = recipe.precision
        return PrecisionConfig(p.mode, () if p.mode == "fp32" else p.keep_fp32)

    def run(self, cfg: PrecisionConfig, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        src = inputs["graph"].path(Files.GRAPH)
        dst = out_dir / Files.GRAPH
        if cfg.mode == "fp32":
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            return {"mode": "fp32", "fp32": "every node (surgery's graph unchanged)"}
        import json

        import onnx

        model = onnx.load(str(src))
        ranges = json.loads(inputs["ranges"].path(Files.RANGES).read_text()) if cfg.mode == "int8" else None
        out, facts = transform(model, cfg.mode, cfg.keep_fp32, ranges, ctx.step)
        onnx.save(out, str(dst))
        return facts


def transform(model, mode: str, keep_fp32, ranges: dict[str, Any] | None, say=lambda _: None):
    """The graph in `mode` (fp32 as is; fp16 with FP32 islands; int8 with Q/DQ from calibration `ranges`)
    and facts for the manifest."""
    if mode == "fp32":
        return model, {"mode": "fp32", "fp32": "every node (surgery's graph unchanged)"}
    if mode == "fp16":
        from d2build.autocast import to_fp16

        say(f"casting {len(model.graph.node)} nodes to float16, keeping FP32 islands")
        result = to_fp16(model, keep_fp32)
        say(f"{result.facts['fp16_nodes']} fp16 nodes, {result.facts['fp32_nodes']} FP32, {result.casts} casts; "
            "checked with onnx.checker (full shape inference)")
        return result.model, {"mode": "fp16", "casts": result.casts, "nodes": len(result.model.graph.node),
                              **result.facts}
    from d2build.quantize import insert_qdq

    assert ranges is not None
    amax = {name: r["amax"] for name, r in ranges["tensors"].items()}
    say(f"inserting Q/DQ ({ranges['method']} ranges from {len(ranges['images'])} image(s))")
    quantized, facts = insert_qdq(model, amax, keep_fp32)
    say(f"{facts['quantized_nodes']} Conv/Gemm quantized: {facts['QuantizeLinear']} Q, "
        f"{facts['DequantizeLinear']} DQ; checked with onnx.checker (full shape inference)")
    return quantized, {"mode": "int8", "calibration": {"method": ranges["method"], "images": ranges["images"]},
                       "nodes": len(quantized.graph.node), **facts}
