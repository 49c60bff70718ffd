#!/bin/bash
# Last device call: assemble and install onnxruntime-gpu, wait for the graphs, run the benchmark.
set -u
T0=$(date +%s); G=/tmp/g
cp .gpu/p5/ort.part05 $G/parts/
mkdir -p /tmp/w; W=/tmp/w/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat $G/parts/ort.part00 $G/parts/ort.part01 $G/parts/ort.part02 $G/parts/ort.part03 $G/parts/ort.part04 $G/parts/ort.part05 > $W
echo "$(cat .gpu/p5/sha256)  $W" | sha256sum -c || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ort $W 2>&1 | tail -2
export PYTHONPATH=/tmp/site_ort:$G/src:/tmp/site PYTHONUNBUFFERED=1 D2BUILD_COMMIT=$(cat .gpu/p5/commit)
[ -e .gpu/p5/code.tgz ] && tar xzf .gpu/p5/code.tgz -C $G/src
cd $G/src
python3 -m d2build doctor > $OUT/doctor.txt 2>&1; cat $OUT/doctor.txt
for i in $(seq 1 ${WAIT:-90}); do
  ok=1; for n in A B C; do [ -e $G/done_$n ] || [ -e $G/failed_$n ] || ok=0; done
  [ $ok = 1 ] && break; sleep 1
done
for n in A B C; do [ -e $G/done_$n ] || { echo "prepare $n unfinished or failed"; kill -- -$(cat $G/pid_$n) 2>/dev/null; }; done
tail -n 3 $G/prep_*.log
LEFT=$(( ${BUDGET:-575} - ( $(date +%s) - T0 ) - ${MARGIN:-110} ))
echo "bench deadline $LEFT s"
python3 bench/gpu_runtime.py run --work $G/work --out $OUT/gpu_runtime.json --variants --deadline $LEFT --iters 45 --batch-iters 15 ${RUNARGS:-} > $OUT/run.log 2> $OUT/run.err
tar czf $OUT/prep.tgz $G/prep_*.log $G/work/graphs*.json 2>/dev/null
echo "final took $(( $(date +%s) - T0 )) s"
grep -v '^{' $OUT/run.log | tail -n 60
