#!/bin/bash
# The eleventh session's trained runs: the two shared-recipe MQAR cells never run before (gla and based at d=128,
# 64 pairs), in the order they ran (from a `git archive` snapshot of main c74559d, nice 5, one torch thread, beside
# the lead's eval jobs at load 1-3; queue.log: every held-out evaluation with the run's wall time). Rows: mqar/results.jsonl.
set -e
export PYTHONPATH=${SNAPSHOT:?a snapshot of the commit, e.g. git archive c74559d}
R=${OUT:-measurements/train/s11}
SHARED="--curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16"  # the 64-pair columns' recipe
for m in gla based; do   # 19:55-20:01 (346 s), 20:01-20:08 (418 s)
  nice -n 5 attnzoo task mqar --full --pairs 64 --dims 128 $SHARED --out "$R/mqar" --resume --threads 1 --log-evals \
    --no-report --mixers "$m"
done
