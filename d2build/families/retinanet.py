"""RetinaNet (FPN): Detectron2's one-stage detector, everything d2build knows about it in one place.

* Export and eager. Detectron2's RetinaNet has no `inference(do_postprocess=False)`; `inference`
  below is `DenseDetector.forward` without `detector_postprocess`: preprocess, backbone, head,
  `forward_inference`. The export traces it (TracingAdapter) and eager runs it, so both compare
  Detectron2's own results in input pixels.
* Graph. What is kept from the export: the backbone, FPN (P3-P7) and the head's towers and
  predictors, called once per level. Everything after the predictors is rebuilt, following
  `RetinaNet.inference_single_image` / `DenseDetector._decode_per_level_predictions`:
  - per level, the top `surgery.rpn.pre_nms_topk` (TOPK_CANDIDATES_TEST) (anchor, class) logits, one
    TopK over the level's raw [A*K*H*W] logits (sigmoid is monotonic, so ranking logits ranks
    scores); the anchor and class of each come from its flat index;
  - `score > score_threshold` (sigmoid): Detectron2 filters before its top-k and the graph after;
    filtering by a threshold and taking the top k by score commute, so the candidates are the same;
  - Box2BoxTransform.apply_deltas (the dw/dh clamp at log(1000/16); the regression weights folded
    into bbox_pred when they are not 1) against the anchors -- no clipping, as Detectron2 does not clip
    before its NMS;
  - class-wise NMS over all levels, at most `max_detections` kept: one EfficientNMS_TRT (plugins; scores
    [B, L*k, K] hold each candidate's score in its class column, so L*k <= 5000 candidates fit the
    plugin's pre-NMS top-k exactly) or one NonMaxSuppression over (image, class) batch items (standard);
  - the kept boxes clipped to the input (Detectron2's `detector_postprocess` clips them at the
    output size; clipping at the input first changes nothing there).
* Random weights. The head's towers are initialised with std 0.01 (activations vanish over four
  convs) and cls_score's bias is the focal-loss prior -log(99): every score sits at 0.01, nothing
  clears 0.05. `adjust_random` gives every tower conv unit output spread, spreads the class logits
  around the prior (`RETINANET_SPREAD`) so a photograph gets ordinary detections, and the box deltas
  a trained model's spread, so the decode is exercised.
"""

from __future__ import annotations

from typing import Any

from d2build.families.base import Family
from d2build.recipe import GraphSpec, SurgeryConfig

EXPORT_OUTPUTS = ("pred_boxes", "pred_classes", "scores", "image_size")
LEVELS = ("p3", "p4", "p5", "p6", "p7")

# What the RetinaNet surgery handles, as (key, Detectron2's default, accepted values, what anything else is).
RETINANET_STRUCTURE: tuple[tuple[str, Any, Any, str], ...] = (
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN", ("RetinaNet",), "not RetinaNet"),
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone", ("build_retinanet_resnet_fpn_backbone",),
     "not RetinaNet's ResNet-FPN P3-P7 backbone"),
    ("MODEL.RESNETS.RES5_DILATION", 1, (1,), "a dilated C5 (DC5)"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False] * 4, ([False] * 4,), "deformable convolutions"),
    ("MODEL.RETINANET.IN_FEATURES", list(LEVELS), (list(LEVELS),), "head levels other than P3-P7"),
    ("MODEL.RETINANET.NORM", "", ("",), "a normalised head (GN/BN)"),
    ("MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator", ("DefaultAnchorGenerator",), "another anchor generator"),
)

# Random weights (adjust_random): each FPN output's std (random P6/P7 are far weaker than P3-P5 otherwise, and
# only the finest levels would detect anything); each tower conv's output std; the class logits' std around the focal-loss
# prior bias (-log(99): score 0.01); the box deltas' std.
RETINANET_SPREAD = {"fpn": 1.0, "tower": 1.0, "cls_score": 0.6, "bbox_pred": 0.15}


class RetinaNet(Family):
    name = "retinanet"
    export_outputs = EXPORT_OUTPUTS
    num_classes_key = "MODEL.RETINANET.NUM_CLASSES"
    structure = RETINANET_STRUCTURE
    described_as = "RetinaNet (ResNet-FPN P3-P7, RetinaNetHead)"

    def eager_overrides(self, surgery: SurgeryConfig) -> dict[str, Any]:
        return {
            "MODEL.RETINANET.SCORE_THRESH_TEST": surgery.nms.score_threshold,
            "MODEL.RETINANET.NMS_THRESH_TEST": surgery.nms.iou_threshold,
            "MODEL.RETINANET.TOPK_CANDIDATES_TEST": surgery.rpn.pre_nms_topk,
            "TEST.DETECTIONS_PER_IMAGE": surgery.nms.max_detections,
        }

    def inference(self, model, inputs):
        """DenseDetector.forward at inference, without detector_postprocess: Instances in input pixels."""
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        return model.forward_inference(images, features, model.head(features))

    def recipe_problems(self, recipe, default) -> list[tuple[str, str, str]]:
        """RetinaNet reads surgery.rpn.pre_nms_topk only (its per-level top-k); in the standard graph the levels'
        candidates of one class meet in one NonMaxSuppression batch item, which TensorRT ranks only the top 5000 of."""
        from d2build.standard_ops import NMS_TOPK

        out = []
        rpn = recipe.surgery.rpn
        for key in ("post_nms_topk", "iou_threshold"):
            if getattr(rpn, key) != default(f"surgery.rpn.{key}"):
                out.append((f"surgery.rpn.{key}", "has no effect on model.family=retinanet (RetinaNet has no RPN; "
                            "surgery.rpn.pre_nms_topk is its per-level top-k before NMS)",
                            f"remove it (default {default(f'surgery.rpn.{key}')})"))
        levels = len(LEVELS)
        if recipe.surgery.ops == "standard" and levels * rpn.pre_nms_topk > NMS_TOPK:
            out.append(("surgery.rpn.pre_nms_topk", f"{rpn.pre_nms_topk} x {levels} levels of one class meet in one "
                        f"NonMaxSuppression batch item, but TensorRT's INMSLayer ranks only the top {NMS_TOPK}",
                        f"use <= {NMS_TOPK // levels} (Detectron2 uses 1000)"))
        return out

    def surgery(self, export_model, cfg, graph: GraphSpec):
        spec = dense_spec(cfg, graph.surgery, graph.input, batch=graph.batch, dynamic=graph.dynamic is not None)
        from d2build.families.retinanet_graph import surgeon

        return surgeon(graph.ops)(export_model, spec).run()

    # ------------------------------------------------------------------ random weights

    def random_key(self) -> dict[str, Any]:
        return {"retinanet_spread": RETINANET_SPREAD}

    def adjust_random(self, model, image_chw) -> None:
        """Towers to unit spread (in order: each sees the ones before), then the predictors (see module doc)."""
        import torch
        from torch import nn

        from d2build import detectron

        head = model.head
        with torch.no_grad():
            images = model.preprocess_image([{"image": torch.as_tensor(image_chw)}])

        def backbone() -> None:
            model.backbone(images.tensor)

        # the shared head sees every level alike, as in a trained model: each FPN output (P3-P5 and the top
        # block's P6, then P7 on it) to the same spread
        fpn = model.backbone
        outputs = [fpn.get_submodule(f"fpn_output{k}") for k in (3, 4, 5) if hasattr(fpn, f"fpn_output{k}")]
        outputs += [m for m in (getattr(fpn.top_block, "p6", None), getattr(fpn.top_block, "p7", None)) if m is not None]
        for conv in outputs:
            detectron.rescale_outputs(model, conv, image_chw, RETINANET_SPREAD["fpn"], backbone)
        with torch.no_grad():
            feats = model.backbone(images.tensor)
            feats = [feats[f] for f in model.head_in_features]

        def forward() -> None:
            head(feats)

        towers = [m for tower in (head.cls_subnet, head.bbox_subnet) for m in tower if isinstance(m, nn.Conv2d)]
        for conv in towers:
            detectron.rescale_outputs(model, conv, image_chw, RETINANET_SPREAD["tower"], forward)
        detectron.rescale_outputs(model, head.bbox_pred, image_chw, RETINANET_SPREAD["bbox_pred"], forward)
        prior = head.cls_score.bias.detach().clone()  # the focal-loss prior stays the bias
        detectron.rescale_outputs(model, head.cls_score, image_chw, RETINANET_SPREAD["cls_score"], forward)
        with torch.no_grad():
            head.cls_score.bias.copy_(prior)


def dense_spec(cfg, surgery: SurgeryConfig, input_hw: tuple[int, int], batch: int = 1, dynamic: bool = False):
    """HeadSpec for a dense detector: the `rpn_*` fields describe RetinaNet's head (its levels, anchors and
    per-level top-k), the ROI fields are empty."""
    from d2build.families.rcnn_graph import HeadSpec, spec_fields

    r = cfg.MODEL.RETINANET
    return HeadSpec(
        **spec_fields(cfg, surgery, input_hw, tuple(r.IN_FEATURES), batch, dynamic),
        roi_in_features=(),
        rpn_post_nms_topk=0,
        rpn_iou=0.0,
        num_classes=int(r.NUM_CLASSES),
        bbox_reg_weights=tuple(float(v) for v in r.BBOX_REG_WEIGHTS),
        box_pooler=(0, 0),
        mask_pooler=None,
    )
