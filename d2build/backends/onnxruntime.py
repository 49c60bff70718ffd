"""Backend `onnxruntime`: a standard-op graph in a plain `onnxruntime.InferenceSession`, on the CPU or a GPU.

No custom-op library: NonMaxSuppression and RoiAlign are ONNX Runtime's own kernels. `device` (runtime.device)
picks the CPU provider or the CUDA provider (d2build/backends/devices.py: options, TF32, the refusal where
there is no GPU); float16 nodes are emulated only where the CPU provider runs the graph (graphs.executable).

Every run goes through IO binding, on every device, so the CPU suite exercises the GPU's code path: the input
is copied to the device once (an OrtValue), outputs stay on the device until they are fetched once each
(`copy_outputs_to_cpu`). `prepare` binds an input once and `execute` reruns on it (d2build bench: the model
alone, no copies). With `cuda_graph=True` ONNX Runtime captures the run as a CUDA graph; that needs fixed
input and output addresses, so the input lives in one device buffer updated in place and the outputs are
preallocated at the graph's static shapes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from d2build.backends import devices, graphs
from d2build.backends.base import Runner, RunnerError

PREFERRED = ("TensorrtExecutionProvider", devices.CUDA_PROVIDER, devices.CPU_PROVIDER)


def default_providers() -> list[str]:
    """The CPU provider: a GPU is used only where runtime.device asks for one (a CUDA build of onnxruntime
    on a machine without a GPU would otherwise fall back with a warning on every session)."""
    return [devices.CPU_PROVIDER]


def _name(provider: Any) -> str:
    return provider if isinstance(provider, str) else provider[0]


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model: Any, threads: int | None = None, providers: list[Any] | None = None, *,
                 device: Any = "cpu", tf32: bool = False, cuda: Mapping[str, Any] | None = None,
                 cuda_graph: bool = False, configure: Callable[[Any], None] | None = None):
        super().__init__()
        import onnxruntime as ort

        self.device = devices.parse(device)
        proto = graphs.load(model)
        self.input_shape = graphs.input_shape(proto)
        self.output_names = [o.name for o in proto.graph.output]
        self._output_shapes = {o.name: graphs.value_shape(o) for o in proto.graph.output}
        self._output_types = {o.name: graphs.value_dtype(o) for o in proto.graph.output}
        if providers is None:
            providers = devices.providers(self.device, tf32=tf32, cuda=cuda, cuda_graph=cuda_graph,
                                          float16=graphs.has_fp16(proto))
        elif _name(providers[0]) == devices.CUDA_PROVIDER and not self.device.is_cuda:  # explicit CUDA providers
            first = providers[0]
            self.device = devices.Device("cuda", int((first[1] if not isinstance(first, str) else {}).get("device_id", 0)))
        self.cuda_graph = bool(cuda_graph) or any(
            not isinstance(p, str) and str(p[1].get("enable_cuda_graph", "0")) == "1" for p in providers)
        names = [_name(p) for p in providers]
        if self.device.is_cuda and names[0] != devices.CUDA_PROVIDER:
            raise RunnerError(f"runtime.device={self.device} runs the graph on {devices.CUDA_PROVIDER}, not {names[0]}")
        proto, self.emulated = graphs.executable(proto, cpu=names[0] == devices.CPU_PROVIDER)
        options = graphs.quiet_session_options(ort.SessionOptions())
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if configure is not None:  # bench: profiling, optimization level
            configure(options)
        if self.device.is_cuda:
            devices.preload()
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own text, first line, under d2build's message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunnerError(f"ONNX Runtime could not open the graph on {self.device}: {first}") from None
        #: providers the session really got, best first (ONNX Runtime drops one that does not load)
        self.providers = list(self.session.get_providers())
        if self.device.is_cuda and self.providers[0] != devices.CUDA_PROVIDER:
            raise RunnerError(f"runtime.device={self.device}: ONNX Runtime fell back to {self.providers[0]} (the CUDA "
                              "provider did not load); `d2build doctor` says which providers load here")
        self._binding: Any = None
        self._inputs: dict[str, Any] = {}  # device OrtValues reused across runs (stable addresses)
        self._outputs: dict[str, Any] = {}  # preallocated device outputs (cuda_graph)

    # ------------------------------------------------------------------ IO binding

    def _input_value(self, name: str, array: np.ndarray) -> Any:
        """The input as an OrtValue on the runner's device: copied there once."""
        from onnxruntime import OrtValue

        array = np.ascontiguousarray(array)
        if not self.device.is_cuda:
            return OrtValue.ortvalue_from_numpy(array)  # the CPU provider reads the array where it is
        held = self._inputs.get(name)
        if held is not None and tuple(held.shape()) == array.shape and held.data_type() == _tensor_type(array.dtype):
            held.update_inplace(array)  # same device buffer: a captured CUDA graph reads this address
            return held
        if self.cuda_graph and held is not None:
            raise RunnerError(f"runtime.cuda_graph: input {name} changed from {held.shape()} to {list(array.shape)}; "
                              "a captured CUDA graph replays one input shape")
        value = OrtValue.ortvalue_from_numpy(array, self.device.ort_type, self.device.index)
        self._inputs[name] = value
        return value

    def _bind(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> Any:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self._input_value(name, array))
        for name in outputs:
            if self.cuda_graph:
                binding.bind_ortvalue_output(name, self._output_value(name))
            else:
                binding.bind_output(name, self.device.ort_type, self.device.index)
        return binding

    def _output_value(self, name: str) -> Any:
        from onnxruntime import OrtValue

        if name not in self._outputs:
            shape = self._output_shapes[name]
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise RunnerError(f"runtime.cuda_graph needs static output shapes; {name} is {list(shape)}")
            self._outputs[name] = OrtValue.ortvalue_from_shape_and_type(
                list(shape), self._output_types[name], self.device.ort_type, self.device.index)
        return self._outputs[name]

    def _run_binding(self, binding: Any) -> None:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001 - a kernel failure on the device: one line, the provider's text
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunnerError(f"ONNX Runtime failed on {self.device}: {first}") from None

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        names = list(self.output_names if outputs is None else outputs)
        binding = self._bind(feeds, list(self.output_names) if self.cuda_graph else names)
        self._run_binding(binding)
        values = dict(zip(self.output_names if self.cuda_graph else names, binding.copy_outputs_to_cpu(),
                          strict=True))
        return {n: values[n] for n in names}

    # bench: the model alone, on an input already in place
    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        self._feeds = dict(feeds)
        self._binding = self._bind(feeds, list(self.output_names))

    def execute(self) -> None:
        assert self._binding is not None, "prepare() first"
        self._run_binding(self._binding)

    def synchronize(self) -> None:
        if self._binding is not None:
            self._binding.synchronize_outputs()

    def fetch(self) -> dict[str, np.ndarray]:
        """The outputs of the last `execute`, copied to the host once each."""
        assert self._binding is not None, "prepare() first"
        return dict(zip(self.output_names, self._binding.copy_outputs_to_cpu(), strict=True))


def _tensor_type(dtype: np.dtype) -> str:
    """OrtValue.data_type()'s spelling of a numpy dtype, e.g. tensor(float)."""
    return {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
            np.dtype(np.int64): "tensor(int64)", np.dtype(np.int32): "tensor(int32)",
            np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.bool_): "tensor(bool)"}.get(np.dtype(dtype), "?")
