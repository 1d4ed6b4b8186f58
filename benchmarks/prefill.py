"""Prompt prefill through attnzoo's KVCache against SDPA / transformers' DynamicCache, and bytes held.

Two tables, one thread, fp32, B=1, time = min over ``--repeats`` interleaved rounds (the machine is
shared: ratios come from the same run):

* per layer (SmolLM2-135M's shapes: 9 query heads, 3 KV heads, head dim 64; random Q/K/V): one
  ``scaled_dot_product_attention`` causal call (``SDPA``) against ``KVCache(policy)``: append the
  prompt's K/V and attend its queries, eviction included. ``× SDPA`` = SDPA time ÷ ours;
* end to end (``--model``, default the real SmolLM2-135M if fetched, else a tiny random Llama):
  one prefill forward (``logits_to_keep=1``) with transformers' ``DynamicCache`` + SDPA against
  ``attnzoo.hf.make_cache(model, policy)`` on the model routed through ``exact``; ``× Dynamic`` =
  DynamicCache time ÷ ours; ``bytes ÷ Dynamic``: the cache's ``nbytes`` over DynamicCache's K/V bytes.

Evicting policies get a budget of ``--budget`` tokens (the issue's 256).

    python benchmarks/prefill.py                       # 2K and 4K
    python benchmarks/prefill.py --lengths 2048 --repeats 2 --no-model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script lives in

from attnzoo.cache import KVCache  # noqa: E402

HEADS, HEADS_KV, DIM = 9, 3, 64


def policy_table(budget: int, heads_kv: int) -> dict[str, tuple[str, dict]]:
    """Row label -> (policy, parameters)."""
    plan = tuple(h == 0 for h in range(heads_kv))
    return {
        "full": ("full", {}),
        "streaming": ("streaming", dict(sinks=4, window=budget - 4)),
        "h2o": ("h2o", dict(budget=budget)),
        "snapkv": ("snapkv", dict(budget=budget)),
        "razor (1 full head)": ("razor", dict(retrieval_heads=(0,), sinks=4, window=budget - 4)),
        "duo (1 full head)": ("duo", dict(plan=plan, sinks=64, window=budget - 64)),
        "infllm": ("infllm", dict(budget=1024)),
        "quest": ("quest", dict(budget=budget)),
    }


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def per_layer(lengths, budget: int, repeats: int) -> None:
    print("\n## Per layer (SmolLM2 shapes, random Q/K/V): ms, x SDPA = SDPA / ours\n")
    table = policy_table(budget, HEADS_KV)
    print("| policy | " + " | ".join(f"{n} ms | x SDPA" for n in lengths) + " |")
    print("|---|" + "---:|---:|" * len(lengths))
    rows: dict[str, list[str]] = {"SDPA causal": []}
    rows.update({label: [] for label in table})
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, HEADS, n, DIM, generator=g)
        k = torch.randn(1, HEADS_KV, n, DIM, generator=g)
        v = torch.randn(1, HEADS_KV, n, DIM, generator=g)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def run(name, params):
            cache = KVCache(name, **params)
            cache.append(k, v)
            cache.attend(q)

        timed = {"SDPA causal": lambda: sdpa()}
        timed.update({label: (lambda p=p: run(*p)) for label, p in table.items()})
        for fn in timed.values():  # warm-up (layout caches, allocator)
            fn()
        result = {label: [] for label in timed}
        for _ in range(repeats):  # interleaved rounds: each row sees the same machine load
            for label, fn in timed.items():
                result[label].append(best(fn, 1))
        base = min(result["SDPA causal"])
        for label, ts in result.items():
            rows[label] += [f"{1000 * min(ts):.1f}", f"{base / min(ts):.2f}"]
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")


def end_to_end(model_name: str, lengths, budget: int, repeats: int) -> None:
    import attnzoo.hf as azhf
    from transformers import DynamicCache

    if model_name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=HEADS, num_key_value_heads=HEADS_KV, max_position_embeddings=8192)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    else:
        import attnzoo.models
        model, _ = attnzoo.models.load(model_name)
    heads_kv = model.config.num_key_value_heads
    table = policy_table(budget, heads_kv)
    print(f"\n## End to end ({model_name}, {model.config.num_hidden_layers} layers): prefill s, "
          "x Dynamic = DynamicCache+SDPA / ours, bytes / Dynamic\n")
    print("| cache | " + " | ".join(f"{n} s | x Dynamic | bytes / Dynamic" for n in lengths) + " |")
    print("|---|" + "---:|---:|---:|" * len(lengths))
    rows: dict[str, list[str]] = {"DynamicCache + SDPA": []}
    rows.update({label: [] for label in table})
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        held: dict[str, int] = {}

        def dynamic():
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            held["DynamicCache + SDPA"] = sum(t.numel() * t.element_size() for layer in cache.layers
                                              for t in (layer.keys, layer.values))

        def ours(label, name, params):
            cache = azhf.make_cache(model, name, **params)
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            held[label] = cache.nbytes

        result = {label: [] for label in rows}
        for _ in range(repeats):
            if azhf.is_applied(model):
                azhf.remove(model)
            result["DynamicCache + SDPA"].append(best(dynamic, 1))
            azhf.apply(model, "exact")
            for label, (name, params) in table.items():
                result[label].append(best(lambda: ours(label, name, params), 1))
        base = min(result["DynamicCache + SDPA"])
        for label, ts in result.items():
            rows[label] += [f"{min(ts):.2f}", f"{base / min(ts):.2f}",
                            f"{held[label] / held['DynamicCache + SDPA']:.3f}"]
        if azhf.is_applied(model):
            azhf.remove(model)
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="smollm2-135m (default when fetched), tiny, or a folder")
    ap.add_argument("--no-model", action="store_true", help="per-layer table only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per_layer(args.lengths, args.budget, args.repeats)
    if not args.no_model:
        model = args.model
        if model is None:
            import attnzoo.models
            model = "smollm2-135m" if attnzoo.models.is_fetched() else "tiny"
        end_to_end(model, args.lengths, args.budget, args.repeats)


if __name__ == "__main__":
    main()
