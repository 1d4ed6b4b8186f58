"""Calibrate per-head plans on a real model for several budgets; time each calibrator; write the plan files.

    python benchmarks/plans.py --out plans/ --length 4096 --budgets 0.125,0.0625,0.03125 \\
        --calibrators razor,duo,moa,moa:policy=streaming,duo_gates,minference

One profile serves every budget for ``moa`` (its allocation is re-run per budget); the other calibrators
run once per budget. Prints one row per plan: calibrator, budget, seconds, full KV heads, KV share at
``--length``; then score the plans with ``attnzoo eval --plan FILE`` on other seeds (held out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnzoo import models
from attnzoo.eval.cases import parse_spec, split_specs
from attnzoo.plan import make_calibrator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budgets", default="0.125")
    ap.add_argument("--calibrators", default="razor,duo,moa")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = models.load(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    print("| calibrator | budget | seconds | full KV heads | KV share | file |\n|---|---|---|---|---|---|")
    for spec in split_specs(args.calibrators):
        name, params = parse_spec(spec)
        tag = spec.replace(":", "-").replace("=", "").replace(",", "-")
        profile, profile_s = None, 0.0
        for budget in budgets:
            cal = make_calibrator(name, budget=budget, length=args.length, **params)
            start = time.perf_counter()
            if hasattr(cal, "allocate") and hasattr(cal, "profile"):  # moa, zipvl: profile once, allocate per budget
                if profile is None:
                    profile = cal.profile(model, tokenizer)
                    profile_s = time.perf_counter() - start
                    torch.save(profile, args.out / f"{tag}-profile.pt")
                    start = time.perf_counter()
                choices, scores = cal.allocate(profile)
                seconds = profile_s + time.perf_counter() - start
                plan = cal.plan(model, choices, scores, seconds, model_name=args.model)
            else:
                plan = cal.run(model, tokenizer, model_name=args.model)
                seconds = plan.calibrator["seconds"]
            path = plan.save(args.out / f"{tag}-{budget:g}.json")
            full = sum(plan.kind(i, h) == "full" for i in range(plan.shapes["layers"])
                       for h in range(plan.shapes["heads_kv"]))
            print(f"| {spec} | {budget:g} | {seconds:.1f} | {full} | {plan.kv_fraction(args.length):.3f} | {path} |",
                  flush=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}))


if __name__ == "__main__":
    main()
