#!/bin/bash
# Device call 6 of 7: assemble and install onnxruntime-gpu; wait for the LazyConfig model's training (it shares the GPU
# with nothing after this) and pack what it wrote.
set -u
T0=$(date +%s); G=/tmp/g
cp .gpu/p5/ort.part05 $G/parts/
mkdir -p /tmp/w; W=/tmp/w/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat $G/parts/ort.part00 $G/parts/ort.part01 $G/parts/ort.part02 $G/parts/ort.part03 $G/parts/ort.part04 $G/parts/ort.part05 > $W
echo "$(cat .gpu/p5/sha256)  $W" | sha256sum -c || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ort $W 2>&1 | tail -2
for i in $(seq 1 ${WAIT:-520}); do
  { [ -e $G/done_train ] || [ -e $G/failed_train ]; } && break; sleep 1
done
tail -n 25 $G/train.log
ls -la $G/train/shapes_lazy_mask_rcnn 2>/dev/null
tar czf $OUT/train.tgz --exclude=work -C $G/train shapes_lazy_mask_rcnn 2>/dev/null
cp $G/train.log $OUT/train.log
tail -n 3 $G/prep_*.log
echo "assemble took $(( $(date +%s) - T0 )) s"
