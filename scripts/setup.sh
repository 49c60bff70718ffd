#!/usr/bin/env bash
# Set up d2build on a fresh machine: .venv with torch 2.14.1 / torchvision 0.29.1, Detectron2
# (repacked from PyPI's sal-detectron2 by tools/repack_detectron2.py), d2build itself (editable),
# the test tools, and a Triton Inference Server with its Python backend's environment (d2build serve).
# Idempotent: a second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 14)))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: need Python 3.11-3.13 (hydra-core 1.3.8 does not run on 3.14)" >&2; exit 1; }

stamp=.venv/.d2build-setup
want=$(cat pyproject.toml setup.py scripts/setup.sh tools/repack_detectron2.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import d2build, detectron2' 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel
echo "setup: torch 2.14.1 + torchvision 0.29.1 (large; pip takes them from the local store where there is one)"
"${PIP[@]}" install -q torch==2.14.1 torchvision==0.29.1
echo "setup: repacking sal-detectron2 0.7.2 into a pure-Python wheel"
.venv/bin/python tools/repack_detectron2.py .wheels >/dev/null
echo "setup: d2build and its dependencies"
"${PIP[@]}" install -q --find-links .wheels -e ".[test,serve]"
# tritonclient without its extras (the grpc extra would pin protobuf and ml_dtypes below what onnx and
# onnxruntime take here): its generated ModelConfig schema checks the deploy tests' configs, and its HTTP and
# gRPC clients run on the transports d2build[serve] installs (geventhttpclient, grpcio)
"${PIP[@]}" install -q --no-deps tritonclient==2.73.0
# timm for ViTDet's LazyConfig (detectron2.modeling.backbone.vit imports timm.models.layers: DropPath, Mlp);
# --no-deps: that import needs only torch, while timm's declared deps would add huggingface_hub, safetensors, hf-xet...
"${PIP[@]}" install -q --no-deps timm==1.0.31
# a real Triton Inference Server for d2build serve and tests/test_serve.py: nvidia-pytriton's wheel ships
# tritonserver 2.51 with the Python backend; --no-deps: it pins numpy<2, d2build keeps numpy 2 (only the
# binary is used, never its Python package)
"${PIP[@]}" install -q --no-deps nvidia-pytriton==0.7.0
echo "setup: the Python backend's execution environment for d2build serve (numpy<2, Pillow, onnxruntime)"
.venv/bin/python -m d2build serve --prepare
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch, detectron2, onnxruntime; print("torch", torch.__version__, "| detectron2", detectron2.__version__, "| onnxruntime", onnxruntime.__version__)'))"
