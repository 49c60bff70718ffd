"""The family interface: what the stages, verify and the runtime may ask of a model family.

A family is one kind of Detectron2 model (Mask R-CNN, Keypoint R-CNN, ...). Nothing outside
`d2build/families/` names a family: stages and commands call these methods on the object
`families.family(name)` returns. Module level imports numpy only (torch and Detectron2 are
imported inside the methods that need them), so the runtime can decode graph outputs on a machine
without torch.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from d2build.processing import Detections, Letterbox, boxes_to_original, nonempty
from d2build.recipe import GraphSpec, SurgeryConfig, VerifyConfig

#: The four outputs every graph ends in (EfficientNMS_TRT's, or the standard-op graph's equivalent).
DETECTION_OUTPUTS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")


class Family:
    name: ClassVar[str]
    with_masks: ClassVar[bool] = False
    with_keypoints: ClassVar[bool] = False
    #: the traced Instances fields, sorted by name, then image_size
    export_outputs: ClassVar[tuple[str, ...]]
    #: graph outputs after DETECTION_OUTPUTS (e.g. detection_masks)
    head_outputs: ClassVar[tuple[str, ...]] = ()

    @property
    def graph_outputs(self) -> tuple[str, ...]:
        return DETECTION_OUTPUTS + self.head_outputs

    # ------------------------------------------------------------------ Detectron2 side

    #: Detectron2 config key holding the number of classes (read by the schema without Detectron2, too)
    num_classes_key: ClassVar[str] = "MODEL.ROI_HEADS.NUM_CLASSES"
    #: What the family's surgery handles, checked by the schema on the config's YAML (no Detectron2 import):
    #: (key, Detectron2's default, accepted values or a predicate, what anything else is)
    structure: ClassVar[tuple[tuple[str, Any, Any, str], ...]] = ()
    #: the family's Detectron2 models in one phrase, for messages ("FPN R-CNN (GeneralizedRCNN, ...)")
    described_as: ClassVar[str] = ""

    def num_classes(self, cfg: Any) -> int:
        """Object classes the model predicts (background not counted)."""
        node = cfg
        for part in self.num_classes_key.split("."):
            node = getattr(node, part)
        return int(node)

    def eager_overrides(self, surgery: SurgeryConfig) -> dict[str, Any]:
        """The recipe's thresholds as Detectron2 config keys, so eager runs what the graph runs."""
        raise NotImplementedError

    def inference(self, model: Any, inputs: list[dict[str, Any]]) -> list[Any]:
        """Detectron2's own inference on batched inputs (images in the model's format), Instances in input
        pixels before any post-processing: what the export traces and what eager runs."""
        raise NotImplementedError

    def eager(self, model: Any, image_chw: np.ndarray) -> Any:
        """Detectron2's own answer on one letterboxed BGR [3, H, W] image: Instances in input pixels."""
        import torch

        with torch.no_grad():
            return self.inference(model, [{"image": in_model_format(model, torch.as_tensor(image_chw))}])[0]

    def export(self, model: Any, image_chw: np.ndarray, path: Path) -> dict[str, np.ndarray]:
        """Trace Detectron2 at this input size into `path` (TracingAdapter around `inference`); outputs named
        after the Instances fields they hold.

        Returns what Detectron2's forward computed on `image_chw` while it was traced (one run of the
        model, not two), by output name: the values the exported graph must reproduce."""
        import torch
        from detectron2.export import TracingAdapter

        x = torch.as_tensor(image_chw)  # BGR, as every d2build image; the export takes BGR too

        def inference(m, inputs):
            return self.inference(m, [{**i, "image": in_model_format(m, i["image"])} for i in inputs])

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

    def export_detections(self, outputs: Mapping[str, np.ndarray], lb: Letterbox) -> Detections:
        """The export's outputs (input pixels) as Detections in original pixels (for the export check); boxes
        lying entirely in the letterbox padding are dropped as `decode` and Detectron2's detector_postprocess
        drop them (two identical zero-area boxes could never match by IoU)."""
        boxes = boxes_to_original(outputs["pred_boxes"], lb)
        keep = nonempty(boxes)
        return Detections(boxes[keep], np.asarray(outputs["scores"])[keep], np.asarray(outputs["pred_classes"])[keep])

    def recipe_problems(self, recipe: Any, default: Any) -> list[tuple[str, str, str]]:
        """Family-specific recipe rules, checked by the schema (no torch): (key, message, fix) each.
        `default(key)`: the key's default as conf/ writes it."""
        return []

    # ------------------------------------------------------------------ random weights

    def random_key(self) -> dict[str, Any]:
        """What the family adds to random weights (keyed by the weights stage when not empty)."""
        return {}

    def adjust_random(self, model: Any, image_chw: np.ndarray) -> None:
        """Make seeded random weights behave beyond `detectron.random_model`'s generic steps (none by default).
        Runs after the BN statistics are set, before the generic predictor spreads (PREDICTOR_SPREAD)."""

    # ------------------------------------------------------------------ graph side

    def surgery(self, export_model: Any, cfg: Any, graph: GraphSpec) -> tuple[Any, dict[str, Any]]:
        """The TensorRT-ready graph (ModelProto) `graph` describes (its batch; any input size when dynamic) and
        facts for the manifest."""
        raise NotImplementedError

    def decode(self, outputs: Mapping[str, np.ndarray], lb: Letterbox, image_index: int = 0,
               mask_threshold: float = 0.5) -> Detections:
        """One image's detections from the graph's named outputs, in original pixels.

        Rows past `num_detections` are padding and are dropped, and so are boxes lying entirely in
        the letterbox padding (empty once clipped to the photograph, as Detectron2's
        `detector_postprocess` drops them); the family's heads decode the rest (`decode_heads`)."""
        b = image_index
        n = int(np.asarray(outputs["num_detections"])[b].reshape(-1)[0])
        boxes_in = np.asarray(outputs["detection_boxes"], dtype=np.float32)[b]
        n = max(0, min(n, len(boxes_in)))
        boxes = boxes_to_original(boxes_in[:n], lb)
        keep = nonempty(boxes)
        rows = np.flatnonzero(keep)
        heads = self.decode_heads(outputs, b, rows, boxes_in[rows], boxes[keep], lb, mask_threshold)
        return Detections(boxes=boxes[keep],
                          scores=np.asarray(outputs["detection_scores"], dtype=np.float32)[b, rows],
                          classes=np.asarray(outputs["detection_classes"])[b, rows].astype(np.int64), **heads)

    def decode_heads(self, outputs: Mapping[str, np.ndarray], image_index: int, rows: np.ndarray,
                     boxes_input: np.ndarray, boxes: np.ndarray, lb: Letterbox,
                     mask_threshold: float) -> dict[str, Any]:
        """Per-detection extras (masks, keypoints) of the kept `rows`; none by default."""
        return {}

    # ------------------------------------------------------------------ verify

    def verify_extra(self, ref: Detections, got: Detections, match: Any,
                     verify: VerifyConfig) -> tuple[dict[str, Any], list[str]]:
        """Family-specific verify metrics and failures beyond boxes and masks (none by default)."""
        return {}, []


def in_model_format(model: Any, image_bgr: Any) -> Any:
    """A BGR image tensor in the channel order the model was trained on (`INPUT.FORMAT` BGR or RGB)."""
    return image_bgr.flip(0) if model.input_format == "RGB" else image_bgr
