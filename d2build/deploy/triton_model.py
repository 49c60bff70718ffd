"""Triton Python-backend model of a d2build bundle: pre- or post-processing, by config parameter `role`.

This file is copied as `model.py` into `triton/<prefix>_preprocess/1/` and `<prefix>_postprocess/1/`,
next to the bundle's model.json and the d2build modules it imports (vendored there; numpy and
Pillow are all they need). Triton's Python backend (python_backend README) calls
`TritonPythonModel.initialize(args)` once (`args["model_config"]`: the config as JSON) and
`execute(requests)` with a list of `pb_utils.InferenceRequest`, expecting one
`pb_utils.InferenceResponse` per request; inputs come from `pb_utils.get_input_tensor_by_name(request,
name).as_numpy()`, outputs are `pb_utils.Tensor(name, array)`, and a request that cannot be served
gets `InferenceResponse(error=pb_utils.TritonError(message))` -- the others in the batch still run.

* role `preprocess`: IMAGE (UINT8 [-1], the encoded file) -> input_tensor [1, 3, H, W] float32 BGR
  (letterboxed as the graph was verified with) and ORIGINAL_HW (INT32 [2]).
* role `postprocess`: ORIGINAL_HW + the graph's outputs -> DETECTIONS (one JSON string in `d2build
  infer`'s per-image format), BOXES [N, 4], SCORES [N], CLASSES [N] (and KEYPOINTS [N, K, 3]).
"""

import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the vendored d2build modules beside this file

import numpy as np  # noqa: E402

from d2build.deploy import runtime as d2rt  # noqa: E402
from d2build.runtime.info import ModelInfo  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.pb = importlib.import_module("triton_python_backend_utils")
        config = json.loads(args["model_config"])
        self.role = config.get("parameters", {}).get("role", {}).get("string_value", "")
        if self.role not in ("preprocess", "postprocess"):
            raise ValueError(f"{config.get('name')}: parameter 'role' must be preprocess or postprocess, "
                             f"got {self.role!r}")
        with open(os.path.join(HERE, "model.json")) as f:
            self.doc = json.load(f)
        self.info = ModelInfo.from_dict(self.doc["model"])
        self.input_name = self.doc["input"]["name"]
        self.graph_outputs = [o["name"] for o in self.doc["outputs"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensors = self._preprocess(request) if self.role == "preprocess" else self._postprocess(request)
                responses.append(self.pb.InferenceResponse(output_tensors=tensors))
            except (d2rt.ImageError, ValueError, KeyError) as e:
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(str(e))))
        return responses

    def finalize(self):
        pass

    def _input(self, request, name):
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            raise ValueError(f"request has no input {name}")
        return t.as_numpy()

    def _preprocess(self, request):
        data = np.ascontiguousarray(self._input(request, "IMAGE"), dtype=np.uint8).reshape(-1)
        bgr = d2rt.decode_image(data, "IMAGE")
        x, lb = d2rt.preprocess(bgr, self.info)
        return [self.pb.Tensor(self.input_name, x),
                self.pb.Tensor("ORIGINAL_HW", np.asarray(lb.original_hw, dtype=np.int32))]

    def _postprocess(self, request):
        hw = tuple(int(v) for v in np.asarray(self._input(request, "ORIGINAL_HW")).reshape(-1)[:2])
        outputs = {name: self._input(request, name) for name in self.graph_outputs}
        det = d2rt.postprocess(outputs, hw, self.info)
        doc = d2rt.detections_to_dict("IMAGE", det, hw, self.info)
        tensors = [
            self.pb.Tensor("DETECTIONS", np.array([json.dumps(doc).encode()], dtype=np.object_)),
            self.pb.Tensor("BOXES", det.boxes.astype(np.float32).reshape(-1, 4)),
            self.pb.Tensor("SCORES", det.scores.astype(np.float32)),
            self.pb.Tensor("CLASSES", det.classes.astype(np.int32)),
        ]
        if self.info.family == "keypoint_rcnn":
            kp = det.keypoints if det.keypoints is not None else np.zeros((0, len(self.info.keypoint_names), 3))
            tensors.append(self.pb.Tensor("KEYPOINTS", kp.astype(np.float32)))
        return tensors
