"""RetinaNet (FPN): Detectron2's one-stage detector; this is its runtime half (build.py beside it builds it).

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


class RetinaNet(Family):
    name = "retinanet"
    num_classes_key = "MODEL.RETINANET.NUM_CLASSES"
    structure = RETINANET_STRUCTURE
    described_as = "RetinaNet (ResNet-FPN P3-P7, RetinaNetHead)"
    test_settings = (("surgery.nms.score_threshold", "MODEL.RETINANET.SCORE_THRESH_TEST", 0.05),
                     ("surgery.nms.iou_threshold", "MODEL.RETINANET.NMS_THRESH_TEST", 0.5),
                     ("surgery.rpn.pre_nms_topk", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 1000),
                     ("surgery.nms.max_detections", "TEST.DETECTIONS_PER_IMAGE", 100))

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


FAMILY = RetinaNet
