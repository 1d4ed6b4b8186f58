"""The packed per-head store of plan layers (``attnzoo.cache.ragged``): one read and one vote per layer.

Oracle: the same ``heads`` groups run as one store and one policy per group (``ragged=False``, the
:class:`SplitLayer` path), and exact attention when no head ever evicts.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo.cache import KVCache
from attnzoo.cache.ragged import RaggedSnapKV

from test_cache import TOL

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(B=2, Hq=6, Hkv=3, N=120, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64))


def _run(cache: KVCache, q, k, v, bounds, key_mask=None) -> list[torch.Tensor]:
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cache.append(k[:, :, a:b], v[:, :, a:b], None if key_mask is None else key_mask[:, a:b])
        outs.append(cache.attend(q[:, :, a:b]))
    return outs


def _same(a: KVCache, b: KVCache, outs_a, outs_b, heads_kv: int) -> None:
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        torch.testing.assert_close(x, y, atol=TOL, rtol=0, msg=lambda m: f"call {i}: {m}")
    assert a.held == b.held
    for h in range(heads_kv):
        assert torch.equal(a.positions(h), b.positions(h)), h


GROUPS = (((0,), "full", {}), ((1,), "snapkv", {"budget": 24, "observe": 4, "pool": 5}),
          ((2,), "snapkv", {"budget": 50, "observe": 4, "pool": 5}))


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("chunk", [1, 5])
def test_packed_store_equals_one_store_per_group(interval, chunk):
    """Per-head budgets in one packed store read and keep what each group's own store does, step by step."""
    q, k, v = _qkv(seed=interval + chunk)
    groups = tuple((h, name, {**p, "interval": interval} if p else p) for h, name, p in GROUPS)
    packed, split = KVCache("heads", groups=groups), KVCache("heads", groups=groups, ragged=False)
    bounds = [0, 60, *range(60 + chunk, 120, chunk), 120]
    outs = _run(packed, q, k, v, bounds)
    assert isinstance(packed._layer, RaggedSnapKV)
    _same(packed, split, outs, _run(split, q, k, v, bounds), 3)
    assert packed.held[0] == 120 and packed.held[1] <= 24 and packed.held[2] <= 50
    # heads really hold different numbers of tokens: the bytes follow the per-head counts, not the largest
    assert packed.nbytes <= 1.15 * split.nbytes
    full = KVCache("full")
    _run(full, q, k, v, [0, 120])
    assert packed.nbytes < 0.65 * full.nbytes  # (120 + 24 + 50) / 360 tokens plus slack and the remembered queries


def test_two_heads_in_one_group_and_padding_crop_reorder():
    """Groups of several heads, batch padding, then crop and reorder: still the per-group stores' result."""
    q, k, v = _qkv(B=3, Hq=8, Hkv=4, N=90, seed=7)
    key_mask = torch.ones(3, 90, dtype=torch.bool)
    key_mask[1, :5] = False  # left padding of row 1
    groups = (((0, 3), "snapkv", {"budget": 20, "observe": 6}), ((1,), "full", {}),
              ((2,), "snapkv", {"budget": 33, "observe": 6}))
    # the oracle runs one store per KV head: a cropped group store pads every head to the group's longest
    per_head = tuple(((h,), name, p) for heads, name, p in groups for h in heads)
    packed, split = KVCache("heads", groups=groups), KVCache("heads", groups=per_head, ragged=False)
    bounds = [0, 50, *range(51, 80)]
    _same(packed, split, _run(packed, q, k, v, bounds, key_mask), _run(split, q, k, v, bounds, key_mask), 4)
    for cache in (packed, split):
        cache.crop(70)
        cache.reorder(torch.tensor([2, 0, 1]))
    q2, k2, v2 = q[[2, 0, 1]], k[[2, 0, 1]], v[[2, 0, 1]]
    rest = [70, *range(71, 90)]
    _same(packed, split, _run(packed, q2, k2, v2, rest, key_mask[[2, 0, 1]]),
          _run(split, q2, k2, v2, rest, key_mask[[2, 0, 1]]), 4)


def test_every_head_within_budget_equals_exact():
    """Budgets above the context: nothing is evicted and the packed store equals the full cache."""
    q, k, v = _qkv(N=70, seed=3)
    groups = (((0,), "full", {}), ((1, 2), "snapkv", {"budget": 200, "observe": 4}))
    packed, full = KVCache("heads", groups=groups), KVCache("full")
    bounds = [0, 40, *range(41, 70), 70]
    outs = _run(packed, q, k, v, bounds)
    for x, y in zip(outs, _run(full, q, k, v, bounds)):
        torch.testing.assert_close(x, y, atol=TOL, rtol=0)
    assert packed.held == [70, 70, 70]


def test_mixed_observe_or_streaming_groups_keep_one_store_per_group():
    """Only full + snapkv groups with one observe/pool/interval share a packed store."""
    q, k, v = _qkv(N=8, seed=1)
    for groups in ((((0,), "streaming", {"window": 4}), ((1, 2), "full", {})),
                   (((0,), "snapkv", {"budget": 6, "observe": 2}), ((1, 2), "snapkv", {"budget": 6, "observe": 3}))):
        cache = KVCache("heads", groups=groups)
        cache.append(k, v)
        assert not isinstance(cache._layer, RaggedSnapKV)


def _top_p_count(q, k, observe: int, top_p: float, group: int, per: str) -> list[int]:
    """Reference: per KV head (or for the layer's summed mass), the fewest keys holding ``top_p`` of the last
    ``observe`` queries' attention mass."""
    n = k.shape[2]
    s = q[:, :, -observe:] @ k.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(n - observe, n)[:, None], float("-inf"))
    mass = s.softmax(-1).sum(2).unflatten(1, (-1, group)).sum(2)[0]                     # (Hkv, n)
    if per == "layer":
        mass = mass.sum(0, keepdim=True).expand(k.shape[1], -1)
    share = mass.sort(-1, descending=True).values.cumsum(-1)
    return ((share < top_p * share[..., -1:]).sum(-1) + 1).tolist()


@pytest.mark.parametrize("per", ["head", "layer"])
def test_zipvl_budgets_are_the_top_p_sets(per):
    """zipvl: each head (or the layer) keeps the fewest prompt tokens holding top_p of the observed mass."""
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, N=100, seed=5)
    k[:, 1] *= 0.05                        # KV head 1 attends almost uniformly: it needs many more tokens
    k[:, 0, 10] = q[0, 0:2, -24:-20].sum((0, 1)) * 3  # KV head 0: one key its observed queries look at
    cache = KVCache("zipvl", top_p=0.9, observe=4, per=per)
    _run(cache, q, k, v, [0, 80, *range(81, 100)])
    want = [max(5, c) for c in _top_p_count(q[:, :, :80], k[:, :, :80], 4, 0.9, 2, per)]
    layer = cache._layer
    assert layer.budgets == want and layer.ratios == [b / 80 for b in want]
    assert want[0] < want[1] < 80 if per == "head" else want[0] == want[1]
    assert cache.held == want  # the decode steps since were evicted back to the budget
