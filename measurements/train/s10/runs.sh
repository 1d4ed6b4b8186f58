#!/bin/bash
# The tenth session's trained runs, in the order they ran (from a `git archive` snapshot of main 4c1914d, niced 10,
# one torch thread, on the 2-core machine shared with the lead's evaluations). They ran as five queues (queue*.log:
# every held-out evaluation with the run's wall time), each later queue taking over from the earlier one; this file
# lists the commands once. Rows: mqar/results.jsonl, seeds32/results.jsonl.
set -e
export PYTHONPATH=${SNAPSHOT:?a snapshot of the commit, e.g. git archive 4c1914d}
R=${OUT:-measurements/train/s10}
run() { echo "=== $(date -u +%H:%M:%S) start: $*"; cat /proc/loadavg; nice -n 10 "$@"; echo "=== $(date -u +%H:%M:%S) end"; }
SH="--full --pairs 64 --dims 128 --out $R/mqar --resume --threads 1 --log-evals --no-report"
SHARED="--curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16"  # the 64-pair columns' recipe
GLA_RECIPE="--curriculum pairs=8,8 --curriculum seq_len=64,128 --stage-steps 800 --steps 2000 --patience 16"
S32="--param pairs=32 --param seq_len=128 --param vocab_size=160 --batch 32 --eval-size 256 --steps 800 --patience 4"
run attnzoo task mqar $SH $SHARED --mixers aaren                  # queue.log
run attnzoo task mqar $SH $GLA_RECIPE --mixers gla                # queue.log
# stopped for want of CPU, no records: `$SH $SHARED --mixers based` (queue2.log), `--mixers gla` (queue3.log)
run attnzoo task train mqar $S32 --threads 1 --log-evals --no-progress --out $R/seeds32 --mixer 'seer(block=8,top_k=2)'   # queue4.log
run attnzoo task train mqar $S32 --threads 1 --log-evals --no-progress --out $R/seeds32 --mixer 'sparsifiner(top_k=16)'   # queue4.log
run attnzoo task mqar $SH $GLA_RECIPE --mixers linear             # queue5.log
run attnzoo task train mqar $S32 --threads 1 --log-evals --no-progress --out $R/seeds32 --mixer 'longheads(block=8,chunks=4)'   # queue5.log
run attnzoo task train mqar ${S32/patience 4/patience 16} --threads 1 --log-evals --no-progress --out $R/seeds32 --mixer 'seer(block=8,top_k=2)'   # queue6.log
run attnzoo task mqar ${SH/dims 128/dims 64} $GLA_RECIPE --mixers linear   # queue6.log
