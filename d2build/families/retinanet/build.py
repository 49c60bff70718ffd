"""RetinaNet (FPN), build half: eager and export without detector_postprocess, the dense surgery, random weights.

What the graph computes and why the random weights are adjusted: see this package's __init__.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from d2build.families.build import FamilyBuild
from d2build.families.retinanet import RetinaNet

if TYPE_CHECKING:
    from d2build.recipe import GraphSpec, SurgeryConfig

# Random weights (adjust_random): each FPN output's std (random P6/P7 are far weaker than P3-P5 otherwise, and
# only the finest levels would detect anything); each tower conv's output std; the class logits' std around the focal-loss
# prior bias (-log(99): score 0.01); the box deltas' std.
RETINANET_SPREAD = {"fpn": 1.0, "tower": 1.0, "cls_score": 0.6, "bbox_pred": 0.15}


class RetinaNetBuild(FamilyBuild):
    family_class = RetinaNet
    export_outputs = ("pred_boxes", "pred_classes", "scores", "image_size")

    def inference(self, model, inputs):
        """DenseDetector.forward at inference, without detector_postprocess: Instances in input pixels."""
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        return model.forward_inference(images, features, model.head(features))

    def surgery(self, export_model, cfg, graph: "GraphSpec"):
        from d2build.families.surgery.dense import dense_surgeon

        spec = dense_spec(cfg, graph.surgery, graph.input, batch=graph.batch, dynamic=graph.dynamic is not None)
        return dense_surgeon(export_model, spec, graph.ops).run()

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


def dense_spec(cfg, surgery: "SurgeryConfig", input_hw: tuple[int, int], batch: int = 1, dynamic: bool = False):
    """HeadSpec for a dense detector: the `rpn_*` fields describe RetinaNet's head (its levels, anchors and
    per-level top-k), the ROI fields are empty."""
    from d2build.families.surgery.spec import HeadSpec, spec_fields

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


BUILD = RetinaNetBuild
