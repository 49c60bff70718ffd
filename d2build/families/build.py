"""A model family's build half: Detectron2 run and exported, random weights that behave, the surgery.

Each family package's `build.py` subclasses `FamilyBuild` (families/base.py says how a family is
split). Module level imports numpy only: torch, Detectron2 and onnx-graphsurgeon are imported inside
the methods that need them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from d2build.families.base import Family
from d2build.processing import Detections, Letterbox, boxes_to_original, nonempty

if TYPE_CHECKING:
    from d2build.recipe import GraphSpec, SurgeryConfig


class FamilyBuild:
    #: the family's runtime half (families/<name>/__init__.py)
    family_class: ClassVar[type[Family]]
    #: the traced Instances fields, sorted by name, then image_size (then a family's image-level outputs)
    export_outputs: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        self.family = self.family_class()

    @property
    def name(self) -> str:
        return self.family.name

    # ------------------------------------------------------------------ Detectron2

    def eager_overrides(self, surgery: "SurgeryConfig") -> dict[str, Any]:
        """The recipe's thresholds as Detectron2 config keys (the family's `test_settings`), so eager runs what
        the graph runs."""
        out = {}
        for key, d2_key, _ in self.family.test_settings:
            value: Any = surgery
            for part in key.split(".")[1:]:  # surgery.nms.iou_threshold -> surgery.nms.iou_threshold
                value = getattr(value, part)
            out[d2_key] = value
        return out

    def inference(self, model: Any, inputs: list[dict[str, Any]]) -> list[Any]:
        """Detectron2's own inference on batched inputs (images in the model's format), Instances in input
        pixels before any post-processing: what the export traces and what eager runs."""
        raise NotImplementedError

    def eager(self, model: Any, image_chw: np.ndarray) -> Any:
        """Detectron2's own answer on one letterboxed BGR [3, H, W] image: Instances in input pixels (on the model's
        device: a model on a GPU gets the image there)."""
        import torch

        x = torch.as_tensor(image_chw, device=getattr(model, "device", "cpu"))
        with torch.no_grad():
            return self.inference(model, [{"image": in_model_format(model, x)}])[0]

    def eager_with_maps(self, model: Any, image_chw: np.ndarray, lb: Letterbox) -> tuple[Any, dict[str, np.ndarray]]:
        """One eager run: the Instances (as `eager`) and the family's image-level maps in original pixels, made by
        Detectron2's own post-processing (what `Family.image_maps` computes from the graph); none by default."""
        return self.eager(model, image_chw), {}

    def eager_detections(self, model: Any, image_chw: np.ndarray, lb: Letterbox, info: Any = None) -> Detections:
        """Detectron2's answer on one letterboxed image as verify compares it: Detections in original pixels,
        post-processed by Detectron2's own code (mask pasting; a family's image-level results too). `info`:
        the model's ModelInfo (names of what it finds)."""
        from d2build.processing import detections_from_instances

        return detections_from_instances(self.eager(model, image_chw), lb)

    # ------------------------------------------------------------------ export

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

    # ------------------------------------------------------------------ random weights

    def random_key(self) -> dict[str, Any]:
        """What the family adds to random weights (keyed by the weights stage when not empty)."""
        return {}

    def adjust_random(self, model: Any, image_chw: np.ndarray) -> tuple[str, ...] | None:
        """Make seeded random weights behave beyond `detectron.random_model`'s generic steps (none by default).
        Runs after the BN statistics are set, before the generic predictor spreads (PREDICTOR_SPREAD); returns
        the PREDICTOR_SPREAD paths it already rescaled to their spread (the generic step skips them)."""

    # ------------------------------------------------------------------ graph

    def surgery(self, export_model: Any, cfg: Any, graph: "GraphSpec") -> tuple[Any, dict[str, Any]]:
        """The TensorRT-ready graph (ModelProto) `graph` describes (its batch; any input size when dynamic) and
        facts for the manifest."""
        raise NotImplementedError


def in_model_format(model: Any, image_bgr: Any) -> Any:
    """A BGR image tensor in the channel order the model was trained on (`INPUT.FORMAT` BGR or RGB)."""
    return image_bgr.flip(0) if model.input_format == "RGB" else image_bgr
