"""Random weights that behave, for models whose norms are not only the backbone's FrozenBatchNorm (prototype).

`detectron.random_model` sets every FrozenBatchNorm's statistics from its own input in one backbone pass and
scales ResNet's residual branches; that covers the yacs FPN models. The LazyConfig baselines differ:

* The LSJ models use SyncBN (backbone, FPN) and BatchNorm in the box head's four convs and the mask head's
  convs. At inference both are `BatchNorm2d` with running statistics (mean 0, var 1 when built): as useless as
  identity FrozenBN, and the heads' BNs see their input only after the RPN and the box predictor have run. So the
  statistics are set over whole inference passes, each norm from the first non-empty input it sees, and once more
  after the box classifier is spread (before that no detection clears the score threshold and the mask head
  sees no rows).
* RegNet's residual blocks (`ResBottleneckBlock`) keep their branch in `f` and end it in `f.c_bn`: scaled like
  ResNet's last BN of a branch, for the same reason (a chaotic random network cannot be checked at fp16).
* ViTDet's ViT is pre-norm (LayerNorm) and its SimpleFeaturePyramid and heads use channel LayerNorm: they need no
  statistics. Its relative position tables are zero when built (`rel_pos_zero_init`), so a random model would
  never exercise them; they get a spread (`REL_POS_STD`) so verify compares a graph that uses them.

The predictors' spreads are `detectron.PREDICTOR_SPREAD`'s. Everything runs at one thread (reproducible sums).
"""

from __future__ import annotations

from typing import Any, Callable

RESIDUAL_BRANCH_SCALE = 0.1  # as detectron.RESIDUAL_BRANCH_SCALE
REL_POS_STD = 0.5  # relative position tables' std: attention then varies with distance by a few logits


def batch_norms(model: Any) -> list[Any]:
    """Every norm with running statistics: FrozenBatchNorm2d, BatchNorm2d (SyncBatchNorm, NaiveSyncBatchNorm)."""
    from torch import nn

    from detectron2.layers import FrozenBatchNorm2d

    return [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm))]


def calibrate_norms(model: Any, forward: Callable[[], Any], done: set[int]) -> int:
    """One `forward()`; each norm not in `done` that sees a non-empty input takes its statistics from it (before it
    normalises it, so later norms see the result). Returns how many were set; `done` gains them."""
    import torch

    def set_stats(mod, inputs):
        x = inputs[0]
        if id(mod) in done or x.numel() == 0 or x.shape[0] * x.shape[2] * x.shape[3] < 2:
            return
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)))
        done.add(id(mod))

    before = len(done)
    hooks = [m.register_forward_pre_hook(set_stats) for m in batch_norms(model)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return len(done) - before


def scale_residual_branches(model: Any, scale: float = RESIDUAL_BRANCH_SCALE) -> int:
    """The last norm of each residual branch times `scale`: ResNet's blocks (conv3/conv2 norm), RegNet's
    ResBottleneckBlock / ResBasicBlock (f.c_bn / f.b_bn). Returns how many branches were scaled."""
    import torch

    scaled = 0
    with torch.no_grad():
        for mod in model.modules():
            norm = None
            if hasattr(mod, "shortcut"):  # detectron2.modeling.backbone.resnet Bottleneck/BasicBlock
                last = getattr(mod, "conv3", None) or getattr(mod, "conv2", None)
                norm = getattr(last, "norm", None)
            elif hasattr(mod, "f") and hasattr(mod, "proj"):  # regnet ResBottleneckBlock / ResBasicBlock
                norm = getattr(mod.f, "c_bn", None) or getattr(mod.f, "b_bn", None)
            if norm is not None and getattr(norm, "weight", None) is not None:
                norm.weight.mul_(scale)
                norm.bias.mul_(scale)
                scaled += 1
    return scaled


def spread_rel_pos(model: Any, seed: int, std: float = REL_POS_STD) -> int:
    """ViT attention's relative position tables (rel_pos_h, rel_pos_w) drawn with std `std`; returns how many."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def behave(model: Any, image_chw: Any, seed: int, family: Any, predictor_spread: dict[str, float],
           rescale: Callable[..., None]) -> dict[str, int]:
    """Make a freshly built (seeded) GeneralizedRCNN with random weights behave; returns what was done.
    `predictor_spread` and `rescale`: detectron.PREDICTOR_SPREAD and detectron.rescale_outputs (the predictors
    spread as for yacs models; passed in, so this module stays below detectron)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        facts = {"residual_branches": scale_residual_branches(model), "rel_pos_tables": spread_rel_pos(model, seed)}
        image = torch.as_tensor(image_chw)

        def inference() -> None:
            model.inference([{"image": image}], do_postprocess=False)

        done: set[int] = set()
        facts["norms_first_pass"] = calibrate_norms(model, inference, done)
        if family is not None:
            family.adjust_random(model, image_chw)
        for path, target in predictor_spread.items():
            if not _has(model, path):
                continue
            if path.startswith("roi_heads.mask_head") or path.startswith("roi_heads.keypoint_head"):
                facts["norms_after_classifier"] = calibrate_norms(model, inference, done)
            rescale(model, model.get_submodule(path), image_chw, target)
        facts["norms_total"] = len(batch_norms(model))
        facts["norms_never_reached"] = facts["norms_total"] - len(done)
        return facts
    finally:
        torch.set_num_threads(threads)


def _has(model: Any, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
