"""Prefill time and time per generated token of `attnzoo eval` cases against the unpatched model (SDPA).

The accuracy runs of `attnzoo eval` time their cases too, but a long accuracy run shares the machine
(and runs niced): its times are not comparable across cases. This script times the same cases the
same way (one passkey prompt of N tokens, the eval's own greedy loop: one prefill with
``logits_to_keep=1``, then one-token steps on the same cache), interleaved in rounds, one thread,
and reports the minimum prefill over ``--repeats`` rounds and the median step. The baseline is the
model as transformers runs it (SDPA, ``DynamicCache``); ``× SDPA`` = SDPA time ÷ the case's (bigger
is better).

    python benchmarks/eval_speed.py --lengths 2048 --repeats 2 \
        --cases prefill=exact prefill=hip:topk=0.25 cache=snapkv@0.125 plan=plan.json

``--markdown`` prints each length's table as GitHub markdown (docs/eval.md takes it unedited); the load
average at the start and end of each length is printed with it, since a loaded machine makes the ratios noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script lives in

from attnzoo.eval import cases as C  # noqa: E402
from attnzoo.eval.runner import Plan, Runner, generate  # noqa: E402

#: the eval's methods and policies at 1/8; vertical_slash takes the dense path below 8192 keys at its defaults,
#: so its row forces the sparse path (as the eval's 8K row does)
DEFAULT_CASES = ["prefill=exact", "prefill=sliding_window", "prefill=streaming",
                 "prefill=vertical_slash:dense_below=0", "prefill=block_topk", "prefill=hip", "cache=streaming@0.125",
                 "cache=h2o@0.125", "cache=snapkv@0.125", "cache=quest@0.125", "cache=tokenselect@0.125",
                 "cache=infllm@0.125", "cache=razor@0.125", "cache=novelty@0.125", "cache=quantized:bits=8"]


def parse_case(text: str) -> dict:
    """``prefill=NAME[:k=v,..]``, ``cache=NAME[:k=v,..][@budget]`` or ``plan=FILE`` -> an eval case."""
    kind, _, spec = text.partition("=")
    if kind == "prefill":
        return C.method_case(spec)
    if kind == "plan":
        return C.plan_case(spec)
    if kind != "cache":
        raise SystemExit(f"eval_speed: a case expected prefill=..., cache=... or plan=..., got {text!r}")
    spec, _, budget = spec.partition("@")
    return C.policy_case(spec, C._value(budget) if budget else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="prefill=NAME[:k=v,..], "
                                                                       "cache=NAME[:k=v,..][@budget] or plan=FILE")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--markdown", action="store_true", help="GitHub markdown tables")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [parse_case(c) for c in args.cases]
    runner = Runner(Plan((("passkey", {}),), (), (), samples=1, model=args.model))
    for n in (int(x) for x in args.lengths.split(",")):
        probe = {"task": "passkey", "task_params": {}, "length": n}
        task, (sample,) = runner.samples(probe)
        rows = {"SDPA (unpatched)": None, **{C.describe(c): c for c in cases}}
        prefill: dict[str, list[float]] = {k: [] for k in rows}
        steps: dict[str, list[float]] = {k: [] for k in rows}
        load = os.getloadavg()[0]
        for _ in range(args.repeats):  # interleaved rounds: load changes hit every row alike
            for label, case in rows.items():
                if case is None:
                    runner.close()
                    from transformers import DynamicCache

                    make = lambda: DynamicCache(config=runner.model.config)  # noqa: E731
                else:
                    make, _ = runner.setup(case, n)
                out = generate(runner.model, runner.tokenizer, sample, task, make)
                prefill[label].append(out.prefill_s)
                steps[label] += out.decode_s
        base_p, base_s = min(prefill["SDPA (unpatched)"]), statistics.median(steps["SDPA (unpatched)"])
        table = []
        for label in rows:
            p, s = min(prefill[label]), statistics.median(steps[label]) if steps[label] else float("nan")
            table.append((label, p, base_p / p, s, base_s / s))
        print(f"\nN={n} (passkey prompt of {out.tokens} tokens; 1 thread; prefill = min of {args.repeats}, "
              f"step = median; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
        if args.markdown:
            print("\n| case | prefill s | × SDPA | s/token | × SDPA |\n|---|---|---|---|---|")
            for label, p, rp, s, rs in table:
                print(f"| {label} | {p:.2f} | {rp:.2f} | {s:.3f} | {rs:.2f} |")
            continue
        print(f"{'case':40s} {'prefill s':>10s} {'× SDPA':>7s} {'s/token':>8s} {'× SDPA':>7s}")
        for label, p, rp, s, rs in table:
            print(f"{label:40s} {p:10.2f} {rp:7.2f} {s:8.3f} {rs:7.2f}")
    runner.close()


if __name__ == "__main__":
    main()
