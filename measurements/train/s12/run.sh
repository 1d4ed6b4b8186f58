#!/bin/bash
# The twelfth session's trained runs (from a `git archive` snapshot of main 699261f, nice 5, one torch thread,
# beside one eval job: load ~2; queue.log: every held-out evaluation with the run's wall time).
# Rows: retrieval/results.jsonl (2048 tokens), seeds32/results.jsonl (MQAR, 32 pairs).
set -e
export PYTHONPATH=${SNAPSHOT:?a snapshot of the commit, e.g. git archive 699261f}
R=${OUT:-measurements/train/s12}
# retrieval at 2048 tokens: the 1K recipe of docs/training.md with two more stages (1024, 1536)
RET="--param seq_len=2048 --param close=True --param code_len=1 --param code_vocab=2 --param filler_vocab=4
     --curriculum seq_len=32,64,128,192,256,384,512,768,1024,1536 --stage-steps 300 --stage-target 0.9
     --steps 3600 --patience 8 --batch 64 --eval-size 256 --lr 1e-3 --stage-required"
nice -n 5 attnzoo task train retrieval $RET --threads 1 --log-evals --out "$R/retrieval"                # 873 s
for seed in 0 1 2; do   # seeds 0 and 1: the 32-token stage not learned in 300 steps (12 s each); seed 2: 2568 s
  nice -n 5 attnzoo task train retrieval $RET --threads 1 --log-evals --out "$R/retrieval" --mixer 'landmark(block=32)' \
    --seed $seed
done
# the layers that keep every key, at 32 pairs (the --full budget of the 32-pair column)
S32="--param pairs=32 --param seq_len=128 --param vocab_size=160 --batch 32 --eval-size 256 --steps 800 --patience 4"
nice -n 5 attnzoo task train mqar $S32 --threads 1 --log-evals --out "$R/seeds32" --mixer diffqkv                    # 23 s
nice -n 5 attnzoo task train mqar $S32 --threads 1 --log-evals --out "$R/seeds32" --mixer 'moh(shared=1,active=2)' --heads 4   # 40 s
