"""Mask R-CNN (FPN), build half: how it is exported, run eagerly and made into the TensorRT-ready graph.

Export: TracingAdapter around `inference(..., do_postprocess=False)`; eager runs the same function on
the same letterboxed input with the recipe's thresholds; surgery is the R-CNN surgeon
(families/surgery/rcnn.py) in the recipe's flavour. The base of every R-CNN family's build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from d2build.families.build import FamilyBuild
from d2build.families.mask_rcnn import MaskRCNN

if TYPE_CHECKING:
    from d2build.recipe import GraphSpec


class MaskRCNNBuild(FamilyBuild):
    family_class = MaskRCNN
    export_outputs = ("pred_boxes", "pred_classes", "pred_masks", "scores", "image_size")
    #: CascadeROIHeads instead of StandardROIHeads (cascade_rcnn/build.py)
    cascade: ClassVar[bool] = False

    def inference(self, model, inputs):
        """GeneralizedRCNN.inference without post-processing: boxes in input pixels, 28x28 mask probabilities."""
        return model.inference(inputs, do_postprocess=False)

    def surgery(self, export_model, cfg, graph: "GraphSpec"):
        """The TensorRT-ready graph: plugin nodes (`surgery.ops=plugins`) or standard ONNX ops (`standard`,
        which may also take inputs of any size: the schema refuses model.dynamic with plugins)."""
        from d2build.families.surgery.rcnn import rcnn_surgeon
        from d2build.families.surgery.spec import head_spec

        f = self.family
        spec = head_spec(cfg, graph.surgery, graph.input, with_masks=f.with_masks, with_keypoints=f.with_keypoints,
                         batch=graph.batch, dynamic=graph.dynamic is not None, cascade=self.cascade)
        return rcnn_surgeon(export_model, spec, graph.ops).run()


BUILD = MaskRCNNBuild
