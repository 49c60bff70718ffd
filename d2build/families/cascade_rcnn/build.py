"""Cascade Mask R-CNN (FPN), build half: Mask R-CNN's with three box stages, and their random classifiers."""

from __future__ import annotations

from d2build.families.cascade_rcnn import CASCADE_STAGES, CascadeRCNN
from d2build.families.mask_rcnn.build import MaskRCNNBuild

# Detectron2 initialises each stage's cls_score with std 0.01: every class scores ~1/81 and nothing
# clears 0.05. Rescaled like Mask R-CNN's predictor (std 2 of the logits on the photograph), the mean of
# three stages gives about as many ordinary detections as Mask R-CNN.
CASCADE_PREDICTOR_SPREAD = {f"roi_heads.box_predictor.{k}.cls_score": 2.0 for k in range(CASCADE_STAGES)}


class CascadeRCNNBuild(MaskRCNNBuild):
    family_class = CascadeRCNN
    cascade = True

    def random_key(self):
        return {"cascade_predictor_spread": CASCADE_PREDICTOR_SPREAD}

    def adjust_random(self, model, image_chw) -> None:
        """Each stage's classifier spreads its logits like Mask R-CNN's one (detectron.PREDICTOR_SPREAD)."""
        from d2build import detectron

        for path, target in CASCADE_PREDICTOR_SPREAD.items():
            detectron.rescale_outputs(model, model.get_submodule(path), image_chw, target)


BUILD = CascadeRCNNBuild
