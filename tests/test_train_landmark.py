"""Landmark attention's tiled grouped softmax (the training path at 1K+ tokens) against its dense form.

The tiled form (query chunks of whole blocks, per-row statistics saved, the scores recomputed in the
backward) must give the dense form's outputs and the gradients of q, k, v and the landmark keys, in fp64,
for every chunking: rows not a multiple of the block, N not a multiple of the block, one chunk, one block.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import AttnZooError
from attnzoo.layers import LandmarkLayer
from attnzoo.layers import landmark
from attnzoo.layers.landmark import grouped_attention


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(N, blk, *, B=2, H=2, D=6, Dv=None, seed=0, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (magnitude * torch.randn(B, H, N, D, dtype=torch.float64, generator=gen) for _ in range(2))
    v = torch.randn(B, H, N, Dv or D, dtype=torch.float64, generator=gen)
    k_lm = magnitude * torch.randn(B, H, N // blk, D, dtype=torch.float64, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, k_lm)], torch.randn(B, H, N, Dv or D, dtype=torch.float64,
                                                                       generator=gen)


def _assert_tiled_equals_dense(N, blk, rows, top_k, **kw):
    leaves, g = _inputs(N, blk, **kw)
    dense = grouped_attention(*leaves, blk, top_k=top_k, rows=None)
    tiled = grouped_attention(*leaves, blk, top_k=top_k, rows=rows)
    torch.testing.assert_close(tiled, dense, rtol=0, atol=1e-12)
    used = leaves if N // blk else leaves[:3]  # no complete block: the landmark keys are empty
    for ours, want in zip(torch.autograd.grad((tiled * g).sum(), used), torch.autograd.grad((dense * g).sum(), used)):
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("N,blk,rows,top_k", [
    (29, 5, 7, None),    # rows rounded up to 2 blocks; chunks hold blocks wholly in some rows' future
    (24, 8, 8, None),    # one block per chunk, N a multiple of the block
    (7, 8, 3, None),     # no complete block: own-block attention only
    (40, 8, 200, None),  # one chunk
    (31, 1, 5, None),    # every key its own block
    (33, 4, 12, 2),      # retrieval of the top 2 past blocks, an incomplete last block
    (64, 8, 16, 3),
    (17, 4, 4, 1),
    (50, 5, 10, 100),    # top_k above the number of blocks: every past block
])
def test_tiled_grouped_softmax_equals_the_dense_form(N, blk, rows, top_k):
    _assert_tiled_equals_dense(N, blk, rows, top_k)


def test_tiled_grouped_softmax_with_large_scores_and_other_value_width():
    """Scores of magnitude ~100 (blocks whose log-sum-exp differ by far more than exp's range) stay finite
    and equal; values wider than the keys."""
    _assert_tiled_equals_dense(37, 6, 9, None, magnitude=6.0, Dv=5, seed=3)
    _assert_tiled_equals_dense(37, 6, 9, 2, magnitude=6.0, Dv=5, seed=4)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 40), blk=st.integers(1, 9), rows=st.integers(1, 20),
       top_k=st.one_of(st.none(), st.integers(1, 5)), seed=st.integers(0, 2**16))
def test_tiled_grouped_softmax_property(N, blk, rows, top_k, seed):
    _assert_tiled_equals_dense(N, blk, rows, top_k, B=1, H=2, D=4, seed=seed)


def test_float32_tiled_form_has_no_nan_and_matches_fp64():
    leaves, _ = _inputs(96, 8, magnitude=4.0, seed=7)
    want = grouped_attention(*leaves, 8, rows=None)
    out = grouped_attention(*(t.detach().float().requires_grad_() for t in leaves), 8, rows=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)


def test_rows_must_be_positive():
    leaves, _ = _inputs(16, 4)
    for bad in (0, -3, 2.5):
        with pytest.raises(AttnZooError, match="rows"):
            grouped_attention(*leaves, 4, rows=bad)


def test_layer_trains_through_the_tiled_form(monkeypatch):
    """The layer's default path is the tiled form: its parameter gradients equal those through the dense form."""
    torch.manual_seed(0)
    layer = LandmarkLayer(16, n_heads=2, block=4).double()
    x = torch.randn(2, 70, 16, dtype=torch.float64)  # more rows than one chunk
    grads = []
    for dense in (False, True):
        if dense:
            monkeypatch.setattr(landmark, "grouped_attention", functools.partial(grouped_attention, rows=None))
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
