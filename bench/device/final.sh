#!/bin/bash
# Last device call: wait for the graphs, run the benchmark, then the LazyConfig models' eager baseline.
set -u
T0=$(date +%s); G=/tmp/g
export PYTHONPATH=/tmp/site_ort:$G/src:/tmp/site PYTHONUNBUFFERED=1 D2BUILD_COMMIT=$(cat .gpu/p6/commit)
cd $G/src
python3 -m d2build doctor > $OUT/doctor.txt 2>&1; cat $OUT/doctor.txt
for i in $(seq 1 ${WAIT:-90}); do
  ok=1; for n in A B C; do [ -e $G/done_$n ] || [ -e $G/failed_$n ] || ok=0; done
  [ $ok = 1 ] && break; sleep 1
done
for n in A B C; do [ -e $G/done_$n ] || { echo "prepare $n unfinished or failed"; kill -- -$(cat $G/pid_$n) 2>/dev/null; }; done
tail -n 3 $G/prep_*.log
LEFT=$(( ${BUDGET:-575} - ( $(date +%s) - T0 ) - ${LAZY:-150} ))
echo "bench deadline $LEFT s"
python3 bench/gpu_runtime.py run --work $G/work --out $OUT/gpu_runtime.json --variants --deadline $LEFT --iters 45 \
    --batch-iters 15 ${RUNARGS:-} > $OUT/run.log 2> $G/run.err
LEFT=$(( ${BUDGET:-575} - ( $(date +%s) - T0 ) - 15 ))
echo "lazy eager deadline $LEFT s"
python3 bench/gpu_eager_lazy.py --out $OUT/gpu_eager_lazy.json --iters 30 --deadline $LEFT > $G/lazy.log 2>&1
tail -n 12 $G/lazy.log
tar czf $OUT/logs.tgz $G/prep_*.log $G/run.err $G/lazy.log $G/work/graphs*.json 2>/dev/null
echo "final took $(( $(date +%s) - T0 )) s"
grep -v '^{' $OUT/run.log | tail -n 70
