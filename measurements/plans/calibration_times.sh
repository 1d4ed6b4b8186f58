#!/bin/bash
# Calibration time of each calibrator at the 4K-sized settings of docs/plans.md, one torch thread, on an idle
# machine; prints a markdown table. Total at most LIMIT seconds (default 690): each calibrator gets what is left,
# one that runs out is killed and its row says so.
#
#   measurements/plans/calibration_times.sh [OUT]          # the docs' settings (~8-11 min idle)
#   TINY=1 measurements/plans/calibration_times.sh /tmp/ct  # the same commands on small prompts (~1-2 min): a check
#   ONLY="moa minference" ...                               # only these calibrators
#
# "calibration s" is the calibrator's own time recorded in the plan file (the model already loaded);
# "wall s" is the whole command, model load included.
set -u
OUT=${1:-calibration-times-$(date -u +%Y%m%d-%H%M)}
LIMIT=${LIMIT:-690}
mkdir -p "$OUT"
if [ "${TINY:-0}" = 1 ]; then
    L=1024; MOA="-p policy=novelty -p prompt_length=512 -p samples=3 -p question=after -p tasks=passkey,niah_single,niah_multikey"
    MINF="-p prompt_length=512 -p samples=1 -p tasks=passkey,niah_single"; DUO="-p rest=novelty -p prompt_length=256"
    GATES="-p steps=4 -p prompt_length=256"; RAZOR="-p rest=novelty -p probe=128"
else
    L=4096; MOA="-p policy=novelty -p prompt_length=4096 -p samples=6 -p question=after -p tasks=passkey,niah_single,niah_multikey"
    MINF="-p prompt_length=4096 -p samples=2 -p tasks=passkey,niah_single"; DUO="-p rest=novelty"; GATES=""; RAZOR="-p rest=novelty"
fi
T0=$(date +%s)
{
echo "commit $(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null), $(date -u '+%F %T') UTC, length $L, load at start: $(cut -d' ' -f1-3 /proc/loadavg), $(getconf _NPROCESSORS_ONLN) cores"
echo
echo "| calibrator | settings | budget | calibration s | wall s | CPU s (user+sys) | full KV heads | KV share at $L | load after |"
echo "|---|---|---|---|---|---|---|---|---|"
} | tee "$OUT/table.md"
run() {  # name budget params...
    local name=$1 budget=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$(( LIMIT - ($(date +%s) - T0) ))
    if [ "$left" -lt 10 ]; then
        echo "| $name | $(echo "$*" | sed "s/-p //g") | $budget | not run (time limit) | | | | | |" | tee -a "$OUT/table.md"; return
    fi
    local t1=$(date +%s.%N)
    /usr/bin/time -f "%U %S" -o "$OUT/$name.cpu" timeout "$left" \
        attnzoo plan --calibrator "$name" --budget "$budget" --length "$L" --threads 1 "$@" --out "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1
    local rc=$? wall=$(echo "$(date +%s.%N) - $t1" | bc)
    local cpu=$(tail -1 "$OUT/$name.cpu" 2>/dev/null | awk '{printf "%.1f", $1 + $2}')
    local settings=$(echo "$*" | sed "s/-p //g")
    if [ $rc -ne 0 ] || [ ! -s "$OUT/$name.json" ]; then
        local why="failed (rc $rc, see $name.log)"; [ $rc -eq 124 ] && why="killed at the time limit"
        echo "| $name | $settings | $budget | $why | $(printf %.1f "$wall") | $cpu | | | |" | tee -a "$OUT/table.md"
        return
    fi
    python - "$OUT/$name.json" "$L" "$budget" "$settings" "$(printf %.1f "$wall")" "$cpu" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY' | tee -a "$OUT/table.md"
import sys
from attnzoo.plan import file
path, length, budget, settings, wall, cpu, load = sys.argv[1:]
plan = file.load(path)
s = plan.shapes
full = sum(plan.kind(i, h) == "full" for i in range(s["layers"]) for h in range(s["heads_kv"]))
name = plan.calibrator["name"]
share = "- (prefill plan: KV full)" if not plan.needs_cache else f"{plan.kv_fraction(int(length)):.3f}"
print(f"| {name} | {settings} | {budget} | {plan.calibrator['seconds']:.1f} | {wall} | {cpu} | {full} | {share} | {load} |")
PY
}
run razor 0.125 $RAZOR
run duo 0.125 $DUO
run moa 0.125 $MOA
run minference 0.125 $MINF
run duo_gates 0.125 $GATES
echo
echo "total $(( $(date +%s) - T0 )) s (limit $LIMIT s); files and logs in $OUT" | tee -a "$OUT/table.md"
