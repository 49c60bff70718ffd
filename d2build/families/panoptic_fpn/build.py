"""Panoptic FPN, build half: Mask R-CNN's export with the semantic head's output beside the instances,
Detectron2's own semantic post-processing and panoptic combination on the reference side, the surgery,
and random weights whose semantic logits spread like a trained model's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from d2build.families.build import in_model_format
from d2build.families.mask_rcnn.build import MaskRCNNBuild
from d2build.families.panoptic_fpn import PanopticFPN

if TYPE_CHECKING:
    from d2build.processing import Detections, Letterbox
    from d2build.recipe import GraphSpec

# SemSegFPNHead's predictor (c2_msra_fill) already spreads its logits on the photograph (std ~4 at 320x320);
# fixed here at that spread so the semantic map is several confident classes whatever the input size.
SEMANTIC_SPREAD = {"sem_seg_head.predictor": 4.0}


class PanopticFPNBuild(MaskRCNNBuild):
    family_class = PanopticFPN
    #: the instances' fields, image_size, then the semantic head's logits at the input size (after its x4 upsample)
    export_outputs = ("pred_boxes", "pred_classes", "pred_masks", "scores", "image_size", "sem_seg")

    def inference(self, model, inputs):
        """PanopticFPN.inference without post-processing: per image (Instances in input pixels, [C, H, W] logits)."""
        instances, semantic = model.inference(inputs, do_postprocess=False)
        return list(zip(instances, semantic))

    def eager_outputs(self, model, image_chw: np.ndarray) -> tuple[Any, Any]:
        import torch

        with torch.no_grad():
            return self.inference(model, [{"image": in_model_format(model, torch.as_tensor(image_chw))}])[0]

    def eager(self, model, image_chw: np.ndarray):
        """The instances (what the instance comparisons, the export check and eval read)."""
        return self.eager_outputs(model, image_chw)[0]

    def eager_with_maps(self, model, image_chw: np.ndarray, lb: "Letterbox") -> tuple[Any, dict[str, np.ndarray]]:
        """The instances and Detectron2's semantic map (sem_seg_postprocess to the photograph, argmax)."""
        from detectron2.modeling.postprocessing import sem_seg_postprocess

        instances, logits = self.eager_outputs(model, image_chw)
        semantic = sem_seg_postprocess(logits, lb.resized_hw, *lb.original_hw).argmax(dim=0)
        return instances, {"semantic": semantic.numpy().astype(np.int32)}

    def eager_detections(self, model, image_chw: np.ndarray, lb: "Letterbox", info: Any = None) -> "Detections":
        """Detectron2's post-processing end to end: detector_postprocess'd instances (pasted masks),
        `sem_seg_postprocess` of the semantic logits to the photograph, its argmax, and Detectron2's own
        `combine_semantic_and_instance_outputs` with the model's thresholds."""
        import torch
        from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
        from detectron2.structures import Instances

        from d2build.families.panoptic_fpn import _name
        from d2build.processing import Segmentation, detections_from_instances

        instances, maps = self.eager_with_maps(model, image_chw, lb)
        det = detections_from_instances(instances, lb)
        h, w = lb.original_hw
        semantic = torch.from_numpy(maps["semantic"]).long()
        found = Instances((h, w), scores=torch.from_numpy(det.scores), pred_classes=torch.from_numpy(det.classes),
                          pred_masks=torch.from_numpy(det.masks))
        with torch.no_grad():
            panoptic, segments = combine_semantic_and_instance_outputs(
                found, semantic, model.combine_overlap_thresh, model.combine_stuff_area_thresh,
                model.combine_instances_score_thresh)
        panoptic = panoptic.numpy().astype(np.int32)
        things = info.class_names if info is not None else None
        stuff = (info.extra.get("panoptic") or {}).get("stuff_classes") if info is not None else None
        named = [{**s, "category": _name(things if s["isthing"] else stuff, s["category_id"],
                                         "class" if s["isthing"] else "stuff"),
                  "area": int(np.count_nonzero(panoptic == s["id"]))} for s in segments]
        det.segmentation = Segmentation(maps["semantic"], panoptic, named)
        return det

    def random_key(self):
        return {"semantic_spread": SEMANTIC_SPREAD}

    def adjust_random(self, model, image_chw) -> None:
        from d2build import detectron

        for path, target in SEMANTIC_SPREAD.items():
            detectron.rescale_outputs(model, model.get_submodule(path), image_chw, target)

    def surgery(self, export_model, cfg, graph: "GraphSpec"):
        """Mask R-CNN's graph plus the semantic head's logits as an output, in either flavour."""
        from d2build.families.surgery.rcnn import rcnn_surgeon
        from d2build.families.surgery.spec import head_spec

        spec = head_spec(cfg, graph.surgery, graph.input, with_masks=True, batch=graph.batch,
                         dynamic=graph.dynamic is not None, semantic=True)
        model, facts = rcnn_surgeon(export_model, spec, graph.ops).run()
        facts["semantic"] = {"classes": spec.semantic_classes, "stride": spec.semantic_stride}
        return model, facts


BUILD = PanopticFPNBuild
