"""`d2build serve`: a real Triton Inference Server serving the session's bundle.

The server is pytriton's tritonserver 2.51 (Python backend only; scripts/setup.sh installs it with
`pip install --no-deps nvidia-pytriton` and makes the Python backend's environment with `d2build
serve --prepare`). The bundle is test_deploy.py's standard-op 320x320 Mask R-CNN (random weights),
deployed with deploy.triton.model=auto, i.e. python: pre-processing, ONNX Runtime and
post-processing in three Python-backend models behind one ensemble.

Each test starts its own `d2build serve` (a subprocess in its own session) on free loopback ports,
waits for its "ready" line with a timeout, and in teardown always ends it: SIGTERM to `d2build
serve`, then SIGKILL to its process group and to the tritonserver's group (the pid it printed;
the Python stubs are in that group), whatever happened. Detections are compared with the bundle
runtime's (`load_bundle` in this process) on the same encoded files: the DETECTIONS documents must
be equal, not close.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from test_deploy import bundles_root, ensure_bundle

PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg")  # real photographs, as scikit-image ships the files
ENSEMBLE = "mask_rcnn_r50"
STEPS = ("mask_rcnn_r50_preprocess", "mask_rcnn_r50_ort_python", "mask_rcnn_r50_postprocess")
START_TIMEOUT = 240


def require_server() -> None:
    """The server and the Python backend's environment scripts/setup.sh installs (fail, not skip: CI has them)."""
    from d2build.deploy import tritonserver as ts

    try:
        ts.find_server()
        ts.check_env(ts.default_env_path())
    except ts.ServeError as e:
        pytest.fail(f"{e} (scripts/setup.sh installs both)")


@pytest.fixture(scope="session")
def bundle(cache_320_dir, tmp_path_factory) -> Path:
    require_server()
    return ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "standard")


@pytest.fixture(scope="session")
def photos() -> list[tuple[str, bytes]]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [(name, (folder / name).read_bytes()) for name in PHOTOS]


@pytest.fixture(scope="session")
def expected(bundle, photos) -> dict[str, dict]:
    """The runtime's DETECTIONS document for each photograph (what the ensemble must answer)."""
    from d2build.deploy import decode_image, detections_to_dict, load_bundle

    model, _ = load_bundle(bundle)
    out = {}
    for name, data in photos:
        det, lb, _ = model.detect(decode_image(data, name))
        out[name] = {"doc": detections_to_dict("IMAGE", det, lb.original_hw, model.info),
                     "boxes": det.boxes.astype(np.float32), "scores": det.scores.astype(np.float32),
                     "classes": det.classes.astype(np.int32)}
        assert len(det) >= 30, name  # random weights that behave: a real comparison, not of empty lists
    return out


# ------------------------------------------------------------------ one server per test


@dataclass
class Served:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    run_dir: Path
    lines: list[str] = field(default_factory=list)
    server_pid: int | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        return "\n".join(self.lines)


def _reader(proc: subprocess.Popen, lines: list[str], events: queue.Queue) -> None:
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        events.put(line)
    events.put(None)


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> list[int]:
    """Pids of live processes in process group `pgid` (zombies excluded)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


@contextmanager
def serve(bundle: Path, tmp: Path, *extra: str, wait_ready: bool = True):
    """`d2build serve BUNDLE` on free loopback ports, until its ready line (or its exit); always ended."""
    from d2build.deploy.tritonserver import free_port

    http_port = free_port()
    grpc_port = free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    run_dir = tmp / "serve-run"
    proc = subprocess.Popen([sys.executable, "-m", "d2build", "serve", str(bundle), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--run-dir", str(run_dir), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    served = Served(proc, http_port, grpc_port, run_dir)
    events: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc, served.lines, events), daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while wait_ready:
            try:
                line = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"d2build serve not ready within {START_TIMEOUT} s:\n{served.output()}")
            if line is None:
                break  # exited: the test reads why
            m = re.match(r"d2build serve: tritonserver pid (\d+)", line)
            if m:
                served.server_pid = int(m.group(1))
            if line.startswith("d2build serve: ready"):
                break
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid)
        _kill_group(served.server_pid)
        proc.wait()


def stop_cleanly(served: Served) -> None:
    """SIGTERM, as a service manager sends it: exit 0, the server and its stubs gone."""
    assert served.server_pid is not None and group_alive(served.server_pid)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.output()
    time.sleep(0.5)  # the reader thread catches up
    assert f"tritonserver (pid {served.server_pid}) stopped" in served.output()
    assert group_alive(served.server_pid) == []  # tritonserver and its Python stubs


def answer(served: Served, protocol: str, data: bytes):
    from d2build.deploy import load

    client = load.make_client(protocol, served.http, served.grpc)
    try:
        return load.infer(client, protocol, ENSEMBLE, np.frombuffer(data, np.uint8),
                          outputs=("DETECTIONS", "BOXES", "SCORES", "CLASSES"))
    finally:
        client.close()


# ------------------------------------------------------------------ the tests


def test_every_model_ready_and_detections_equal_the_runtime(bundle, photos, expected, tmp_path):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    with serve(bundle, tmp_path) as served:
        assert "d2build serve: ready: tritonserver 2.51.0" in served.output(), served.output()
        assert f"HTTP  http://{served.http}" in served.output() and f"gRPC  {served.grpc}" in served.output()
        hc = http.InferenceServerClient(served.http)
        gc = grpc.InferenceServerClient(served.grpc)
        assert hc.is_server_ready() and gc.is_server_ready()
        index = {m["name"]: m.get("state") for m in hc.get_model_repository_index()}
        assert index == {m: "READY" for m in (*STEPS, ENSEMBLE)}
        for m in (*STEPS, ENSEMBLE):
            assert hc.is_model_ready(m) and gc.is_model_ready(m)
        for name, data in photos:
            want = expected[name]
            for protocol in ("http", "grpc"):
                result = answer(served, protocol, data)
                got = json.loads(result.as_numpy("DETECTIONS")[0])
                assert got == want["doc"], f"{name} over {protocol}"
                np.testing.assert_array_equal(result.as_numpy("BOXES"), want["boxes"])
                np.testing.assert_array_equal(result.as_numpy("SCORES"), want["scores"])
                np.testing.assert_array_equal(result.as_numpy("CLASSES"), want["classes"])
        hc.close()
        gc.close()
        stop_cleanly(served)


def test_bounded_load_every_answer_equals_the_runtime(bundle, photos, expected, tmp_path):
    """8 concurrent clients (4 HTTP, 4 gRPC) x 6 requests: no error, every answer the runtime's (8 clients keep
    the server's queue full on this 2-core machine; bench/serve_load.py sends 25 each).
    (The latency figures are bench/serve_load.py's, in docs/DEPLOY.md: tests do not time things.)"""
    from d2build.deploy import load

    with serve(bundle, tmp_path) as served:
        assert "ready" in served.output(), served.output()
        answers, _ = load.run_load(served.http, served.grpc, ENSEMBLE, photos, clients=8, requests=6)
        assert len(answers) == 48 and {a.protocol for a in answers} == {"http", "grpc"}
        errors = [f"client {a.client} #{a.index} {a.image}: {a.error}" for a in answers if a.error]
        assert errors == []
        wrong = [f"client {a.client} #{a.index} {a.image}" for a in answers if a.detections != expected[a.image]["doc"]]
        assert wrong == []
        assert served.proc.poll() is None and group_alive(served.server_pid)
        stop_cleanly(served)


def _post(served: Served, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=300)
    try:
        conn.request("POST", f"/v2/models/{ENSEMBLE}/infer", body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def _binary(dtype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request with IMAGE in Triton's binary tensor extension (as tritonclient sends it)."""
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": dtype, "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "DETECTIONS"}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def test_bad_requests_get_errors_naming_the_problem_and_the_server_goes_on(bundle, photos, expected, tmp_path):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    name, good = photos[2]
    noise = np.random.default_rng(0).integers(0, 256, 50 << 20, dtype=np.uint8).tobytes()  # a 50 MB body
    cases = [
        ("wrong dtype", _binary("FP32", [4], np.zeros(4, np.float32).tobytes()), 400,
         "inference input 'IMAGE' data-type is 'FP32', but model 'mask_rcnn_r50' expects 'UINT8'"),
        ("wrong shape", _binary("UINT8", [2, 4], bytes(8)), 400,
         "unexpected shape for input 'IMAGE' for model 'mask_rcnn_r50'. Expected [-1], got [2,4]"),
        ("empty image", _binary("UINT8", [0], b""), 400, "IMAGE: empty (0 bytes); send the encoded image file's bytes"),
        ("undecodable image", _binary("UINT8", [19], b"not an image at all"), 400,
         "IMAGE: cannot be decoded as an image (UnidentifiedImageError: cannot identify image file); send the encoded"),
        ("truncated photograph", _binary("UINT8", [len(good) // 2], good[: len(good) // 2]), 400,
         "IMAGE: cannot be decoded as an image"),
        ("50 MB body", _binary("UINT8", [len(noise)], noise), 400, f"{len(noise)} bytes received"),
        ("missing input", (json.dumps({"inputs": []}).encode(), {}), 400,
         "missing required input(s) ['IMAGE']"),
        ("size disagreeing with the shape", _binary("UINT8", [100], bytes(10)), 400,
         "input byte size mismatch for input 'IMAGE' for model 'mask_rcnn_r50'. Expected 100, got 10"),
    ]
    with serve(bundle, tmp_path) as served:
        assert "ready" in served.output(), served.output()
        for what, (body, headers), status, words in cases:
            code, text = _post(served, body, headers)
            error = json.loads(text)["error"]
            assert (code, words in error) == (status, True), f"{what}: HTTP {code} {error}"
            assert "Traceback" not in error and "BytesIO" not in error, what
            code, text = _post(served, *_binary("UINT8", [len(good)], good))  # the next good request
            assert code == 200, f"after {what}: {text[:300]}"
            assert json.loads(json.loads(text)["outputs"][0]["data"][0]) == expected[name]["doc"], f"after {what}"
        # over gRPC too: a request error is INVALID_ARGUMENT with the same words, and the server goes on
        gc = grpc.InferenceServerClient(served.grpc)
        bad = grpc.InferInput("IMAGE", [19], "UINT8")
        bad.set_data_from_numpy(np.frombuffer(b"not an image at all", np.uint8))
        with pytest.raises(InferenceServerException, match="IMAGE: cannot be decoded as an image") as err:
            gc.infer(ENSEMBLE, [bad])
        assert "INVALID_ARGUMENT" in str(err.value.status())
        assert gc.is_server_ready() and all(gc.is_model_ready(m) for m in (*STEPS, ENSEMBLE))
        assert json.loads(answer(served, "grpc", good).as_numpy("DETECTIONS")[0]) == expected[name]["doc"]
        gc.close()
        stop_cleanly(served)


def _variant(bundle: Path, dest: Path, model: str) -> Path:
    """A copy of the bundle (hard links) whose Triton repository is deploy.triton.model=`model`'s, re-signed."""
    from d2build.deploy import triton
    from d2build.deploy.bundle import MODEL_JSON, write_manifest

    shutil.copytree(bundle, dest, copy_function=os.link, ignore=shutil.ignore_patterns("triton", MODEL_JSON))
    doc = json.loads((bundle / MODEL_JSON).read_text())
    doc["triton"]["model"] = model
    (dest / MODEL_JSON).write_text(json.dumps(doc, indent=1))
    triton.write_repository(dest, doc)
    manifest = json.loads((bundle / "manifest.json").read_text())
    write_manifest(dest, manifest["key"], manifest["name"])
    return dest


def test_refusals_are_one_line(bundle, tmp_path):
    """A missing server, a port in use, a model this server cannot load, a damaged bundle: one line, no traceback."""
    # no tritonserver: none on the path given
    proc = subprocess.run([sys.executable, "-m", "d2build", "serve", str(bundle), "--tritonserver",
                           str(tmp_path / "nothing")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"d2build serve: {tmp_path / 'nothing'}: not an executable tritonserver (from --tritonserver)"]
    env = {k: v for k, v in os.environ.items() if k != "D2BUILD_TRITONSERVER"}
    env["PATH"] = "/usr/bin:/bin"
    probe = ("import sys; sys.modules['pytriton'] = None\n"  # as if nvidia-pytriton were not installed
             "from d2build.commands.serve import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", probe, str(bundle)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no tritonserver found: install one with `pip install --no-deps nvidia-pytriton==0.7.0`" in proc.stderr
    # a port in use: refused before anything starts
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "d2build", "serve", str(bundle), "--http-port", str(busy),
                               "--run-dir", str(tmp_path / "busy")], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"d2build serve: port {busy} on 127.0.0.1 is in use (another server?); pass --http-port with a free port")
    assert "pid" not in proc.stdout  # nothing was started
    # --models naming a model the repository does not have
    proc = subprocess.run([sys.executable, "-m", "d2build", "serve", str(bundle), "--models", "mask_rcnn_r50_engine",
                           "--run-dir", str(tmp_path / "models")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"d2build serve: --models mask_rcnn_r50_engine: not in {bundle}'s repository (it has "
        f"{', '.join([*sorted(STEPS), ENSEMBLE])})"]
    # a damaged bundle: exit 2 naming the file
    damaged = _variant(bundle, tmp_path / "damaged", "python")
    (damaged / "triton" / "mask_rcnn_r50_preprocess" / "1" / "d2build" / "processing.py").write_text("# edited\n")
    proc = subprocess.run([sys.executable, "-m", "d2build", "serve", str(damaged)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "processing.py: does not match its sha256 in manifest.json" in proc.stderr
    # a model this server has no backend for: named, with Triton's reason, and the server is stopped
    variant = _variant(bundle, tmp_path / "ort", "onnxruntime")
    with serve(variant, tmp_path) as served:
        assert served.proc.wait(120) == 1
        time.sleep(0.5)
        out = served.output()
        assert ("d2build serve: model mask_rcnn_r50_onnxruntime did not load: load failed for model "
                "'mask_rcnn_r50_onnxruntime': version 1 is at UNAVAILABLE state: Invalid argument: unable to find "
                "backend library for backend 'onnxruntime'") in out, out
        assert "Traceback" not in out
        assert served.server_pid is not None and group_alive(served.server_pid) == []
