"""Each case's accuracy as a share of exact attention's on the same prompts, pooled over every seed in the rows,
with a paired bootstrap interval (prompts resampled with replacement, per task).

    python measurements/plans/pooled.py measurements/plans/eval/*/results.jsonl --length 4096

Only rows whose task parameters are ``--task-params`` count (default ``question=after``, the protocol of the plan
tables; the one-pass rows of ``eval/s12-onepass`` have none). A prompt counts for a case only where exact's row for
the same task and seed exists too (greedy decoding is deterministic, so rows of one cell from several runs agree;
the last one read is kept). Prints one Markdown row per case: per task "case / exact (share %, 90 % interval)"
and the seeds pooled.
"""

from __future__ import annotations

import argparse

import torch

from table import TASKS, case_name, case_rows

EXACT = "prefill exact"


def read(paths: list[str], length: int, task_params: dict) -> dict:
    """(case, task, seed) -> per-prompt scores."""
    return {(case_name(r), r["task"], r["seed"]): r["scores"] for r in case_rows(paths)
            if r["length"] == length and r["task_params"] == task_params}


def share(case: list[float], exact: list[float], draws: int, gen: torch.Generator) -> tuple[float, float, float]:
    """sum(case) / sum(exact) and the 5th and 95th percentiles of the same ratio over paired resamples."""
    c, e = torch.tensor(case), torch.tensor(exact)
    idx = torch.randint(len(c), (draws, len(c)), generator=gen)
    ratios = c[idx].sum(1) / e[idx].sum(1).clamp_min(1e-9)
    lo, hi = torch.quantile(ratios, torch.tensor([0.05, 0.95])).tolist()
    return float(c.sum() / e.sum().clamp_min(1e-9)), lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--draws", type=int, default=10000)
    ap.add_argument("--seeds", help="only these seeds (comma-separated)")
    ap.add_argument("--task-params", default="question=after", help="the rows' task parameters, k=v,... ('' for none)")
    args = ap.parse_args()
    task_params = dict(kv.split("=", 1) for kv in args.task_params.split(",") if kv)
    cells = read(args.paths, args.length, task_params)
    if args.seeds:
        keep = {int(s) for s in args.seeds.split(",")}
        cells = {k: v for k, v in cells.items() if k[2] in keep}
    gen = torch.Generator().manual_seed(0)
    cases = sorted({k[0] for k in cells}, key=lambda c: (c != EXACT, c))
    tasks = [t for t in TASKS if any(k[1] == t for k in cells)]
    print("| case (seeds pooled) | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for case in cases:
        out, seeds = [], set()
        for t in tasks:
            both = sorted(s for (c, task, s) in cells if c == case and task == t and (EXACT, t, s) in cells)
            if not both:
                out.append("–")
                continue
            seeds |= set(both)
            mine = [x for s in both for x in cells[(case, t, s)]]
            ref = [x for s in both for x in cells[(EXACT, t, s)]]
            ratio, lo, hi = share(mine, ref, args.draws, gen)
            out.append(f"{sum(mine):g} / {sum(ref):g} of {len(mine)} ({100 * ratio:.1f} %, {100 * lo:.0f}–{100 * hi:.0f})")
        print(f"| {case} ({len(seeds)}) | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
