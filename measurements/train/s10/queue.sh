#!/bin/bash
# train10 queue, session 10: snapshot of main 4c1914d in /work/snap10
export PYTHONPATH=/work/snap10
R=/work/train-results/s10
cd /tmp
run() { echo "=== $(date -u +%H:%M:%S) start: $*"; cat /proc/loadavg; nice -n 10 "$@"; echo "=== $(date -u +%H:%M:%S) end rc=$?"; cat /proc/loadavg; }
SH="--full --pairs 64 --dims 128 --out $R/mqar --resume --threads 1 --log-evals --no-report"
# 1. shared 64-pair recipe, missing d=128 cells
run attnzoo task mqar $SH --curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16 --mixers aaren
# 2. gla, own recipe: 8 pairs at 64 tokens (<= 800 steps), 8 pairs at 128 tokens (<= 800), then 64 pairs at 256
run attnzoo task mqar $SH --curriculum pairs=8,8 --curriculum seq_len=64,128 --stage-steps 800 --steps 2000 --patience 16 --mixers gla
run attnzoo task mqar $SH --curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16 --mixers based
run attnzoo task mqar $SH --curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16 --mixers gla
# 3. learned seed systems at 32 pairs, d=64 (the --full 32-pair column's budget)
S32="--param pairs=32 --param seq_len=128 --param vocab_size=160 --batch 32 --eval-size 256 --steps 800 --patience 4 --threads 1 --log-evals --no-progress --out $R/seeds32"
run attnzoo task train mqar $S32 --mixer 'seer(block=8,top_k=2)'
run attnzoo task train mqar $S32 --mixer 'sparsifiner(top_k=16)'
run attnzoo task train mqar $S32 --mixer 'longheads(block=8,chunks=4)'
run attnzoo task train mqar $S32 --mixer diffqkv
run attnzoo task train mqar $S32 --mixer 'moh(shared=1,active=2)' --heads 4
echo "=== queue done $(date -u)"
