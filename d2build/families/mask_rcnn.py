"""Mask R-CNN (FPN): everything d2build knows about this Detectron2 family, in one place.

How to export it (TracingAdapter around `inference(..., do_postprocess=False)`), what the export's
outputs mean, how Detectron2 eager is run for comparison (same letterboxed input, the recipe's
thresholds), and which surgery turns the export into the TensorRT-ready graph.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from d2build.families.base import Family
from d2build.processing import Detections, Letterbox, boxes_to_original, paste_masks

EXPORT_OUTPUTS = ("pred_boxes", "pred_classes", "pred_masks", "scores", "image_size")


class MaskRCNN(Family):
    """Detectron2's GeneralizedRCNN with FPN and a mask head; Faster and Keypoint R-CNN subclass it."""

    name = "mask_rcnn"
    with_masks = True
    with_keypoints = False
    export_outputs = EXPORT_OUTPUTS
    head_outputs = ("detection_masks",)

    def eager_overrides(self, surgery: dict[str, Any]) -> dict[str, Any]:
        """The recipe's thresholds as Detectron2 config keys, so eager runs what the graph runs."""
        return {
            "MODEL.ROI_HEADS.NMS_THRESH_TEST": surgery["nms"]["iou_threshold"],
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": surgery["nms"]["score_threshold"],
            "TEST.DETECTIONS_PER_IMAGE": surgery["nms"]["max_detections"],
            "MODEL.RPN.PRE_NMS_TOPK_TEST": surgery["rpn"]["pre_nms_topk"],
            "MODEL.RPN.POST_NMS_TOPK_TEST": surgery["rpn"]["post_nms_topk"],
            "MODEL.RPN.NMS_THRESH": surgery["rpn"]["iou_threshold"],
        }

    def eager(self, model, image_chw: np.ndarray):
        """Detectron2's own answer on one letterboxed BGR [3,H,W] image: Instances in input pixels."""
        import torch

        with torch.no_grad():
            return model.inference([{"image": _in_model_format(model, torch.as_tensor(image_chw))}],
                                   do_postprocess=False)[0]

    def export(self, model, image_chw: np.ndarray, path: Path) -> dict[str, np.ndarray]:
        """Trace Detectron2 at this input size; outputs named after the Instances fields they hold.

        Returns what Detectron2's forward computed on `image_chw` while it was traced (one run of the
        model, not two), by output name: the values the exported graph must reproduce."""
        import torch
        from detectron2.export import TracingAdapter

        x = torch.as_tensor(image_chw)  # BGR, as every d2build image; the export takes BGR too

        def inference(m, inputs):
            return m.inference([{**i, "image": _in_model_format(m, i["image"])} for i in inputs],
                               do_postprocess=False)

        adapter = TracingAdapter(model, [{"image": x}], inference_func=inference)
        adapter.eval()
        traced: list[Any] = []
        hook = adapter.register_forward_hook(lambda _m, _args, out: traced.append(out))
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches surgery removes
                torch.onnx.export(adapter, (x,), str(path), opset_version=17, dynamo=False,
                                  input_names=["image"], output_names=list(self.export_outputs))
        finally:
            hook.remove()
        outputs = traced[-1] if isinstance(traced[-1], (tuple, list)) else (traced[-1],)
        return {name: t.detach().numpy() for name, t in zip(self.export_outputs, outputs, strict=True)}

    def export_detections(self, outputs, lb: Letterbox) -> Detections:
        """The export's outputs (input pixels) as Detections in original pixels, masks unpasted."""
        return Detections(boxes_to_original(outputs["pred_boxes"], lb), outputs["scores"], outputs["pred_classes"])

    def decode_heads(self, outputs, image_index, rows, boxes_input, boxes, lb, mask_threshold) -> dict[str, Any]:
        """Masks of the kept detections pasted into the original image (Detectron2's paste_masks_in_image)."""
        if not self.with_masks:
            return {}
        raw = np.asarray(outputs["detection_masks"], dtype=np.float32)[image_index, rows]
        return {"masks": paste_masks(raw, boxes, lb.original_hw, threshold=mask_threshold)}

    def surgery(self, export_model, cfg, surgery: dict[str, Any], input_hw: tuple[int, int], batch: int = 1,
                dynamic: bool = False):
        """The TensorRT-ready graph: plugin nodes (`surgery.ops=plugins`) or standard ONNX ops (`standard`,
        which may also take inputs of any size)."""
        from d2build.families.rcnn_graph import RCNNSurgeon, head_spec
        from d2build.families.rcnn_standard import StandardSurgeon

        standard = surgery.get("ops", "plugins") == "standard"
        if dynamic and not standard:
            from d2build.graph import GraphMismatch

            raise GraphMismatch("dynamic input sizes need surgery.ops=standard: PyramidROIAlign_TRT's image_size "
                                "attribute fixes the plugin graph's input size")
        spec = head_spec(cfg, surgery, input_hw, with_masks=self.with_masks, with_keypoints=self.with_keypoints,
                         batch=batch, dynamic=dynamic)
        surgeon = StandardSurgeon if standard else RCNNSurgeon
        return surgeon(export_model, spec).run()


def _in_model_format(model, image_bgr):
    """A BGR image tensor in the channel order the model was trained on (`INPUT.FORMAT` BGR or RGB)."""
    return image_bgr.flip(0) if model.input_format == "RGB" else image_bgr
