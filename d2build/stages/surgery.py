"""surgery: the export becomes the TensorRT-ready graph (static outputs; plugin nodes or standard ops).

The family's surgeon does the rewrite (`surgery.ops`: plugins | standard); this stage records what came
out: node count, op histogram, every plugin's attributes, input/output shapes and the anchor counts
that were checked.

The same stage builds the graphs other stages derive from the recipe's (pipeline.py): `surgery[cal]`,
the graph int8 calibration runs (the default final NMS, batch 1, the fixed input), and
`surgery[eval]`, the candidate graph of the eval stages (a final NMS that keeps every score above
eval.score_floor and suppresses nothing). Their keys compose from the export's key and this stage's
VERSION like the recipe's graph; a derived graph equal to the recipe's is the same cache entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from d2build.cache import Artifact
from d2build.recipe import Files, GraphSpec, Recipe
from d2build.stages.base import Context, Stage


class SurgeryStage(Stage):
    kind = "surgery"
    VERSION = 5  # 3: surgery.ops (plugins | standard); 4: model.batch_size; 5: standard: one NMS item per image
    tools = ("onnx", "onnx-graphsurgeon", "onnxruntime", "sal-detectron2")

    def __init__(self, needs=None, *, name: str | None = None,
                 derive: Callable[[Recipe, GraphSpec], GraphSpec] | None = None):
        super().__init__(needs, name=name)
        self.derive = derive  # the recipe's graph -> the graph this node builds (None: the recipe's)

    def slice(self, recipe: Recipe) -> GraphSpec:
        spec = GraphSpec.of(recipe)
        return self.derive(recipe, spec) if self.derive else spec

    def run(self, cfg: GraphSpec, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        import onnx

        from d2build import detectron
        from d2build.families import builder
        from d2build.graph import io_shapes, op_histogram, plugin_attributes

        d2cfg = detectron.load_cfg(cfg.config)
        detectron.check_family(d2cfg, cfg.family)
        detectron.check_input(d2cfg, cfg.input, cfg.dynamic is not None, cfg.batch)
        export = onnx.load(str(inputs["export"].path(Files.GRAPH)))
        ctx.step(f"rewriting {len(export.graph.node)} export nodes")
        model, facts = builder(cfg.family).surgery(export, d2cfg, cfg)
        onnx.save(model, str(out_dir / Files.GRAPH))
        ctx.step(f"{len(model.graph.node)} nodes, checked with onnx.checker (full shape inference)")
        return {
            "ops": cfg.ops,
            "nodes": len(model.graph.node),
            "op_counts": op_histogram(model),
            "plugins": plugin_attributes(model),
            "io": io_shapes(model),
            **facts,
        }
