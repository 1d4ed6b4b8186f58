"""Time per generated token of a calibrated cache plan against uniform policies at the same mean budget.

A plan gives each KV head its own SnapKV budget (``attnzoo plan --calibrator moa``). Its layers run as
one packed store (one read and one vote per layer, :mod:`attnzoo.cache.ragged`) or, with
``ragged=False``, as one store and one SnapKV policy per head group. This script times both next to
uniform ``--policies`` (default ``snapkv``; the first is the ratio's base) at ``--budget`` on one
passkey prompt, the eval's own greedy loop (prefill, then one-token steps), interleaved rounds, one
thread: the median step and the KV bytes held at the end. ``--no-per-group`` drops the one-store-per-group
row (plans with other groups than full and snapkv never share a packed store).

    python benchmarks/plan_decode.py --plan plans/moa-0.125.json --length 4096 --budget 0.125 --repeats 2
    python benchmarks/plan_decode.py --plan plans/moa-policynovelty-...-0.03125.json --budget 0.03125 \
        --policies snapkv,novelty --no-per-group
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script lives in

from attnzoo.eval import cases as C  # noqa: E402
from attnzoo.eval.runner import Plan, Runner, generate  # noqa: E402


def per_group(make):
    """The same plan cache with every ``heads`` layer running one store per head group."""
    def build():
        cache = make()
        for layer in cache.layers:
            if hasattr(layer.kv.policy, "ragged"):
                layer.kv.policy.ragged = False
        return cache
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="a calibrated cache plan (attnzoo plan --out)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=0.125, help="uniform snapkv's budget (share of the context)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policies", default="snapkv", help="uniform policies timed at --budget (first: the base)")
    ap.add_argument("--no-per-group", dest="per_group", action="store_false",
                    help="skip the plan run as one store per head group")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runner = Runner(Plan((("passkey", {}),), (), (), samples=1, model=args.model))
    task, (sample,) = runner.samples({"task": "passkey", "task_params": {}, "length": args.length})
    uniform = [C.policy_case(p, args.budget) for p in C.split_specs(args.policies)]
    plan = C.plan_case(args.plan)
    rows = {C.describe(u): (u, None) for u in uniform}
    rows[f"{C.describe(plan)} (packed)" if args.per_group else C.describe(plan)] = (plan, None)
    if args.per_group:
        rows[f"{C.describe(plan)} (one store per group)"] = (plan, per_group)
    base_label = C.describe(uniform[0])
    steps: dict[str, list[float]] = {k: [] for k in rows}
    held: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved rounds: load changes hit every row alike
        for label, (case, wrap) in rows.items():
            make, _ = runner.setup(case, args.length)
            out = generate(runner.model, runner.tokenizer, sample, task, wrap(make) if wrap else make)
            steps[label] += out.decode_s
            held[label] = out.kv_bytes[-1] / out.kv_full[-1]
            print(f"  {label}: {out.prediction!r} {statistics.median(out.decode_s):.3f} s/token", flush=True)
    base = statistics.median(steps[base_label])
    print(f"\nN={args.length} (passkey prompt; 1 thread; median of {len(steps[base_label])} steps)")
    print(f"| case | s/token | × {base_label} | KV held / full |\n|---|---|---|---|")
    for label in rows:
        s = statistics.median(steps[label])
        print(f"| {label} | {s:.3f} | {base / s:.2f} | {held[label]:.3f} |")
    runner.close()


if __name__ == "__main__":
    main()
