"""surgery: the export becomes the TensorRT-ready graph (static outputs; plugin nodes or standard ops).

The family module does the rewrite (`surgery.ops`: plugins | standard); this stage records what came
out: node count, op histogram, every plugin's attributes, input/output shapes and the anchor counts
that were checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build.cache import Artifact
from d2build.recipe import Recipe
from d2build.stages.base import Context, Stage, config_ref


class SurgeryStage(Stage):
    name = "surgery"
    VERSION = 4  # 3: surgery.ops (plugins | standard); 4: model.batch_size
    needs = ("export",)
    tools = ("onnx", "onnx-graphsurgeon", "onnxruntime", "sal-detectron2")

    def config_slice(self, recipe: Recipe) -> dict[str, Any]:
        m = recipe.model
        return {"family": m.family, **config_ref(m.config), "input": list(m.input), "batch": m.batch_size,
                "dynamic": recipe.to_dict()["model"]["dynamic"],
                "surgery": recipe.to_dict()["surgery"]}

    def run(self, cfg: dict[str, Any], inputs: dict[str, Artifact], out_dir: Path,
            ctx: Context) -> dict[str, Any]:
        import onnx

        from d2build import detectron
        from d2build.families import family
        from d2build.graph import io_shapes, op_histogram, plugin_attributes

        d2cfg = detectron.load_cfg(cfg["config"])
        export = onnx.load(str(inputs["export"].path("model.onnx")))
        ctx.step(f"rewriting {len(export.graph.node)} export nodes")
        model, facts = family(cfg["family"]).surgery(export, d2cfg, cfg["surgery"], tuple(cfg["input"]),
                                                     batch=cfg.get("batch", 1), dynamic=bool(cfg.get("dynamic")))
        onnx.save(model, str(out_dir / "model.onnx"))
        ctx.step(f"{len(model.graph.node)} nodes, checked with onnx.checker (full shape inference)")
        return {
            "flavour": cfg["surgery"].get("ops", "plugins"),
            "nodes": len(model.graph.node),
            "ops": op_histogram(model),
            "plugins": plugin_attributes(model),
            "io": io_shapes(model),
            **facts,
        }
