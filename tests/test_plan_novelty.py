"""The ``novelty`` cache policy (keeps keys with no near-duplicate) and plans whose reduced heads use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo import AttnZooError
from attnzoo.cache import KVCache, make_policy
from attnzoo.cache.novelty import descriptors, novelty

D = 16


def rope(x: torch.Tensor, pos: torch.Tensor, layout: str = "half", theta: float = 100.0) -> torch.Tensor:
    """Rotary position embedding of ``x (..., n, D)`` at positions ``pos (n,)``."""
    freq = theta ** (-torch.arange(D // 2).float() / (D // 2))
    ang = pos.float()[:, None] * freq
    cos, sin = ang.cos(), ang.sin()
    a, b = (x[..., 0::2], x[..., 1::2]) if layout == "interleaved" else x.chunk(2, -1)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).flatten(-2) if layout == "interleaved" else torch.cat([ra, rb], -1)


def reference(k: torch.Tensor, pos: torch.Tensor, rope_: str, exclude: int) -> torch.Tensor:
    """The definition, one key pair at a time: minus the largest cosine similarity to a key ``exclude`` away."""
    x = descriptors(k, rope_)
    out = torch.empty(k.shape[:-1])
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            for i in range(k.shape[2]):
                sims = [F.cosine_similarity(x[b, h, i], x[b, h, j], dim=0) for j in range(k.shape[2])
                        if abs(int(pos[b, h, i]) - int(pos[b, h, j])) >= exclude]
                out[b, h, i] = -max(sims) if sims else 1.0
    return out


@pytest.mark.parametrize("order", ["contiguous", "strided", "gaps", "shuffled"])
@pytest.mark.parametrize("rope_", ["half", "interleaved", "none"])
def test_novelty_is_its_definition(rope_, order):
    # ordered positions take the few-diagonals path, shuffled ones the distance grid
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 23, D, generator=g)
    pos = torch.arange(23).expand(2, 2, 23) * (1 if order == "contiguous" else 2)
    if order == "gaps":  # increments of 1-4, per head
        pos = torch.randint(1, 5, (2, 2, 23), generator=g).cumsum(-1)
    elif order == "shuffled":
        pos = pos[..., torch.randperm(23, generator=g)]
    got = novelty(k, pos, rope=rope_, exclude=5, rows=4)  # row chunks smaller than n
    torch.testing.assert_close(got, reference(k, pos, rope_, 5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_novelty_ignores_rope_rotation(layout):
    # the same keys rotated to other positions score the same: the descriptor is each channel pair's length
    k = torch.randn(1, 1, 12, D, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).view(1, 1, 12)
    moved = rope(k, torch.randint(0, 5000, (12,), generator=torch.Generator().manual_seed(2)), layout)
    torch.testing.assert_close(novelty(moved, pos, rope=layout), novelty(k, pos, rope=layout), atol=1e-5, rtol=1e-5)


def test_padding_neither_scores_nor_counts_as_a_twin():
    k = torch.randn(1, 1, 6, D, generator=torch.Generator().manual_seed(3))
    k[0, 0, 5] = k[0, 0, 0]  # a twin of key 0, but padding
    valid = torch.tensor([[[True] * 5 + [False]]])
    got = novelty(k, torch.arange(6).view(1, 1, 6), valid=valid)
    torch.testing.assert_close(got[..., :5], novelty(k[..., :5, :], torch.arange(5).view(1, 1, 5)))
    assert got[0, 0, 5] == -torch.inf


def planted(n: int = 400, period: int = 7, unique=(101, 230, 333)):
    """Repeated 'filler' (a cycle of ``period`` keys, each rotated by RoPE at its own position) with a
    few unique keys planted: what a repeated text with one fact looks like to the cache."""
    g = torch.Generator().manual_seed(4)
    cycle = torch.randn(period, D, generator=g)
    k = cycle[torch.arange(n) % period] + 0.05 * torch.randn(n, D, generator=g)
    k[list(unique)] = torch.randn(len(unique), D, generator=g) * 2
    k = rope(k, torch.arange(n)).view(1, 1, n, D)
    return k, unique


def test_policy_keeps_the_planted_unique_keys():
    k, unique = planted()
    n = k.shape[2]
    cache = KVCache("novelty", budget=40, sinks=4, recent=8, pool=1)
    v = torch.randn(1, 1, n, D)
    cache.append(k, v)
    cache.attend(torch.randn(1, 2, n, D))
    held = set(cache.positions(0)[0].tolist())
    assert len(held) == 40 - 8 + 1                              # budget - interval + 1 (interval 8)
    assert set(unique) <= held and set(range(4)) <= held and set(range(n - 8, n)) <= held
    # a policy voted by the last queries keeps none of them when those queries look elsewhere
    snap = KVCache("snapkv", budget=40, observe=8, pool=1)
    snap.append(k, v)
    q = torch.zeros(1, 2, n, D)
    q[..., 0] = 1.0
    snap.attend(q)
    assert not set(unique) <= set(snap.positions(0)[0].tolist())


def test_pool_keeps_neighbours_and_decode_stays_within_budget():
    k, unique = planted()
    cache = KVCache("novelty", budget=60, sinks=4, recent=8, pool=3, interval=4)
    cache.append(k, torch.randn(1, 1, k.shape[2], D))
    cache.attend(torch.randn(1, 1, k.shape[2], D))
    held = set(cache.positions(0)[0].tolist())
    assert {u + d for u in unique for d in (-1, 0, 1)} <= held
    for _ in range(10):  # decode: never more than the budget, and the unique keys stay
        cache.append(torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D))
        cache.attend(torch.randn(1, 1, 1, D))
        assert cache.held[0] <= 60
    assert set(unique) <= set(cache.positions(0)[0].tolist())


def test_within_budget_equals_full():
    g = torch.Generator().manual_seed(5)
    k, v, q = (torch.randn(1, 2, 30, D, generator=g) for _ in range(3))
    outs = []
    for name, params in (("novelty", {"budget": 64, "recent": 8}), ("full", {})):
        cache = KVCache(name, **params)
        cache.append(k, v)
        outs.append(cache.attend(q[:, :, :, :].repeat(1, 2, 1, 1)))
    torch.testing.assert_close(outs[0], outs[1])


def repeated(n: int = 120, unique=(30, 70)):
    """Keys and values that are one token repeated (no RoPE), with a few unique tokens planted."""
    g = torch.Generator().manual_seed(6)
    k0, v0 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    k, v = k0.expand(1, 1, n, D).clone(), v0.expand(1, 1, n, D).clone()
    k[0, 0, list(unique)] = 2 * torch.randn(len(unique), D, generator=g)
    v[0, 0, list(unique)] = torch.randn(len(unique), D, generator=g)
    return k, v, k0, v0


@pytest.mark.parametrize("decode", [0, 12])
def test_mass_compensation_is_exact_for_repeated_tokens(decode):
    # evicted tokens that are all one key and value: "mass" (the mean token counted once per evicted token)
    # gives full attention's output exactly, "mean" (counted once) attention over the held tokens plus one
    # copy of the evicted one, "none" neither; the held tokens stay within the budget, the state is in nbytes
    k, v, k0, v0 = repeated()
    g = torch.Generator().manual_seed(7)
    caches = {c: KVCache("novelty", budget=24, sinks=4, recent=4, pool=1, interval=2, rope="none", compensate=c)
              for c in ("none", "mean", "mass")}
    caches["full"] = KVCache("full")
    q = torch.randn(1, 2, k.shape[2], D, generator=g)
    for c in caches.values():
        c.append(k, v)
        c.attend(q)
    for _ in range(decode + 1):  # more of the repeated token: more evictions, the count grows
        qn = torch.randn(1, 2, 1, D, generator=g)
        outs = {}
        for name, c in caches.items():
            c.append(k0.view(1, 1, 1, D), v0.view(1, 1, 1, D))
            outs[name] = c.attend(qn)
    torch.testing.assert_close(outs["mass"], outs["full"], atol=1e-5, rtol=1e-5)
    extra = decode + 1
    keys, values = (torch.cat([x, x0.view(1, 1, 1, D).expand(1, 1, extra, D)], 2) for x, x0 in ((k, k0), (v, v0)))
    kept = caches["mean"].positions(0)[0]
    one_copy = KVCache("full")
    one_copy.append(torch.cat([k0.view(1, 1, 1, D), keys[:, :, kept]], 2),
                    torch.cat([v0.view(1, 1, 1, D), values[:, :, kept]], 2))
    torch.testing.assert_close(outs["mean"], one_copy.attend(qn, causal=False), atol=1e-5, rtol=1e-5)
    assert (outs["none"] - outs["full"]).abs().max() > 0.1
    assert max(caches["mass"].held) <= 24
    assert caches["mass"].nbytes == caches["none"].nbytes + (D + D + 1) * 4  # sum K, sum V, count (fp32)


def test_compensation_refuses_a_crop_into_what_it_merged():
    k, v, _, _ = repeated()
    cache = KVCache("novelty", budget=24, sinks=4, recent=4, pool=1, rope="none", compensate="mass")
    cache.append(k, v)
    cache.attend(torch.randn(1, 1, k.shape[2], D))
    with pytest.raises(AttnZooError, match="crop: length expected >="):
        cache.crop(50)
    cache.crop(k.shape[2])  # nothing merged at or after the last position: fine


def test_bad_parameters_are_named():
    with pytest.raises(AttnZooError, match="budget expected > sinks \\+ recent"):
        make_policy("novelty", budget=20, sinks=4, recent=16)
    with pytest.raises(AttnZooError, match="rope"):
        make_policy("novelty", rope="yarn")
    with pytest.raises(AttnZooError, match="compensate"):
        make_policy("novelty", compensate="sum")
    with pytest.raises(AttnZooError, match="even head dim"):
        novelty(torch.randn(1, 1, 4, 5), torch.arange(4).view(1, 1, 4))


def test_split_calibrator_gives_reduced_heads_novelty():
    import attnzoo.plan as P

    cal = P.make_calibrator("razor", budget=0.125, length=4096, rest="novelty")
    kind, name, params = cal.reduced()
    assert (kind, name) == ("policy", "novelty") and params["budget"] == cal.sinks + cal.streaming_window()
    assert not cal.compensated and P.make_calibrator("razor").compensated
    with pytest.raises(AttnZooError, match="too small for rest='novelty'"):
        P.make_calibrator("razor", budget=0.125, length=4096, rest="novelty", window=8)


def test_novelty_plan_round_trips_and_holds_its_budget(tmp_path):
    transformers = pytest.importorskip("transformers")
    import attnzoo.hf as azhf
    import attnzoo.plan as P
    from attnzoo.plan import file

    from test_plan import HEADS_KV, LAYERS, VOCAB, planted_model

    model = planted_model()
    plan = P.make_calibrator("razor", budget=0.5, length=512, window=60, probe=128, rest="novelty").run(
        model, model_name="tiny")
    kinds = {plan.kind(i, h) for i in range(LAYERS) for h in range(HEADS_KV)}
    assert kinds == {"full", "novelty"} and plan.kv_fraction(512) <= 0.5
    again = file.load(plan.save(tmp_path / "p.json"))
    assert again.to_dict() == plan.to_dict()
    ids = torch.randint(100, VOCAB, (1, 512), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        azhf.apply(model, again)
        try:
            cache = azhf.make_cache(model, again)
            model(ids, cache=cache, use_cache=True)
        finally:
            azhf.remove(model)
    held = sorted(n for layer in cache.layers for n in layer.kv.held)
    assert held == [64 - 8 + 1] * 3 + [512]  # three novelty heads (budget sinks + window, interval 8), one full
    assert transformers is not None


def test_moa_novelty_profile_keeps_what_the_policy_keeps():
    # moa's profile of a novelty head reads exactly the tokens the cache policy holds after compressing
    # the context (the same parameters), plus everything after it
    import attnzoo.plan as P

    cal = P.make_calibrator("moa", policy="novelty", budget=0.25, length=256, question="after")
    k, _ = planted(n=200, unique=(50, 120))
    k = k.expand(1, 2, -1, -1).contiguous()
    start, n = 160, 200
    tokens = cal.held(0.25, 256)
    mask = cal.read_masks(torch.randn(1, 2, n, D), k, torch.tensor([n - 1]), start, tokens, 1)
    _, name, params = cal.choice(0.25)
    cache = KVCache(name, **params)
    cache.append(k[:, :1, :start], torch.randn(1, 1, start, D))
    cache.attend(torch.randn(1, 1, start, D))
    held = set(cache.positions(0)[0].tolist()) | set(range(start, n))
    assert set(mask[0, 0].nonzero().flatten().tolist()) == held


@pytest.mark.parametrize("compensate", ["mean", "mass"])
def test_moa_compensated_profile_reads_what_the_cache_reads(compensate):
    # the profile's output for a compensated novelty head equals the cache's: the context compressed
    # (evicted tokens summed into the mean token), then the question's queries read it
    import attnzoo.plan as P

    cal = P.make_calibrator("moa", policy="novelty", budget=0.25, length=256, question="after", compensate=compensate)
    k, _ = planted(n=200, unique=(50, 120))
    g = torch.Generator().manual_seed(8)
    k, v, q = k.expand(1, 2, -1, -1).contiguous(), torch.randn(1, 2, 200, D, generator=g), torch.randn(1, 2, 200, D,
                                                                                                        generator=g)
    v[:, 1], q[:, 1] = v[:, 0], q[:, 1]  # one KV head (group 2): both query heads read its keys and values
    start, n = 160, 200
    pos = torch.arange(start, n)
    mask = cal.read_masks(q, k, pos, start, cal.held(0.25, 256), 2)
    got = cal.read(q[:, :, pos], k, v, mask, start)
    _, name, params = cal.choice(0.25)
    assert params["compensate"] == compensate
    cache = KVCache(name, **params)
    cache.append(k[:, :1, :start], v[:, :1, :start])
    cache.attend(q[:, :, :start])
    cache.append(k[:, :1, start:], v[:, :1, start:])
    torch.testing.assert_close(got, cache.attend(q[:, :, start:]), atol=1e-5, rtol=1e-5)
    plain = P.make_calibrator("moa", policy="novelty", budget=0.25, length=256, question="after")
    assert (plain.read(q[:, :, pos], k, v, mask, start) - got).abs().max() > 1e-3
    assert "compensate" not in plain.choice(0.25)[2]
    with pytest.raises(AttnZooError, match="'compensate' 'mass' expected policy='novelty'"):
        P.make_calibrator("moa", policy="snapkv", compensate="mass")


def test_moa_compensated_allocation_counts_the_mean_token():
    import attnzoo.plan as P

    cal = P.make_calibrator("moa", policy="novelty", budget=0.125, length=256, compensate="mass")
    errors = torch.rand(6, 2, len(cal.spans), generator=torch.Generator().manual_seed(9))
    choices, _ = cal.allocate(errors)
    held = [256 if name == "full" else params["budget"] + 1 for row in choices for _, name, params in row]
    assert sum(held) <= 0.125 * 256 * len(held) and any(h < 256 for h in held)
    assert all(params.get("compensate") == "mass" for row in choices for _, name, params in row if name == "novelty")
