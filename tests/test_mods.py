"""mods.positional: a user score_mod declared to be a distance bias runs as one (evaluated once per call)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import mods

from test_routes import assert_same_grads, dense, distance, qkv


def _table_mod(Hq: int, Nq: int, Nk: int, seed: int):
    """A user function adding ``table[h, d + Nk - 1] - 0.05·|d|`` (d = kv_idx - q_idx), with a table sized
    exactly for the call's distances (an evaluation beyond them would raise), and a log of the scores' shapes."""
    table = torch.randn(Hq, Nq + Nk - 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table.requires_grad_(True)
    seen = []

    def fn(score, b, h, q_idx, kv_idx):
        seen.append(tuple(score.shape))
        return score + table[h, kv_idx - q_idx + Nk - 1] - 0.05 * (kv_idx - q_idx).abs()
    return fn, table, seen


@pytest.mark.parametrize("method, params, causal, Nq, Nk", [
    ("exact", {}, True, 11, 13), ("exact", {}, False, 13, 9), ("exact_tiled", {"q_tile": 4, "k_tile": 5}, True, 11, 13),
    ("block_topk", {"block": 4, "topk": 2}, True, 17, 21), ("sliding_window", {"window": 6, "block": 4}, True, 17, 17)])
def test_positional_user_mod_runs_as_a_distance_bias_like_the_function_itself(method, params, causal, Nq, Nk):
    """``positional(fn, heads)`` equals ``fn`` as a plain score_mod (and, for exact, the dense float64
    reference): values, lse, gradients to q, k, v and the table fn closes over; the engines call fn only on
    per-distance rows (never on a tile of scores; block_topk's estimate on pooled blocks), at the call's
    distances only (the table has no more)."""
    Hq, Hkv = 4, 2
    q, k, v = qkv(B=2, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, seed=Nq + Nk)
    fn, table, seen = _table_mod(Hq, Nq, Nk, seed=Nq)
    got = az.attention(q, k, v, method=method, causal=causal, score_mod=mods.positional(fn, Hq), return_lse=True,
                       **params)
    seen.clear()
    with torch.no_grad():
        fast = az.attention(q, k, v, method=method, causal=causal, score_mod=mods.positional(fn, Hq), return_lse=True,
                            **params)
    pooled = (-(-Nq // 4), -(-Nk // 4)) if method == "block_topk" else None  # its estimate: one score per block pair
    assert seen and all(shape[-2] == 1 or shape[-2:] == pooled for shape in seen), seen  # distance rows, no tile
    plain = az.attention(q, k, v, method=method, causal=causal, score_mod=fn, return_lse=True, **params)
    want = plain
    if method.startswith("exact"):
        d = distance(Nq, Nk)
        want = dense(q, k, v, causal=causal, bias=table[:, d + Nk - 1][None] - 0.05 * d.abs())
        torch.testing.assert_close(plain[0], want[0], atol=1e-12, rtol=1e-10)
    for out in (got, fast):
        torch.testing.assert_close(out[0], want[0].detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, table])


def test_positional_shared_by_heads_composes_with_softcap_and_runs_on_flex():
    """heads=1 (f ignores h), composed with a soft cap (bias then cap: the capped kernel path) and with
    alibi (a sum of distance biases); the flex backend calls the function itself."""
    import warnings
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Nq=9, Nk=12, grad=False)
    fn = lambda s, b, h, qi, ki: s + 0.3 * torch.cos((ki - qi).to(s.dtype))  # noqa: E731
    d = distance(9, 12)
    slopes = mods.alibi_slopes(4).double()
    for mod, bias, cap in ((mods.compose(mods.positional(fn, 1), mods.softcap(2.0)), 0.3 * torch.cos(d.double()), 2.0),
                           (mods.compose(mods.positional(fn, 1), mods.alibi(slopes)),
                            0.3 * torch.cos(d.double()) + slopes[:, None, None] * d, None)):
        want = dense(q, k, v, causal=True, bias=bias, cap=cap)
        for backend in ("torch", "flex"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # eager flex warns that it materialises the scores
                got = az.attention(q, k, v, causal=True, score_mod=mod, return_lse=True, backend=backend)
            torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)  # flex: lse through base 2


def test_positional_refuses_what_it_cannot_be():
    """A mod that is not additive (its change depends on the scores), a table with the wrong number of heads
    and a bad ``heads`` are named."""
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Nq=6, Nk=6, grad=False)
    with pytest.raises(az.AttnZooError, match=r"positional\(<lambda>\): the mod is declared positional but is not"):
        az.attention(q, k, v, causal=True, score_mod=mods.positional(lambda s, b, h, qi, ki: 2 * s, 4))
    fn, _, _ = _table_mod(3, 6, 6, seed=0)
    with pytest.raises(az.AttnZooError, match=r"a distance bias with 3 head rows .* expected 4 .* or 1"):
        az.attention(q, k, v, causal=True, score_mod=mods.positional(fn, 3))
    with pytest.raises(az.AttnZooError, match=r"positional: heads expected a positive int"):
        mods.positional(fn, 0)
    with pytest.raises(az.AttnZooError, match=r"score_mod"):
        mods.positional(lambda s: s, 4)


@pytest.mark.parametrize("causal, Nq, Nk, layout_heads", [(True, 37, 45, 2), (False, 40, 29, 4), (True, 33, 33, 1)])
def test_block_kernel_runs_distance_biases_and_soft_caps_like_the_slot_loop(causal, Nq, Nk, layout_heads):
    """The C++ block kernel takes a distance bias (alibi, per-head and shared relative tables, a positional
    user function, their sums) as one vector per head added in its row pass, and a soft cap (alone or after
    the bias) in the same pass: values and lse equal the slot
    loop (the generic executor: the same mod as a plain function) in float64, with key padding, GQA, layouts
    per batch row and per KV head / query head / shared; gradients (the slot-by-slot backward) too."""
    from attnzoo.core import blockkernel
    from attnzoo.core.blocksparse import BlockLayout, attend, forward_path
    if not blockkernel.available():
        pytest.skip("the block kernel extension does not build here")
    B, Hq, Hkv = 2, 4, 2
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, seed=Nq)
    g = torch.Generator().manual_seed(Nk)
    lay = BlockLayout.from_indices(torch.randint(-1, -(-Nk // 8), (B, layout_heads, -(-Nq // 8), 3), generator=g),
                                   block_q=8, block_k=8, len_q=Nq, len_k=Nk)
    pad = torch.rand(B, Nk, generator=g) > 0.2
    table = torch.randn(Hq, 2 * Nk + 1, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda s, b, h, qi, ki: s + 0.1 * torch.sin(0.3 * (ki - qi).to(s.dtype)) * (h + 1)  # noqa: E731
    for mod in (mods.alibi(mods.alibi_slopes(Hq).double()), mods.relative_bias(table), mods.softcap(1.5),
                mods.compose(mods.relative_bias(torch.randn(7, generator=g, dtype=torch.float64)),
                             mods.positional(fn, Hq), mods.alibi(torch.rand(Hq, generator=g).double())),
                mods.compose(mods.relative_bias(table), mods.alibi(mods.alibi_slopes(Hq).double()),
                             mods.softcap(2.0))):
        for mask in (None, pad):
            assert forward_path(q, k, v, lay, causal=causal, score_mod=mod) == "block kernel"
            got = attend(q, k, v, lay, scale=0.3, causal=causal, key_padding_mask=mask, score_mod=mod)
            slot = attend(q, k, v, lay, scale=0.3, causal=causal, key_padding_mask=mask,
                          score_mod=lambda s, b, h, qi, ki, m=mod: m(s.clone(), b, h, qi, ki))
            fin = torch.isfinite(slot[1])
            assert torch.equal(fin, torch.isfinite(got[1]))
            torch.testing.assert_close(got[0], slot[0], atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(got[1][fin], slot[1][fin], atol=1e-12, rtol=1e-10)
    assert_same_grads(got, slot, [q, k, v])
    grads = [torch.autograd.grad(attend(q, k, v, lay, scale=0.3, causal=causal, score_mod=m)[0].square().sum(),
                                 table)[0] for m in (mods.relative_bias(table),
                                                     lambda s, b, h, qi, ki: mods.relative_bias(table)(s, b, h, qi, ki))]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)
