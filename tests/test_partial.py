"""The log-sum-exp merge: partitions of the keys recombine into exact attention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo import Partial, merge
from attnzoo.core.exact import naive_attention


def _partials_over_partition(q, k, v, labels, parts, causal):
    """Attention of q over each key subset {j : labels[j] == p}, as Partials (float64)."""
    out = []
    for p in range(parts):
        keep = (labels == p).expand(q.shape[0], -1)
        out.append(Partial(*naive_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal,
                                            key_padding_mask=keep)))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.integers(1, 30), st.booleans(), st.integers(0, 1000))
def test_merge_of_a_random_partition_equals_attention_over_all_keys(parts, len_q, len_k, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, len_q, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, len_k, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, len_k, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(parts, (1, len_k), generator=gen)  # some parts may be empty
    merged = merge(*_partials_over_partition(q, k, v, labels, parts, causal))
    ref_out, ref_lse = naive_attention(q, k, v, scale=8 ** -0.5, causal=causal)
    torch.testing.assert_close(merged.out.double(), ref_out, rtol=1e-6, atol=1e-6)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(merged.lse), finite)
    torch.testing.assert_close(merged.lse.double()[finite], ref_lse[finite], rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1000))
def test_merge_is_associative_and_commutative(seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 20, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 20, 3, generator=gen, dtype=torch.float64)
    a, b, c = _partials_over_partition(q, k, v, torch.randint(3, (1, 20), generator=gen), 3, causal=False)
    left = merge(merge(a, b), c)
    right = merge(a, merge(b, c))
    swapped = merge(c, a, b)
    for other in (right, swapped):
        torch.testing.assert_close(left.out, other.out, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(left.lse, other.lse, rtol=1e-6, atol=1e-7)


def test_empty_partials_are_the_identity_and_never_nan():
    full = Partial(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3))
    empty = Partial.empty((1, 2, 3, 4))
    merged = merge(full, empty)
    torch.testing.assert_close(merged.out, full.out)
    torch.testing.assert_close(merged.lse, full.lse)
    both_empty = merge(empty, empty)
    assert torch.all(both_empty.out == 0) and torch.all(both_empty.lse == -math.inf)


def test_weighted_partial_counts_keys_with_importance_weight():
    """A subset counted twice (log weight log 2) equals attention over the keys duplicated."""
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 3)
    p = Partial(*az.attention(q, k, v, method="exact_tiled", return_lse=True)).weighted(math.log(2))
    dup_out, dup_lse = az.attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), method="naive", return_lse=True)
    torch.testing.assert_close(p.out, dup_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.lse, dup_lse, rtol=1e-5, atol=1e-5)


def test_merge_rejects_bad_arguments():
    with pytest.raises(az.AttnZooError, match="at least one"):
        merge()
    with pytest.raises(az.AttnZooError, match="argument 1"):
        merge(Partial(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2)), Partial(torch.zeros(1, 1, 4, 3), torch.zeros(1, 1, 4)))
