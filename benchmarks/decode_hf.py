"""Time per generated token of a real model through attnzoo's transformers adapter against plain SDPA.

One decode step (one token, ``model(input_ids, cache=...)``) of SmolLM2-135M on a transformers
``DynamicCache`` already holding L tokens, as ``attnzoo eval`` decodes after its prefill: the model
as transformers runs it (SDPA), and with ``attnzoo.hf.apply(model, "exact")`` (what ``prefill=exact``
runs), optionally also through attnzoo's own ``full`` cache (``--attnzoo-cache``). The cache is filled
with random keys/values (a step's cost does not depend on them; a real prefill at 4K takes ~30 s
here) and grows by one token per step, as in generation, fed a fixed pseudo-random token sequence
(``--same-token``: one repeated token, which lets tokenselect reuse its selection). Cases alternate in rounds; each reports the
minimum step over ``--steps`` steps and ``--rounds`` rounds, one thread; ``× SDPA`` = SDPA time ÷ the
case's (bigger is better).

    python benchmarks/decode_hf.py --lengths 1024,4096
    python benchmarks/decode_hf.py --lengths 4096 --profile   # where the adapter's step goes (cProfile)
    python benchmarks/decode_hf.py --rounds 0 --calls 200     # one layer's attention call alone (less noisy)
    python benchmarks/decode_hf.py --lengths 8192 --cases prefill=block_topk prefill=block_topk:decode=method \
        cache=full cache=tokenselect:score_dtype=int8@0.125 cache=quest@0.125   # methods and policies too
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script lives in

import attnzoo.hf as azhf  # noqa: E402
from attnzoo.eval import cases as C  # noqa: E402
from attnzoo import models  # noqa: E402


def parse_case(spec: str) -> tuple[str, dict]:
    """``prefill=NAME[:k=v,..]`` (apply the method; DynamicCache), ``cache=NAME[:k=v,..]@BUDGET`` (apply exact;
    attnzoo's cache with the policy, a fractional budget resolved as ``attnzoo eval`` does) or ``plan=FILE`` (a
    prefill plan file, e.g. minference's; DynamicCache) -> (label, case)."""
    kind, _, rest = spec.partition("=")
    if kind == "plan":
        plan, cache = C.load_plan(rest)
        if cache is not None:
            raise SystemExit(f"--cases: {spec}: only prefill plans (no cache policy) are timed here")
        return spec, dict(apply=(plan, {}))
    rest, _, budget = rest.partition("@")
    name, params = C.parse_spec(rest)
    if kind == "prefill":
        return spec, dict(apply=(name, params))
    if kind == "cache":
        return spec, dict(apply=("exact", {}), policy=(name, params, float(budget) if budget else None))
    raise SystemExit(f"--cases: expected prefill=... or cache=..., got {spec!r}")


def filled_cache(model, length: int, *, attnzoo_cache: bool, policy: tuple | None = None):
    """A cache holding ``length`` random tokens in every layer (DynamicCache, or attnzoo's cache: ``full`` or
    ``policy`` = (name, params, budget))."""
    from transformers import DynamicCache

    cfg = model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    kv = [(torch.randn(1, heads, length, dim, generator=gen), torch.randn(1, heads, length, dim, generator=gen))
          for _ in range(cfg.num_hidden_layers)]
    if not attnzoo_cache and policy is None:
        cache = DynamicCache(config=cfg)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache
    if policy is None:
        cache = azhf.make_cache(model, "full")
    else:
        name, params, budget = policy
        cache = azhf.make_cache(model, name, **C.policy_params(name, params, budget, length))
    for layer, (k, v) in zip(cache.layers, kv):
        layer.kv.append(k, v)
    return cache


@torch.no_grad()
def step_time(model, length: int, steps: int, *, attnzoo_cache: bool = False, policy: tuple | None = None) -> float:
    """The fastest of ``steps`` one-token decode steps on a cache of ``length`` tokens (after one warm-up step)."""
    cache = filled_cache(model, length, attnzoo_cache=attnzoo_cache, policy=policy)
    ids = step_tokens(steps + 1)
    model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    best = float("inf")
    for i in range(steps):
        t0 = time.perf_counter()
        model(input_ids=ids[:, i + 1:i + 2], cache=cache, use_cache=True)
        best = min(best, time.perf_counter() - t0)
    return best


#: feed the same token at every step (the old behaviour) instead of :func:`step_tokens`' sequence
SAME_TOKEN = False


def step_tokens(n: int) -> torch.Tensor:
    """``(1, n)`` the tokens fed one per step: a fixed pseudo-random sequence (the same for every case), as in
    generation. One repeated token makes consecutive queries nearly equal, so tokenselect's similarity cache
    would reuse its selection on most steps and the minimum step would never score (``--same-token``)."""
    if SAME_TOKEN:
        return torch.full((1, n), 42)
    return torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def call_times(model, length: int, steps: int, methods: dict[str, tuple] = {}) -> dict[str, float]:
    """One layer's attention call alone, transformers' SDPA function against attnzoo's adapter with ``exact`` and
    with each of ``methods`` (label -> (name, params): what ``prefill=`` cases apply; their generation-step route
    included), on keys/values that grow by one token per call as a DynamicCache's do; calls alternate, the
    fastest of ``steps`` each."""
    import copy

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attnzoo.hf.adapter import attnzoo_attention

    layer = model.model.layers[0].self_attn
    cfg = model.config
    heads, heads_kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, heads_kv, length + steps, dim, generator=gen) for _ in range(2))
    q = torch.randn(1, heads, 1, dim, generator=gen)
    modules = {"SDPA (DynamicCache)": (sdpa_attention_forward, layer)}
    for label, (name, params) in {"attnzoo exact (DynamicCache)": ("exact", {}), **methods}.items():
        azhf.apply(model, name, **params)
        modules[label] = attnzoo_attention, copy.copy(layer)  # the layer with this plan (and its own K/V scan)
        azhf.remove(model)
    best = dict.fromkeys(modules, float("inf"))
    for i in range(steps):
        kv = k[:, :, :length + i + 1].clone(), v[:, :, :length + i + 1].clone()  # a fresh cat, as DynamicCache
        for name, (fn, module) in modules.items():
            t0 = time.perf_counter()
            fn(module, q, *kv, None, dropout=0.0, scaling=module.scaling)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--attnzoo-cache", action="store_true", help="also time attnzoo's own full cache")
    ap.add_argument("--cases", nargs="*", default=[], help="more cases: prefill=NAME[:k=v,..] (e.g. "
                                                          "prefill=block_topk:decode=method) or "
                                                          "cache=NAME[:k=v,..]@BUDGET (e.g. cache=quest@0.125) or "
                                                          "plan=FILE (a prefill plan)")
    ap.add_argument("--same-token", action="store_true", help="feed one token at every step (near-identical "
                                                              "queries: tokenselect reuses its selection)")
    ap.add_argument("--profile", action="store_true", help="cProfile the adapter's steps at the first length")
    ap.add_argument("--calls", type=int, default=0, help="also time one layer's attention call alone, alternating "
                                                         "SDPA and attnzoo, this many calls per length")
    args = ap.parse_args()
    global SAME_TOKEN
    SAME_TOKEN = args.same_token
    torch.set_num_threads(1)
    model, _ = models.load(args.model)
    model.eval()
    exact = ("exact", {})
    cases = {"SDPA (DynamicCache)": dict(apply=None), "attnzoo exact (DynamicCache)": dict(apply=exact)}
    if args.attnzoo_cache:
        cases["attnzoo exact (attnzoo full cache)"] = dict(apply=exact, attnzoo_cache=True)
    cases.update(parse_case(spec) for spec in args.cases)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{args.model}, one decode step, 1 thread, min over {args.steps} steps x {args.rounds} rounds"
          + (f"; one call: min over {args.calls} alternating calls" if args.calls else ""))
    print(f"{'L':>6}  {'case':44s} {'ms/token':>9} {'x SDPA':>7}")
    for length in lengths:
        best = {name: float("inf") for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                if case["apply"]:
                    azhf.apply(model, case["apply"][0], **case["apply"][1])
                try:
                    best[name] = min(best[name], step_time(model, length, args.steps,
                                                           attnzoo_cache=case.get("attnzoo_cache", False),
                                                           policy=case.get("policy")))
                finally:
                    if case["apply"]:
                        azhf.remove(model)
        base = best["SDPA (DynamicCache)"]
        for name, t in best.items() if args.rounds else ():
            print(f"{length:>6}  {name:44s} {t * 1e3:9.1f} {base / t:7.2f}", flush=True)
        if args.calls:
            calls = call_times(model, length, args.calls, {name: case["apply"] for name, case in cases.items()
                                                            if case["apply"] and "policy" not in case
                                                            and case["apply"][0] != "exact"})
            base = calls["SDPA (DynamicCache)"]
            for name, t in calls.items():
                print(f"{length:>6}  one call: {name:34s} {t * 1e3:9.3f} {base / t:7.2f}", flush=True)
    if args.profile:
        import cProfile
        import pstats

        azhf.apply(model, "exact")
        prof = cProfile.Profile()
        prof.runcall(step_time, model, lengths[0], args.steps)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
