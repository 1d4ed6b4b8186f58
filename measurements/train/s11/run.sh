#!/usr/bin/env bash
# issue 17: the two shared-recipe MQAR cells never run (gla and based at d=128, 64 pairs); after the idle timing
cd /work/train-results/s11
while pgrep -f "phase2.sh" >/dev/null; do sleep 10; done
export PYTHONPATH=/work/eval-results/s11/src-c74559d
for m in gla based; do
  echo "$(date -u +%H:%M:%S) start $m load=$(cut -d' ' -f1 /proc/loadavg)" >> driver.log
  nice -n 5 attnzoo task mqar --full --pairs 64 --dims 128 --curriculum pairs=8 --stage-steps 300 --steps 600 \
    --patience 16 --out mqar --resume --threads 1 --log-evals --no-report --mixers "$m" >> train.log 2>&1
  echo "$(date -u +%H:%M:%S) end $m rc=$? load=$(cut -d' ' -f1 /proc/loadavg)" >> driver.log
done
