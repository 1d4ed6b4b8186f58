#!/bin/bash
# train10 queue, part 2 (after queue.sh was cut at its gla own-recipe run, pid 12155): snapshot of main 4c1914d
export PYTHONPATH=/work/snap10
R=/work/train-results/s10
cd /tmp
while kill -0 12155 2>/dev/null; do sleep 10; done
run() { echo "=== $(date -u +%H:%M:%S) start: $*"; cat /proc/loadavg; nice -n 10 "$@"; echo "=== $(date -u +%H:%M:%S) end rc=$?"; cat /proc/loadavg; }
SH="--full --pairs 64 --dims 128 --out $R/mqar --resume --threads 1 --log-evals --no-report"
run attnzoo task mqar $SH --curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16 --mixers based
run attnzoo task mqar $SH --curriculum pairs=8 --stage-steps 300 --steps 600 --patience 16 --mixers gla
# linear with gla's own recipe (does the recipe, not the gate, decide linear attention's 64-pair cell too?)
run attnzoo task mqar $SH --curriculum pairs=8,8 --curriculum seq_len=64,128 --stage-steps 800 --steps 1400 --patience 16 --mixers linear
S32="--param pairs=32 --param seq_len=128 --param vocab_size=160 --batch 32 --eval-size 256 --steps 800 --patience 4 --threads 1 --log-evals --no-progress --out $R/seeds32"
run attnzoo task train mqar $S32 --mixer 'seer(block=8,top_k=2)'
run attnzoo task train mqar $S32 --mixer 'sparsifiner(top_k=16)'
run attnzoo task train mqar $S32 --mixer 'longheads(block=8,chunks=4)'
run attnzoo task train mqar $S32 --mixer diffqkv
run attnzoo task train mqar $S32 --mixer 'moh(shared=1,active=2)' --heads 4
echo "=== queue2 done $(date -u)"
