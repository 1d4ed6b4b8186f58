"""Sequence-parallel attention (attnzoo.parallel) on real gloo process groups.

Every multi-process check runs inside ONE process group per world size (the
workers start once per P and run every check in turn; each check's outcome
comes back by name and becomes its own test below), so the suite pays the
process start-up once per P. The oracle is single-process ``naive`` attention
in float64 on the full sequence, computed on every rank from the same seed;
fp32 results must match it to 1e-5 relative (max-abs / max|ref|).
"""

from __future__ import annotations

import importlib
import math
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import parallel as azp
from attnzoo.parallel import ring as ring_module
from attnzoo.parallel import ulysses as ulysses_module
from attnzoo.parallel.launch import _context
from attnzoo.parallel.layout import Layout, _plan, shard_sizes

SEED = 1234
TOL = 1e-5
ALGOS = {"ring": azp.ring_attention, "token_ring": azp.token_ring_attention, "ulysses": azp.ulysses_attention}


# ------------------------------------------------------------ helpers (run inside the workers)
def _full_inputs(N: int, Hq: int, Hkv: int, D: int = 8, Dv: int = 8, B: int = 2, seed: int = SEED):
    """The same full-sequence q, k, v, d_out on every rank (float64)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, d, generator=g, dtype=torch.float64)
            for h, d in ((Hq, D), (Hkv, D), (Hkv, Dv), (Hq, Dv))]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs error relative to max|ref| (0 for empty tensors)."""
    a, ref = a.detach().double(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def _compare(rank: int, P: int, algo: str, N: int, Hq: int, Hkv: int, causal: bool, grad: bool, **params) -> None:
    q, k, v, d_out = _full_inputs(N, Hq, Hkv)
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    ref = attnzoo.attention(*leaves, method="naive", causal=causal)
    mine = [azp.shard_sequence(t, rank, P).float().requires_grad_(grad) for t in (q, k, v)]
    out = ALGOS[algo](*mine, causal=causal, **params)
    assert out.dtype == torch.float32 and out.shape == mine[0].shape[:3] + (d_out.shape[3],)
    err = _rel(out, azp.shard_sequence(ref, rank, P))
    assert err <= TOL, f"{algo} forward N={N} Hq={Hq} Hkv={Hkv} causal={causal}: rel err {err:.2e}"
    if grad:
        ref.backward(d_out)
        out.backward(azp.shard_sequence(d_out, rank, P).float())
        for name, a, b in zip("qkv", mine, leaves):
            err = _rel(a.grad, azp.shard_sequence(b.grad, rank, P))
            assert err <= TOL, f"{algo} d{name} N={N} Hq={Hq} Hkv={Hkv} causal={causal}: rel err {err:.2e}"


def _expect_error(fn, error: type, *needles: str) -> str:
    with pytest.raises(error) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value), f"expected {needle!r} in: {info.value}"
    return str(info.value)


# ------------------------------------------------------------------- the checks
def _forward_cases(P: int):
    """(N, Hq, Hkv): divisible N, uneven N with GQA, and N < P (some ranks hold nothing)."""
    return [(4 * P, 4, 4), (4 * P + 3, 4, 2), (P - 1, 4, 1)]


def check_forward(algo: str, causal: bool):
    def run(rank, P):
        for N, Hq, Hkv in _forward_cases(P):
            _compare(rank, P, algo, N, Hq, Hkv, causal, grad=False)
    return run


def check_grad(algo: str, causal: bool):
    def run(rank, P):
        for N, Hq, Hkv in [(4 * P + 1, 4, 2), (2 * P, 4, 4)]:
            _compare(rank, P, algo, N, Hq, Hkv, causal, grad=True)
    return run


def check_small_tiles(rank, P):
    """Tiles smaller than the segments: several query and key tiles per (segment, segment) pair."""
    saved = ring_module.Q_TILE, ring_module.K_TILE
    ring_module.Q_TILE, ring_module.K_TILE = 3, 5
    try:
        for algo in ("ring", "token_ring"):
            _compare(rank, P, algo, 6 * P + 1, 4, 2, True, grad=True)
    finally:
        ring_module.Q_TILE, ring_module.K_TILE = saved


def check_ulysses_local_method(rank, P):
    """Any registered local method with its own parameters, forward and backward."""
    _compare(rank, P, "ulysses", 4 * P + 1, 4, 2, True, grad=True, method="exact_tiled", q_tile=3, k_tile=5)
    _compare(rank, P, "ulysses", 4 * P, 4, 1, False, grad=False, method="flash_decode", splits=3)


def check_ulysses_heads_not_divisible(rank, P):
    q = torch.randn(1, P + 1, 3, 8)
    _expect_error(lambda: azp.ulysses_attention(q, q, q), attnzoo.AttnZooError, f"Hq={P + 1}", f"P={P}",
                  "ring_attention")


def check_ulysses_refuses_tensor_inputs(rank, P):
    q = torch.randn(1, P, 3, 8)
    _expect_error(lambda: azp.ulysses_attention(q, q, q, key_padding_mask=torch.ones(1, 3, dtype=torch.bool)),
                  attnzoo.AttnZooError, "key_padding_mask", "not supported")


def check_mismatched_shapes(rank, P):
    """Every rank reports the disagreement, naming the size and each rank's value."""
    D = 8 if rank == 0 else 16
    q = torch.randn(1, 2, 3, D)
    for fn in ALGOS.values():
        _expect_error(lambda: fn(q, q, q), azp.ParallelError, "head dim D", str([8] + [16] * (P - 1)))


def check_mismatched_lengths(rank, P):
    q = torch.randn(1, 2, 3 + (rank == P - 1), 4)  # the last rank holds one extra position
    expected = str(shard_sizes(3 * P + 1, P))
    _expect_error(lambda: azp.ring_attention(q, q, q), azp.ParallelError, "shard lengths", expected)


def check_mismatched_causal(rank, P):
    q = torch.randn(1, 2, 3, 4)
    _expect_error(lambda: azp.token_ring_attention(q, q, q, causal=rank == 0), azp.ParallelError, "causal differs")


def check_rejected_method_on_one_rank(rank, P):
    """An argument error on one rank (here an unknown method name) does not leave the others waiting."""
    q = torch.randn(1, P, 3, 4)
    if rank == 0:
        _expect_error(lambda: azp.ulysses_attention(q, q, q, method="no_such_method"), attnzoo.AttnZooError,
                      "unknown method")
    else:
        _expect_error(lambda: azp.ulysses_attention(q, q, q), azp.ParallelError, "rank(s) [0] rejected")


def check_rejected_inputs(rank, P):
    """A rank whose own inputs are invalid raises its own error; the others do not wait for a timeout."""
    q = torch.randn(1, 2, 3, 4)
    if rank == 1:
        bad = q.clone()
        bad[0, 0, 0, 0] = math.nan
        _expect_error(lambda: azp.ring_attention(bad, q, q), attnzoo.AttnZooError, "NaN")
    else:
        start = time.monotonic()
        _expect_error(lambda: azp.ring_attention(q, q, q), azp.ParallelError, "rank(s) [1] rejected")
        assert time.monotonic() - start < 10.0  # the group timeout is 20 s: no waiting for it


def check_half_precision(rank, P):
    """bf16 shards: computed in fp32, returned in bf16, close to the fp64 oracle."""
    q, k, v, _ = _full_inputs(4 * P, 4, 2)
    ref = attnzoo.attention(q, k, v, method="naive", causal=True)
    for fn in ALGOS.values():
        out = fn(*(azp.shard_sequence(t, rank, P).bfloat16() for t in (q, k, v)), causal=True)
        assert out.dtype == torch.bfloat16
        assert _rel(out, azp.shard_sequence(ref, rank, P)) < 2e-2


def check_bytes_counted(rank, P):
    """The byte counter matches the analytic traffic of each algorithm (non-causal, N divisible by P)."""
    B, Hq, Hkv, D, n = 2, 4, 2, 8, 6
    q, k, v, _ = _full_inputs(n * P, Hq, Hkv, B=B)
    shards = [azp.shard_sequence(t, rank, P).float() for t in (q, k, v)]
    expected = {
        "ring": (P - 1) * B * n * Hkv * 2 * D * 4,
        "token_ring": (P - 1) * B * n * Hq * (D + D + 1) * 4,  # q out, (out, lse) in fp32 back
        # (P-1)/P of q, k, v and out leave each rank; KV heads replicated up to a multiple of P
        "ulysses": (P - 1) * B * n * (2 * Hq + 2 * Hkv * (P // math.gcd(Hkv, P))) * D * 4 // P,
    }
    for name, fn in ALGOS.items():
        stats = azp.comm_stats()
        stats.reset()
        fn(*shards)
        payload = stats.bytes_sent - stats.sent_by_op.get("shape check", 0)
        assert payload == expected[name], f"{name}: counted {payload} bytes, expected {expected[name]}"
        assert stats.bytes_received == stats.bytes_sent  # symmetric when N is divisible by P


def check_subgroups(rank, P):
    """Two interleaved sub-groups ({0, 2}, {1, 3} for P=4): group ranks differ from global ranks."""
    groups = [list(range(start, P, 2)) for start in (0, 1)]
    handles = [torch.distributed.new_group(members) for members in groups]  # every rank creates every group
    mine = rank % 2
    sub_rank, sub_size = groups[mine].index(rank), len(groups[mine])
    q, k, v, _ = _full_inputs(3 * sub_size + 1, 4, 2, seed=SEED + mine)
    ref = attnzoo.attention(q, k, v, method="naive", causal=True)
    for name, fn in ALGOS.items():
        out = fn(*(azp.shard_sequence(t, sub_rank, sub_size).float() for t in (q, k, v)), causal=True,
                 group=handles[mine])
        err = _rel(out, azp.shard_sequence(ref, sub_rank, sub_size))
        assert err <= TOL, f"{name} in sub-group {groups[mine]}: rel err {err:.2e}"


def check_empty_sequence(rank, P):
    """N = 0: empty outputs and gradients, no message sent."""
    for fn in ALGOS.values():
        for causal in (False, True):
            q = torch.zeros(1, P, 0, 4, requires_grad=True)
            out = fn(q, q, q, causal=causal)
            out.sum().backward()
            assert out.shape == (1, P, 0, 4) and q.grad.shape == q.shape


def check_gather_sequence(rank, P):
    x = torch.arange(2 * 3 * (2 * P + 1), dtype=torch.float32).view(2, 3, 2 * P + 1)
    assert torch.equal(azp.gather_sequence(azp.shard_sequence(x, rank, P)), x)


CHECKS = {f"forward_{a}_{'causal' if c else 'full'}": check_forward(a, c) for a in ALGOS for c in (False, True)}
CHECKS |= {f"grad_{a}_{'causal' if c else 'full'}": check_grad(a, c) for a in ALGOS for c in (False, True)}
CHECKS |= {
    "ulysses_local_method": check_ulysses_local_method,
    "ulysses_heads_not_divisible": check_ulysses_heads_not_divisible,
    "ulysses_refuses_tensor_inputs": check_ulysses_refuses_tensor_inputs,
    "mismatched_shapes": check_mismatched_shapes,
    "mismatched_lengths": check_mismatched_lengths,
    "mismatched_causal": check_mismatched_causal,
    "rejected_inputs": check_rejected_inputs,
    "rejected_method_on_one_rank": check_rejected_method_on_one_rank,
    "half_precision": check_half_precision,
    "bytes_counted": check_bytes_counted,
    "gather_sequence": check_gather_sequence,
    "subgroups": check_subgroups,
    "empty_sequence": check_empty_sequence,
    "small_tiles": check_small_tiles,
}


#: with P=4 these run in the slow suite (P=2 runs every check by default)
SLOW_AT_4 = {"grad_ring_full", "grad_token_ring_full", "grad_token_ring_causal", "grad_ulysses_full",
             "ulysses_local_method", "half_precision", "mismatched_causal", "empty_sequence"}


def _is_slow(P: int, name: str) -> bool:
    return P == 4 and name in SLOW_AT_4


def _run_checks(rank: int, P: int, names: list[str], module: str | None = None) -> dict[str, str | None]:
    """Worker: run the named checks (of ``module``'s CHECKS, default this file's) in this process group;
    None = passed, else the failure text."""
    torch.manual_seed(SEED)
    checks = CHECKS if module is None else importlib.import_module(module).CHECKS
    outcome = {}
    for name in names:
        try:
            checks[name](rank, P)
            outcome[name] = None
        except BaseException:  # one failing check must not stop the others
            outcome[name] = traceback.format_exc()
    return outcome


@pytest.fixture(scope="module")
def outcomes():
    """Outcome per check, per rank: one process group per (P, slow or not), started on first use."""
    cache: dict[tuple[int, bool], list[dict]] = {}

    def get(P: int, slow: bool) -> list[dict]:
        if (P, slow) not in cache:
            names = [n for n in CHECKS if _is_slow(P, n) == slow]
            cache[P, slow] = azp.run_local(_run_checks, P, names, timeout=20.0, wall_timeout=240.0)
        return cache[P, slow]
    return get


@pytest.mark.parametrize("P, name", [
    pytest.param(P, name, marks=[pytest.mark.slow] if _is_slow(P, name) else [])
    for P in (2, 4) for name in CHECKS
])
def test_multi_process(outcomes, P, name):
    failures = {rank: r[name] for rank, r in enumerate(outcomes(P, _is_slow(P, name))) if r[name] is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


# ------------------------------------------------------------ failure behaviour
def _one_rank_exits(rank: int, P: int, algo: str, mid_call: bool) -> tuple[str, float]:
    """The last rank leaves, either before calling or in the middle of the call (after the shape
    check, when its first local attention starts); every other rank must raise ParallelError quickly."""
    dist.barrier()  # the group is fully connected first: an exit during gloo's mesh setup fails init instead
    if rank == P - 1:
        if not mid_call:
            os._exit(0)
        module = ulysses_module if algo == "ulysses" else ring_module
        setattr(module, "attention" if algo == "ulysses" else "_attend_block", lambda *a, **kw: os._exit(0))
    q = torch.randn(1, P, 4, 8)  # Ulysses needs Hq % P == 0
    start = time.monotonic()
    try:
        ALGOS[algo](q, q, q, causal=True)
    except azp.ParallelError as e:
        return str(e), time.monotonic() - start
    return "no error", time.monotonic() - start


def _one_rank_stalls(rank: int, P: int, timeout: float) -> tuple[str, float]:
    """The last rank stays alive but never reaches the call (hung elsewhere)."""
    if rank == P - 1:
        time.sleep(timeout + 1.0)
        return "stalled", 0.0
    q = torch.randn(1, 2, 4, 8)
    start = time.monotonic()
    try:
        azp.ring_attention(q, q, q)
    except azp.ParallelError as e:
        return str(e), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.parametrize("algo, mid_call", [
    ("ring", False), ("ring", True), ("ulysses", True),
    pytest.param("token_ring", True, marks=pytest.mark.slow),
])
def test_a_rank_that_exits_makes_the_others_raise(algo, mid_call):
    P, timeout = 3, 10.0
    results = azp.run_local(_one_rank_exits, P, algo, mid_call, timeout=timeout, wall_timeout=60.0, missing_ok=True)
    assert results[-1] is None
    for rank, (message, elapsed) in enumerate(results[:-1]):
        assert message.startswith(f"{algo}_attention: "), f"rank {rank}: {message}"
        assert "another rank died" in message and "timeout" in message
        assert ("shape check" in message) != mid_call, message  # mid-call failures come from the data exchange
        assert elapsed < timeout, f"rank {rank} took {elapsed:.1f} s"


def test_a_rank_that_never_arrives_times_out():
    P, timeout = 2, 2.0
    results = azp.run_local(_one_rank_stalls, P, timeout, timeout=timeout, wall_timeout=60.0)
    message, elapsed = results[0]
    assert message.startswith("ring_attention: ") and "timeout" in message, message
    assert timeout * 0.5 < elapsed < timeout + 5.0, f"raised after {elapsed:.1f} s with a {timeout} s timeout"


def _join_alone(store: str, timeout: float) -> tuple[str, float]:
    """Rank 0 of a 2-rank group whose rank 1 never starts."""
    start = time.monotonic()
    try:
        azp.init_process_group("gloo", timeout=timeout, init_method=f"file://{store}", rank=0, world_size=2)
    except azp.ParallelError as e:
        return str(e), time.monotonic() - start
    return "joined", time.monotonic() - start


def test_a_rank_that_never_joins_the_group_times_out(tmp_path):
    timeout = 2.0
    with ProcessPoolExecutor(1, mp_context=_context()) as pool:  # a worker process: the group state stays there
        message, elapsed = pool.submit(_join_alone, str(tmp_path / "store"), timeout).result(timeout=60)
    assert message.startswith("init_process_group: could not form the gloo process group within 2.0 s"), message
    assert elapsed < timeout + 5.0


# ------------------------------------------------------------ single-process checks
def test_refuses_without_process_group():
    q = torch.randn(1, 2, 4, 8)
    for fn in ALGOS.values():
        _expect_error(lambda: fn(q, q, q), attnzoo.AttnZooError, "init_process_group")


def test_init_process_group_rejects_bad_timeout():
    _expect_error(lambda: azp.init_process_group(timeout=0), attnzoo.AttnZooError, "timeout")


@pytest.mark.parametrize("N", [0, 1, 7, 16, 33])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_shard_sizes_match_tensor_split(N, P):
    x = torch.arange(N).view(1, 1, N, 1)
    assert [azp.shard_sequence(x, r, P).shape[2] for r in range(P)] == shard_sizes(N, P)


@settings(max_examples=60, deadline=None)
@given(N=st.integers(0, 80), P=st.integers(1, 8))
def test_relayout_plans_move_every_row_to_its_place(N, P):
    """Simulate the all-to-all of contiguous -> zig-zag -> contiguous in one process."""
    src, dst = Layout.contiguous(N, P), Layout.zigzag(N, P)
    positions = torch.arange(N)
    held = [positions[sum(shard_sizes(N, P)[:r]):sum(shard_sizes(N, P)[:r + 1])] for r in range(P)]

    def move(held, a, b):
        plans = [_plan(a, b, r) for r in range(P)]
        out = []
        for r in range(P):
            rows = torch.full((plans[r].out_len,), -1)
            arrived = []
            for s in range(P):  # what rank s sends to r: its (s -> r) split
                lo = sum(plans[s].send_splits[:r])
                arrived.append(held[s][plans[s].send_rows[lo:lo + plans[s].send_splits[r]]])
            rows[plans[r].recv_rows] = torch.cat(arrived)
            out.append(rows)
        return out

    zig = move(held, src, dst)
    for r in range(P):
        expected = torch.cat([torch.arange(s, s + n) for s, n in dst.segments[r]])
        assert torch.equal(zig[r], expected)
    back = move(zig, dst, src)
    assert all(torch.equal(a, b) for a, b in zip(back, held))


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(P):
    """Visible (query, key) pairs per rank under causal attention: max/min <= 1.1 (docs/methods.md, Sequence parallel)."""
    N = 64 * P
    layout = Layout.zigzag(N, P)
    work = []
    for r in range(P):
        work.append(sum(s + i + 1 for s, n in layout.segments[r] for i in range(n)))
    assert max(work) / min(work) <= 1.1
    contiguous = Layout.contiguous(N, P)
    naive = [sum(s + i + 1 for s, n in contiguous.segments[r] for i in range(n)) for r in range(P)]
    assert max(naive) / min(naive) > 2
