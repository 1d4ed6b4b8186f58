"""Markdown table of the eval rows here: one row per case and length, one column per task (per seed, "seed 0 / seed 1
/ ...", the sum of the per-prompt scores over n; with more than two seeds in the rows also the pooled sum), the KV
MiB held, the mean s/token of the decode steps (loaded machine: read ratios only within one run).

    python measurements/plans/table.py measurements/plans/eval/*/results.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


def case_name(r: dict) -> str:
    if r["kind"] == "plan":
        return "plan " + os.path.basename(r["name"]).removesuffix(".json")
    params = ",".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
    budget = "" if r["budget"] is None else f" @{r['budget']:g}"
    return f"{r['kind']} {r['name']}{':' + params if params else ''}{budget}"


def case_rows(paths: list[str]):
    """Every measured case row (``type`` case, ``status`` ok) in the JSON-lines files, in order."""
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if r.get("type") == "case" and r.get("status") == "ok":
                yield r


def main(paths: list[str]) -> None:
    cells = defaultdict(dict)                                  # (length, case) -> {(task, seed): row}
    for r in case_rows(paths):
        cells[(r["length"], case_name(r))][(r["task"], r["seed"])] = r
    tasks = [t for t in TASKS if any(t == k[0] for c in cells.values() for k in c)]
    seeds = sorted({k[1] for c in cells.values() for k in c} | {0, 1})
    pooled = len(seeds) > 2
    label = " / ".join(f"s{s}" for s in seeds) + (" (pooled)" if pooled else "")
    print("| length | case | " + " | ".join(f"{t} {label}" for t in tasks) + " | KV MiB held / full | s/token |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|")
    for (length, case), rows in sorted(cells.items()):
        out = []
        for t in tasks:
            got = [rows.get((t, s)) for s in seeds]
            cell = " / ".join("–" if g is None else f"{sum(g['scores']):g}/{g['n']}" for g in got)
            ran = [g for g in got if g is not None]
            if pooled and ran:
                cell += f" ({sum(sum(g['scores']) for g in ran):g}/{sum(g['n'] for g in ran)})"
            out.append(cell)
        any_row = list(rows.values())
        kv = sum(r["kv_bytes"] for r in any_row) / len(any_row) / 2**20
        full = any_row[0]["kv_full_bytes"] / 2**20
        step = sum(r["decode_s_per_token"] for r in any_row) / len(any_row)
        print(f"| {length} | {case} | " + " | ".join(out) + f" | {kv:.1f} / {full:.0f} | {step:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
