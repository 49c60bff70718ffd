"""Triton Python-backend model of a d2build bundle: pre-processing, the graph in ONNX Runtime, or
post-processing, by config parameter `role`.

This file is copied as `model.py` into `triton/<prefix>_preprocess/1/`, `<prefix>_postprocess/1/`
and (deploy.triton.model=python) `<prefix>_ort_python/1/`, next to the bundle's model.json and the
d2build modules it imports (vendored there: numpy and Pillow are all they need, plus onnxruntime for
role `onnxruntime`). Triton's Python backend (python_backend README) calls
`TritonPythonModel.initialize(args)` once per instance (`args["model_config"]`: the config as JSON;
`args["model_instance_kind"]`: CPU or GPU, `args["model_instance_device_id"]`) and `execute(requests)`
with a list of `pb_utils.InferenceRequest`, expecting one `pb_utils.InferenceResponse` per request;
inputs come from `pb_utils.get_input_tensor_by_name(request, name).as_numpy()`, outputs are
`pb_utils.Tensor(name, array)`, and a request that cannot be served gets
`InferenceResponse(error=pb_utils.TritonError(message))` -- the others in the batch still run.

* role `preprocess`: IMAGE (UINT8 [-1], the encoded file) -> input_tensor [1, 3, H, W] float32 BGR
  (letterboxed as the graph was verified with) and ORIGINAL_HW (INT32 [2]).
* role `onnxruntime`: input_tensor -> the graph's outputs, by `deploy.onnx_runner.OnnxFileRunner` on
  the model.onnx beside this file (the class `load_bundle` runs bundles with); a GPU instance uses
  ONNX Runtime's CUDA provider when the installed onnxruntime has it.
* role `postprocess`: ORIGINAL_HW + the graph's outputs -> DETECTIONS (one JSON string in `d2build
  infer`'s per-image format), BOXES [N, 4], SCORES [N], CLASSES [N] (and KEYPOINTS [N, K, 3]).

Where numpy, Pillow and onnxruntime come from is the server's business: Triton's containers have
numpy (add Pillow, and onnxruntime for role onnxruntime); `d2build serve` gives the models an
execution environment (config parameter EXECUTION_ENV_PATH) that has them.
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

ROLES = ("preprocess", "onnxruntime", "postprocess")


class TritonPythonModel:
    def initialize(self, args):
        self.pb = importlib.import_module("triton_python_backend_utils")
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        self.role = params.get("role", {}).get("string_value", "")
        if self.role not in ROLES:
            raise ValueError(f"{config.get('name')}: parameter 'role' must be one of {', '.join(ROLES)}, "
                             f"got {self.role!r}")
        with open(os.path.join(HERE, "model.json")) as f:
            self.doc = json.load(f)
        self.info = ModelInfo.from_dict(self.doc["model"])
        self.input_name = self.doc["input"]["name"]
        self.graph_outputs = [o["name"] for o in self.doc["outputs"]]
        if self.role == "onnxruntime":
            self.runner = self._open_graph(args, params)

    def _open_graph(self, args, params):
        from d2build.deploy.onnx_runner import OnnxFileRunner, default_providers

        threads = params.get("intra_op_num_threads", {}).get("string_value", "")
        gpu = args.get("model_instance_kind") == "GPU"
        device = int(args.get("model_instance_device_id") or 0)
        providers = default_providers(device) if gpu else ["CPUExecutionProvider"]
        # idle ONNX Runtime threads sleep: this stub shares the CPU with the pre/post-processing stubs, which
        # work on other requests meanwhile
        return OnnxFileRunner(os.path.join(HERE, "model.onnx"), threads=int(threads) if threads else None,
                              providers=providers, spinning=False)

    def execute(self, requests):
        step = {"preprocess": self._preprocess, "onnxruntime": self._graph, "postprocess": self._postprocess}[self.role]
        responses = []
        for request in requests:
            try:
                responses.append(self.pb.InferenceResponse(output_tensors=step(request)))
            except (d2rt.ImageError, ValueError, KeyError) as e:  # the request's fault: HTTP 400, its own words
                responses.append(self.pb.InferenceResponse(error=self._error(str(e), "INVALID_ARG")))
            except Exception as e:  # noqa: BLE001 - anything else fails this request only, and says where
                responses.append(self.pb.InferenceResponse(
                    error=self._error(f"d2build {self.role}: {type(e).__name__}: {e}", "INTERNAL")))
        return responses

    def _error(self, message, code):
        """A TritonError with a status code where this backend has them (INVALID_ARG: HTTP 400, gRPC
        INVALID_ARGUMENT), else the plain one (HTTP 500)."""
        cls = self.pb.TritonError
        return cls(message, getattr(cls, code)) if hasattr(cls, code) else cls(message)

    def finalize(self):
        self.runner = None

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

    def _graph(self, request):
        x = np.ascontiguousarray(self._input(request, self.input_name), dtype=np.float32)
        outputs = self.runner.run({self.input_name: x})
        return [self.pb.Tensor(name, np.ascontiguousarray(outputs[name])) for name in self.graph_outputs]

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
