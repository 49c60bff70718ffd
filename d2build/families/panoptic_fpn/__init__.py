"""Panoptic FPN, runtime half: Mask R-CNN's instances, the semantic head's stuff, and their combination.

Detectron2's `PanopticFPN` (COCO-PanopticSegmentation/panoptic_fpn_R_*): a GeneralizedRCNN (Mask R-CNN's
instance branch, decoded as Mask R-CNN's) plus `SemSegFPNHead` on p2..p5, whose per-class logits the
graph outputs at 1/4 of the input (`semantic_logits [B, C, H/4, W/4]`; class 0 is "things", 1.. the
stuff classes). Decoding here, numpy only (a deploy bundle vendors this file):

* the semantic map in the photograph's pixels, as Detectron2 makes it (`processing.semantic_to_original`:
  the head's x4 upsample, then `sem_seg_postprocess`'s resize to the photograph, then the argmax);
* the panoptic segmentation, as `combine_semantic_and_instance_outputs` combines the post-processed
  instances (pasted masks) with that map: instances by descending score down to
  `INSTANCES_CONFIDENCE_THRESH`, each dropped when more than `OVERLAP_THRESH` of its mask is taken,
  else its free pixels; then every stuff class's free pixels when at least `STUFF_AREA_LIMIT` of them.
  The three thresholds come from the config (`MODEL.PANOPTIC_FPN.COMBINE`, ModelInfo.extra["panoptic"],
  a bundle's model.json).

Verify (`verify_extra`) compares both with Detectron2's own: the semantic map pixel by pixel
(`verify.min_semantic_agreement`), the panoptic segments one-to-one by category and IoU
(`verify.segment_iou_threshold`, `verify.min_segments_matched`), beside the instances as for Mask R-CNN.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from d2build.families.base import Outputs
from d2build.families.mask_rcnn import MASK_HEAD_ROW, RCNN_STRUCTURE, MaskRCNN
from d2build.processing import Detections, Segmentation, semantic_to_original

#: Detectron2's defaults (MODEL.PANOPTIC_FPN.COMBINE), used when decoding without a ModelInfo
COMBINE_DEFAULTS = {"overlap_threshold": 0.5, "stuff_area_limit": 4096, "instances_score_threshold": 0.5}

PANOPTIC_STRUCTURE: tuple[tuple[str, Any, Any, str], ...] = tuple(
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN", ("PanopticFPN",), "not a Panoptic FPN")
    if row[0] == "MODEL.META_ARCHITECTURE" else row for row in RCNN_STRUCTURE
) + (
    MASK_HEAD_ROW,
    ("MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead", ("SemSegFPNHead",), "another semantic head"),
    ("MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3", "p4", "p5"], (["p2", "p3", "p4", "p5"],),
     "a semantic head on other levels than p2..p5"),
    ("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4, (4,), "a semantic head at another stride than 4"),
)


class PanopticFPN(MaskRCNN):
    name = "panoptic_fpn"
    with_masks = True
    head_outputs = (Outputs.MASKS, Outputs.SEMANTIC)
    structure = PANOPTIC_STRUCTURE
    described_as = ("Panoptic FPN (PanopticFPN: Mask R-CNN's instance branch on ResNet-FPN, and SemSegFPNHead for "
                    "the stuff classes)")

    def info_extra(self, cfg: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The combination thresholds (MODEL.PANOPTIC_FPN.COMBINE) and the semantic classes' names."""
        c = cfg.MODEL.PANOPTIC_FPN.COMBINE
        n = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        names = list(metadata.get("stuff_classes") or [])
        if len(names) != n:
            names = ["things", *(f"stuff {k}" for k in range(1, n))]
        return {"panoptic": {"overlap_threshold": float(c.OVERLAP_THRESH), "stuff_area_limit": int(c.STUFF_AREA_LIMIT),
                             "instances_score_threshold": float(c.INSTANCES_CONFIDENCE_THRESH),
                             "stuff_classes": names}}

    def decode(self, outputs, lb, image_index=0, mask_threshold=0.5, info=None) -> Detections:
        """Mask R-CNN's detections, then the semantic map and the panoptic segmentation of the image."""
        det = super().decode(outputs, lb, image_index, mask_threshold, info)
        det.segmentation = self.segmentation_of(det, self.image_maps(outputs, image_index, lb), info)
        return det

    def image_maps(self, outputs, image_index, lb) -> dict[str, np.ndarray]:
        return {"semantic": semantic_to_original(np.asarray(outputs[Outputs.SEMANTIC])[image_index], lb)}

    def segmentation_of(self, det, maps, info=None) -> Segmentation:
        settings = {**COMBINE_DEFAULTS, **((info.extra.get("panoptic") or {}) if info is not None else {})}
        return combine(det, maps["semantic"], settings, info.class_names if info is not None else None)

    # ------------------------------------------------------------------ verify

    def verify_extra(self, ref, got, match, verify) -> tuple[dict[str, Any], list[str]]:
        """The semantic map pixel by pixel, the panoptic segments one-to-one (same category, IoU)."""
        if ref.segmentation is None or got.segmentation is None:
            raise ValueError("a panoptic segmentation is missing on one side: Detectron2 "
                             f"{'has' if ref.segmentation is not None else 'lacks'} one, the graph "
                             f"{'has' if got.segmentation is not None else 'lacks'} one")
        stats = segmentation_agreement(ref.segmentation, got.segmentation, verify.segment_iou_threshold)
        problems = []
        if stats["semantic_agreement"] < verify.min_semantic_agreement:
            problems.append(f"semantic map agrees on {stats['semantic_agreement']:.4f} of pixels "
                            f"(< verify.min_semantic_agreement={verify.min_semantic_agreement})")
        if stats["segments_matched_share"] < verify.min_segments_matched:
            problems.append(f"panoptic segments: {stats['segments_matched']} of {stats['segments_detectron2']} matched "
                            f"at IoU >= {verify.segment_iou_threshold} (< verify.min_segments_matched="
                            f"{verify.min_segments_matched})")
        return stats, problems

    def verify_summary(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        if not rows:
            return {}, ""
        agreement = min(r["semantic_agreement"] for r in rows)
        matched = sum(r["segments_matched"] for r in rows)
        total = sum(r["segments_detectron2"] for r in rows)
        out = {"min_semantic_agreement": agreement, "segments_matched": matched, "segments_detectron2": total,
               "min_panoptic_agreement": min(r["panoptic_agreement"] for r in rows),
               "semantic_classes": min(r["semantic_classes"] for r in rows)}
        return out, (f", semantic agreement >= {agreement:.4f}, panoptic segments {matched}/{total} matched "
                     f"(pixels >= {out['min_panoptic_agreement']:.4f})")


# ---------------------------------------------------------------------------------------------
# The panoptic combination (Detectron2's combine_semantic_and_instance_outputs)
# ---------------------------------------------------------------------------------------------


def combine(det: Detections, semantic: np.ndarray, settings: Mapping[str, Any],
            thing_names: tuple[str, ...] | None = None) -> Segmentation:
    """The panoptic segmentation of one image from its instances (masks pasted at the photograph's size) and
    its semantic map, step for step as Detectron2's `combine_semantic_and_instance_outputs`."""
    h, w = semantic.shape
    panoptic = np.zeros((h, w), np.int32)
    segments: list[dict[str, Any]] = []
    masks = det.masks if det.masks is not None else np.zeros((len(det), h, w), bool)
    for k in np.argsort(-det.scores, kind="stable"):
        score = float(det.scores[k])
        if score < settings["instances_score_threshold"]:
            break
        mask = masks[k]
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        taken = panoptic > 0
        overlap = int(np.count_nonzero(mask & taken))
        if overlap * 1.0 / area > settings["overlap_threshold"]:
            continue
        if overlap > 0:
            mask = mask & ~taken
        panoptic[mask] = len(segments) + 1
        c = int(det.classes[k])
        segments.append({"id": len(segments) + 1, "isthing": True, "category_id": c,
                         "category": _name(thing_names, c, "class"), "score": score, "instance_id": int(k),
                         "area": int(np.count_nonzero(mask))})
    stuff_names = settings.get("stuff_classes")
    for label in np.unique(semantic):
        if label == 0:  # "things": the instances' part of the map
            continue
        mask = (semantic == label) & (panoptic == 0)
        area = int(np.count_nonzero(mask))
        if area < settings["stuff_area_limit"]:
            continue
        panoptic[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "isthing": False, "category_id": int(label),
                         "category": _name(stuff_names, int(label), "stuff"), "area": area})
    return Segmentation(semantic=semantic.astype(np.int32), panoptic=panoptic, segments=segments)


def _name(names: Any, k: int, what: str) -> str:
    return str(names[k]) if names is not None and 0 <= k < len(names) else f"{what} {k}"


def category_map(seg: Segmentation) -> np.ndarray:
    """Each pixel's panoptic category as one int: -1 for no segment, thing c as c, stuff s as 1000 + s."""
    codes = np.full(len(seg.segments) + 1, -1, np.int64)
    for s in seg.segments:
        codes[s["id"]] = s["category_id"] + (0 if s["isthing"] else 1000)
    return codes[seg.panoptic]


def segmentation_agreement(ref: Segmentation, got: Segmentation, iou_threshold: float) -> dict[str, Any]:
    """Detectron2's segmentation (`ref`) against the graph's: semantic pixel agreement, panoptic pixel agreement
    by category, and segments matched one-to-one (same thing/stuff category, IoU >= `iou_threshold`; greedy by
    IoU, each segment used once)."""
    if ref.semantic.shape != got.semantic.shape:
        raise ValueError(f"semantic maps differ in size: {ref.semantic.shape} vs {got.semantic.shape}")
    n_ref, n_got = len(ref.segments), len(got.segments)
    joint = np.bincount(ref.panoptic.ravel().astype(np.int64) * (n_got + 1) + got.panoptic.ravel(),
                        minlength=(n_ref + 1) * (n_got + 1)).reshape(n_ref + 1, n_got + 1)
    area_ref, area_got = joint.sum(axis=1), joint.sum(axis=0)
    union = area_ref[:, None] + area_got[None, :] - joint
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, joint / union, 0.0)[1:, 1:]
    key = [(s["isthing"], s["category_id"]) for s in ref.segments]
    same = np.array([[k == (t["isthing"], t["category_id"]) for t in got.segments] for k in key],
                    bool).reshape(n_ref, n_got)
    cand = np.argwhere(same & (iou >= iou_threshold))
    order = np.argsort(-iou[cand[:, 0], cand[:, 1]], kind="stable") if len(cand) else []
    used_ref, used_got, ious = set(), set(), []
    for i, j in (cand[o] for o in order):
        if i in used_ref or j in used_got:
            continue
        used_ref.add(int(i))
        used_got.add(int(j))
        ious.append(float(iou[i, j]))
    return {
        "semantic_agreement": float(np.mean(ref.semantic == got.semantic)),
        "semantic_classes": int(len(np.unique(ref.semantic))),
        "panoptic_agreement": float(np.mean(category_map(ref) == category_map(got))),
        "segments_detectron2": n_ref, "segments_graph": n_got, "segments_matched": len(ious),
        "segments_matched_share": len(ious) / n_ref if n_ref else (1.0 if n_got == 0 else 0.0),
        "mean_segment_iou": float(np.mean(ious)) if ious else None,
        "things": sum(1 for s in ref.segments if s["isthing"]),
    }


FAMILY = PanopticFPN
