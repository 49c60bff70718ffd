"""Running a built model on images: pre-processing, a backend, decoding -- and nothing of torch,
Detectron2 or Hydra, so a deploy bundle runs where only numpy, Pillow and one backend are installed.

    info = ModelInfo(...)                                 # what the model is (model.json in a bundle)
    model = Model(backends.open_graph("model.onnx"), info)
    detections, letterbox, seconds = model.detect(bgr)   # original-image pixels

verify, infer, eval and bench go through the same `Model`, so what they report is what a deployed
model computes.
"""

from d2build.runtime.info import ModelInfo
from d2build.runtime.model import Model

__all__ = ["Model", "ModelInfo"]
