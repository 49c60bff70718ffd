"""A model family's runtime part: what decodes a graph's outputs, names them and checks them -- numpy only.

A family is one kind of Detectron2 model (Mask R-CNN, Keypoint R-CNN, ...), one package under
d2build/families/ in two halves:

* its `__init__.py`, the runtime half (this class): which outputs the graph has, how they become
  Detections in the photograph's pixels, the family's verify metrics, and the facts the schema checks
  a recipe against (which Detectron2 configs it builds, its recipe rules). It imports numpy and
  d2build's own runtime modules only, so a deploy bundle vendors it and decodes where neither torch
  nor Detectron2 is installed;
* its `build.py`, the build half (families/build.py: `FamilyBuild`): how Detectron2 runs and is
  exported, random weights that behave, and the surgery that makes the TensorRT-ready graph.

Nothing outside d2build/families/ names a family: stages and commands ask `families.family(name)`
(runtime) or `families.builder(name)` (build) and call these methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from d2build.processing import Detections, Letterbox, boxes_to_original, nonempty

if TYPE_CHECKING:
    from d2build.recipe import Recipe, VerifyConfig
    from d2build.runtime.info import ModelInfo


class Outputs:
    """The graph's output names (EfficientNMS_TRT's four, or the standard-op graph's equivalent, then the heads')."""

    NUM = "num_detections"  # [B, 1] int32: valid rows per image
    BOXES = "detection_boxes"  # [B, D, 4] x1, y1, x2, y2 in input pixels
    SCORES = "detection_scores"  # [B, D]
    CLASSES = "detection_classes"  # [B, D] int32
    MASKS = "detection_masks"  # [B, D, 28, 28] probabilities of each detection's own class
    HEATMAPS = "detection_heatmaps"  # [B, D, K, 56, 56] keypoint logits
    #: [B, C, H / 4, W / 4] the semantic head's per-class logits over the input canvas (Panoptic FPN: class 0 is
    #: "things", 1.. the stuff classes); an image-level output, not per detection
    SEMANTIC = "semantic_logits"
    DETECTIONS = (NUM, BOXES, SCORES, CLASSES)
    #: the per-detection rows (everything but NUM and the image-level SEMANTIC); PointRend's MASKS are
    #: [B, D, 224, 224], its subdivided resolution
    ROWS = (BOXES, SCORES, CLASSES, MASKS, HEATMAPS)


class Family:
    name: ClassVar[str]
    with_masks: ClassVar[bool] = False
    with_keypoints: ClassVar[bool] = False
    #: graph outputs after Outputs.DETECTIONS (e.g. detection_masks)
    head_outputs: ClassVar[tuple[str, ...]] = ()

    @property
    def graph_outputs(self) -> tuple[str, ...]:
        return Outputs.DETECTIONS + self.head_outputs

    # ------------------------------------------------------------------ what the schema checks (no Detectron2)

    #: Detectron2 config key holding the number of classes (read by the schema without Detectron2, too)
    num_classes_key: ClassVar[str] = "MODEL.ROI_HEADS.NUM_CLASSES"
    #: What the family's surgery handles, checked by the schema on the config's YAML (no Detectron2 import):
    #: (key, Detectron2's default, accepted values or a predicate, what anything else is)
    structure: ClassVar[tuple[tuple[str, Any, Any, str], ...]] = ()
    #: the family's Detectron2 models in one phrase, for messages ("FPN R-CNN (GeneralizedRCNN, ...)")
    described_as: ClassVar[str] = ""
    #: The recipe keys that are Detectron2 test-time settings: (recipe key, Detectron2 config key, Detectron2's
    #: default). Eager runs with the recipe's values (FamilyBuild.eager_overrides); a config that sets another
    #: value is noted at run start (schema.config_setting_notes).
    test_settings: ClassVar[tuple[tuple[str, str, Any], ...]] = ()

    def num_classes(self, cfg: Any) -> int:
        """Object classes the model predicts (background not counted)."""
        node = cfg
        for part in self.num_classes_key.split("."):
            node = getattr(node, part)
        return int(node)

    def recipe_problems(self, recipe: "Recipe", default: Any) -> list[tuple[str, str, str]]:
        """Family-specific recipe rules, checked by the schema (no torch): (key, message, fix) each.
        `default(key)`: the key's default as conf/ writes it."""
        return []

    def info_extra(self, cfg: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """What decoding needs beyond ModelInfo's fields, read from the Detectron2 config (any object with its
        attributes) and its dataset metadata: ModelInfo.extra, written into a bundle's model.json."""
        return {}

    # ------------------------------------------------------------------ decoding

    def decode(self, outputs: Mapping[str, np.ndarray], lb: Letterbox, image_index: int = 0,
               mask_threshold: float = 0.5, info: "ModelInfo | None" = None) -> Detections:
        """One image's detections from the graph's named outputs, in original pixels.

        Rows past `num_detections` are padding and are dropped, and so are boxes lying entirely in
        the letterbox padding (empty once clipped to the photograph, as Detectron2's
        `detector_postprocess` drops them); the family's heads decode the rest (`decode_heads`).
        `info`: the model's ModelInfo, for families whose decoding reads `info.extra` (Panoptic FPN's
        combination thresholds and stuff names); without it they use Detectron2's defaults."""
        b = image_index
        n = int(np.asarray(outputs[Outputs.NUM])[b].reshape(-1)[0])
        boxes_in = np.asarray(outputs[Outputs.BOXES], dtype=np.float32)[b]
        n = max(0, min(n, len(boxes_in)))
        boxes = boxes_to_original(boxes_in[:n], lb)
        keep = nonempty(boxes)
        rows = np.flatnonzero(keep)
        heads = self.decode_heads(outputs, b, rows, boxes_in[rows], boxes[keep], lb, mask_threshold)
        return Detections(boxes=boxes[keep],
                          scores=np.asarray(outputs[Outputs.SCORES], dtype=np.float32)[b, rows],
                          classes=np.asarray(outputs[Outputs.CLASSES])[b, rows].astype(np.int64), **heads)

    def decode_heads(self, outputs: Mapping[str, np.ndarray], image_index: int, rows: np.ndarray,
                     boxes_input: np.ndarray, boxes: np.ndarray, lb: Letterbox,
                     mask_threshold: float) -> dict[str, Any]:
        """Per-detection extras (masks, keypoints) of the kept `rows`; none by default."""
        return {}

    def image_maps(self, outputs: Mapping[str, np.ndarray], image_index: int, lb: Letterbox) -> dict[str, np.ndarray]:
        """Image-level maps in original pixels (Panoptic FPN: {"semantic": class per pixel}), as the eval stages
        store them beside the candidates; none by default."""
        return {}

    def segmentation_of(self, det: Detections, maps: Mapping[str, np.ndarray],
                        info: "ModelInfo | None" = None) -> Any:
        """The image's processing.Segmentation from its final detections and `image_maps` (None: the family has
        none), so eval scores each NMS variant's panoptic result."""
        return None

    # ------------------------------------------------------------------ verify

    def verify_extra(self, ref: Detections, got: Detections, match: Any,
                     verify: "VerifyConfig") -> tuple[dict[str, Any], list[str]]:
        """Family-specific verify metrics and failures beyond boxes and masks (none by default)."""
        return {}, []

    def verify_summary(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """Over all verified images: the family's summary metrics and a phrase for verify's console line
        (", semantic agreement >= 0.9990"); none by default."""
        return {}, ""
