"""The learned seed systems as layers: each definition's check, and a few training steps lowering the loss."""

import itertools
import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import AttnZooError
from attnzoo.core.linear import linear_attention
from attnzoo.layers import (CombinerLayer, DiffQKVLayer, LandmarkLayer, MoHLayer, SEALayer, SeerGateLayer,
                            SparsifinerLayer, SSELayer, masformer_plan)
from attnzoo.layers.combiner import combiner_attention
from attnzoo.layers.heads import stable_topk_mask
from attnzoo.layers.landmark import grouped_attention
from attnzoo.layers.linear import _merge_heads, _split_heads
from attnzoo.tasks import make_task
from attnzoo.train import TinyModel
from attnzoo.train.trainer import aux_loss, token_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def _mha(layer, x, causal=True):
    """Standard multi-head attention with the layer's own qkv / o_proj weights."""
    q, k, v = (_split_heads(t, layer.n_heads) for t in layer.qkv(x).chunk(3, dim=-1))
    return layer.o_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal)))


# ------------------------------------------------------------------ Landmark (M21)
def _grouped_softmax_definition(q, k, k_lm, blk, top_k=None):
    """The grouped softmax's attention matrix, query by query: the current block's scores and the landmark
    scores of the (top_k by landmark score) past blocks in one softmax; a past block's tokens share its weight."""
    B, H, N, D = q.shape
    s, s_lm = q @ k.transpose(-1, -2) / D**0.5, q @ k_lm.transpose(-1, -2) / D**0.5
    a = torch.zeros(B, H, N, N, dtype=q.dtype)
    for b_, h_, i in itertools.product(range(B), range(H), range(N)):
        c = i // blk
        past, cur = list(range(c)), list(range(c * blk, i + 1))
        if top_k is not None and c > top_k:
            past = sorted(s_lm[b_, h_, i, :c].topk(top_k).indices.tolist())
        g = torch.cat([s_lm[b_, h_, i, past], s[b_, h_, i, cur]]).softmax(-1)
        for n, b in enumerate(past):  # a past block's tokens share the weight its landmark won
            a[b_, h_, i, b * blk:(b + 1) * blk] = g[n] * s[b_, h_, i, b * blk:(b + 1) * blk].softmax(-1)
        a[b_, h_, i, cur] = g[len(past):]
    return a


@pytest.mark.parametrize("N,blk", [(29, 5), (24, 8), (7, 8)])
def test_landmark_grouped_softmax_matches_its_definition(N, blk):
    B, H, D = 2, 2, 8
    gen = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    k_lm = torch.randn(B, H, N // blk, D, dtype=torch.float64, generator=gen).requires_grad_()
    a = _grouped_softmax_definition(q, k, k_lm, blk)
    torch.testing.assert_close(a.sum(-1), torch.ones(B, H, N, dtype=torch.float64))  # rows sum to 1
    out = grouped_attention(q, k, v, k_lm, blk)
    torch.testing.assert_close(out, a @ v)
    # gradients: the batched form is the definition's function, so they agree too
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    leaves = [q, k, v] + ([k_lm] if N // blk else [])
    for ours, want in zip(torch.autograd.grad((out * g).sum(), leaves), torch.autograd.grad((a @ v * g).sum(), leaves)):
        torch.testing.assert_close(ours, want)
    # retrieval with k = all blocks equals the training-time grouped softmax
    torch.testing.assert_close(grouped_attention(q, k, v, k_lm, blk, top_k=max(1, N // blk)), out)
    # fewer blocks: only the top-2 past blocks by landmark score get weight, as in the definition
    eye = torch.eye(N, dtype=torch.float64).expand(B, H, N, N)
    sparse = grouped_attention(q, k, eye, k_lm, blk, top_k=2)
    torch.testing.assert_close(sparse, _grouped_softmax_definition(q, k, k_lm, blk, top_k=2))
    past_blocks_read = (sparse[..., :, :(N // blk) * blk].reshape(B, H, N, N // blk, blk).sum(-1) > 0).sum(-1)
    assert int(past_blocks_read.max()) <= 2 + 1  # two retrieved + (part of) the current block


def test_landmark_layer_retrieval_and_errors():
    layer = LandmarkLayer(32, 2, block=8)
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(layer(x, top_k=5), layer(x))
    with pytest.raises(AttnZooError, match="block"):
        LandmarkLayer(32, 2, block=0)


# ------------------------------------------------------------------ SEA (M10), Sparsifiner (M11), Seer (M9)
@pytest.mark.parametrize("causal", [True, False])
def test_learned_sparse_full_masks_are_exact(causal):
    x = torch.randn(2, 40, 32)
    for layer in (SparsifinerLayer(32, 2, top_k=40, causal=causal), SEALayer(32, 2, bins=8, top_k=8, causal=causal),
                  SeerGateLayer(32, 2, block=8, threshold=0.0, top_k=None, causal=causal)):
        layer.eval()
        torch.testing.assert_close(layer(x), _mha(layer, x, causal), msg=type(layer).__name__)


def test_learned_sparse_masks_really_prune():
    x = torch.randn(1, 64, 32)
    sp = SparsifinerLayer(32, 2, top_k=4)
    q, k, _ = (_split_heads(t, 2) for t in sp.qkv(x).chunk(3, -1))
    assert int((sp.layout(x, q, k).kv_tokens >= 0).sum(-1).max()) == 4
    sea = SEALayer(32, 2, bins=8, top_k=2)
    assert int(sea.layout(x, q, k).block_mask().sum(-1).max()) <= 3  # two bins + the diagonal
    assert not torch.allclose(sp(x), _mha(sp, x))


def test_predictors_learn_from_distillation():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32)
    for layer in (SparsifinerLayer(32, 2, top_k=8), SEALayer(32, 2, bins=8, top_k=2),
                  SeerGateLayer(32, 2, block=8, top_k=2)):
        predictor = [p for n, p in layer.named_parameters() if not n.startswith(("qkv", "o_proj"))]
        opt = torch.optim.Adam(predictor, lr=3e-2)
        losses = []
        for _ in range(30):
            layer.train()
            layer(x)
            opt.zero_grad()
            layer.distill_loss.backward()
            opt.step()
            losses.append(layer.distill_loss.item())
        assert losses[-1] < 0.8 * losses[0], (type(layer).__name__, losses[0], losses[-1])


def test_seer_gate_target_and_recall():
    layer = SeerGateLayer(32, 2, block=8, top_k=2)
    x = torch.randn(2, 40, 32)
    q, k, _ = (_split_heads(t, 2) for t in layer.qkv(x).chunk(3, -1))
    from attnzoo.layers.learned_sparse import teacher_probs

    target = layer.target(teacher_probs(q, k, True))
    torch.testing.assert_close(target.sum(-1), torch.ones(target.shape[:-1]))
    assert (target.triu(1) == 0).all()  # causal at block level
    assert 0 < layer.block_recall(x) <= 1
    assert SeerGateLayer(32, 2, block=8, threshold=0.0, top_k=None).block_recall(x) == pytest.approx(1.0)
    with pytest.raises(AttnZooError, match="exactly one of threshold and top_k"):
        SeerGateLayer(32, 2, threshold=0.1, top_k=2)


# ------------------------------------------------------------------ SSE (M31)
def test_sse_single_partition_is_the_host_linear_attention():
    layer = SSELayer(32, 2, partitions=1, top_k=1, chunk=8)
    x = torch.randn(2, 30, 32)
    q, k, v = (_split_heads(t, 2) for t in layer.qkv(x).chunk(3, dim=-1))
    g = (F.logsigmoid(layer.gate(x)) / layer.tau).transpose(1, 2).unsqueeze(-1)
    o, _ = linear_attention(q * q.shape[-1] ** -0.5, k, v, causal=True, gate=g, chunk=8)
    o = _merge_heads(o)
    ref = layer.o_proj(layer.norm(o.reshape(-1, 32)).view_as(o))
    torch.testing.assert_close(layer(x), ref)


def test_sse_chunked_equals_recurrent_and_routes_deterministically():
    layer = SSELayer(32, 2, partitions=4, top_k=2, chunk=8)
    x = torch.randn(2, 30, 32)
    torch.testing.assert_close(layer(x), layer(x, form="recurrent"), atol=1e-5, rtol=1e-4)
    e = layer.routing(x)
    assert ((e > 0).sum(-1) == 2).all()
    ties = stable_topk_mask(torch.zeros(3, 5), 2)
    assert ties.tolist() == [[True, True, False, False, False]] * 3  # ties go to the lower index
    assert layer.state_size(30) == 4 * 32 * 32 // 2


# ------------------------------------------------------------------ Combiner (M34)
def test_combiner_full_support_rows_sum_to_one_and_size_one_regions_are_exact():
    B, H, N, D = 2, 2, 37, 8
    q, k, v = torch.randn(3, B, H, N, D, dtype=torch.float64).unbind(0)
    rq = torch.randn(H, D, dtype=torch.float64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(combiner_attention(q, k, v, rq, block=4, region=1), exact)
    a = combiner_attention(q, k, torch.eye(N, dtype=torch.float64).expand(B, H, N, N), rq, block=8, region=4)
    torch.testing.assert_close(a.sum(-1), torch.ones(B, H, N, dtype=torch.float64))
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    assert (a[..., causal] > 0).all() and (a[..., ~causal] == 0).all()  # full support, nothing from the future
    with pytest.raises(AttnZooError, match="multiple of region"):
        CombinerLayer(32, 2, block=6, region=4)


# ------------------------------------------------------------------ MoH (M39)
def test_moh_all_heads_fixed_weights_is_mha_and_routing_shapes():
    layer = MoHLayer(32, 4, shared=1, active=2, route=False)
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(layer(x), _mha(layer, x))
    layer.route = True
    w = layer.head_weights(x)
    assert w.shape == (2, 20, 4)
    assert ((w[..., 1:] > 0).sum(-1) == 2).all() and (w[..., :1] > 0).all()  # 2 of 3 routed + the shared head
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 20))
    torch.testing.assert_close(layer(x), layer(x))  # deterministic
    assert layer.balance_loss.item() >= 1.0 - 1e-5  # Switch-style loss: 1 when balanced, more otherwise
    with pytest.raises(AttnZooError, match="active"):
        MoHLayer(32, 4, shared=1, active=4)


# ------------------------------------------------------------------ MASFormer (M40)
def test_masformer_plan_reduces_to_dense():
    assert masformer_plan(4, 1, 16) == [("sliding_window", {"window": 16}), ("sliding_window", {"window": 16}),
                                        ("exact", {}), ("sliding_window", {"window": 16})]
    assert [m for m, _ in masformer_plan(8, 2)].count("exact") == 2
    ids = torch.randint(16, (2, 32))
    dense = TinyModel(vocab=16, d_model=32, n_layers=3, mixer="exact", max_len=32, seed=1)
    for plan in (masformer_plan(3, 3, 8), masformer_plan(3, 1, 32)):  # F = all layers; w >= N
        model = TinyModel(vocab=16, d_model=32, n_layers=3, mixer=plan, max_len=32, seed=1)
        torch.testing.assert_close(model(ids), dense(ids))
    narrow = TinyModel(vocab=16, d_model=32, n_layers=3, mixer=masformer_plan(3, 1, 4), max_len=32, seed=1)
    assert not torch.allclose(narrow(ids), dense(ids))
    with pytest.raises(AttnZooError, match="full_layers"):
        masformer_plan(2, 3)


# ------------------------------------------------------------------ Sigma DiffQKV (M41)
def test_diffqkv_reduces_to_mha_and_selective_v_fetch():
    layer = DiffQKVLayer(32, 4, k_heads=4, v_heads=4)
    x = torch.randn(2, 20, 32)
    q, k, v = (_split_heads(p(x), 4) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    ref = layer.o_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    torch.testing.assert_close(layer(x), ref)
    odd = DiffQKVLayer(32, 4, k_heads=1, v_heads=2, d_k=4, d_v=12, aug_q=16)
    assert odd(x).shape == (2, 20, 32)
    assert odd.state_size(20) == 20 * (1 * 4 + 2 * 12)
    torch.testing.assert_close(odd(x, v_topk=20), odd(x))  # fetching every V row is exact
    assert not torch.allclose(odd(x, v_topk=3), odd(x))
    with pytest.raises(AttnZooError, match="lcm"):
        DiffQKVLayer(32, 4, k_heads=3, v_heads=2)


# ------------------------------------------------------------------ LongHeads (M23)
def test_longheads_within_window_is_exact_and_retrieves_beyond_it():
    q, k, v = torch.randn(3, 1, 4, 100, 16).unbind(0)
    for causal in (True, False):
        exact = az.attention(q, k, v, method="exact", causal=causal)
        torch.testing.assert_close(az.attention(q, k, v, method="longheads", block=16, chunks=7, causal=causal),
                                   exact)
    lay = az.get("longheads", block=16, chunks=3).layouts(q, k, causal=True)[0].block_mask()
    assert lay[..., 0].all() and lay.diagonal(dim1=-2, dim2=-1).all()  # first and local chunks always
    assert int(lay.sum(-1).max()) == 3
    # a passkey far outside the 48-token window: one key matches the last queries strongly
    N, D = 256, 16
    q, k = (torch.randn(2, 1, 1, N, D) * 0.1).unbind(0)
    v = torch.randn(1, 1, N, D)
    q[..., -16:, :] = k[..., 100, :] = torch.randn(D) * 3
    exact = az.attention(q, k, v, method="exact", causal=True)[..., -16:, :]
    lh = az.attention(q, k, v, method="longheads", block=16, chunks=3, causal=True)[..., -16:, :]
    window = az.attention(q, k, v, method="sliding_window", window=48, causal=True)[..., -16:, :]
    assert (lh - exact).abs().max() < 0.05 < (window - exact).abs().max()


# ------------------------------------------------------------------ every new layer trains
@pytest.mark.slow
@pytest.mark.parametrize("name", ["landmark", "sse", "combiner", "moh", "diffqkv", "sea", "sparsifiner", "seer"])
def test_a_few_training_steps_reduce_the_loss(name):
    task = make_task("mqar", pairs=4, seq_len=32, vocab_size=32)
    model = TinyModel(**task.model_config(), mixer=name, d_model=32, conv=4, seed=0,
                      mixer_params={"block": 8} if name in ("landmark", "seer") else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = task.tensors(16, seed=0)
    losses = []
    for _ in range(20):
        loss = token_loss(model(x), y) + aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(token_loss(model(x), y).item())
    assert losses[-1] < 0.9 * losses[0], losses
