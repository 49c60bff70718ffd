"""COCO evaluation: which category a model class is, detections in COCO's result format, AP by pycocotools.

Also the final NMS of each side a comparison has -- the plugin graph (EfficientNMS_TRT's semantics),
the standard graph (ONNX NonMaxSuppression as ONNX Runtime computes it) and Detectron2 eager
(`fast_rcnn_inference`: scores > threshold, torchvision's batched_nms, top-k) -- applied to an image's
*candidates*: every (proposal, class) detection above a low score floor, with no suppression. A
variant's detections are exactly what its graph computes once the candidates are known (the final NMS
is the only thing an NMS setting changes), so an NMS sweep runs the model once per image
(stages/candidates.py) and every variant only re-runs its NMS here (stages/eval.py).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOX_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
IOU_TYPES = {"bbox": BOX_STATS, "segm": BOX_STATS, "keypoints": KEYPOINT_STATS}


# ---------------------------------------------------------------- annotations and classes

def load_coco(path: str | Path):
    """pycocotools' COCO for an instances json, without its console chatter."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def category_map(gt, info) -> tuple[dict[int, int], str | None]:
    """Model class index -> annotation category id, and a note when the mapping is by position.

    By name when every model class name is a category name; by position (categories sorted by id)
    when the names are unknown or differ but the counts agree; otherwise ValueError saying which."""
    cats = sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])
    by_name = {c["name"]: c["id"] for c in cats}
    names = info.class_names
    if names and all(n in by_name for n in names):
        return {i: by_name[n] for i, n in enumerate(names)}, None
    if len(cats) == info.num_classes:
        why = "the model's class names are unknown" if not names else "its category names differ from the model's"
        listed = ", ".join(c["name"] for c in cats[:5]) + (", ..." if len(cats) > 5 else "")
        return ({i: c["id"] for i, c in enumerate(cats)},
                f"{why}; model class k is mapped to the k-th category by id ({listed}). Set model.class_names "
                "to map by name")
    if names:
        missing = [n for n in names if n not in by_name][:5]
        raise ValueError(f"its {len(cats)} categories match neither the model's {len(names)} class names "
                         f"(missing e.g. {missing}) nor their count; set model.class_names to the json's names")
    raise ValueError(f"its {len(cats)} categories do not match the model's {info.num_classes} classes and the "
                     "model's class names are unknown; set model.class_names")


def keypoint_sigmas(info, configured: tuple[float, ...] | None, config_sigmas: tuple[float, ...] = ()) -> np.ndarray:
    """Per-keypoint OKS sigmas: eval.keypoint_oks_sigmas, else the Detectron2 config's
    TEST.KEYPOINT_OKS_SIGMAS, else COCO's for a 17-keypoint model; ValueError otherwise."""
    from d2build.families.keypoint_rcnn import COCO_OKS_SIGMAS

    k = len(info.keypoint_names)
    for sigmas, where in ((configured, "eval.keypoint_oks_sigmas"), (config_sigmas, "TEST.KEYPOINT_OKS_SIGMAS")):
        if sigmas:
            if len(sigmas) != k:
                raise ValueError(f"{where} has {len(sigmas)} values but the model has {k} keypoints")
            return np.asarray(sigmas, np.float64)
    if k == len(COCO_OKS_SIGMAS):
        return np.asarray(COCO_OKS_SIGMAS, np.float64) / 10.0
    raise ValueError(f"the model has {k} keypoints, not COCO's 17: set eval.keypoint_oks_sigmas to {k} per-keypoint "
                     "sigmas (COCO uses 0.025-0.107; 0.05 is a typical value)")


def has(gt, iou_type: str) -> bool:
    anns = gt.dataset.get("annotations", [])
    if iou_type == "segm":
        return any(a.get("segmentation") for a in anns)
    if iou_type == "keypoints":
        return any(a.get("num_keypoints", 0) > 0 or any(a.get("keypoints", [])[2::3]) for a in anns)
    return bool(anns)


# ---------------------------------------------------------------- results and AP

def encode_masks(masks) -> list[dict]:
    """Boolean [N, h, w] masks as COCO run-length encodings (counts as str)."""
    from pycocotools import mask as mask_util

    out = []
    for m in masks:
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


def to_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, category_of: dict,
               rles: list[dict] | None = None, keypoints: np.ndarray | None = None) -> list[dict]:
    """COCO result records of one image (boxes xyxy in original pixels). Keypoints get -0.5 on x and y, as
    Detectron2's COCOEvaluator writes them (pixel indices, not the continuous coordinates boxes use)."""
    out = []
    for k in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        r: dict[str, Any] = {"image_id": int(image_id), "category_id": category_of[int(classes[k])],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])}
        if rles is not None:
            r["segmentation"] = rles[k]
        if keypoints is not None:
            kp = np.array(keypoints[k], np.float64)
            kp[:, :2] -= 0.5
            r["keypoints"] = [round(float(v), 3) for v in kp.reshape(-1)]
        out.append(r)
    return out


def evaluate(gt, results: list[dict], iou_type: str, sigmas: np.ndarray | None = None,
             image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO AP/AR (in [0, 1]) of `results` against `gt`; pycocotools' own computation, quiet."""
    from pycocotools.cocoeval import COCOeval

    names = IOU_TYPES[iou_type]
    if not results:
        return {k: 0.0 for k in names}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(names, ev.stats)}


# ---------------------------------------------------------------- candidates and each side's final NMS

@dataclass
class Candidates:
    """One image's detections before the final NMS: every (proposal, class) above the score floor.

    All rows take part in NMS (`boxes_input`, input pixels, as the model's NMS sees them); `shown` marks
    the rows that survive the letterbox (boxes not entirely in the padding), which alone have
    original-pixel boxes, masks and keypoints."""

    boxes_input: np.ndarray  # [n, 4]
    scores: np.ndarray  # [n]
    classes: np.ndarray  # [n] int
    shown: np.ndarray  # [n] bool
    boxes: np.ndarray  # [n, 4] original pixels (rows not shown: zeros)
    rles: list[dict | None] | None = None
    keypoints: np.ndarray | None = None  # [n, K, 3] original pixels
    truncated: bool = False  # the candidate cap was reached: variants may miss low-score detections

    def to_json(self) -> dict[str, Any]:
        return {"boxes_input": self.boxes_input.tolist(), "scores": self.scores.tolist(),
                "classes": self.classes.tolist(), "shown": self.shown.tolist(), "boxes": self.boxes.tolist(),
                "rles": self.rles, "keypoints": None if self.keypoints is None else self.keypoints.tolist(),
                "truncated": self.truncated}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Candidates":
        kp = d.get("keypoints")
        return cls(np.asarray(d["boxes_input"], np.float32).reshape(-1, 4), np.asarray(d["scores"], np.float32),
                   np.asarray(d["classes"], np.int64), np.asarray(d["shown"], bool),
                   np.asarray(d["boxes"], np.float32).reshape(-1, 4), d.get("rles"),
                   None if kp is None else np.asarray(kp, np.float32), bool(d.get("truncated")))

    @classmethod
    def from_rows(cls, boxes_input, scores, classes, lb, heads_of, cap: int) -> "Candidates":
        """Rows as a model produced them; `heads_of(shown_rows, boxes_input, boxes)` -> masks/keypoints."""
        from d2build.processing import boxes_to_original, nonempty

        boxes_input = np.asarray(boxes_input, np.float32).reshape(-1, 4)
        boxes = boxes_to_original(boxes_input, lb)
        shown = nonempty(boxes)
        rows = np.flatnonzero(shown)
        heads = heads_of(rows, boxes_input[rows], boxes[rows])
        rles, keypoints = None, None
        if heads.get("masks") is not None:
            rles = [None] * len(boxes_input)
            for r, rle in zip(rows, encode_masks(heads["masks"])):
                rles[r] = rle
        if heads.get("keypoints") is not None:
            keypoints = np.zeros((len(boxes_input), *heads["keypoints"].shape[1:]), np.float32)
            keypoints[rows] = heads["keypoints"]
        boxes[~shown] = 0
        return cls(boxes_input, np.asarray(scores, np.float32), np.asarray(classes, np.int64), shown, boxes, rles,
                   keypoints, truncated=len(boxes_input) >= cap)

    def detections(self, keep: np.ndarray, image_hw: tuple[int, int]):
        """The kept rows that are shown as processing.Detections in original pixels (masks decoded)."""
        from pycocotools import mask as mask_utils

        from d2build.processing import Detections

        keep = np.asarray([k for k in keep if self.shown[k]], np.int64)
        masks = None
        if self.rles is not None:
            masks = np.zeros((len(keep), *image_hw), bool)
            for i, k in enumerate(keep):
                rle = dict(self.rles[k])
                masks[i] = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep], masks)

    def results(self, keep: np.ndarray, image_id: int, category_of: dict) -> list[dict]:
        """COCO records of the kept rows that are shown (in keep's order)."""
        keep = np.asarray([k for k in keep if self.shown[k]], np.int64)
        return to_results(image_id, self.boxes[keep], self.scores[keep], self.classes[keep], category_of,
                          None if self.rles is None else [self.rles[k] for k in keep],
                          None if self.keypoints is None else self.keypoints[keep])


def final_nms(c: Candidates, ops: str, score_threshold: float, iou_threshold: float,
              max_detections: int) -> np.ndarray:
    """Indices of the candidates one side's final NMS keeps, best first."""
    if ops == "detectron2":
        return _nms_detectron2(c, score_threshold, iou_threshold, max_detections)
    if ops == "standard":
        return _nms_onnxruntime(c, score_threshold, iou_threshold, max_detections)
    if ops == "plugins":
        return _nms_efficient(c, score_threshold, iou_threshold, max_detections)
    raise ValueError(f"unknown NMS {ops!r} (plugins, standard or detectron2)")


def _nms_detectron2(c: Candidates, t: float, u: float, d: int) -> np.ndarray:
    """fast_rcnn_inference_single_image: scores > t, batched_nms (IoU > u suppresses), keep[:d]."""
    import torch
    from torchvision.ops import batched_nms

    idx = np.flatnonzero(c.scores > np.float32(t))
    if not len(idx):
        return idx
    keep = batched_nms(torch.from_numpy(c.boxes_input[idx]), torch.from_numpy(c.scores[idx]),
                       torch.from_numpy(c.classes[idx]), float(u))
    return idx[keep.numpy()[:d]]


_ORT_NMS: dict[str, Any] = {}


def _nms_onnxruntime(c: Candidates, t: float, u: float, d: int) -> np.ndarray:
    """The standard graph's final NMS: ONNX Runtime's NonMaxSuppression, one batch item per class,
    score > t, IoU > u suppresses; then the top d by score."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "session" not in _ORT_NMS:
        node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "score"], ["selected"],
                                center_point_box=0)
        graph = helper.make_graph([node], "nms", [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["B", "N", 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", 1, "N"]),
            helper.make_tensor_value_info("max", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("selected", TensorProto.INT64, ["K", 3])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        _ORT_NMS["session"] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    classes = np.unique(c.classes)
    if not len(classes):
        return np.zeros(0, np.int64)
    rows = [np.flatnonzero(c.classes == k) for k in classes]
    n = max(len(r) for r in rows)
    boxes = np.zeros((len(classes), n, 4), np.float32)
    scores = np.full((len(classes), 1, n), -1.0, np.float32)
    for i, r in enumerate(rows):
        boxes[i, :len(r)] = c.boxes_input[r]
        scores[i, 0, :len(r)] = c.scores[r]
    (sel,) = _ORT_NMS["session"].run(None, {"boxes": boxes, "scores": scores, "max": np.array([n], np.int64),
                                            "iou": np.array([u], np.float32), "score": np.array([t], np.float32)})
    kept = np.array([rows[i][j] for i, _, j in sel], np.int64)
    order = np.argsort(-c.scores[kept], kind="stable")
    return kept[order][:d]


def _nms_efficient(c: Candidates, t: float, u: float, d: int) -> np.ndarray:
    """The plugin graph's final NMS: d2build's EfficientNMS_TRT reference (score >= t, IoU >= u suppresses,
    one global sort, the first d kept)."""
    from d2build.reference import efficient_nms

    if not len(c.scores):
        return np.zeros(0, np.int64)
    num_classes = int(c.classes.max()) + 1
    scores = np.zeros((1, len(c.scores), num_classes), np.float32)
    scores[0, np.arange(len(c.scores)), c.classes] = c.scores
    num, boxes, out_scores, out_classes = efficient_nms(
        c.boxes_input[None], scores, score_threshold=t, iou_threshold=u, max_output_boxes=d)
    index = {}
    for i in range(len(c.scores)):  # the plugin outputs boxes, not indices: find each one's row
        index.setdefault((int(c.classes[i]), c.boxes_input[i].tobytes(), float(c.scores[i])), i)
    return np.array([index[(int(out_classes[0, k]), boxes[0, k].tobytes(), float(out_scores[0, k]))]
                     for k in range(int(num[0, 0]))], np.int64)


def save_candidates(path: Path, per_image: dict[int, Candidates]) -> None:
    path.write_text(json.dumps({str(k): v.to_json() for k, v in per_image.items()}))


def load_candidates(path: Path) -> dict[int, Candidates]:
    return {int(k): Candidates.from_json(v) for k, v in json.loads(path.read_text()).items()}


# ---------------------------------------------------------------- panoptic quality (COCO panoptic ground truth)

PANOPTIC_VOID = 0  # segment id 0 in a PNG: unlabelled pixels


def png_ids(path: Path) -> np.ndarray:
    """A COCO panoptic PNG's segment ids (id = R + 256 G + 256^2 B)."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def panoptic_quality(gt: dict[str, Any], masks_dir: Path, predictions: dict[int, Any]) -> dict[str, dict[str, float]]:
    """PQ, SQ and RQ over All / Things / Stuff categories, as panopticapi's pq_compute counts them.

    `gt`: a COCO panoptic json; `predictions`: image id -> processing.Segmentation whose segments name their
    category (`category`, `isthing`), matched to the json's categories by name and thing/stuff (a segment of
    another category counts as unlabelled). Per image, a predicted and a ground-truth segment of one category
    match at IoU > 0.5, where the IoU leaves out the prediction's pixels on unlabelled ground truth; crowd
    segments never match, and unmatched predictions lying more than half on unlabelled or same-category crowd
    pixels are not false positives. PQ = sum of matched IoUs / (TP + FP/2 + FN/2) per category, averaged over
    the categories with any TP, FP or FN. Images without a prediction are skipped."""
    cats = {c["id"]: c for c in gt["categories"]}
    by_name = {(c["name"], bool(c["isthing"])): c["id"] for c in gt["categories"]}
    stats = {cid: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for cid in cats}
    for ann in gt["annotations"]:
        seg = predictions.get(ann["image_id"])
        if seg is None:
            continue
        gt_ids = png_ids(Path(masks_dir) / ann["file_name"])
        if gt_ids.shape != seg.panoptic.shape:
            raise ValueError(f"{ann['file_name']} is {gt_ids.shape[0]}x{gt_ids.shape[1]}, the prediction "
                             f"{seg.panoptic.shape[0]}x{seg.panoptic.shape[1]}")
        gt_seg = {s["id"]: s for s in ann["segments_info"]}
        pred_cat = {s["id"]: by_name.get((s.get("category"), bool(s["isthing"]))) for s in seg.segments}
        pred = np.where(np.isin(seg.panoptic, [k for k, c in pred_cat.items() if c is not None]), seg.panoptic, 0)
        pairs, counts = np.unique(np.stack([gt_ids.ravel(), pred.ravel().astype(np.int64)]), axis=1,
                                  return_counts=True)
        inter = {(int(g), int(p)): int(n) for (g, p), n in zip(pairs.T, counts)}
        gt_area = {g: sum(n for (a, _), n in inter.items() if a == g) for g in gt_seg}
        pred_area = {p: sum(n for (_, b), n in inter.items() if b == p) for p in pred_cat if pred_cat[p] is not None}
        gt_hit, pred_hit = set(), set()
        for (g, p), n in inter.items():
            if g not in gt_seg or p not in pred_area or gt_seg[g].get("iscrowd", 0):
                continue
            if gt_seg[g]["category_id"] != pred_cat[p]:
                continue
            union = pred_area[p] + gt_area[g] - n - inter.get((PANOPTIC_VOID, p), 0)
            iou = n / union
            if iou > 0.5:
                stats[pred_cat[p]]["tp"] += 1
                stats[pred_cat[p]]["iou"] += iou
                gt_hit.add(g)
                pred_hit.add(p)
        crowd = {}
        for g, s in gt_seg.items():
            if s.get("iscrowd", 0):
                crowd[s["category_id"]] = g
            elif g not in gt_hit:
                stats[s["category_id"]]["fn"] += 1
        for p, area in pred_area.items():
            if p in pred_hit:
                continue
            ignored = inter.get((PANOPTIC_VOID, p), 0) + inter.get((crowd.get(pred_cat[p], -1), p), 0)
            if ignored / area <= 0.5:
                stats[pred_cat[p]]["fp"] += 1
    out = {}
    for label, keep in (("All", lambda c: True), ("Things", lambda c: bool(c["isthing"])),
                        ("Stuff", lambda c: not c["isthing"])):
        pq = sq = rq = 0.0
        n = 0
        for cid, st in stats.items():
            if not keep(cats[cid]) or st["tp"] + st["fp"] + st["fn"] == 0:
                continue
            n += 1
            denom = st["tp"] + 0.5 * st["fp"] + 0.5 * st["fn"]
            pq += st["iou"] / denom
            sq += st["iou"] / st["tp"] if st["tp"] else 0.0
            rq += st["tp"] / denom
        out[label] = {"PQ": pq / n if n else 0.0, "SQ": sq / n if n else 0.0, "RQ": rq / n if n else 0.0,
                      "categories": n}
    return out
