"""weights: the model's parameters as a cached state dict, whatever their source.

A model-zoo URL is downloaded once (read with the restricted unpickler), a local file is keyed by
its digest, and `random` is seeded random weights with BN statistics from a real photograph.
Export and verify both load this one file, so they are guaranteed to see the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2build.cache import Artifact, file_digest
from d2build.recipe import Recipe
from d2build.stages.base import Context, Stage, config_ref


class WeightsStage(Stage):
    name = "weights"
    VERSION = 3
    tools = ("torch", "sal-detectron2")

    def config_slice(self, recipe: Recipe) -> dict[str, Any]:
        from d2build.detectron import BN_PHOTO, PREDICTOR_SPREAD, RESIDUAL_BRANCH_SCALE

        m = recipe.model
        cfg: dict[str, Any] = {**config_ref(m.config), "weights": m.weights}
        if m.weights == "random":
            from d2build.families import FAMILIES, family

            cfg.update(seed=m.seed, bn_photo=BN_PHOTO, residual_branch_scale=RESIDUAL_BRANCH_SCALE,
                       predictor_spread=PREDICTOR_SPREAD)
            extra = family(m.family).random_key() if m.family in FAMILIES else {}
            if extra:  # what the family adds to random weights (none for the first R-CNN families: keys unchanged)
                cfg.update(family=m.family, family_random=extra)
        elif not m.weights.startswith(("http://", "https://")):
            cfg["weights_sha256"] = file_digest(Path(m.weights).expanduser())
        return cfg

    def run(self, cfg: dict[str, Any], inputs: dict[str, Artifact], out_dir: Path,
            ctx: Context) -> dict[str, Any]:
        import numpy as np
        import torch

        from d2build import detectron, photos

        d2cfg = detectron.load_cfg(cfg["config"])
        if cfg["weights"] == "random":
            ctx.step(f"random weights (seed {cfg['seed']}), BN statistics from '{cfg['bn_photo']}'")
            photo = photos.bundled(cfg["bn_photo"])
            chw = np.ascontiguousarray(photo.bgr.transpose(2, 0, 1), dtype=np.float32)
            model = detectron.random_model(d2cfg, cfg["seed"], chw, family=cfg.get("family"))
        else:
            ctx.step(f"loading {cfg['weights']}")
            model = detectron.build_model(d2cfg)
            detectron.load_checkpoint(model, cfg["weights"])
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out_dir / "model.pth")
        return {"parameters": int(sum(v.numel() for v in state.values())), "tensors": len(state)}


def load_state(art: Artifact) -> dict[str, Any]:
    import torch

    return torch.load(art.path("model.pth"), map_location="cpu", weights_only=True)
