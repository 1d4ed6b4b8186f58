"""How firmly each case prefers the queried needle's value over the distractor's on niah_multikey prompts.

    python measurements/plans/margin.py --seeds 0,1,2,3,4,5 --cases exact,novelty:compensate=mass@0.125,plan.json

For every prompt (4K, ``question=after``: the context goes through the cache first, then the question) the
answer and the distractor needle's value are teacher-forced up to their first differing token; the margin is
``log p(answer's token) - log p(distractor's token)`` there (nats; > 0: the case prefers the right value).
One forward pass per prompt and case, with the cache each case builds in ``attnzoo eval``. Prints one row per
prompt and writes them as JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from attnzoo.eval import cases as C
from attnzoo.eval import runner as R


def case_of(spec: str) -> dict:
    """``exact``, a policy spec ``name:params@budget``, or a plan file (``*.json``)."""
    if spec.endswith(".json"):
        return C.plan_case(spec)
    if spec == "exact":
        return C.method_case("exact")
    policy, _, budget = spec.partition("@")
    return C.policy_case(policy, float(budget) if budget else None)


def margin(model, tokenizer, sample, make_cache, distractor: str) -> float:
    ids = R.prompt_ids(tokenizer, sample)
    split = R.context_tokens(tokenizer, sample, ids)
    right, wrong = (tokenizer(" " + v, add_special_tokens=False)["input_ids"] for v in (sample.answers[0], distractor))
    at = next(i for i, (a, b) in enumerate(zip(right, wrong)) if a != b)
    cache = make_cache()
    kw = {R.cache_kwarg(type(model)): cache, "use_cache": True}
    with torch.inference_mode():
        model(input_ids=ids[:, :split], logits_to_keep=1, **kw)
        rest = torch.cat([ids[:, split:], torch.tensor([right[:at]], dtype=ids.dtype)], 1)
        logp = torch.log_softmax(model(input_ids=rest, logits_to_keep=1, **kw).logits[0, -1].float(), -1)
    return float(logp[right[at]] - logp[wrong[at]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cases", default="exact")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--depth", type=float, help="only the prompts whose queried needle sits at this depth")
    ap.add_argument("--out", default="margins.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = {"task": "niah_multikey", "task_params": {"question": "after"}, "length": args.length}
    with open(args.out, "a") as out:
        for seed in (int(s) for s in args.seeds.split(",")):
            runner = R.Runner(R.Plan(tasks=(), lengths=(args.length,), cases=(), samples=args.samples, seed=seed))
            for spec in args.cases.split(","):
                case = case_of(spec) | task
                _, samples = runner.samples(case)
                make_cache, _ = runner.setup(case, args.length)
                for sample in samples:
                    if args.depth is not None and abs(sample.meta["depth"] - args.depth) > 1e-9:
                        continue
                    distractor = re.search(r" is (\d+)\.", sample.meta["needles"][1]).group(1)
                    m = margin(runner.model, runner.tokenizer, sample, make_cache, distractor)
                    row = {"seed": seed, "depth": sample.meta["depth"], "case": spec, "margin": round(m, 3)}
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
