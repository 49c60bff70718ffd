"""PointRend Mask R-CNN (FPN), build half: Mask R-CNN's export and eager run, the point-head surgery, and
random weights whose coarse and point predictions spread like a trained model's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2build.families.mask_rcnn.build import MaskRCNNBuild
from d2build.families.pointrend import PointRend

if TYPE_CHECKING:
    from d2build.recipe import GraphSpec

# Detectron2 initialises both predictors with std 0.001: coarse and point logits sit at ~0 and every mask
# is a coin flip at the 0.5 threshold. Rescaled in this order (the classifier first, or nothing reaches the
# mask head; the coarse head before the point head, which reads its logits) to Mask R-CNN's spreads.
POINTREND_SPREAD = {"roi_heads.box_predictor.cls_score": 2.0,
                    "roi_heads.mask_head.coarse_head.prediction": 3.0,
                    "roi_heads.mask_head.point_head.predictor": 3.0}


class PointRendBuild(MaskRCNNBuild):
    family_class = PointRend

    def random_key(self):
        return {"pointrend_spread": POINTREND_SPREAD}

    def adjust_random(self, model, image_chw) -> tuple[str, ...]:
        """Each predictor measured on the cheapest forward that reaches it (the same outputs as a full one: the
        classifier sees proposals, the coarse head the final boxes); the point head on the full subdivision."""
        import contextlib
        from unittest import mock

        import torch

        from d2build import detectron

        heads, mask_head = model.roi_heads, model.roi_heads.mask_head

        def forward(*patches):
            def run():
                with contextlib.ExitStack() as stack:
                    for target, name, value in patches:
                        stack.enter_context(mock.patch.object(target, name, value))
                    model.inference([{"image": torch.as_tensor(image_chw)}], do_postprocess=False)
            return run

        cheap = {"roi_heads.box_predictor.cls_score": forward((heads, "mask_on", False)),
                 "roi_heads.mask_head.coarse_head.prediction":
                     forward((mask_head, "_subdivision_inference", lambda _f, _c, instances: instances))}
        for path, target in POINTREND_SPREAD.items():
            detectron.rescale_outputs(model, model.get_submodule(path), image_chw, target, forward=cheap.get(path))
        return ("roi_heads.box_predictor.cls_score",)

    def surgery(self, export_model, cfg, graph: "GraphSpec"):
        """Mask R-CNN's graph with PointRend's subdivision in place of the 28x28 mask head, in either flavour."""
        from d2build.families.surgery.rcnn import rcnn_surgeon
        from d2build.families.surgery.spec import head_spec

        spec = head_spec(cfg, graph.surgery, graph.input, with_masks=True, batch=graph.batch,
                         dynamic=graph.dynamic is not None, point_rend=True)
        model, facts = rcnn_surgeon(export_model, spec, graph.ops).run()
        pr = spec.point_rend
        assert pr is not None
        facts["point_rend"] = {"coarse": f"{pr.coarse_side}x{pr.coarse_side}", "first_pass": f"{pr.init_side}x"
                               f"{pr.init_side}", "steps": len(pr.step_grids), "points_per_step": pr.num_points,
                               "mask": f"{pr.mask_side}x{pr.mask_side}"}
        return model, facts


BUILD = PointRendBuild
