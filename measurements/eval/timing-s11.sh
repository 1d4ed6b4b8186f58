#!/usr/bin/env bash
# issue 19: time against SDPA for every case the idle tables lacked (run alone on the idle machine)
cd "$(dirname "$0")/../.."   # the checkout
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
P="streaming h2o snapkv quest tokenselect infllm razor novelty"
lo=""; hi=""; for p in $P; do lo="$lo cache=$p@0.0625"; hi="$hi cache=$p@0.25"; done
S="python benchmarks/eval_speed.py --repeats 1 --markdown"
echo "$(date -u +%H:%M:%S) 2K/4K start load=$(cut -d' ' -f1 /proc/loadavg)"
$S --lengths 2048,4096 --cases prefill=exact $lo $hi cache=quantized:bits=4
echo "$(date -u +%H:%M:%S) 8K start load=$(cut -d' ' -f1 /proc/loadavg)"
$S --lengths 8192 --cases prefill=exact prefill=sliding_window prefill=streaming cache=full \
   cache=streaming@0.125 cache=h2o@0.125 cache=tokenselect@0.125 cache=infllm@0.125 cache=razor@0.125 \
   cache=quantized:bits=8 cache=quantized:bits=4 $lo $hi
echo "$(date -u +%H:%M:%S) end load=$(cut -d' ' -f1 /proc/loadavg)"
