"""Allocate a saved moa profile at other budgets or lengths, or add a parameter to a plan's novelty groups.

    # the profile benchmarks/plans.py saved (<tag>-profile.pt) and one plan it wrote (for the settings):
    python measurements/plans/allocate.py --profile P-profile.pt --like P-0.125.json --length 8192 \\
        --budgets 0.125,0.25 --out-prefix P-L8192
    # the same profile with fewer candidate spans (every reduced head holds at least 1/16 of the context):
    python measurements/plans/allocate.py --profile P-profile.pt --like P-0.125.json --spans 0.0625,0.125,0.25,0.5 \
        --budgets 0.125 --out-prefix P-floor16
    # session 9's "compensate=mass" plans: the same allocation, every novelty group with compensate=mass
    python measurements/plans/allocate.py --add compensate=mass --like P-0.0625.json --out P-0.0625-mass.json

No model is loaded: the shapes come from the ``--like`` plan. One moa profile serves every budget and length
(a head's share of the context scales with the context, MoA's elastic rule).
"""

from __future__ import annotations

import argparse
import json

import torch

from attnzoo.plan import file, make_calibrator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", required=True, help="a plan file written from the profile (its calibrator settings)")
    ap.add_argument("--profile", help="the (layers, heads_kv, spans) profile saved by benchmarks/plans.py")
    ap.add_argument("--length", type=int, help="context length to allocate for (default: the --like plan's)")
    ap.add_argument("--budgets", default="", help="comma-separated mean KV shares")
    ap.add_argument("--out-prefix", help="plans go to <prefix>-<budget>.json")
    ap.add_argument("--spans", help="comma-separated candidate shares, a subset of the profile's (default: all)")
    ap.add_argument("--add", help="NAME=VALUE added to every novelty group of --like (no re-allocation)")
    ap.add_argument("--out", help="with --add: the plan file written")
    args = ap.parse_args()
    like = json.loads(open(args.like).read())
    if args.add:
        key, value = args.add.split("=", 1)
        for layer in like["layers"]:
            for g in layer["groups"]:
                if g.get("policy") == "novelty":
                    g["params"][key] = value
        like["calibrator"]["params"] = like["calibrator"]["params"] | {f"added:{key}": value}
        print(file.from_dict(like, source=args.like).save(args.out), flush=True)
        return
    cal_info = like["calibrator"]
    params = {k: v for k, v in cal_info["params"].items() if k not in ("budget", "length")}
    length = args.length or cal_info["params"]["length"]
    profile = torch.load(args.profile)
    if args.spans:  # keep the profile's columns of the chosen spans
        spans = [float(s) for s in params["spans"]]
        chosen = sorted(float(s) for s in args.spans.split(","))
        missing = [s for s in chosen if s not in spans]
        if missing:
            raise SystemExit(f"--spans: {missing} not among the profile's spans {spans}")
        profile = profile[..., [spans.index(s) for s in chosen]]
        params["spans"] = chosen
    for b in args.budgets.split(","):
        cal = make_calibrator(cal_info["name"], budget=float(b), length=length, **params)
        choices, scores = cal.allocate(profile)
        info = {"name": cal.name, "params": cal.params(), "seconds": cal_info["seconds"],
                "scores": [[round(float(s), 5) for s in row] for row in scores.float()]}
        plan = file.head_plan(like["model"], like["shapes"], choices, calibrator=info)
        path = plan.save(f"{args.out_prefix}-{float(b):g}.json")
        print(f"{path}: KV share {plan.kv_fraction(length):.4f} at {length}", flush=True)


if __name__ == "__main__":
    main()
