"""Backend `detectron2`: the model the graph came from, run eagerly -- the reference `d2build eval` sets
every graph and engine beside.

Not a graph runner: it detects images directly, with the same interface as `runtime.Model.detect`.
Two ways to feed it: `letterbox` (default) is the input the graph gets, so a difference in AP is the
graph's; `shortest_edge` is Detectron2's own test-time resize (ResizeShortestEdge with the config's
MIN_SIZE_TEST / MAX_SIZE_TEST, Detectron2's own post-processing), the accuracy the model has where
it was trained.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

RESIZES = ("letterbox", "shortest_edge")


class EagerModel:
    backend = "detectron2"

    def __init__(self, model: Any, build: Any, info: Any, cfg: Any, resize: str = "letterbox"):
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; use one of {RESIZES}")
        self.model, self.build, self.info, self.cfg, self.resize = model, build, info, cfg, resize
        self.input_hw = info.input_hw
        self.source = f"Detectron2 eager ({resize})"
        self.path = None

    def detect_batch(self, images_bgr: list[np.ndarray]):
        """runtime.Model's batch interface: eager runs one image at a time (detections, letterboxes, seconds)."""
        found = [self.detect(bgr) for bgr in images_bgr]
        return [d for d, _, _ in found], [lb for _, lb, _ in found], sum(t for _, _, t in found)

    def detect(self, bgr: np.ndarray):
        """(Detections in original pixels, Letterbox or None, seconds)."""
        from d2build.processing import detections_from_instances, letterbox

        if self.resize == "letterbox":
            chw, lb = letterbox(bgr, self.info.input_hw, self.info.pixel_mean)
            t0 = time.perf_counter()
            inst = self.build.eager(self.model, chw)
            return detections_from_instances(inst, lb), lb, time.perf_counter() - t0
        return self._native(bgr)

    def _native(self, bgr: np.ndarray):
        """DefaultPredictor's path: ResizeShortestEdge, model([...]) with height/width, Detectron2's postprocess."""
        import torch
        from detectron2.data import transforms as T

        from d2build.processing import Detections

        c = self.cfg.INPUT
        aug = T.ResizeShortestEdge([c.MIN_SIZE_TEST, c.MIN_SIZE_TEST], c.MAX_SIZE_TEST)
        h, w = bgr.shape[:2]
        image = aug.get_transform(bgr).apply_image(bgr)
        if self.model.input_format == "RGB":
            image = image[:, :, ::-1]
        x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"),
                            device=getattr(self.model, "device", "cpu"))
        t0 = time.perf_counter()
        with torch.no_grad():
            inst = self.model([{"image": x, "height": h, "width": w}])[0]["instances"]
        seconds = time.perf_counter() - t0
        masks = inst.pred_masks.cpu().numpy().astype(bool) if inst.has("pred_masks") else None
        keypoints = inst.pred_keypoints.cpu().numpy() if inst.has("pred_keypoints") else None
        return Detections(inst.pred_boxes.tensor.cpu().numpy(), inst.scores.cpu().numpy(),
                          inst.pred_classes.cpu().numpy(), masks,
                          keypoints), None, seconds


def set_tf32(enabled: bool) -> dict[str, bool]:
    """PyTorch's TF32 switches for CUDA matmuls and cuDNN convolutions, both set explicitly; returns the previous
    values. PyTorch's defaults are matmul off and cuDNN convolutions ON, so an "fp32" Detectron2 on a GPU runs
    its convolutions in TF32 unless this says otherwise (devices.py says why d2build turns it off)."""
    import torch

    before = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return before


def tf32_state() -> dict[str, bool]:
    import torch

    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def on_device(model: Any, device: Any = "cpu", *, tf32: bool = False) -> Any:
    """The Detectron2 model moved to `device` (cpu | cuda | cuda:N, as runtime.device) with TF32 set explicitly
    (`set_tf32`), in eval mode. Refuses a CUDA device torch cannot see, in one line."""
    import torch

    from d2build.backends import devices

    dev = devices.parse(device)
    if dev.is_cuda:
        if not torch.cuda.is_available():
            raise devices.DeviceError(f"runtime.device={dev}: torch {torch.__version__} sees no CUDA device "
                                      "(Detectron2 eager runs on torch); use runtime.device=cpu")
        if dev.index >= torch.cuda.device_count():
            raise devices.DeviceError(f"runtime.device={dev}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    set_tf32(tf32)
    return model.to(torch.device(str(dev))).eval()
