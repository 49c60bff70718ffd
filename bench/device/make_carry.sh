#!/bin/bash
# Lay out what the device calls of bench/gpu_runtime.py carry, in CHECKOUT/.gpu (the checkout the device tool
# sends: /work/main here; .gpu is ignored through .git/info/exclude). Six calls: c1 (this branch's code, the
# pure-Python wheels, part 0 of onnxruntime-gpu, setup.sh: it also starts the LazyConfig model's training), p1..p4
# (parts 1-4), p5 (part 5, assemble.sh: onnxruntime-gpu installed, the training waited for), p6 (final.sh). Each call
# must stay under 64 MiB with the checkout's own files (about 20 MB), so part 0 is 40.5 MB and the others 45 MB.
#   bench/device/make_carry.sh /work/main            (run from this checkout's root)
# The device calls, back to back (a machine goes back 30 s after a call):
#   run(carry=[".gpu/c1"], command="bash .gpu/c1/setup.sh 2>&1 | tee $OUT/setup.log")
#   run(carry=[".gpu/pN"], command="cp .gpu/pN/ort.part0N /tmp/g/parts/")          N = 1..4
#   run(carry=[".gpu/p5"], command="bash .gpu/p5/assemble.sh 2>&1 | tee $OUT/assemble.log", timeout_s=600)
#   run(carry=[".gpu/p6"], command="bash .gpu/p6/final.sh 2>&1 | tee $OUT/final.log", timeout_s=600)
set -eu
DEST=${1:?checkout the device tool sends}/.gpu
WHEELS=${WHEELS:-/work/gpuwheels}
ORT=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
PY=${PY:-/work/main/.venv/bin/python}
P="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
mkdir -p "$WHEELS/pure"
[ -e "$WHEELS/$ORT" ] || $PY -m pip download -q --no-deps --only-binary=:all: $P -d "$WHEELS" onnxruntime-gpu==1.31.1
$PY -m pip download -q --no-deps --only-binary=:all: $P -d "$WHEELS/pure" yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1 \
    hydra-core==1.3.8 onnx-graphsurgeon==0.6.1 pycocotools==2.0.11 onnxruntime-extensions==0.15.2
$PY -m pip wheel -q --no-deps -w "$WHEELS/pure" fvcore==0.1.5.post20221221 iopath==0.1.10 antlr4-python3-runtime==4.9.3
ls "$WHEELS"/pure/sal_detectron2-*.whl >/dev/null 2>&1 || $PY tools/repack_detectron2.py "$WHEELS/pure"
grep -qx '/.gpu/' "$1/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$1/.git/info/exclude"
rm -rf "$DEST"; mkdir -p "$DEST"/c1/pure "$DEST"/p1 "$DEST"/p2 "$DEST"/p3 "$DEST"/p4 "$DEST"/p5 "$DEST"/p6
tar czf "$DEST/c1/code.tgz" --exclude=__pycache__ d2build conf recipes bench/gpu_runtime.py bench/gpu_eager_lazy.py bench/timing.py \
    tools/train_lazy_small.py pyproject.toml
cp "$WHEELS"/pure/*.whl "$DEST/c1/pure/"
cp bench/device/setup.sh "$DEST/c1/"; cp bench/device/assemble.sh "$DEST/p5/"; cp bench/device/final.sh "$DEST/p6/"
W="$WHEELS/$ORT"; A=40500000; B=45000000
head -c $A "$W" > "$DEST/c1/ort.part00"
for i in 1 2 3 4; do tail -c +$((A + (i - 1) * B + 1)) "$W" | head -c $B > "$DEST/p$i/ort.part0$i"; done
tail -c +$((A + 4 * B + 1)) "$W" > "$DEST/p5/ort.part05"
sha256sum "$W" | cut -d' ' -f1 > "$DEST/p5/sha256"
git rev-parse --short HEAD > "$DEST/p6/commit"
du -sb "$DEST"/*
