"""Benchmark: a bundle under a bounded load through a real Triton server (docs/DEPLOY.md's figures).

Deploys the tests' bundle (Mask R-CNN R50-FPN, random weights, 320x320, standard ops,
deploy.triton.model=python) unless --bundle is given, starts `d2build serve` on free loopback ports,
sends one warm-up request per photograph, then one client's --requests sequential requests (the
latency without queueing), then the load of tests/test_serve.py: --clients concurrent clients (even
ones HTTP, odd ones gRPC, tritonclient) x --requests requests each, cycling over scikit-image's
astronaut.png, coffee.png and rocket.jpg files, and checks every answer against the bundle
runtime's detections. Latency is per request, client side (send to parsed answer). For scale, the
same run first times the bundle runtime in this process (`model.detect`, the same photographs).

    .venv/bin/python bench/serve_load.py [--bundle DIR] [--clients 8] [--requests 25] [--cache DIR]

Writes bench/results/serve_load.json and prints a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg")


def deploy(cache: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "d2build", "deploy", "--out", str(out), "--run-dir", str(out / "run"),
           "recipe=mask_rcnn_r50", "model.weights=random", "model.input=[320,320]", "verify.count=1",
           "surgery.ops=standard", f"cache.dir={cache}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return next(p for p in out.glob("mask_rcnn_r50-*") if (p / "manifest.json").is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = ap.parse_args()

    import skimage

    from d2build.deploy import decode_image, detections_to_dict, load, load_bundle
    from d2build.deploy.tritonserver import free_port

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    bundle = Path(args.bundle) if args.bundle else deploy(Path(args.cache), tmp / "bundles")
    folder = Path(skimage.__file__).parent / "data"
    photos = [(n, (folder / n).read_bytes()) for n in PHOTOS]
    model, _ = load_bundle(bundle)
    expected, runtime_s = {}, []
    for name, data in photos:
        det, lb, _ = model.detect(decode_image(data, name))
        expected[name] = detections_to_dict("IMAGE", det, lb.original_hw, model.info)
    for _ in range(3):
        for name, data in photos:
            t0 = time.perf_counter()
            model.detect(decode_image(data, name))
            runtime_s.append(time.perf_counter() - t0)
    del model
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "d2build", "serve", str(bundle), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--run-dir", str(tmp / "serve")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server_pid = None
    try:
        for line in proc.stdout:
            if line.startswith("d2build serve: tritonserver pid"):
                server_pid = int(line.split()[4].rstrip(","))
            if line.startswith("d2build serve: ready") or proc.poll() is not None:
                break
        http, grpc = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        load.run_load(http, grpc, "mask_rcnn_r50", photos, clients=1, requests=len(photos))  # warm-up
        load1 = os.getloadavg()[0]
        alone, alone_wall = load.run_load(http, grpc, "mask_rcnn_r50", photos, clients=1, requests=args.requests,
                                          protocol="http")
        answers, wall = load.run_load(http, grpc, "mask_rcnn_r50", photos, clients=args.clients,
                                      requests=args.requests)
        stats = load.summary(answers, wall)
        stats["identical_to_runtime"] = sum(a.detections == expected[a.image] for a in answers)
        stats["one_client"] = load.summary(alone, alone_wall)
        stats["one_client"]["identical_to_runtime"] = sum(a.detections == expected[a.image] for a in alone)
        stats["runtime_in_process_median_ms"] = round(1000 * sorted(runtime_s)[len(runtime_s) // 2], 1)
        stats["loadavg_1min_before"] = round(load1, 2)
        stats["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for pid in (proc.pid, server_pid):
            try:
                os.killpg(pid, signal.SIGKILL) if pid else None
            except ProcessLookupError:
                pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    doc = {"bundle": bundle.name, "clients": args.clients, "requests_per_client": args.requests,
           "protocols": "even clients HTTP, odd gRPC", "photos": list(PHOTOS), **stats,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
           "commit": commit.strip()}
    out = REPO / "bench" / "results" / "serve_load.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    one = stats["one_client"]
    for label, st in ((f"1 x {args.requests}", one), (f"{args.clients} x {args.requests}", stats)):
        print(f"| {label} | {st['errors']} | {st['identical_to_runtime']}/{st['requests']} | {st['p50_ms']:.0f} | "
              f"{st['p99_ms']:.0f} | {st['requests_per_s']:.2f} |")


if __name__ == "__main__":
    main()
