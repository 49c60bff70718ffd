"""weights: the model's parameters as a cached state dict, whatever their source.

A model-zoo URL is downloaded once (read with the restricted unpickler), a local file is keyed by
its digest, and `random` is seeded random weights with BN statistics from a real photograph.
Export and verify both load this one file, so they are guaranteed to see the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build import lazyconfig
from d2build.cache import Artifact, file_digest
from d2build.recipe import ConfigRef, Files, RandomWeights, Recipe, WeightsSlice
from d2build.stages.base import Context, Stage


class WeightsStage(Stage):
    kind = "weights"
    VERSION = 3
    tools = ("torch", "sal-detectron2")

    def slice(self, recipe: Recipe) -> WeightsSlice:
        from d2build.detectron import BN_PHOTO, PREDICTOR_SPREAD, RESIDUAL_BRANCH_SCALE

        m = recipe.model
        config = ConfigRef.of(m.config, m.config_overrides)
        if m.weights == "random":
            from d2build.families import FAMILIES, builder

            extra = builder(m.family).random_key() if m.family in FAMILIES else {}
            # what the family adds to random weights (none for the first R-CNN families: keys unchanged)
            norms = None
            if lazyconfig.is_lazy(m.config):
                from d2build import random_norms

                norms = {"scheme": "random_norms.behave", "residual_branch_scale": random_norms.RESIDUAL_BRANCH_SCALE,
                         "rel_pos_std": random_norms.REL_POS_STD}
            return WeightsSlice(config, m.weights, random=RandomWeights(
                m.seed, BN_PHOTO, RESIDUAL_BRANCH_SCALE, PREDICTOR_SPREAD, m.family if extra else None, extra or None,
                norms))
        if m.weights.startswith(("http://", "https://")):
            return WeightsSlice(config, m.weights)
        return WeightsSlice(config, m.weights, file_digest(Path(m.weights).expanduser()))

    def run(self, cfg: WeightsSlice, inputs: dict[str, Artifact], out_dir: Path, ctx: Context) -> dict[str, Any]:
        import numpy as np
        import torch

        from d2build import detectron, photos

        d2cfg = detectron.load_cfg(cfg.config)
        report: dict[str, Any] = {}
        if cfg.random is not None:
            r = cfg.random
            ctx.step(f"random weights (seed {r.seed}), BN statistics from '{r.bn_photo}'")
            photo = photos.bundled(r.bn_photo)
            chw = np.ascontiguousarray(photo.bgr.transpose(2, 0, 1), dtype=np.float32)
            model = detectron.random_model(d2cfg, r.seed, chw, family=r.family, report=report)
        else:
            ctx.step(f"loading {cfg.weights}")
            model = detectron.build_model(d2cfg)
            detectron.load_checkpoint(model, cfg.weights)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out_dir / Files.WEIGHTS)
        info: dict[str, Any] = {"parameters": int(sum(v.numel() for v in state.values())), "tensors": len(state)}
        if report:
            info["random_norms"] = report  # a LazyConfig model's norms: how many were reached, and when
        return info


def load_state(art: Artifact) -> dict[str, Any]:
    import torch

    return torch.load(art.path(Files.WEIGHTS), map_location="cpu", weights_only=True)
