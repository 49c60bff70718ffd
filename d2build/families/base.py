"""The family interface: what the stages, verify and the runtime may ask of a model family.

A family is one kind of Detectron2 model (Mask R-CNN, Keypoint R-CNN, ...). Nothing outside
`d2build/families/` names a family: stages and commands call these methods on the object
`families.family(name)` returns. Module level imports numpy only (torch and Detectron2 are
imported inside the methods that need them), so the runtime can decode graph outputs on a machine
without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from d2build.processing import Detections, Letterbox, boxes_to_original, nonempty

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

    def num_classes(self, cfg: Any) -> int:
        """Object classes the model predicts (background not counted)."""
        return int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)

    def eager_overrides(self, surgery: dict[str, Any]) -> dict[str, Any]:
        """The recipe's thresholds as Detectron2 config keys, so eager runs what the graph runs."""
        raise NotImplementedError

    def eager(self, model: Any, image_chw: np.ndarray) -> Any:
        """Detectron2's own answer on one letterboxed BGR [3, H, W] image: Instances in input pixels."""
        raise NotImplementedError

    def export(self, model: Any, image_chw: np.ndarray, path: Path) -> dict[str, np.ndarray]:
        """Trace at this input size into `path`; return what the traced forward computed, by output name."""
        raise NotImplementedError

    def export_detections(self, outputs: Mapping[str, np.ndarray], lb: Letterbox) -> Detections:
        """The export's outputs as Detections in original pixels (for the export check)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ graph side

    def surgery(self, export_model: Any, cfg: Any, surgery: dict[str, Any], input_hw: tuple[int, int],
                batch: int = 1, dynamic: bool = False) -> tuple[Any, dict[str, Any]]:
        """The TensorRT-ready graph (ModelProto) for `batch` images (of any size when `dynamic`) and facts
        for the manifest."""
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
                     verify: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Family-specific verify metrics and failures beyond boxes and masks (none by default)."""
        return {}, []
