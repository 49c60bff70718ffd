"""d2build doctor: what this machine can do -- TensorRT, CUDA, GPU, plugins, Detectron2, ONNX Runtime, torch."""

from __future__ import annotations

import importlib.util
from importlib import metadata

SUMMARY = ("one line each: TensorRT, CUDA, GPU, plugin library, Detectron2, onnxruntime(-extensions) and which of its "
           "providers load (runtime.device=cuda), torch")


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def lines(device: int = 0) -> list[tuple[str, str]]:
    """(what, status) pairs; never raises: a probe that fails says so on its line."""
    from d2build.backends import tensorrt as trt

    out: list[tuple[str, str]] = []
    env = trt.environment(device, probe_gpu=True)
    out.append(("TensorRT", f"{env.tensorrt} (strongly typed networks; builds engines)" if env.tensorrt
                else f"missing: {env.tensorrt_error}"))
    out.extend(_plugin_lines(env))
    out.append(("torch", _torch()))
    out.append(("CUDA", f"available through torch (CUDA {env.torch_cuda})" if env.cuda
                else f"not available: {env.gpu_error or 'no CUDA device'}"))
    out.append(("GPU", f"{env.gpu}, compute capability {env.compute_capability} (device {device})" if env.gpu
                else "none" + (f" ({env.gpu_error})" if env.gpu_error else "")))
    d2 = _version("sal-detectron2", "detectron2")
    out.append(("Detectron2", f"{d2} (pure-Python install)" if d2 and importlib.util.find_spec("detectron2")
                else "missing: run scripts/setup.sh (repacks PyPI's sal-detectron2)"))
    ort = _version("onnxruntime", "onnxruntime-gpu")
    ext = _version("onnxruntime-extensions")
    out.append(("onnxruntime", f"{ort}, extensions {ext} (CPU reference executor for verify and "
                "runtime.backend=reference)" if ort and ext else
                f"{ort or 'missing'}, {'extensions ' + ext if ext else 'onnxruntime-extensions missing'}: "
                "verify and runtime.backend=reference cannot run"))
    out.append(("providers", _providers(device)))
    reason = trt.skip_reason(env)
    out.append(("build", "engines can be built here" if reason is None else f"skipped here: {reason}"))
    return out


def _creators(env) -> set[tuple[str, str]] | str:
    """(name, version) of every plugin creator TensorRT's registry holds, or why it cannot be asked."""
    from d2build.plugins import PLUGINS

    if env.tensorrt is None:
        return "unknown (needs TensorRT): " + " and ".join(PLUGINS) + " come from libnvinfer_plugin"
    try:
        from d2build.backends import tensorrt as trt

        t = trt.load()
        logger = t.Logger(t.Logger.ERROR)
        if not t.init_libnvinfer_plugins(logger, ""):
            return "libnvinfer_plugin did not initialise"
        registry = t.get_plugin_registry()
        creators = getattr(registry, "all_creators", None) or registry.plugin_creator_list  # 10.x+ / older
        return {(c.name, str(getattr(c, "plugin_version", ""))) for c in creators}
    except Exception as e:  # noqa: BLE001 - doctor reports, never raises
        return f"could not be queried: {type(e).__name__}: {e}"


def _plugin_lines(env) -> list[tuple[str, str]]:
    """The plugin creators d2build's graphs need, and which graph flavours this TensorRT can build."""
    from d2build.plugins import PLUGINS
    from d2build.standard_ops import PARSER_PLUGINS

    creators = _creators(env)
    if isinstance(creators, str):
        return [("plugins", creators), ("flavours", "unknown without TensorRT: surgery.ops=plugins needs "
                 + " and ".join(PLUGINS) + "; surgery.ops=standard needs the ONNX parser's RoiAlign (the ROIAlign_TRT "
                 "plugin TensorRT ships; d2build targets TensorRT 10.x/11.x)")]
    names = {n for n, _ in creators}
    missing = [n for n in PLUGINS if n not in names]
    roi, version = PARSER_PLUGINS["RoiAlign"]
    standard_ok = roi in names  # v2 (IPluginV3) since 10.1, v1 before: either imports RoiAlign
    flavours = [f for f, ok in (("plugins", not missing), ("standard", standard_ok)) if ok]
    return [("plugins", f"found {', '.join(n for n in PLUGINS if n in names) or 'none'}"
             + (f"; MISSING {', '.join(missing)}" if missing else "")),
            ("flavours", f"can build surgery.ops={'|'.join(flavours)}" if flavours else "can build neither flavour"
             + ("" if standard_ok else f" (standard needs {roi} v{version} for RoiAlign)"))]


def _providers(device: int = 0) -> str:
    """Which ONNX Runtime providers are built in and which really load (a probe session each): what
    runtime.device=cuda needs."""
    try:
        import onnxruntime as ort

        from d2build.backends import devices
    except Exception as e:  # noqa: BLE001 - doctor reports, never raises
        return f"onnxruntime does not import: {e}"
    have = [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    both = _version("onnxruntime") and _version("onnxruntime-gpu")
    clash = (" -- onnxruntime and onnxruntime-gpu are both installed: they share one `onnxruntime` package, the "
             "last installed wins (microsoft/onnxruntime#26996); pip uninstall -y onnxruntime onnxruntime-gpu && "
             "pip install onnxruntime-gpu") if both else ""
    if devices.CUDA_PROVIDER not in have:
        return (f"{', '.join(have)} (a CPU build: runtime.device=cuda needs onnxruntime-gpu; "
                f"{devices.GPU_INSTALL}){clash}")
    why = devices.cuda_problem(devices.Device("cuda", device))
    loaded = "CPUExecutionProvider, CUDAExecutionProvider (cuda:%d) load" % device if why is None else \
        f"CPUExecutionProvider loads; CUDAExecutionProvider does not: {why[0]} (fix: {why[1]})"
    extra = [p for p in have if p not in (devices.CUDA_PROVIDER, devices.CPU_PROVIDER)]
    return loaded + (f"; also built in: {', '.join(extra)} (not used by d2build)" if extra else "") + clash


def _torch() -> str:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"does not import: {e}"
    return f"{torch.__version__}" + (f" (CUDA {torch.version.cuda} build)" if torch.version.cuda else " (CPU build)")


def main(argv: list[str]) -> int:
    device = 0
    for a in argv:
        if a.startswith("build.device="):
            device = int(a.split("=", 1)[1])
        elif a in ("-h", "--help"):
            print("usage: d2build doctor [build.device=N]\n" + SUMMARY)
            return 0
    for what, status in lines(device):
        print(f"{what:<12} {status}")
    return 0
