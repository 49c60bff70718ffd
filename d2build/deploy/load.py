"""A bounded load on a served bundle: N concurrent clients x M requests to its ensemble, over HTTP
or gRPC with tritonclient (pip install tritonclient; its http/grpc extras or geventhttpclient/grpcio).

    answers, wall = run_load("127.0.0.1:8000", "127.0.0.1:8001", "mask_rcnn_r50", images, clients=8, requests=25)
    summary(answers, wall)   # {"requests", "errors", "p50_ms", "p99_ms", "requests_per_s", ...}

Each client is a thread with its own tritonclient client (they are not shared between threads);
client k sends images[(k + i) % len(images)] for i in range(requests), all clients starting
together; every answer keeps its DETECTIONS document (or the error text) and its latency, so a
caller can check each answer against the runtime's. tests/test_serve.py checks the answers;
bench/serve_load.py records the figures in docs/DEPLOY.md.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOLS = ("http", "grpc", "mixed")  # mixed: even clients HTTP, odd clients gRPC


@dataclass
class Answer:
    client: int
    index: int
    image: str
    protocol: str
    seconds: float
    detections: dict[str, Any] | None = None
    error: str | None = None


def infer(client, protocol: str, model: str, data: np.ndarray, outputs: tuple[str, ...] = ("DETECTIONS",)):
    """One request: the encoded image bytes as IMAGE (UINT8 [n]); tritonclient's InferResult."""
    if protocol == "http":
        import tritonclient.http as mod
    else:
        import tritonclient.grpc as mod
    image = mod.InferInput("IMAGE", [int(data.size)], "UINT8")
    image.set_data_from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    wanted = [mod.InferRequestedOutput(name) for name in outputs]
    return client.infer(model, [image], outputs=wanted)


def make_client(protocol: str, http_url: str, grpc_url: str, timeout: float = 600):
    if protocol == "http":
        import tritonclient.http as http

        return http.InferenceServerClient(http_url, connection_timeout=timeout, network_timeout=timeout)
    import tritonclient.grpc as grpc

    return grpc.InferenceServerClient(grpc_url)


def detections(result) -> dict[str, Any]:
    return json.loads(result.as_numpy("DETECTIONS")[0])


def run_load(http_url: str, grpc_url: str, model: str, images: list[tuple[str, bytes]], *, clients: int = 8,
             requests: int = 25, protocol: str = "mixed", timeout: float = 600) -> tuple[list[Answer], float]:
    """(every answer, wall seconds from the common start to the last answer)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    arrays = [(name, np.frombuffer(data, dtype=np.uint8)) for name, data in images]
    answers: list[Answer] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        proto = protocol if protocol != "mixed" else ("http", "grpc")[k % 2]
        client = make_client(proto, http_url, grpc_url, timeout)
        start.wait()
        mine = []
        for i in range(requests):
            name, data = arrays[(k + i) % len(arrays)]
            t0 = time.perf_counter()
            try:
                doc = detections(infer(client, proto, model, data))
                mine.append(Answer(k, i, name, proto, time.perf_counter() - t0, detections=doc))
            except Exception as e:  # noqa: BLE001 - every failure is an answer to count and show
                mine.append(Answer(k, i, name, proto, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"))
        client.close()
        with lock:
            answers.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sorted(answers, key=lambda a: (a.client, a.index)), time.perf_counter() - t0


def summary(answers: list[Answer], wall: float) -> dict[str, Any]:
    ok = sorted(a.seconds for a in answers if a.error is None)

    def pct(q: float) -> float | None:
        return round(1000 * ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))], 1) if ok else None

    return {"requests": len(answers), "errors": sum(a.error is not None for a in answers),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "mean_ms": round(1000 * statistics.fmean(ok), 1) if ok else None,
            "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None, "wall_s": round(wall, 2)}
