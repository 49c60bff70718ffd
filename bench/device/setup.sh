#!/bin/bash
# Device call 1: unpack d2build (this branch), install the pure-Python wheels, start building the graphs in
# sessions of their own (they outlive this call while the machine stays warm).
set -u
T0=$(date +%s); G=/tmp/g
mkdir -p $G/src $G/parts $G/work
cp .gpu/c1/ort.part00 $G/parts/
tar xzf .gpu/c1/code.tgz -C $G/src
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/c1/pure/*.whl 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
nproc; free -g | head -2
export PYTHONPATH=$G/src:/tmp/site
cd $G/src
python3 -c "import torch, detectron2, hydra, onnx_graphsurgeon, pycocotools, onnxruntime, onnxruntime_extensions; print('torch', torch.__version__, torch.cuda.is_available(), 'cudnn', torch.backends.cudnn.version(), 'ort', onnxruntime.__version__)"
# the user's own LazyConfig model (tools/train_lazy_small.py), on the GPU while the graphs build on the CPU
mkdir -p $G/train
setsid nohup bash -c "python3 tools/train_lazy_small.py --out $G/train/shapes_lazy_mask_rcnn --work $G/train/work \
    --train-seconds ${TRAIN_SECONDS:-270} --max-iter 4000 --workers 8 && touch $G/done_train || touch $G/failed_train" \
    > $G/train.log 2>&1 < /dev/null &
start() {
  name=$1; shift
  OMP_NUM_THREADS=2 setsid nohup bash -c "python3 bench/gpu_runtime.py prepare --work $G/work --tag $name $* && touch $G/done_$name || touch $G/failed_$name" > $G/prep_$name.log 2>&1 < /dev/null &
  echo $! > $G/pid_$name
}
start A --models mask_rcnn_r50 --sizes 640 1344 --batches 1
start B --models mask_rcnn_r50 --sizes 640 1344 --batches 8
start C --models retinanet_r50 --sizes 640 1344 --batches 1 8
sleep 15
tail -n 2 $G/prep_*.log
echo "setup took $(( $(date +%s) - T0 )) s"
