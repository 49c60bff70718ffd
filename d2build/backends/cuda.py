"""The few CUDA runtime calls a TensorRT engine needs, through ctypes: no torch, no cuda-python.

A deployed model runs its engine with numpy + TensorRT + this module. TensorRT's Python API takes
device pointers as integers and a stream as an integer handle, so all the runner needs from CUDA
is: pick a device, allocate and free device memory, copy host <-> device asynchronously on a stream,
wait for the stream, and (for `d2build bench runtime.cuda_graph=true`) capture and replay a CUDA
graph. Those are stable C entry points of libcudart (same signatures in CUDA 11.4 to 13), loaded
from wherever the CUDA runtime is found:

1. `$D2BUILD_CUDART` (a path to libcudart.so*), when set;
2. the dynamic loader's search (`libcudart.so.13`, `.so.12`, `.so.11.0`, `libcudart.so`), which also
   finds a copy TensorRT's own wheel or container already loaded into the process;
3. the NVIDIA runtime wheels (`nvidia-cuda-runtime*`: site-packages/nvidia/*/lib/libcudart.so*);
4. `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`.

Every call is checked: a non-zero `cudaError_t` raises `CudaError` with CUDA's own name and string
for it and the call that failed. Without a CUDA runtime (this project's CI machines) `runtime()`
raises `CudaUnavailable` naming every place it looked and what to install.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["Cuda", "CudaError", "CudaUnavailable", "DeviceBuffer", "runtime"]

# cudaMemcpyKind
HOST_TO_DEVICE = 1
DEVICE_TO_HOST = 2
DEVICE_TO_DEVICE = 3
STREAM_NON_BLOCKING = 0x01  # cudaStreamNonBlocking: no implicit sync with the legacy default stream
CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal
# cudaDeviceAttr
ATTR_COMPUTE_CAPABILITY_MAJOR = 75
ATTR_COMPUTE_CAPABILITY_MINOR = 76
ATTR_MULTIPROCESSOR_COUNT = 16

SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")
INSTALL_HINT = ("install the CUDA runtime (pip install nvidia-cuda-runtime-cu12 or -cu13, the CUDA toolkit, "
                "or use NVIDIA's TensorRT/Triton container), or point D2BUILD_CUDART at libcudart.so")


class CudaUnavailable(ImportError):
    """No CUDA runtime library can be loaded here; the message says where d2build looked."""


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error: `.code`, `.name` (e.g. cudaErrorMemoryAllocation), `.call`."""

    def __init__(self, call: str, code: int, name: str, text: str):
        super().__init__(f"{call} failed: {name} ({code}): {text}")
        self.call, self.code, self.name = call, code, name


def candidates() -> list[str]:
    """Where libcudart may be, in the order tried (names for the loader, then paths)."""
    out: list[str] = []
    env = os.environ.get("D2BUILD_CUDART")
    if env:
        out.append(env)
    out += list(SONAMES)
    for base in dict.fromkeys(sys.path):
        if base and os.path.isdir(os.path.join(base, "nvidia")):
            out += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            out += sorted(glob.glob(os.path.join(home, "lib64", "libcudart.so*")), reverse=True)
    return list(dict.fromkeys(out))


def _load_library() -> tuple[ctypes.CDLL, str]:
    tried = []
    for name in candidates():
        try:
            return ctypes.CDLL(name), name
        except OSError as e:
            tried.append(f"{name} ({str(e).split(':')[-1].strip() or 'not found'})")
    raise CudaUnavailable("no CUDA runtime library (libcudart) could be loaded; tried " + ", ".join(tried)
                          + f". To run a TensorRT engine: {INSTALL_HINT}")


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_uint, c_size, vp = ctypes.c_int, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p
    p_int, p_vp = ctypes.POINTER(c_int), ctypes.POINTER(vp)
    table: dict[str, tuple[Any, list[Any]]] = {
        "cudaGetErrorName": (ctypes.c_char_p, [c_int]),
        "cudaGetErrorString": (ctypes.c_char_p, [c_int]),
        "cudaGetLastError": (c_int, []),
        "cudaRuntimeGetVersion": (c_int, [p_int]),
        "cudaDriverGetVersion": (c_int, [p_int]),
        "cudaGetDeviceCount": (c_int, [p_int]),
        "cudaSetDevice": (c_int, [c_int]),
        "cudaGetDevice": (c_int, [p_int]),
        "cudaDeviceGetAttribute": (c_int, [p_int, c_int, c_int]),
        "cudaGetDeviceProperties": (c_int, [vp, c_int]),
        "cudaMalloc": (c_int, [p_vp, c_size]),
        "cudaFree": (c_int, [vp]),
        "cudaMemGetInfo": (c_int, [ctypes.POINTER(c_size), ctypes.POINTER(c_size)]),
        "cudaMemcpyAsync": (c_int, [vp, vp, c_size, c_int, vp]),
        "cudaMemsetAsync": (c_int, [vp, c_int, c_size, vp]),
        "cudaStreamCreateWithFlags": (c_int, [p_vp, c_uint]),
        "cudaStreamSynchronize": (c_int, [vp]),
        "cudaStreamDestroy": (c_int, [vp]),
        "cudaDeviceSynchronize": (c_int, []),
        "cudaStreamBeginCapture": (c_int, [vp, c_int]),
        "cudaStreamEndCapture": (c_int, [vp, p_vp]),
        "cudaGraphInstantiateWithFlags": (c_int, [p_vp, vp, ctypes.c_ulonglong]),
        "cudaGraphLaunch": (c_int, [vp, vp]),
        "cudaGraphExecDestroy": (c_int, [vp]),
        "cudaGraphDestroy": (c_int, [vp]),
    }
    for name, (restype, argtypes) in table.items():
        fn = getattr(lib, name, None)
        if fn is not None:  # cudaGraphInstantiateWithFlags is 11.4+; the rest are everywhere
            fn.restype, fn.argtypes = restype, argtypes


class Cuda:
    """The loaded CUDA runtime: checked wrappers, one per call d2build makes."""

    def __init__(self, lib: ctypes.CDLL, path: str = "?"):
        self.lib, self.path = lib, path
        _declare(lib)

    # ------------------------------------------------------------------ errors
    def error_name(self, code: int) -> str:
        raw = self.lib.cudaGetErrorName(code)
        return raw.decode() if raw else f"cudaError {code}"

    def error_string(self, code: int) -> str:
        raw = self.lib.cudaGetErrorString(code)
        return raw.decode() if raw else "unknown error"

    def check(self, code: int, call: str) -> None:
        if code != 0:
            raise CudaError(call, int(code), self.error_name(code), self.error_string(code))

    # ------------------------------------------------------------------ versions and devices
    def runtime_version(self) -> int:
        v = ctypes.c_int()
        self.check(self.lib.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
        return v.value

    def driver_version(self) -> int:
        """0 when no driver is installed (CUDA's own convention)."""
        v = ctypes.c_int()
        self.check(self.lib.cudaDriverGetVersion(ctypes.byref(v)), "cudaDriverGetVersion")
        return v.value

    def device_count(self) -> int:
        n = ctypes.c_int()
        self.check(self.lib.cudaGetDeviceCount(ctypes.byref(n)), "cudaGetDeviceCount")
        return n.value

    def set_device(self, device: int) -> None:
        self.check(self.lib.cudaSetDevice(int(device)), f"cudaSetDevice({device})")

    def get_device(self) -> int:
        d = ctypes.c_int()
        self.check(self.lib.cudaGetDevice(ctypes.byref(d)), "cudaGetDevice")
        return d.value

    def attribute(self, attr: int, device: int) -> int:
        v = ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(v), int(attr), int(device)),
                   f"cudaDeviceGetAttribute({attr}, {device})")
        return v.value

    def compute_capability(self, device: int) -> tuple[int, int]:
        return (self.attribute(ATTR_COMPUTE_CAPABILITY_MAJOR, device),
                self.attribute(ATTR_COMPUTE_CAPABILITY_MINOR, device))

    def _properties(self, device: int) -> bytes:
        # cudaDeviceProp begins with `char name[256]; cudaUUID_t uuid (16 bytes)` in every CUDA since 10;
        # the rest of its layout changes between versions, so only that head is read, from a buffer far
        # larger than any version's struct.
        buf = ctypes.create_string_buffer(8192)
        self.check(self.lib.cudaGetDeviceProperties(buf, int(device)), f"cudaGetDeviceProperties({device})")
        return buf.raw[:272]

    def device_name(self, device: int) -> str:
        return self._properties(device)[:256].split(b"\0", 1)[0].decode(errors="replace")

    def device_uuid(self, device: int) -> str:
        """GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, as nvidia-smi prints it."""
        u = self._properties(device)[256:272].hex()
        return f"GPU-{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    def mem_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    # ------------------------------------------------------------------ memory
    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(1, int(nbytes))), f"cudaMalloc({nbytes})")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        if ptr:
            self.check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        """Host array (C-contiguous; keep it alive until the stream is synchronized) -> device."""
        if not src.flags.c_contiguous:
            raise ValueError("memcpy_htod_async needs a C-contiguous array")
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src.ctypes.data), src.nbytes,
                                            HOST_TO_DEVICE, ctypes.c_void_p(stream)), "cudaMemcpyAsync(H2D)")

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        """Device -> host array (C-contiguous, writeable; valid once the stream is synchronized)."""
        if not (dst.flags.c_contiguous and dst.flags.writeable):
            raise ValueError("memcpy_dtoh_async needs a C-contiguous, writeable array")
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst.ctypes.data), ctypes.c_void_p(src), dst.nbytes,
                                            DEVICE_TO_HOST, ctypes.c_void_p(stream)), "cudaMemcpyAsync(D2H)")

    def memcpy_dtod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), int(nbytes),
                                            DEVICE_TO_DEVICE, ctypes.c_void_p(stream)), "cudaMemcpyAsync(D2D)")

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemsetAsync(ctypes.c_void_p(ptr), int(value), int(nbytes), ctypes.c_void_p(stream)),
                   "cudaMemsetAsync")

    # ------------------------------------------------------------------ streams and graphs
    def stream_create(self, flags: int = STREAM_NON_BLOCKING) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), flags), "cudaStreamCreateWithFlags")
        return int(s.value or 0)

    def stream_synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        if stream:
            self.check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def device_synchronize(self) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def begin_capture(self, stream: int, mode: int = CAPTURE_MODE_THREAD_LOCAL) -> None:
        self.check(self.lib.cudaStreamBeginCapture(ctypes.c_void_p(stream), mode), "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> "CudaGraph":
        """The captured work as an instantiated graph (launch it with `CudaGraph.launch`)."""
        graph = ctypes.c_void_p()
        self.check(self.lib.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph)),
                   "cudaStreamEndCapture")
        exe = ctypes.c_void_p()
        code = self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0)
        if code != 0:
            self.lib.cudaGraphDestroy(graph)
            self.check(code, "cudaGraphInstantiateWithFlags")
        return CudaGraph(self, int(graph.value or 0), int(exe.value or 0))


class CudaGraph:
    """An instantiated CUDA graph: `launch(stream)` replays it; `close()` frees it."""

    def __init__(self, cuda: Cuda, graph: int, exe: int):
        self.cuda, self.graph, self.exe = cuda, graph, exe

    def launch(self, stream: int) -> None:
        self.cuda.check(self.cuda.lib.cudaGraphLaunch(ctypes.c_void_p(self.exe), ctypes.c_void_p(stream)),
                        "cudaGraphLaunch")

    def close(self) -> None:
        if self.exe:
            self.cuda.lib.cudaGraphExecDestroy(ctypes.c_void_p(self.exe))
            self.cuda.lib.cudaGraphDestroy(ctypes.c_void_p(self.graph))
            self.exe = self.graph = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class DeviceBuffer:
    """`nbytes` of device memory, freed with `close()` (or when collected); `.ptr` is the address TensorRT takes."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, int(nbytes)
        self.ptr = cuda.malloc(self.nbytes)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.cuda.free(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, or a context already torn down
            pass


_lock = threading.Lock()
_runtime: Cuda | None = None


def runtime() -> Cuda:
    """The process's CUDA runtime, loaded on first use; raises CudaUnavailable without one."""
    global _runtime
    with _lock:
        if _runtime is None:
            lib, path = _load_library()
            _runtime = Cuda(lib, path)
        return _runtime


def describe(device: int = 0) -> dict[str, Any]:
    """What this process sees, as plain data (for `doctor`, error messages and tests); never raises."""
    try:
        cuda = runtime()
    except CudaUnavailable as e:
        return {"cudart": None, "error": str(e)}
    out: dict[str, Any] = {"cudart": cuda.path}
    try:
        out["runtime_version"] = cuda.runtime_version()
        out["driver_version"] = cuda.driver_version()
        out["devices"] = cuda.device_count()
        if device < out["devices"]:
            out["name"] = cuda.device_name(device)
            out["compute_capability"] = "%d.%d" % cuda.compute_capability(device)
            out["uuid"] = cuda.device_uuid(device)
        else:
            out["error"] = f"device {device} requested, {out['devices']} visible"
    except CudaError as e:
        out["error"] = str(e)
    return out


if __name__ == "__main__":  # python -m d2build.backends.cuda: what this process sees
    import json

    print(json.dumps(describe(int(sys.argv[1]) if len(sys.argv) > 1 else 0), indent=1))
