"""Vision mixers (attnzoo.layers.vision) against references written from their definitions, plus a few
training steps of every mixer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import grid as G
from attnzoo.layers.linear import _merge_heads, _split_heads
from attnzoo.layers.vision import (AFF, ECA, MIXERS, AdditiveMixer, BiFormerAttention, CascadedGroupAttention,
                                   ChannelAttention, DiNAAttention, EchoAttention, FITAttention,
                                   FlatFormerAttention, GlobalAttention, GnConv, HiLoAttention, PoolMixer, RxTLayer,
                                   ScatterFormerAttention, SHViTAttention, SwinAttention, essa_attention,
                                   lightnet_attention, make_mixer, titans_memory)
from attnzoo.layers.vision.conv import eca_kernel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _x(n, c=16, b=2):
    return torch.randn(b, n, c, dtype=torch.float64)


def _mhsa(q, k, v, bias=None, mask=None):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return s.softmax(-1) @ v


# -------------------------------------------------------------------- Swin
def test_swin_one_window_without_shift_is_global_attention_plus_bias():
    H, W = 5, 5
    m = SwinAttention(16, 4, window=5).double()
    with torch.no_grad():
        m.bias_table.normal_()
    x = _x(H * W)
    q, k, v = m.split(x)
    r, c = torch.arange(25) // 5, torch.arange(25) % 5
    idx = (r[:, None] - r[None] + 4) * 9 + (c[:, None] - c[None] + 4)
    bias = m.bias_table[idx].permute(2, 0, 1)
    ref = m.proj(_merge_heads(_mhsa(q, k, v, bias)))
    torch.testing.assert_close(m(x, (H, W)), ref)


@pytest.mark.parametrize("grid,window,shift", [((8, 8), 4, 2), ((7, 10), 3, 1), ((6, 5), 4, 0)])
def test_swin_without_bias_equals_window2d(grid, window, shift):
    m = SwinAttention(16, 2, window=window, shift=shift).double()
    with torch.no_grad():
        m.bias_table.zero_()
    x = _x(grid[0] * grid[1])
    q, k, v = m.split(x)
    ref = m.proj(_merge_heads(az.attention(q, k, v, method="window2d", grid=grid, window=window, shift=shift)))
    torch.testing.assert_close(m(x, grid), ref)


# ----------------------------------------------------------------- BiFormer
@pytest.mark.parametrize("grid", [(6, 6), (5, 7)])  # (5, 7): padded to whole regions, the padding masked
def test_biformer_all_regions_is_full_attention_plus_lce(grid):
    m = BiFormerAttention(16, 2, regions=2, topk=4).double()
    x = _x(grid[0] * grid[1])
    q, k, v = m.split(x)
    lce = G.from_channels_first(m.lce(G.to_channels_first(_merge_heads(v), grid)))
    torch.testing.assert_close(m(x, grid), m.proj(_merge_heads(_mhsa(q, k, v)) + lce))


# --------------------------------------------------------------------- HiLo
def test_hilo_all_lofi_without_pooling_is_mhsa():
    m = HiLoAttention(16, 4, alpha=1.0, window=1).double()
    x = _x(30)
    q = _split_heads(m.lo_q(x), 4)
    k, v = (_split_heads(t, 4) for t in m.lo_kv(x).chunk(2, -1))
    torch.testing.assert_close(m(x, (5, 6)), m.proj(_merge_heads(_mhsa(q, k, v))))


def test_hilo_groups_match_their_dense_masked_references():
    m = HiLoAttention(16, 4, alpha=0.5, window=2).double()
    grid = (5, 6)
    x = _x(30)
    q, k, v = (_split_heads(t, 2) for t in m.hi_qkv(x).chunk(3, -1))
    gid = G.window_ids(grid, 2)
    hi = _mhsa(q, k, v, mask=gid[:, None] == gid[None])
    pooled = torch.stack([x.view(2, 5, 6, 16)[:, 2 * a:2 * a + 2, 2 * b:2 * b + 2].mean((1, 2))
                          for a in range(3) for b in range(3)], 1)  # ceil-mode pooling: the last row is 1 high
    lq = _split_heads(m.lo_q(x), 2)
    lk, lv = (_split_heads(t, 2) for t in m.lo_kv(pooled).chunk(2, -1))
    lo = _mhsa(lq, lk, lv)
    torch.testing.assert_close(m(x, grid), m.proj(_merge_heads(torch.cat([hi, lo], 1))))


# -------------------------------------------------------------------- DaViT
def test_channel_attention_matches_einsum_and_is_permutation_equivariant():
    m = ChannelAttention(16, 4).double()
    x = _x(20)
    q, k, v = m.split(x)  # (B, G, N, Cg)
    a = torch.einsum("bgnc,bgnd->bgcd", q, k).mul(4 ** -0.5).softmax(-1)
    y = torch.einsum("bgnd,bgcd->bgnc", v, a)
    torch.testing.assert_close(m(x), m.proj(_merge_heads(y)))
    perm = torch.randperm(20)
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm])


# ------------------------------------------------------------- EfficientViT
def test_cascaded_group_attention_matches_a_loop_and_the_order_matters():
    m = CascadedGroupAttention(16, 4, qk_dim=8, bias_side=6).double()
    with torch.no_grad():
        m.attention_bias.normal_()
    grid = (4, 5)
    x = _x(20)
    r, c = torch.arange(20) // 5, torch.arange(20) % 5
    offset = (r[:, None] - r[None]).abs() * 6 + (c[:, None] - c[None]).abs()
    outs, prev = [], torch.zeros(2, 20, 4, dtype=torch.float64)
    for j in range(4):
        xj = x[..., 4 * j:4 * j + 4] + prev
        w = m.qkv[j]
        qkv = xj @ w.weight.T + w.bias
        q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
        q = m.dw[j](q.transpose(1, 2).reshape(2, 8, 4, 5)).reshape(2, 8, 20).transpose(1, 2)
        prev = (q @ k.transpose(1, 2) / math.sqrt(8) + m.attention_bias[j][offset]).softmax(-1) @ v
        outs.append(prev)
    torch.testing.assert_close(m(x, grid), m.proj(torch.cat(outs, -1)))
    m(x, grid).sum().backward()
    assert m.attention_bias.grad.abs().sum() > 0  # the bias is learned
    with pytest.raises(az.AttnZooError, match="bias_side"):
        m(_x(49), (7, 7))
    swapped = CascadedGroupAttention(16, 4, qk_dim=8, bias_side=6).double()
    swapped.load_state_dict(m.state_dict())
    with torch.no_grad():
        for p in (swapped.qkv, swapped.dw):
            p[0], p[1] = p[1], p[0]
    assert not torch.allclose(swapped(x, grid), m(x, grid))


# --------------------------------------------------------------- FlatFormer
def test_flatformer_is_inverse_permuted_block_diagonal_attention():
    m = FlatFormerAttention(16, 2, group=8, window=3, axis=1).double()
    grid = (6, 7)
    x = _x(42)
    order = m.order(grid, 42, x.device)
    q, k, v = (t[:, :, order] for t in m.split(x))
    blk = torch.arange(42) // 8
    y = _mhsa(q, k, v, mask=blk[:, None] == blk[None])[:, :, torch.argsort(order)]
    torch.testing.assert_close(m(x, grid), m.proj(_merge_heads(y)))
    m.group = 42  # one group: global attention
    q, k, v = m.split(x)
    torch.testing.assert_close(m(x, grid), m.proj(_merge_heads(_mhsa(q, k, v))))


def test_flatformer_takes_point_coordinates():
    m = FlatFormerAttention(16, 2, group=8, window=4).double()
    coords = torch.randint(0, 30, (50, 2))
    y = m(_x(50), coords)
    assert y.shape == (2, 50, 16) and torch.isfinite(y).all()


# ---------------------------------------------------------------------- ECA
def test_eca_kernel_rule_and_k1_is_per_channel_gating():
    assert [eca_kernel(c) for c in (64, 256, 2048)] == [3, 5, 7]
    m = ECA(16, kernel=1).double()
    x = _x(12)
    w = m.conv.weight.item()
    ref = torch.stack([x[..., c] * torch.sigmoid(w * x[..., c].mean(1, keepdim=True)) for c in range(16)], -1)
    torch.testing.assert_close(m(x), ref)


# ------------------------------------------------------------------ CAS-ViT
def test_additive_mixer_mixes_values_only_pointwise():
    """O = Γ(Φ(Q)+Φ(K)) ⊙ V: no pairwise token products, so a change of V at one pixel moves only that pixel."""
    m = AdditiveMixer(16).double()
    x = _x(20)
    base = m(x, (4, 5))
    delta = torch.zeros(2, 20, 48, dtype=torch.float64)
    delta[:, 7, 32:] = 1.0
    h = m.qkv.register_forward_hook(lambda mod, inp, out: out + delta)
    moved = (m(x, (4, 5)) - base).abs().amax((0, 2))
    h.remove()
    assert moved[7] > 1e-6 and torch.all(moved[torch.arange(20) != 7] == 0)


# ------------------------------------------------------------- ScatterFormer
def test_scatterformer_equals_per_window_linear_attention():
    grid, win = (6, 7), 3
    q, k, v = (torch.randn(2, 2, 42, 8, dtype=torch.float64) for _ in range(3))
    from attnzoo.layers.vision import windowed_linear_attention
    scattered = torch.randint(0, 5, (42,), generator=torch.Generator().manual_seed(0)) * 2  # odd ids unused
    for gid in (G.window_ids(grid, win), scattered):
        out = windowed_linear_attention(q, k, v, gid)
        for w in gid.unique():
            sel = gid == w
            ref = az.attention(q[:, :, sel], k[:, :, sel], v[:, :, sel], method="linear", causal=False)
            torch.testing.assert_close(out[:, :, sel], ref)
    m = ScatterFormerAttention(16, 2, window=3).double()
    assert m(_x(42), grid).shape == (2, 42, 16)


# ---------------------------------------------------------------------- ESSA
def test_essa_matches_the_explicit_kernel_matrix():
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    qh = F.normalize(q - q.mean(-1, keepdim=True), dim=-1)
    kh = F.normalize(k - k.mean(-1, keepdim=True), dim=-1)
    a = 1 + qh @ kh.transpose(-1, -2)
    ref = (a @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(essa_attention(q, k, v, eps=0.0), ref)


# ------------------------------------------------------------------ LightNet
def test_lightnet_recurrent_chunked_and_prefix_softmax_agree():
    q, f, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    w = f.unsqueeze(-1)  # (B, H, N, Dk, 1): exp(f_j) weights per channel
    prefix = torch.stack([(w[:, :, :t + 1].softmax(2) * v[:, :, :t + 1].unsqueeze(-2)).sum(2)
                          for t in range(40)], 2)  # (B, H, N, Dk, Dv)
    ref = (F.silu(q).unsqueeze(-2) @ prefix).squeeze(-2)
    torch.testing.assert_close(lightnet_attention(q, f, v, causal=True, chunk=16), ref)
    torch.testing.assert_close(lightnet_attention(q, f, v, causal=True, form="recurrent"), ref)
    glob = (w.softmax(2) * v.unsqueeze(-2)).sum(2, keepdim=True)
    torch.testing.assert_close(lightnet_attention(q, f, v, causal=False), (F.silu(q).unsqueeze(-2) @ glob).squeeze(-2))


# ----------------------------------------------------------------------- DiNA
def test_dina_kernel_covering_the_grid_is_global_attention():
    m = DiNAAttention(16, 2, kernel=5, dilation=1).double()
    x = _x(25)
    q, k, v = m.split(x)
    torch.testing.assert_close(m(x, (5, 5)), m.proj(_merge_heads(_mhsa(q, k, v))))
    auto = DiNAAttention(16, 2, kernel=3, dilation=None).double()
    n_idx = G.neighborhood_index((9, 9), 3, 3)
    mask = torch.zeros(81, 81, dtype=torch.bool)
    mask[torch.arange(81)[:, None], n_idx] = True
    x = _x(81)
    q, k, v = auto.split(x)
    torch.testing.assert_close(auto(x, (9, 9)), auto.proj(_merge_heads(_mhsa(q, k, v, mask=mask))))


# ---------------------------------------------------------------------- SHViT
def test_shvit_with_all_channels_is_single_head_attention():
    m = SHViTAttention(16, partial=16, qk_dim=8).double()
    x = _x(20)
    q, k, v = m.qkv(x).split([8, 8, 16], -1)
    torch.testing.assert_close(m(x), m.proj((q @ k.transpose(1, 2) / math.sqrt(8)).softmax(-1) @ v))
    part = SHViTAttention(16, partial=8).double()
    x2 = x.clone()
    x2[..., 8:] += 1.0  # the untouched channels pass straight to the projection
    diff = part(x2) - part(x)
    torch.testing.assert_close(diff, part.proj.weight[:, 8:].sum(1).expand_as(diff))


# ------------------------------------------------------------------------ FIT
def test_fit_one_group_without_latents_is_a_plain_attention_layer():
    m = FITAttention(16, 2, group=64, latents=0).double()
    x = _x(30)
    q, k, v = m.local.split(x)
    torch.testing.assert_close(m(x), m.local.proj(_merge_heads(_mhsa(q, k, v))))
    with_lat = FITAttention(16, 2, group=8, latents=2).double()
    y = with_lat(x)
    # the global step reaches across groups: a change in group 0 moves outputs of group 3
    x2 = x.clone()
    x2[:, 0] += 1
    assert (with_lat(x2) - y)[:, 24:].abs().max() > 1e-6


# --------------------------------------------------------------------- HorNet
def test_gnconv_order_one_is_a_gated_depthwise_conv():
    m = GnConv(8, order=1, kernel=3).double()
    grid = (4, 5)
    x = _x(20, c=8)
    p0, q0 = m.proj_in(x).split([8, 8], -1)
    img = q0.view(2, 4, 5, 8)
    pad = F.pad(img, (0, 0, 1, 1, 1, 1))
    conv = torch.zeros_like(img)
    wt = m.dw.weight[:, 0]  # (C, 3, 3)
    for a in range(3):
        for b in range(3):
            conv = conv + pad[:, a:a + 4, b:b + 5] * wt[:, a, b]
    conv = conv + m.dw.bias
    torch.testing.assert_close(m(x, grid), m.proj_out(p0 * conv.reshape(2, 20, 8)))


# ------------------------------------------------------------------------ AFF
def test_aff_equals_circular_convolution_with_the_equivalent_kernel():
    m = AFF(8, groups=4).double()
    grid = (6, 5)
    x = _x(30, c=8)
    xc = G.to_channels_first(x, grid)
    h = torch.fft.ifft2(m.mask(torch.fft.fft2(xc, norm="ortho"))).real  # (B, C, H, W)
    ref = torch.zeros_like(xc)
    for a in range(6):
        for b in range(5):
            ref = ref + h[..., a:a + 1, b:b + 1] * torch.roll(xc, shifts=(a, b), dims=(2, 3))
    torch.testing.assert_close(m.filter(x, grid), G.from_channels_first(ref))


# ------------------------------------------------------------------ PoolFormer
def test_poolformer_constant_input_gives_zero():
    x = torch.full((2, 35, 4), 3.25, dtype=torch.float64)
    assert torch.all(PoolMixer()(x, (5, 7)).abs() < 1e-12)


# -------------------------------------------------------------------- EchoAtt
def test_echoatt_without_sharing_is_the_base_stack_and_shared_layers_reuse_the_map():
    base = EchoAttention(16, 2, depth=3, shared=()).double()
    x = _x(12)

    def reference(model, reuse):
        y, amap = x, None
        for i in range(3):
            h = model.norms[i](y)
            v = _split_heads(model.v[i](h), 2)
            if i not in reuse:
                q, k = (_split_heads(t, 2) for t in model.qk[i](h).chunk(2, -1))
                amap = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
            y = y + model.proj[i](_merge_heads(amap @ v))
        return y - x

    torch.testing.assert_close(base(x), reference(base, ()))
    shared = EchoAttention(16, 2, depth=3, shared=(1,)).double()
    assert shared.qk[1] is None
    torch.testing.assert_close(shared(x), reference(shared, (1,)))


# --------------------------------------------------------------------- Titans
def _titans_loop(q, k, v, theta, alpha, mem, chunk, eta=None):
    """Token by token, gradients at the chunk-start memory: S_t = η_t S_{t-1} - θ_t ∇‖k_t M_c - v_t‖²,
    M_t = (1-α_t)M_{t-1} + S_t."""
    outs, M, S = [], mem.clone(), torch.zeros_like(mem)
    for t in range(q.shape[2]):
        if t % chunk == 0:
            Mc = M.clone()
        kt, vt = k[:, :, t:t + 1], v[:, :, t:t + 1]
        grad = 2 * kt.transpose(-1, -2) @ (kt @ Mc - vt)
        S = (0 if eta is None else eta[:, :, t:t + 1]) * S - theta[:, :, t:t + 1] * grad
        M = (1 - alpha[:, :, t:t + 1]) * M + S
        outs.append(q[:, :, t:t + 1] @ M)
    return torch.cat(outs, 2), M, S


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_titans_chunked_memory_equals_the_token_loop(chunk, momentum):
    g = torch.Generator().manual_seed(chunk)
    q, k, v = (torch.randn(1, 2, 23, 4, dtype=torch.float64, generator=g) for _ in range(3))
    k = F.normalize(k, dim=-1)
    theta, alpha, eta = (torch.rand(1, 2, 23, 1, dtype=torch.float64, generator=g) * s for s in (0.5, 0.2, 0.9))
    eta = eta if momentum else None
    mem = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g)
    y, m_end, s_end = titans_memory(q, k, v, theta, alpha, mem, chunk, eta=eta)
    ref, ref_m, ref_s = _titans_loop(q, k, v, theta, alpha, mem, chunk, eta)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(m_end, ref_m)
    torch.testing.assert_close(s_end, ref_s)
    if 12 % chunk == 0:  # carrying (M, S) across two calls equals one call (the split on a chunk boundary)
        first = [t[:, :, :12] for t in (q, k, v, theta, alpha)]
        rest = [t[:, :, 12:] for t in (q, k, v, theta, alpha)]
        y1, m1, s1 = titans_memory(*first, mem, chunk, eta=None if eta is None else eta[:, :, :12])
        y2, m2, _ = titans_memory(*rest, m1, chunk, eta=None if eta is None else eta[:, :, 12:], surprise=s1)
        torch.testing.assert_close(torch.cat([y1, y2], 2), y)
        torch.testing.assert_close(m2, m_end)


def test_titans_with_zero_step_keeps_its_memory():
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    zero = torch.zeros(1, 2, 10, 1, dtype=torch.float64)
    mem = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    for eta in (None, torch.full_like(zero, 0.9)):
        y, m_end, _ = titans_memory(q, k, v, zero, zero, mem, 4, eta=eta)
        torch.testing.assert_close(m_end, mem)
        torch.testing.assert_close(y, q @ mem)


# ------------------------------------------------------------------------ RxT
def test_rxt_with_empty_memory_is_a_stateless_causal_decoder():
    m = RxTLayer(16, 2, slots=4).double()
    x = _x(10)
    y = m(x)
    torch.testing.assert_close(m(x, stm=torch.zeros(2, 0, 16, dtype=torch.float64)), y)
    q, k, v = m.self_attn.split(x)
    torch.testing.assert_close(y, m.self_attn.proj(_merge_heads(_mhsa(q, k, v, mask=torch.ones(10, 10).tril().bool()))))
    stm = m.initial_memory(2).double()
    with_mem = m(x, stm=stm)
    assert not torch.allclose(with_mem, y)
    x2 = x.clone()
    x2[:, 6:] += 1  # causal within the turn
    torch.testing.assert_close(m(x2, stm=stm)[:, :6], with_mem[:, :6])
    new = m.update(stm, x)
    assert new.shape == stm.shape
    u = m.mem_attn.attend(stm, x + m.encoder(x))
    lo, hi = torch.minimum(stm, u), torch.maximum(stm, u)
    assert torch.all(new >= lo - 1e-12) and torch.all(new <= hi + 1e-12)  # gated residual: between STM and U


# ------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_a_few_training_steps_reduce_the_loss(name):
    grid, dim = (8, 8), 16
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, dim, generator=gen)
    y = (x[:, :32].mean((1, 2)) > x[:, 32:].mean((1, 2))).long()  # needs mixing across the grid
    mixer = make_mixer(name, dim, 2)
    head = torch.nn.Linear(dim, 2)
    params = list(mixer.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)

    def loss():
        h = x + mixer(x, grid)
        return F.cross_entropy(head(h.mean(1)), y)

    first = loss().item()
    for _ in range(10):
        opt.zero_grad()
        l_ = loss()
        l_.backward()
        opt.step()
    assert loss().item() < first


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_on_a_grid_its_windows_do_not_divide_has_finite_gradients(name):
    grid, dim = (6, 7), 16  # 4×4 windows, 2×2 regions/pools and 16-token groups do not divide it
    mixer = make_mixer(name, dim, 2).double()
    x = torch.randn(2, 42, dim, dtype=torch.float64, requires_grad=True)
    y = mixer(x, grid)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in mixer.parameters()]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert not grads or any(g is not None and g.abs().sum() > 0 for g in grads)  # PoolFormer has no parameters


def test_mixer_errors():
    with pytest.raises(az.AttnZooError, match="mixer"):
        make_mixer("nope", 16)
    with pytest.raises(az.AttnZooError, match="grid"):
        SwinAttention(16, 2, window=4)(torch.randn(1, 30, 16), (5, 5))
    with pytest.raises(az.AttnZooError, match="shift"):
        SwinAttention(16, 2, window=4, shift=4)
