"""d2build serve BUNDLE [--http-port P] [--grpc-port P] [--models M ...]: a local Triton Inference Server.

Starts tritonserver on 127.0.0.1 with the bundle's Triton repository (d2build/deploy/tritonserver.py:
explicit model control, the Python-backend models in an execution environment with numpy<2, Pillow
and onnxruntime), loads the models one by one, prints the endpoints and an example request, and
serves until Ctrl-C or SIGTERM, then stops the server (and its Python stubs) and exits 0. A missing
server, a port in use, or a model that does not load is one line (the model and Triton's reason),
exit 1; a bad bundle, exit 2. `--prepare` installs what pip's resolver cannot: the server binary
(`pip install --no-deps nvidia-pytriton==0.7.0`) and the Python backend's environment.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

SUMMARY = "serve a bundle with a local Triton Inference Server (HTTP and gRPC on 127.0.0.1) until Ctrl-C"


class _Stop(Exception):
    """Ctrl-C or SIGTERM before the server is up: stop waiting at once."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2build serve", description=__doc__.split("\n\n")[0],
                                epilog="Bundles deployed with deploy.triton.model=python (the default for a standard-op "
                                       "graph without an engine) load on pytriton's server; tensorrt and onnxruntime "
                                       "models need NVIDIA's containers (docs/DEPLOY.md).")
    p.add_argument("bundle", nargs="?", help="a bundle folder written by `d2build deploy`")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port on 127.0.0.1 (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (default 8001)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="load only these models of the repository (default: all; an ensemble needs its steps)")
    p.add_argument("--tritonserver", metavar="PATH", help="the tritonserver binary (default: $D2BUILD_TRITONSERVER, "
                                                          "nvidia-pytriton's, or tritonserver on PATH)")
    p.add_argument("--python-env", metavar="DIR", help="execution environment of the Python-backend models (default: "
                                                       "the one --prepare makes; `none`: the server's own Python, as "
                                                       "in NVIDIA's containers)")
    p.add_argument("--run-dir", help="serving repository, backend links and tritonserver.log "
                                     "(default outputs/serve-runs/<date>/<time>)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server and each model (300)")
    p.add_argument("--prepare", action="store_true", help="install the server binary (pip --no-deps) and make the "
                                                          "Python backend's environment, then exit")
    return p


def main(argv: list[str]) -> int:
    from d2build.deploy import tritonserver as ts

    args = parser().parse_args(argv)
    if args.prepare:
        try:
            ts.install_server()
            ts.prepare_env(Path(args.python_env) if args.python_env and args.python_env != "none" else None)
        except ts.ServeError as e:
            print(f"d2build serve: {e}", file=sys.stderr)
            return 1
        return 0
    if not args.bundle:
        parser().print_usage(sys.stderr)
        print("d2build serve: name a bundle folder (or --prepare)", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else (Path("outputs") / "serve-runs" / time.strftime("%Y-%m-%d")
                                                       / time.strftime("%H-%M-%S"))
    from d2build.deploy.bundle import BundleError

    try:
        server, models = ts.serve_setup(Path(args.bundle), run_dir, tritonserver=args.tritonserver,
                                        python_env=args.python_env, http_port=args.http_port, grpc_port=args.grpc_port)
    except BundleError as e:
        print(f"d2build serve: {e}", file=sys.stderr)
        return 2
    except ts.ServeError as e:
        print(f"d2build serve: {e}", file=sys.stderr)
        return 1
    if args.models:
        unknown = [m for m in args.models if m not in models]
        if unknown:
            print(f"d2build serve: --models {' '.join(unknown)}: not in {args.bundle}'s repository (it has "
                  f"{', '.join(models)})", file=sys.stderr)
            return 2
        models = [m for m in models if m in args.models]
    stop = {"signal": None, "serving": False}

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop["signal"] = signum
        if not stop["serving"]:
            raise _Stop

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(server, models, args, stop, ts)
    finally:
        stop["serving"] = True  # a second Ctrl-C must not interrupt the stop itself
        code = server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        if code is not None:
            print(f"d2build serve: tritonserver (pid {server.pid}) stopped", flush=True)


def _serve(server, models: list[str], args, stop: dict, ts) -> int:
    try:
        return _start_and_wait(server, models, args, stop, ts)
    except _Stop:
        print(f"d2build serve: {signal.Signals(stop['signal']).name}: stopping", flush=True)
        return 0


def _start_and_wait(server, models: list[str], args, stop: dict, ts) -> int:
    try:
        server.start()
        print(f"d2build serve: tritonserver pid {server.pid}, log {server.log}", flush=True)
        server.wait_live(args.timeout)
        for m in models:
            t0 = time.monotonic()
            server.load(m, args.timeout)
            print(f"d2build serve: loaded {m} ({time.monotonic() - t0:.1f} s)", flush=True)
        if not server.ready():
            raise ts.ServeError(f"tritonserver is not ready after loading {', '.join(models)}: {server.log_reason()}")
    except ts.ServeError as e:
        print(f"d2build serve: {e}", file=sys.stderr, flush=True)
        return 1
    version = server.metadata().get("version", "?")
    stop["serving"] = True
    print(example(server, models, version), flush=True)
    while stop["signal"] is None:
        if not server.running():
            print(f"d2build serve: tritonserver exited (code {server.proc.poll()}): {server.log_reason()}; log: "
                  f"{server.log}", file=sys.stderr, flush=True)
            return 1
        time.sleep(0.2)
    print(f"d2build serve: {signal.Signals(stop['signal']).name}: stopping", flush=True)
    return 0


def example(server, models: list[str], version: str) -> str:
    ensemble = models[-1]
    host = server.host
    return "\n".join([
        f"d2build serve: ready: tritonserver {version}, models {', '.join(models)}",
        f"  HTTP  {server.url}   (KServe v2: POST /v2/models/{ensemble}/infer)",
        f"  gRPC  {host}:{server.grpc_port}",
        "  example (pip install tritonclient; IMAGE is the encoded file's bytes, DETECTIONS one JSON string):",
        "    import json, numpy as np, tritonclient.http as http",
        f"    client = http.InferenceServerClient('{host}:{server.http_port}')",
        "    data = np.fromfile('photo.jpg', dtype=np.uint8)",
        "    image = http.InferInput('IMAGE', [data.size], 'UINT8'); image.set_data_from_numpy(data)",
        f"    print(json.loads(client.infer('{ensemble}', [image]).as_numpy('DETECTIONS')[0]))",
        f"  health: curl -s -o /dev/null -w '%{{http_code}}\\n' {server.url}/v2/health/ready",
        "  Ctrl-C (or SIGTERM) stops the server",
    ])
