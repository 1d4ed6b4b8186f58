"""Prompt prefill against SDPA: dynamic sparse methods on real Q/K/V, attnzoo's KVCache, and bytes held.

Three tables, one thread (``--threads``), fp32, B=1, time = min over ``--repeats`` interleaved rounds (the
machine is shared: ratios come from the same run):

* sparse prefill (``--sparse``; issue 20 item 1): SmolLM2-135M's Q/K/V of one layer (the bench's causal
  ``real`` workload: layer 15 on the shipped text, captured once into the attnzoo cache) at each length;
  lengths beyond ``--real-up-to`` use synthetic inputs with the same statistics (see
  :func:`synthetic_like`; ``--validate-synthetic`` checks them against the capture). Each dynamic method at its defaults (and the variants in ``SPARSE``): time,
  ``× SDPA``, the path it took (``dense``/``sparse``), the share of the visible pairs its layouts read
  and its attention recall (the bench's protocol);

* per layer (SmolLM2-135M's shapes: 9 query heads, 3 KV heads, head dim 64; random Q/K/V): one
  ``scaled_dot_product_attention`` causal call (``SDPA``) against ``KVCache(policy)``: append the
  prompt's K/V and attend its queries, eviction included. ``× SDPA`` = SDPA time ÷ ours;
* end to end (``--model``, default the real SmolLM2-135M if fetched, else a tiny random Llama):
  one prefill forward (``logits_to_keep=1``) with transformers' ``DynamicCache`` + SDPA against
  ``attnzoo.hf.make_cache(model, policy)`` on the model routed through ``exact``; ``× Dynamic`` =
  DynamicCache time ÷ ours; ``bytes ÷ Dynamic``: the cache's ``nbytes`` over DynamicCache's K/V bytes.

Evicting policies get a budget of ``--budget`` tokens (the issue's 256).

    python benchmarks/prefill.py                       # 2K and 4K
    python benchmarks/prefill.py --sparse --lengths 4096 8192 --threads 2
    python benchmarks/prefill.py --lengths 2048 --repeats 2 --no-model
    python benchmarks/prefill.py --validate-synthetic --lengths 8192   # the generators against the capture
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


#: row label -> (method, parameters) of the sparse-prefill table
SPARSE = {
    "block_topk": ("block_topk", {}),
    "block_topk (heads=query)": ("block_topk", {"heads": "query"}),
    "block_topk (score bound)": ("block_topk", {"score": "bound"}),
    "block_topk (score bound, topk 1/10)": ("block_topk", {"score": "bound", "topk": 0.1}),
    "block_topk (topk 1/10)": ("block_topk", {"topk": 0.1}),
    "block_topk (topk 1/16)": ("block_topk", {"topk": 0.0625}),
    "block_topk (score lse)": ("block_topk", {"score": "lse"}),
    "block_topk (score lse, topk 1/10)": ("block_topk", {"score": "lse", "topk": 0.1}),
    # 50 of 32K's 512 key blocks: where the 32K synthetic's recall crosses 0.95 (0.9502; 52 blocks: 0.952)
    "block_topk (score lse, topk 0.0975)": ("block_topk", {"score": "lse", "topk": 0.0975}),
    "vertical_slash": ("vertical_slash", {}),
    "hip": ("hip", {}),
    "hip (heads=query)": ("hip", {"heads": "query"}),
}


#: SmolLM2-135M's rope_theta and trained context (max_position_embeddings; its config.json)
ROPE_BASE, TRAINED_CONTEXT = 100000.0, 8192
#: synthetic generators (``--synthetic``): "sink" (the default) and "gaussian" (the fifth session's, for before/after)
GENERATORS = ("sink", "gaussian")


def synthetic_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, seed: int = 0,
                   generator: str = "sink"):
    """Inputs of length ``n`` with the statistics of a real capture: per head, Gaussian rows with the
    capture's mean and covariance (q, k, v each), then rotated by RoPE at their positions (SmolLM2's base
    ``ROPE_BASE``) after un-rotating the capture's rows to estimate them, so scores keep their positional decay,
    their mean direction (the sink-like bias) and their channel scales.

    ``generator="sink"`` adds what the Gaussian rows miss (``--validate-synthetic`` measures it):

    * the attention sink: row 0 of q, k, v is the capture's own first row (the statistics come from the other
      rows), because a real model puts a large share of every row's attention on its first token, whose key is
      no draw from the others' distribution. Without it, block_topk's recall on Gaussian inputs drawn with the
      8K capture's statistics is 0.932 at 16 blocks, 0.965 on the capture itself; with it 0.968;
    * past the model's trained context (``TRAINED_CONTEXT``) the rows are rotated with NTK-scaled RoPE (base
      ``ROPE_BASE · s^(D/(D-2))``, ``s = n / TRAINED_CONTEXT``), as context-extended models are: plain RoPE
      past 8K turns the mean positional bias of SmolLM2's layer 15 from decaying (-13 to -18 at 6K-8K apart)
      to +13 at 16K apart (heads 0-2), an out-of-context artefact that no model serving 32K has. NTK keeps
      the bias falling out to 24K; it also flattens the local decay a little, so long inputs get somewhat
      more diffuse attention (pessimistic for sparse methods).

    ``generator="gaussian"``: Gaussian rows only (position 0 drawn like the rest, plain RoPE at every length)."""
    if generator not in GENERATORS:
        raise ValueError(f"generator: expected one of {GENERATORS}, got {generator!r}")
    keep = 1 if generator == "sink" else 0
    D = q.shape[-1]
    base = ROPE_BASE
    if generator == "sink" and n > TRAINED_CONTEXT:
        base = ROPE_BASE * (n / TRAINED_CONTEXT) ** (D / (D - 2))

    def stats(t, rotated):
        x = t[0, :, keep:].double()
        if rotated:
            x = _unrope(x, keep)
        mean = x.mean(1, keepdim=True)
        cov = torch.einsum("hni,hnj->hij", x - mean, x - mean) / x.shape[1]
        return mean, torch.linalg.cholesky(cov + 1e-6 * torch.eye(x.shape[-1], dtype=x.dtype))

    def draw(t, rotated, gen):
        mean, chol = stats(t, rotated)
        z = torch.randn(t.shape[1], n, t.shape[-1], generator=gen, dtype=torch.float64)
        x = mean + z @ chol.transpose(-1, -2)
        x = (_rope(x, base=base) if rotated else x).float().unsqueeze(0)
        x[:, :, :keep] = t[:, :, :keep]  # position 0: RoPE is the identity at any base
        return x

    gen = torch.Generator().manual_seed(seed)
    return draw(q, True, gen), draw(k, True, gen), draw(v, False, gen)


def _rope_tables(n: int, d: int, base: float = ROPE_BASE, start: int = 0):
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(start, start + n, dtype=torch.float64).view(-1, 1) * inv
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def _rope(x: torch.Tensor, start: int = 0, sign: float = 1.0, base: float = ROPE_BASE) -> torch.Tensor:
    """Llama's rotary embedding (rotate-half) of ``x (H, N, D)`` at positions start..start+N-1 (``sign`` -1:
    undo)."""
    cos, sin = _rope_tables(x.shape[1], x.shape[2], base, start)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + sign * rot * sin


def _unrope(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    return _rope(x, start, -1.0)


#: position buckets of the validation table
_BUCKETS = ((512, 1024), (1024, 2048), (2048, 4096), (4096, 8192))


def validate_synthetic(length: int, counts=(8, 16, 32)) -> None:
    """Per-position recall of block_topk at fixed block counts on the real capture of ``length`` and on each
    generator's inputs drawn with that capture's statistics at the same length: a generator reproduces
    the real inputs where its column matches the real one (the check behind ``synthetic_like``)."""
    import attnzoo as az
    from attnzoo.bench import capture
    from attnzoo.core.exact import tiled_attention

    rec = capture.cached_layer("smollm2-135m", None, length=length, batch=1, layer=None)
    real = tuple(rec[x][0].float().contiguous() for x in "qkv")
    buckets = [b for b in _BUCKETS if b[1] <= length]
    print(f"\n## Synthetic inputs against the real capture at {length}: block_topk's recall by query position "
          "(fixed block counts, 64-token blocks)\n")
    print("| inputs | blocks | " + " | ".join(f"rows {a}-{b}" for a, b in buckets) + " | all rows |")
    print("|---|---:|" + "---:|" * (len(buckets) + 1))
    for label, inputs in [("real", real)] + [(g, synthetic_like(*real, length, generator=g)) for g in GENERATORS]:
        q, k, v = inputs
        _, exact = tiled_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=True)
        for c in counts:
            _, lse = az.get("block_topk", topk=c, dense_below=0, dense_from=1.0)(q, k, v, causal=True,
                                                                               return_lse=True)
            r = torch.exp((lse.double() - exact.double()).clamp(max=0))[0]
            cells = [f"{float(r[:, a:b].mean()):.3f}" for a, b in buckets]
            print(f"| {label} | {c} | " + " | ".join(cells) + f" | {float(r.mean()):.3f} |", flush=True)


def sparse_prefill(lengths, repeats: int, real_up_to: int, recall: bool, rows: list[str] | None = None,
                   generator: str = "sink") -> None:
    import attnzoo as az
    from attnzoo.bench import capture
    from attnzoo.bench.metrics import bench_clock, method_recall, time_calls
    from attnzoo.catalog.sparse.dynamic import layout_share
    from attnzoo.checks import check_qkv

    print("\n## Sparse prefill (SmolLM2-135M layer 15 Q/K/V, 9 query / 3 KV heads, D=64): ms, x SDPA = SDPA / ours, "
          "path, share of visible pairs read, recall\n")
    clock = bench_clock()
    print(f"clock: {clock} (own = wall time less the thread's run-queue waits; single-threaded CPU only)\n")
    print("| N | inputs | method | ms | x SDPA | path | share read | recall |")
    print("|---:|---|---|---:|---:|---|---:|---:|")
    real = None
    for n in lengths:
        if n <= real_up_to:
            rec = capture.cached_layer("smollm2-135m", None, length=n, batch=1, layer=None)
            q, k, v = (rec[x][0].float().contiguous() for x in "qkv")
            source = "real"
            real = (q, k, v)
        else:
            if real is None:
                rec = capture.cached_layer("smollm2-135m", None, length=real_up_to, batch=1, layer=None)
                real = tuple(rec[x][0].float() for x in "qkv")
            q, k, v = synthetic_like(*real, n, generator=generator)
            source = f"synthetic {generator} (stats of {real[0].shape[2]})"
        prob = check_qkv(q, k, v)
        methods = {label: az.get(name, **params) for label, (name, params) in SPARSE.items()
                   if rows is None or label in rows}

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        timed = {"SDPA causal": sdpa}
        timed.update({label: (lambda m=m: m(q, k, v, causal=True)) for label, m in methods.items()})
        with torch.no_grad():
            for fn in timed.values():  # warm-up
                fn()
            result = {label: [] for label in timed}
            for _ in range(repeats):  # interleaved rounds, on the bench's clock (own time: run-queue waits removed)
                for label, fn in timed.items():
                    result[label] += time_calls(fn, repeat=1, budget_s=0.0, clock=clock).runs
        base = min(result["SDPA causal"])
        print(f"| {n} | {source} | SDPA causal | {1000 * base:.0f} | 1.00 | dense | 1.000 | 1.000 |", flush=True)
        for label, m in methods.items():
            with torch.no_grad():
                fitted = m.fit(prob)
                lays = fitted.choose(q, k, prob, causal=True, key_padding_mask=None)
                path = "dense" if lays is None else "sparse"
                share = 1.0 if lays is None else layout_share(lays, prob, True)
                rc = method_recall(m, q, k, v, scale=prob.scale, causal=True) if recall else None
            t = min(result[label])
            print(f"| {n} | {source} | {label} | {1000 * t:.0f} | {base / t:.2f} | {path} | {share:.3f} | "
                  + ("-" if rc is None else f"{rc:.3f}") + " |", flush=True)


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
    ap.add_argument("--sparse", action="store_true", help="the sparse-prefill table only (issue 20 item 1)")
    ap.add_argument("--real-up-to", type=int, default=8192, help="longest captured length; longer ones are "
                                                                 "synthetic with its statistics")
    ap.add_argument("--no-recall", action="store_true", help="skip the recall column (costly at 32K)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"sparse-table rows to run (of {', '.join(SPARSE)})")
    ap.add_argument("--synthetic", choices=GENERATORS, default="sink", help="generator of the lengths past "
                                                                         "--real-up-to (see synthetic_like)")
    ap.add_argument("--validate-synthetic", action="store_true", help="the generators against the real "
                                                                      "capture of the first --lengths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.validate_synthetic:
        validate_synthetic(args.lengths[0])
        return
    if args.sparse:
        sparse_prefill(args.lengths, args.repeats, args.real_up_to, not args.no_recall, args.rows, args.synthetic)
        return
    per_layer(args.lengths, args.budget, args.repeats)
    if not args.no_model:
        model = args.model
        if model is None:
            import attnzoo.models
            model = "smollm2-135m" if attnzoo.models.is_fetched() else "tiny"
        end_to_end(model, args.lengths, args.budget, args.repeats)


if __name__ == "__main__":
    main()
