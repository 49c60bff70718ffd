"""One model definition for yacs and LazyConfig models: build it, set the recipe's test thresholds, read its facts
(prototype for issue 21; see docs/design/lazyconfig.md).

Today the families and stages read yacs keys (MODEL.ROI_HEADS.NUM_CLASSES, MODEL.RPN.IN_FEATURES, INPUT.FORMAT,
...). A LazyConfig has none of them: the same facts sit in `cfg.model` under other names, or only on the model
Detectron2 builds. Both kinds of config build the same classes, so the facts are read from the *instantiated
model* (`facts`), and the recipe's thresholds are set *on the model* (`apply_test_settings`): one code path for
both. What a model does not carry -- the test-time resize, the datasets whose metadata names the classes, COCO
OKS sigmas -- comes from `Definition`, the only part with two implementations (`YacsDefinition`,
`LazyDefinition`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Facts:
    """What surgery, verify, eval and the runtime need to know about a built model (HeadSpec's config fields)."""

    meta_architecture: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    input_format: str
    num_classes: int
    dense_in_features: tuple[str, ...]  # RPN's levels, or RetinaNet's head levels
    strides: dict[str, int]  # every backbone output's stride
    anchor_generator: str
    anchors_per_location: int
    size_divisibility: int
    square_pad: int  # ViTDet pads every image to this square (0: not)
    dense_reg_weights: tuple[float, ...]  # RPN's (or RetinaNet's) Box2BoxTransform weights
    roi_heads: str = ""
    roi_in_features: tuple[str, ...] = ()
    box_head: str = ""
    box_head_convs: int = 0
    box_head_fcs: int = 0
    box_reg_weights: tuple[tuple[float, ...], ...] = ()  # per box stage (one, or a cascade's three)
    class_agnostic_boxes: bool = False
    box_pooler: tuple[int, int] | None = None  # resolution, sampling ratio
    pooler_aligned: bool = True  # ROIAlignV2
    canonical_box_size: int = 224
    canonical_level: int = 4
    mask_pooler: tuple[int, int] | None = None
    class_agnostic_masks: bool = False
    keypoint_pooler: tuple[int, int] | None = None
    num_keypoints: int = 0
    norms: dict[str, int] = field(default_factory=dict)  # norm class -> count (what random weights must set)


def _pooler(p) -> tuple[int, int, bool]:
    level = p.level_poolers[0]
    return int(p.output_size[0]), int(getattr(level, "sampling_ratio", 0)), bool(getattr(level, "aligned", False))


def facts(model: Any) -> Facts:
    """The facts of a built GeneralizedRCNN or RetinaNet, read from its modules."""
    from collections import Counter

    from torch import nn

    backbone = model.backbone
    shapes = backbone.output_shape()
    dense = getattr(model, "proposal_generator", None) or model
    gen = dense.anchor_generator
    levels = tuple(dense.in_features if hasattr(dense, "in_features") else model.head_in_features)
    norms = Counter(type(m).__name__ for m in model.modules()
                    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
                    or type(m).__name__ in ("FrozenBatchNorm2d", "LayerNorm"))
    pad = getattr(backbone, "padding_constraints", {}) or {}
    f: dict[str, Any] = dict(
        meta_architecture=type(model).__name__,
        pixel_mean=tuple(float(v) for v in model.pixel_mean.flatten()),
        pixel_std=tuple(float(v) for v in model.pixel_std.flatten()),
        input_format=model.input_format,
        dense_in_features=levels,
        strides={k: int(s.stride) for k, s in shapes.items()},
        anchor_generator=type(gen).__name__,
        anchors_per_location=int(gen.num_anchors[0]) if isinstance(gen.num_anchors, list) else int(gen.num_anchors),
        size_divisibility=int(backbone.size_divisibility),
        square_pad=int(pad.get("square_size", 0) or 0),
        dense_reg_weights=tuple(float(w) for w in dense.box2box_transform.weights),
        norms=dict(sorted(norms.items())),
    )
    heads = getattr(model, "roi_heads", None)
    if heads is None:  # RetinaNet
        return Facts(num_classes=int(model.num_classes), **f)
    predictors = heads.box_predictor if isinstance(heads.box_predictor, nn.ModuleList) else [heads.box_predictor]
    box_heads = heads.box_head if isinstance(heads.box_head, nn.ModuleList) else [heads.box_head]
    res, ratio, aligned = _pooler(heads.box_pooler)
    f.update(
        roi_heads=type(heads).__name__,
        num_classes=int(heads.num_classes),
        roi_in_features=tuple(heads.box_in_features),
        box_head=type(box_heads[0]).__name__,
        box_head_convs=sum(isinstance(m, nn.Conv2d) for m in box_heads[0].modules()),
        box_head_fcs=sum(isinstance(m, nn.Linear) for m in box_heads[0].modules()),
        box_reg_weights=tuple(tuple(float(w) for w in p.box2box_transform.weights) for p in predictors),
        class_agnostic_boxes=predictors[-1].bbox_pred.out_features == 4,
        box_pooler=(res, ratio),
        pooler_aligned=aligned,
        canonical_box_size=int(heads.box_pooler.canonical_box_size),
        canonical_level=int(heads.box_pooler.canonical_level),
    )
    if heads.mask_on:
        res, ratio, aligned_m = _pooler(heads.mask_pooler)
        f.update(mask_pooler=(res, ratio), class_agnostic_masks=heads.mask_head.predictor.out_channels == 1,
                 pooler_aligned=aligned and aligned_m)
    if getattr(heads, "keypoint_on", False):
        res, ratio, aligned_k = _pooler(heads.keypoint_pooler)
        f.update(keypoint_pooler=(res, ratio), num_keypoints=int(heads.keypoint_head.num_keypoints),
                 pooler_aligned=f["pooler_aligned"] and aligned_k)
    return Facts(**f)


def anchors(model: Any, input_hw: tuple[int, int], levels: tuple[str, ...]) -> list[Any]:
    """Detectron2's own anchors of the model's generator for this input size (rcnn_graph.anchor_facts' job)."""
    import torch

    dense = getattr(model, "proposal_generator", None) or model
    strides = {k: s.stride for k, s in model.backbone.output_shape().items()}
    grids = [torch.empty(1, 1, math.ceil(input_hw[0] / strides[f]), math.ceil(input_hw[1] / strides[f]))
             for f in levels]
    return [b.tensor.numpy() for b in dense.anchor_generator(grids)]


def apply_test_settings(model: Any, surgery: dict[str, Any]) -> None:
    """The recipe's thresholds on the built model (what `eager_overrides` does through yacs keys), so Detectron2
    eager runs what the graph runs. Works for a model from either kind of config."""
    from torch import nn

    nms, rpn = surgery["nms"], surgery["rpn"]
    heads = getattr(model, "roi_heads", None)
    if heads is None:  # RetinaNet
        model.test_score_thresh = float(nms["score_threshold"])
        model.test_nms_thresh = float(nms["iou_threshold"])
        model.max_detections_per_image = int(nms["max_detections"])
        model.test_topk_candidates = int(rpn["pre_nms_topk"])
        return
    predictors = heads.box_predictor if isinstance(heads.box_predictor, nn.ModuleList) else [heads.box_predictor]
    for p in predictors:
        p.test_score_thresh = float(nms["score_threshold"])
        p.test_nms_thresh = float(nms["iou_threshold"])
        p.test_topk_per_image = int(nms["max_detections"])
    gen = model.proposal_generator
    gen.pre_nms_topk[False] = int(rpn["pre_nms_topk"])
    gen.post_nms_topk[False] = int(rpn["post_nms_topk"])
    gen.nms_thresh = float(rpn["iou_threshold"])


# ------------------------------------------------------------------ what only the config knows

class Definition:
    """A model as model.config describes it: how to build it, and the few facts that are not on the model."""

    config: str

    def build(self) -> Any:
        raise NotImplementedError

    def test_resize(self) -> tuple[int, int]:
        """Detectron2's own test-time resize (short side, long-side limit): the native eval side and dynamic shapes."""
        raise NotImplementedError

    def dataset_names(self) -> list[str]:
        """Datasets whose metadata may name the classes (test first)."""
        raise NotImplementedError

    def keypoint_oks_sigmas(self) -> tuple[float, ...]:
        raise NotImplementedError


class LazyDefinition(Definition):
    def __init__(self, config: str, overrides: dict[str, Any] | None = None):
        from d2build import lazyconfig

        self.config = config
        self.cfg = lazyconfig.load(config, overrides)
        self.family = lazyconfig.family_of(self.cfg, config)

    def build(self):
        from d2build import lazyconfig

        return lazyconfig.build_model(self.cfg, self.config)

    def _test(self, key: str, default: Any = None) -> Any:
        from omegaconf import OmegaConf

        return OmegaConf.select(self.cfg, f"dataloader.{key}", default=default)

    def test_resize(self):
        from d2build import lazyconfig

        for aug in self._test("test.mapper.augmentations", []) or []:
            name = lazyconfig.target_name(aug.get("_target_", "")) if hasattr(aug, "get") else ""
            if name.endswith("ResizeShortestEdge"):
                short = aug["short_edge_length"]
                return int(short if isinstance(short, int) else list(short)[-1]), int(aug["max_size"])
        # a config without a test loader (common/models/*.py): d2build's letterbox only, no native resize
        raise ValueError(f"{self.config} has no dataloader.test.mapper.augmentations with ResizeShortestEdge: set "
                         "model.dynamic.min_size / max_size")

    def dataset_names(self):
        names = []
        for key in ("test.dataset.names", "train.dataset.names"):
            v = self._test(key)
            if v is not None:
                names += [v] if isinstance(v, str) else list(v)
        return names

    def keypoint_oks_sigmas(self):
        return tuple(self._test("evaluator.kpt_oks_sigmas", ()) or ())
