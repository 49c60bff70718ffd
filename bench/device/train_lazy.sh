#!/bin/bash
# Device calls for the LazyConfig model and the LazyConfig eager baseline (no onnxruntime-gpu needed):
#   bench/device/train_lazy.sh make /work/main        (here: lays out .gpu/t1: code, the pure-Python wheels, timm)
#   run(carry=[".gpu/t1"], command="bash .gpu/t1/train_lazy.sh start 2>&1 | tee $OUT/start.log", timeout_s=600)
#   run(carry=[], command="bash bench/device/train_lazy.sh collect 2>&1 | tee $OUT/collect.log", timeout_s=600)
# start: installs the wheels, times Detectron2 eager on the LazyConfig models (bench/gpu_eager_lazy.py, the GPU
# to itself), then starts tools/train_lazy_small.py in a session of its own; collect (the next call, within the
# 30 s the machine stays warm) waits for the training and returns models/shapes_lazy_mask_rcnn as train.tgz.
set -u
G=/tmp/g; T0=$(date +%s)
case "${1:?make|start|collect}" in
make)
  DEST=${2:?checkout}/.gpu/t1; WHEELS=${WHEELS:-/work/gpuwheels}
  grep -qx '/.gpu/' "$2/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$2/.git/info/exclude"
  rm -rf "$DEST"; mkdir -p "$DEST/pure"
  tar czf "$DEST/code.tgz" --exclude=__pycache__ d2build conf recipes bench/gpu_eager_lazy.py bench/timing.py \
      tools/train_lazy_small.py pyproject.toml
  cp "$WHEELS"/pure/*.whl "$DEST/pure/"; cp bench/device/train_lazy.sh "$DEST/"
  git rev-parse --short HEAD > "$DEST/commit"; du -sb "$DEST" ;;
start)
  mkdir -p $G/src $G/train; tar xzf .gpu/t1/code.tgz -C $G/src
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/t1/pure/*.whl 2>&1 | tail -3
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  export PYTHONPATH=$G/src:/tmp/site PYTHONUNBUFFERED=1 D2BUILD_COMMIT=$(cat .gpu/t1/commit)
  cd $G/src
  python3 bench/gpu_eager_lazy.py --out $OUT/gpu_eager_lazy.json --iters 30 --deadline ${EAGER_S:-300} \
      --models mask_rcnn_vitdet_b mask_rcnn_r50_lsj mask_rcnn_r101_lsj mask_rcnn_regnetx_4gf_lsj > $OUT/eager.log 2>&1
  tail -n 15 $OUT/eager.log
  setsid nohup bash -c "python3 tools/train_lazy_small.py --out $G/train/shapes_lazy_mask_rcnn --work $G/train/work \
      --train-seconds ${TRAIN_SECONDS:-360} --max-iter 4000 --workers 12 && touch $G/done_train || touch $G/failed_train" \
      > $G/train.log 2>&1 < /dev/null &
  sleep 20; tail -n 3 $G/train.log
  echo "start took $(( $(date +%s) - T0 )) s" ;;
collect)
  for i in $(seq 1 ${WAIT:-560}); do { [ -e $G/done_train ] || [ -e $G/failed_train ]; } && break; sleep 1; done
  tail -n 12 $G/train.log
  tar czf $OUT/train.tgz --exclude=work -C $G/train shapes_lazy_mask_rcnn 2>/dev/null; cp $G/train.log $OUT/
  echo "collect took $(( $(date +%s) - T0 )) s" ;;
esac
