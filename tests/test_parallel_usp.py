"""USP (Ulysses × ring on a 2-D mesh), packed sequences across ranks, LightSeq
checkpointing, argument agreement and numerics as P grows, on real gloo groups.

Same harness as ``test_parallel.py``: one process group per (P, slow or not)
runs every check and reports each by name. Oracles are single-process float64
(``naive`` on the full sequence, or on each document of a packed one).
"""

from __future__ import annotations

import functools
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import parallel as azp
from attnzoo.parallel import ring as ring_module
from attnzoo.parallel.layout import Layout
from attnzoo.parallel.packed import Documents
from test_parallel import _expect_error, _rel, _run_checks

SEED = 4321
TOL = 1e-5  # fp32 shards vs the fp64 oracle, max-abs relative to max|ref| (measured <= 1e-6 at P <= 8)


def _inputs(N: int, Hq: int, Hkv: int, D: int = 8, B: int = 2, seed: int = SEED):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq)]


def _oracle(q, k, v, causal: bool, cu_q=None, cu_k=None, method: str = "naive", **params):
    """Full-sequence attention, or each document's on its own (zeros for queries of a document without keys)."""
    if cu_q is None:
        return attnzoo.attention(q, k, v, method=method, causal=causal, **params)
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if cu_k[i + 1] == cu_k[i]:
            outs.append(q.new_zeros(q[:, :, qs].shape[:3] + (v.shape[3],)))
        else:
            outs.append(attnzoo.attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], method=method, causal=causal,
                                          **params))
    return torch.cat(outs, dim=2)


def _compare(rank: int, P: int, fn, N: int, Hq: int, Hkv: int, causal: bool, grad: bool, *, dtype=torch.float32,
             tol: float = TOL, oracle: dict | None = None, B: int = 2, whole: bool = False, **kwargs) -> list[float]:
    """Run ``fn`` on this rank's shards and compare with the oracle; returns [out, dq, dk, dv] errors,
    max-abs relative to the max of the shard's reference (``whole``: of the whole sequence's)."""
    q, k, v, d_out = _inputs(N, Hq, Hkv, B=B)
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    ref = _oracle(*leaves, causal, kwargs.get("cu_seqlens_q"), kwargs.get("cu_seqlens_k"), **(oracle or {}))
    mine = [azp.shard_sequence(t, rank, P).to(dtype).requires_grad_(grad) for t in (q, k, v)]
    out = fn(*mine, causal=causal, **kwargs)
    assert out.dtype == dtype and out.shape == mine[0].shape
    def error(a, full):
        shard = azp.shard_sequence(full, rank, P)
        return _rel(a, shard) * (float(shard.abs().max() / full.abs().max()) if whole and shard.numel() else 1.0)
    errors = [error(out, ref.detach())]
    if grad:
        ref.backward(d_out)
        out.backward(azp.shard_sequence(d_out, rank, P).to(dtype))
        errors += [error(a.grad, b.grad) for a, b in zip(mine, leaves)]
    label = f"{getattr(fn, 'func', fn).__name__} {getattr(fn, 'keywords', '')} N={N} Hq={Hq} Hkv={Hkv} " \
            f"causal={causal} {kwargs}"
    for name, err in zip(["out", "dq", "dk", "dv"], errors):
        assert err <= tol, f"{label}: {name} rel err {err:.2e} > {tol:.0e}"
    return errors


def _meshes(P: int) -> list[int]:
    """Ulysses degrees U of the meshes (P/U) × U to test: every divisor of P."""
    return [U for U in range(1, P + 1) if P % U == 0]


def _usp(U: int):
    return functools.partial(azp.usp_attention, ulysses=U)


# ------------------------------------------------------------------- the checks
def check_usp(causal: bool):
    """Every mesh: uneven N with GQA, KV heads fewer than U (replicated), N < P; forward and gradients."""
    def run(rank, P):
        for U in _meshes(P):
            for N, Hq, Hkv in [(4 * P + 3, 4, 2), (2 * P + 1, 4, 1), (P - 1, 4, 4)]:
                _compare(rank, P, _usp(U), N, Hq, Hkv, causal, grad=True)
    return run


def check_usp_local_method(rank, P):
    """Ring degree 1 (U = P): any registered method runs on the Ulysses side, with its parameters."""
    for method, params in [("sliding_window", {"window": 3}), ("exact_tiled", {"q_tile": 3, "k_tile": 5})]:
        _compare(rank, P, _usp(P), 4 * P + 1, 4, 2, True, grad=True, method=method, oracle={"method": method, **params},
                 **params)


def check_usp_small_tiles(rank, P):
    """Several tiles per segment pair inside the ring engine, on the 2-D mesh."""
    saved = ring_module.Q_TILE, ring_module.K_TILE
    ring_module.Q_TILE, ring_module.K_TILE = 3, 5
    try:
        _compare(rank, P, _usp(_meshes(P)[-2] if P > 1 else 1), 6 * P + 1, 4, 2, True, grad=True)
    finally:
        ring_module.Q_TILE, ring_module.K_TILE = saved


def _packings(N: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Documents crossing shard boundaries: an empty one, one of length 1; different query/key lengths
    per document (cross-attention inside each, causal bottom-right); a document whose queries see no key."""
    same = torch.tensor([0, 1, 1, N // 2 + 1, N - 2, N], dtype=torch.int32)
    return [(same, same), (torch.tensor([0, 3, N - 1, N]), torch.tensor([0, 5, N - 4, N])),
            (torch.tensor([0, 2, N]), torch.tensor([0, 0, N]))]


def check_packed(rank, P):
    """Packed sequences equal per-document single-process attention, for every algorithm, both masks."""
    N = 4 * P + 3
    algos = [azp.ring_attention, azp.token_ring_attention, azp.ulysses_attention] + [_usp(U) for U in _meshes(P)]
    for causal in (False, True):
        for cu_q, cu_k in _packings(N):
            for fn in algos:
                _compare(rank, P, fn, N, 4, 2, causal, grad=True, B=1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    # a non-exact local method on each document (Ulysses, and USP with ring degree 1)
    cu = torch.tensor([0, 5, N])
    for fn in (azp.ulysses_attention, _usp(P)):
        _compare(rank, P, fn, N, 4, 2, True, grad=True, B=1, cu_seqlens_q=cu, cu_seqlens_k=cu,
                 method="sliding_window", window=3, oracle={"method": "sliding_window", "window": 3})


def check_packed_rejects_bad_offsets(rank, P):
    """The single-process API's checks, with the call's name, on every rank alike (the offsets agree)."""
    q = torch.randn(1, P, 3, 4)
    N = 3 * P

    def cu(*offsets):
        return torch.tensor(offsets)
    for fn in (azp.ring_attention, azp.ulysses_attention, _usp(1)):
        name = getattr(fn, "func", fn).__name__
        _expect_error(lambda: fn(q, q, q, cu_seqlens_q=cu(0, 2, 1, N), cu_seqlens_k=cu(0, 1, 2, N)),
                      attnzoo.AttnZooError, name, "cu_seqlens_q", "non-decreasing")
        _expect_error(lambda: fn(q, q, q, cu_seqlens_q=cu(0, N - 1), cu_seqlens_k=cu(0, N)), attnzoo.AttnZooError,
                      "cu_seqlens_q", str(N), "global offsets")
        _expect_error(lambda: fn(q, q, q, cu_seqlens_q=cu(0, N), cu_seqlens_k=cu(0, 1, N)), attnzoo.AttnZooError,
                      "cu_seqlens_k", "2 offsets")
        _expect_error(lambda: fn(q, q, q, cu_seqlens_q=cu(0, N)), attnzoo.AttnZooError, "cu_seqlens_k", "None")
        _expect_error(lambda: fn(q, q, q, cu_seqlens_q=torch.tensor([0.0, N]), cu_seqlens_k=cu(0, N)),
                      attnzoo.AttnZooError, "cu_seqlens_q", "int32")
        two = torch.randn(2, P, 3, 4)
        _expect_error(lambda: fn(two, two, two, cu_seqlens_q=cu(0, N), cu_seqlens_k=cu(0, N)), attnzoo.AttnZooError,
                      "batch 2")


def check_arguments_agree(rank, P):
    """Arguments that differ across ranks are reported on every rank, by name, without a timeout."""
    q = torch.randn(1, P, 3, 4)
    N = 3 * P
    _expect_error(lambda: azp.ring_attention(q, q, q, scale=0.5 + rank), azp.ParallelError, "scale differs")
    cu = torch.tensor([0, 1 + rank, N])
    _expect_error(lambda: azp.token_ring_attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu), azp.ParallelError,
                  "cu_seqlens_q differs")
    _expect_error(lambda: azp.ulysses_attention(q, q, q, method="sliding_window", window=2 + rank), azp.ParallelError,
            "params differs")
    _expect_error(lambda: azp.usp_attention(q, q, q, ulysses=1 if rank else P), azp.ParallelError, "ulysses differs")


def check_usp_rejects(rank, P):
    q = torch.randn(1, P, 3, 4)
    _expect_error(lambda: azp.usp_attention(q, q, q, ulysses=P + 1), attnzoo.AttnZooError, "ulysses", f"P={P}")
    _expect_error(lambda: azp.usp_attention(q, q, q, ulysses=1, method="sliding_window", window=2),
                  attnzoo.AttnZooError, "method", "'exact'")
    odd = torch.randn(1, 3, 3, 4)
    _expect_error(lambda: azp.usp_attention(odd, odd, odd, ulysses=2), attnzoo.AttnZooError, "Hq=3", "ulysses=2")


class _Block(torch.nn.Module):
    """A transformer block calling the sequence-parallel attention twice (two attention sub-layers, so the
    replay order inside one checkpointed region is exercised), then an MLP."""

    def __init__(self, attend, d: int = 16, heads: int = 4):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, 3 * d) for _ in range(2))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):  # (B, n, d): this rank's positions
        B, n, d = x.shape
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = qkv(x).view(B, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + proj(self.attend(q, k, v, causal=True).transpose(1, 2).reshape(B, n, d))
        return x + self.mlp(x)


def _layer_grads(rank: int, P: int, attend, wrap: str) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(SEED)  # the same weights on every rank
    block = _Block(attend)
    layer = {"none": block, "lightseq": azp.LightSeqCheckpoint(block),
             "plain": azp.LightSeqCheckpoint(block, lightseq=False)}[wrap]
    x = azp.shard_sequence(torch.randn(2, 4 * P + 1, 16), rank, P, dim=1).requires_grad_()
    stats = azp.comm_stats()
    stats.reset()
    layer(x).square().sum().backward()
    moved = sum(b for op, b in stats.sent_by_op.items() if op.startswith("ring") or op.startswith("token ring"))
    return [x.grad] + [p.grad for p in block.parameters()], moved


def check_lightseq(rank, P):
    """LightSeq checkpointing gives the same gradients as no checkpointing and as plain checkpointing,
    and moves no more ring traffic than no checkpointing (plain checkpointing reruns the forward ring)."""
    for attend in (azp.ring_attention, azp.token_ring_attention, _usp(1), _usp(P)):
        (free, moved_free), (kept, moved_kept), (plain, moved_plain) = (
            _layer_grads(rank, P, attend, wrap) for wrap in ("none", "lightseq", "plain"))
        for a, b, c in zip(free, kept, plain):
            assert torch.equal(a, b), f"{attend}: LightSeq gradient differs by {float((a - b).abs().max()):.2e}"
            assert torch.equal(a, c), f"{attend}: plain checkpoint gradient differs by {float((a - c).abs().max())}"
        assert moved_kept == moved_free, (moved_kept, moved_free)
        if P > 1 and getattr(attend, "keywords", {}).get("ulysses") != P:  # a ring with more than one rank
            assert moved_plain > moved_kept, (moved_plain, moved_kept)


def check_bytes(rank, P):
    """USP's counted bytes equal the analytic formula for every mesh (non-causal, N divisible by P)."""
    B, Hq, Hkv, D, n = 2, 4, 2, 8, 6
    q, k, v, _ = _inputs(n * P, Hq, Hkv, D=D, B=B)
    shards = [azp.shard_sequence(t, rank, P).float() for t in (q, k, v)]
    for U in _meshes(P):
        if Hq % U:
            continue
        R, kv = P // U, Hkv * (U // math.gcd(Hkv, U))
        expected = ((U - 1) * B * n * (2 * Hq + 2 * kv) * D * 4 // U  # Ulysses: q, k, v in and out back
                    + (R - 1) * B * n * kv * 2 * D * 4)  # ring over the column: U·n positions of kv/U heads
        stats = azp.comm_stats()
        stats.reset()
        azp.usp_attention(*shards, ulysses=U)
        payload = stats.bytes_sent - stats.sent_by_op.get("shape check", 0)
        assert payload == expected, f"U={U}: counted {payload} bytes, expected {expected} ({stats.sent_by_op})"


#: Bounds on the max-abs error relative to max|ref| over the whole sequence (the same yardstick at every P),
#: against the fp64 oracle, for the data below (N=67, Hq=8, Hkv=2, D=8, causal, seed 4321), measured at
#: P = 1, 2, 4, 8 by ``python benchmarks/parallel.py --tables numerics --numerics-shape 67 8 2 8``:
#: fp32 shards  <= 3.6e-7 forward, 7.8e-7 gradients, flat in P (every merge and dK/dV sum is fp32);
#: bf16 shards  <= 4.7e-3 forward, 9.4e-3 gradients (bf16 rounding of inputs and outputs), flat in P.
NUMERIC_BOUNDS = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def check_numerics(rank, P):
    """Forward and gradient error against fp64 stays within the measured bound at every P (fp32 merges)."""
    algos = [azp.ring_attention, azp.token_ring_attention, azp.ulysses_attention, _usp(2 if P % 2 == 0 else 1)]
    for dtype, tol in NUMERIC_BOUNDS.items():
        for fn in algos:
            _compare(rank, P, fn, 67, 8, 2, True, grad=True, dtype=dtype, tol=tol, whole=True)


CHECKS = {
    "usp_full": check_usp(False),
    "usp_causal": check_usp(True),
    "usp_local_method": check_usp_local_method,
    "usp_small_tiles": check_usp_small_tiles,
    "usp_rejects": check_usp_rejects,
    "packed": check_packed,
    "packed_rejects_bad_offsets": check_packed_rejects_bad_offsets,
    "arguments_agree": check_arguments_agree,
    "lightseq": check_lightseq,
    "bytes": check_bytes,
    "numerics": check_numerics,
}

#: (P, check, slow): every check at P = 2 and 4 (a few at 4 slow); numerics also at P = 1 and (slow) P = 8
CASES = ([(P, n, P == 4 and n in {"usp_small_tiles", "packed_rejects_bad_offsets", "usp_local_method"})
          for P in (2, 4) for n in CHECKS] + [(1, "numerics", False), (8, "numerics", True)])


@pytest.fixture(scope="module")
def outcomes():
    cache: dict[tuple[int, bool], list[dict]] = {}

    def get(P: int, slow: bool) -> list[dict]:
        if (P, slow) not in cache:
            names = [n for p, n, s in CASES if p == P and s == slow]
            cache[P, slow] = azp.run_local(_run_checks, P, names, __name__, timeout=30.0, wall_timeout=400.0)
        return cache[P, slow]
    return get


@pytest.mark.parametrize("P, name, slow", [
    pytest.param(P, name, slow, marks=[pytest.mark.slow] if slow else []) for P, name, slow in CASES])
def test_multi_process(outcomes, P, name, slow):
    failures = {rank: r[name] for rank, r in enumerate(outcomes(P, slow)) if r[name] is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


# ------------------------------------------------------------ failure behaviour
def _usp_rank_exits(rank: int, P: int, mid_call: bool) -> tuple[str, float]:
    """The last rank leaves before the call, or inside it (at its first local attention, after the mesh
    exists); every other rank must raise ParallelError within the group timeout."""
    azp.usp_mesh(2)  # the mesh (collective to create) exists before anyone leaves
    dist.barrier()
    if rank == P - 1:
        if not mid_call:
            os._exit(0)
        ring_module._attend_block = lambda *a, **kw: os._exit(0)
    q = torch.randn(1, 4, 8, 8)
    start = time.monotonic()
    try:
        azp.usp_attention(q, q, q, ulysses=2, causal=True)
    except azp.ParallelError as e:
        return str(e), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.parametrize("mid_call", [False, True])
def test_a_rank_that_exits_makes_the_others_raise_usp(mid_call):
    P, timeout = 4, 10.0
    results = azp.run_local(_usp_rank_exits, P, mid_call, timeout=timeout, wall_timeout=90.0, missing_ok=True)
    assert results[-1] is None
    for rank, (message, elapsed) in enumerate(results[:-1]):
        assert message.startswith("usp_attention: "), f"rank {rank}: {message}"
        assert "another rank died" in message and "timeout" in message
        assert ("shape check" in message) != mid_call, message
        assert elapsed < timeout + 2.0, f"rank {rank} took {elapsed:.1f} s"


# ------------------------------------------------------------ single-process checks
def _positions(segments) -> list[int]:
    return [s + i for s, n in segments for i in range(n)]


@pytest.mark.parametrize("R, U", [(1, 4), (2, 2), (4, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("N", [0, 5, 13, 24])
def test_mesh_layouts(R, U, N):
    """USP's layouts: the zig-zag rows spread over the mesh group back to the same rows in the same order,
    every position held once; the contiguous shards grouped by row are each row's contiguous range."""
    rows = [[i * U + u for u in range(U)] for i in range(R)]
    ring = Layout.zigzag(N, R)
    spread = ring.spread(rows)
    for i in range(R):
        assert _positions(spread.grouped(rows).segments[i]) == _positions(ring.segments[i])
    assert sorted(_positions(s for segs in spread.segments for s in segs)) == list(range(N))
    contiguous = Layout.contiguous(N, R * U)
    at = 0
    for i, row in enumerate(rows):
        length = sum(contiguous.length(r) for r in row)
        assert _positions(contiguous.grouped(rows).segments[i]) == list(range(at, at + length))
        at += length


def _cuts(draw, N: int, most: int) -> list[int]:
    return [0] + sorted(draw(st.lists(st.integers(0, N), max_size=most))) + [N]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), N=st.integers(0, 14), causal=st.booleans())
def test_documents_pieces_cover_exactly_the_visible_pairs(data, N, causal):
    """Per (query, key) position pair: seen through exactly one piece when the packed rule makes it visible
    (same document; causal bottom-right inside it), through none otherwise, for any documents and any
    cutting of the sequence into held segments."""
    cu_q = _cuts(data.draw, N, 4)
    cu_k = _cuts(data.draw, N, len(cu_q) - 2)
    while len(cu_k) < len(cu_q):
        cu_k.insert(-1, N)
    docs = Documents.from_args("t", torch.tensor(cu_q), torch.tensor(cu_k), N, torch.zeros(1, 1, N, 1))
    bounds = _cuts(data.draw, N, 4)
    segs = [(a, b - a) for a, b in zip(bounds, bounds[1:])]
    seen = torch.zeros(N, N, dtype=torch.int64)
    for qs in segs:
        for ks in segs:
            for q0, q1, k0, k1, qo, ko in docs.pieces(qs, ks, causal):
                for i in range(q1 - q0):
                    for j in range(k1 - k0):
                        seen[qs[0] + q0 + i, ks[0] + k0 + j] += int(not causal or ko + j <= qo + i)
    expected = torch.zeros(N, N, dtype=torch.int64)
    for d in range(len(docs)):
        lq, lk = docs.q[d + 1] - docs.q[d], docs.k[d + 1] - docs.k[d]
        for a in range(lq):
            for b in range(lk):
                expected[docs.q[d] + a, docs.k[d] + b] = int(not causal or b <= a + lk - lq)
    assert torch.equal(seen, expected)


def test_usp_refuses_without_process_group():
    q = torch.randn(1, 2, 4, 8)
    _expect_error(lambda: azp.usp_attention(q, q, q, ulysses=1), attnzoo.AttnZooError, "init_process_group")


def test_lightseq_checkpoint_rejects_non_module():
    _expect_error(lambda: azp.LightSeqCheckpoint(lambda x: x), attnzoo.AttnZooError, "layer", "Module")
