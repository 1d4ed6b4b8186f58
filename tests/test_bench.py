"""The measuring lab: metrics on constructed cases, results-file safety, runner robustness, the
quick suite end to end (results + report), kill-and-resume, and real Q/K/V capture from MiniLM.

Seeds: workloads use seed 0 unless stated; tensors in metric tests use torch.manual_seed(0) (conftest).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.bench import metrics, tables, workloads
from attnzoo.bench.report import fitted_exponent, pareto_front
from attnzoo.bench.results import ResultsFile, merge_rounds
from attnzoo.bench.runner import Suite, parse_workload, plan
from attnzoo.checks import Problem
from attnzoo.errors import AttnZooError

ROOT = Path(__file__).resolve().parents[1]

# Methods registered only inside the benchmark's subprocesses (never in this test process, so other
# test files iterating attnzoo.methods() never see them).
PLUGIN = textwrap.dedent('''
    import time
    from dataclasses import dataclass
    from typing import ClassVar
    import torch
    from attnzoo.core.exact import naive_attention, tiled_attention
    from attnzoo.core.masks import visible_mask
    from attnzoo.registry import Family, Method, Supports, param, register

    @register
    @dataclass(frozen=True)
    class Band(Method):
        """Exact attention over the keys within `window` positions of the query (a known selection)."""
        name: ClassVar[str] = "zz_band"
        family: ClassVar[Family] = Family.LOCAL
        window: int = param(8, min=1)

        def visible(self, q, k, *, causal, key_padding_mask=None):
            nq, nk = q.shape[2], k.shape[2]
            pos = torch.arange(nq)[:, None] + nk - nq
            dist = pos - torch.arange(nk)[None, :]
            return (dist < self.window) & (dist > -self.window)

        def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
            mask = self.visible(q, k, causal=causal)
            seen = visible_mask(prob.len_q, prob.len_k, causal=causal)
            mask = mask if seen is None else mask & seen
            s = (q @ k.transpose(-1, -2)) * prob.scale
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
            return p @ v, None

    @register
    @dataclass(frozen=True)
    class Boom(Method):
        name: ClassVar[str] = "zz_boom"
        family: ClassVar[Family] = Family.LOCAL

        def forward(self, q, k, v, prob, **kw):
            raise RuntimeError("kaboom at length %d" % prob.len_k)

    @register
    @dataclass(frozen=True)
    class Crash(Method):
        """Kills the process it runs in: the benchmark's worker."""
        name: ClassVar[str] = "zz_crash"
        family: ClassVar[Family] = Family.LOCAL

        def forward(self, q, k, v, prob, **kw):
            import os
            os._exit(3)

    @register
    @dataclass(frozen=True)
    class NonCausal(Method):
        name: ClassVar[str] = "zz_noncausal"
        family: ClassVar[Family] = Family.LOW_RANK
        supports: ClassVar[Supports] = Supports(causal=False)

        def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
            return v.mean(dim=2, keepdim=True).expand(-1, -1, prob.len_q, -1), None

    @register
    @dataclass(frozen=True)
    class NeedsX(Method):
        name: ClassVar[str] = "zz_needs_x"
        family: ClassVar[Family] = Family.LINEAR_RNN
        inputs: ClassVar[dict] = {"x": "an input nobody generates"}

        def forward(self, q, k, v, prob, **kw):
            return q, None

    @register
    @dataclass(frozen=True)
    class Gated(Method):
        """Uses the generated GLA gate g (must be <= 0): exact attention if it is."""
        name: ClassVar[str] = "zz_gated"
        family: ClassVar[Family] = Family.LINEAR_RNN
        inputs: ClassVar[dict] = {"g": "log gates"}

        def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse, g):
            assert g.shape == q.shape and bool((g <= 0).all())
            return naive_attention(q, k, v, scale=prob.scale, causal=causal)[0], None

    @register
    @dataclass(frozen=True)
    class Sleepy(Method):
        """Exact attention after a nap: slow enough to trip the per-case cap and to be killed mid-run."""
        name: ClassVar[str] = "zz_sleepy"
        family: ClassVar[Family] = Family.EXACT
        nap: float = param(0.15, min=0.0)

        def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
            time.sleep(self.nap)
            return tiled_attention(q, k, v, scale=prob.scale, causal=causal)
''')


def _env(tmp_path: Path) -> dict:
    (tmp_path / "azbench_plugin.py").write_text(PLUGIN)
    paths = [str(ROOT), str(tmp_path), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", COLUMNS="200")


def _bench(tmp_path: Path, *args: str, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", "--threads", "1", *args],
                          env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def _cases(folder: Path) -> list[dict]:
    return ResultsFile(folder).read().cases


# ------------------------------------------------------------------- metrics
def test_errors_of_exact_output_are_zero_and_cosine_one():
    out = torch.randn(2, 3, 5, 4)
    errs = metrics.output_errors(out, out.clone())
    assert errs == {"rel_error": 0.0, "max_abs_error": 0.0, "cosine": 1.0}
    errs = metrics.output_errors(2 * out, out)  # same direction, twice the size
    assert errs["rel_error"] == pytest.approx(1.0) and errs["cosine"] == pytest.approx(1.0)
    assert metrics.output_errors(-out, out)["cosine"] == pytest.approx(-1.0)


def test_recall_of_exact_family_is_one_and_no_hook_is_blank():
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    assert metrics.method_recall(attnzoo.get("exact_tiled"), q, k, scale=0.5, causal=True) == 1.0

    class NoHook(attnzoo.Method):  # not registered: only its family and attributes matter here
        family = attnzoo.Family.LOW_RANK

    assert metrics.method_recall(NoHook(), q, k, scale=0.5, causal=True) is None


def test_known_mask_gives_known_recall():
    # q = 0: every visible key gets the same probability, so a mask's recall is the share of visible keys it keeps.
    n, window = 12, 4
    q, k = torch.zeros(1, 1, n, 8), torch.randn(1, 1, n, 8)
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) < window
    expected = sum(min(i + 1, window) / (i + 1) for i in range(n)) / n
    assert metrics.mass_recall(q, k, band, scale=1.0, causal=True) == pytest.approx(expected, abs=1e-12)
    everything = torch.ones(n, n, dtype=torch.bool)
    assert metrics.mass_recall(q, k, everything, scale=1.0, causal=True) == pytest.approx(1.0, abs=1e-12)
    # a peaked row: the needle key holds almost all mass, so reading only it gives recall ~1
    k2 = torch.zeros(1, 1, n, 8)
    k2[0, 0, 3, 0] = 50.0
    q2 = torch.zeros(1, 1, n, 8)
    q2[..., 0] = 1.0
    needle_only = torch.zeros(n, n, dtype=torch.bool)
    needle_only[:, 3] = True
    assert metrics.mass_recall(q2, k2, needle_only, scale=1.0, causal=False) > 0.999


def test_flops_count_visible_pairs():
    assert metrics.visible_pairs(4, 4, causal=True) == 10
    assert metrics.visible_pairs(2, 4, causal=True) == 7  # bottom-right: rows see 3 and 4 keys
    prob = Problem(1, 2, 2, 4, 4, 8, 8, 1.0)
    assert metrics.attention_flops(prob, causal=False) == 2 * 2 * 16 * 16
    assert metrics.method_flops(attnzoo.get("exact"), prob, True) == (2 * 2 * 10 * 16, "exact-equivalent")


@pytest.mark.parametrize("clock", ["wall", "own"])
def test_timing_respects_repeat_and_budget(clock):
    if clock == "own" and metrics.bench_clock() != "own":
        pytest.skip("no /proc/thread-self/schedstat here")
    calls = []
    t = metrics.time_calls(lambda: calls.append(time.sleep(0.02)), repeat=50, budget_s=0.05, clock=clock)
    assert 2 <= len(t.runs) <= 4 and len(calls) == len(t.runs) and t.median >= 0.02  # a sleep counts
    assert len(metrics.time_calls(lambda: None, repeat=3, budget_s=10, clock=clock).runs) == 3


def test_a_reference_is_timed_alongside_every_call():
    order: list[str] = []
    t = metrics.time_calls(lambda: order.append("f"), repeat=4, budget_s=10,
                           alongside=lambda: order.append("ref"))
    assert order == ["f", "ref"] * 4 and len(t.runs) == len(t.ref_runs) == 4 and t.ref_median is not None
    assert metrics.time_calls(lambda: None, repeat=2, budget_s=10).ref_median is None


def test_the_own_clock_leaves_out_the_time_spent_waiting_for_a_core():
    """Sharing one core with a busy process doubles a call's wall time, not its ``own`` time (its CPU time)."""
    if not hasattr(os, "sched_setaffinity") or metrics.bench_clock() != "own":
        pytest.skip("needs Linux affinity and /proc/thread-self/schedstat")
    cpu_times: list[float] = []

    def work():
        t0, x = time.thread_time(), 0
        for i in range(100_000):
            x += i
        cpu_times.append(time.thread_time() - t0)

    before = os.sched_getaffinity(0)
    core = min(before)
    hog = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {core})
        time.sleep(0.2)  # the hog is running on our core
        wall = metrics.time_calls(work, repeat=10, budget_s=30, clock="wall").median
        own = metrics.time_calls(work, repeat=10, budget_s=30, clock="own").median
    finally:
        hog.kill()
        hog.wait()
        os.sched_setaffinity(0, before)
    cpu = statistics.median(cpu_times)
    assert wall > 1.5 * cpu  # the core was shared
    assert 0.8 * cpu < own < 1.3 * cpu, (own, cpu, wall)


@pytest.mark.skipif(not metrics.peak_memory_supported(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_a_temporary_buffer():
    def work():
        big = torch.ones(16 * 2**20)  # 64 MiB, freed before returning
        return float(big.sum())

    value, peak = metrics.peak_memory(work)
    assert value == 16 * 2**20 and peak >= 60 * 2**20
    _, small = metrics.peak_memory(lambda: torch.ones(4).sum())
    assert small < 8 * 2**20


def test_fitted_exponent_and_pareto_front():
    lengths = [256, 1024, 4096]
    assert fitted_exponent(lengths, [3e-9 * n**2 for n in lengths]) == pytest.approx(2.0)
    assert fitted_exponent([256], [1.0]) is None
    points = [(1.0, 1e-6), (2.0, 1e-3), (0.5, 1e-3), (3.0, 1e-1), (2.0, 1e-2)]
    assert pareto_front(points) == [0, 1, 3]


# ----------------------------------------------------------------- workloads
def test_structured_workload_deals_patterns_to_heads_and_g_is_a_log_gate():
    qkv = workloads.make("structured", length=96, heads=6, heads_kv=6, dim=16, seed=0)
    assert qkv.meta["head_patterns"] == ["local", "needle", "vertical_slash", "clusters", "local", "needle"]
    again = workloads.make("structured", length=96, heads=6, heads_kv=6, dim=16, seed=0)
    assert torch.equal(qkv.q, again.q) and torch.equal(qkv.k, again.k)
    sinks = workloads.make("sinks", length=64, heads=2, dim=16, sinks=2, seed=1)
    probs = torch.softmax(sinks.q @ sinks.k.transpose(-1, -2) / 4, dim=-1)
    assert float(probs[..., :2].sum(-1).mean()) > 0.5  # the planted sinks hold most of the mass
    g = workloads.make_inputs(["g"], qkv)["g"]
    assert g.shape == qkv.q.shape and bool((g <= 0).all())
    with pytest.raises(AttnZooError, match="no generator for extra input 'x'"):
        workloads.make_inputs(["x"], qkv)


def test_plan_skips_what_a_method_cannot_run():
    suite = Suite(methods=("exact", "naive"), lengths=(64, 32, 4096), workloads=("gaussian", "real:layer=1"),
                  causal=False)
    planned, notes = plan(suite)
    lengths = [(p.case["workload"], p.case["length"]) for p in planned]
    assert lengths == [("gaussian", 32)] * 2 + [("gaussian", 64)] * 2 + [("gaussian", 4096)] * 2 + \
        [("real", 32)] * 2 + [("real", 64)] * 2
    assert any("lengths above 512" in n for n in notes)  # non-causal: MiniLM, at every length it encodes
    assert [p.heatmap for p in planned if p.case["workload"] == "real"] == [True, True, False, False]
    # causal: the decoder, only where sparse methods are sparse (>= 2048, else the longest length given)
    planned, notes = plan(dataclasses.replace(suite, causal=True, lengths=(64, 2048, 4096)))
    real = [(p.case["length"], p.case["workload_params"]) for p in planned if p.case["workload"] == "real"]
    assert real == [(n, {"layer": 1, "model": "smollm2-135m"}) for n in (2048, 2048, 4096, 4096)]
    assert any("run at 2048, 4096 only" in n for n in notes)
    assert workloads.real_lengths([256, 1024], {"model": "smollm2-135m"}) == [1024]
    assert workloads.real_lengths([256, 1024], {}) == [256, 1024]
    assert workloads.real_params({"capture": "x.pt"}, causal=True) == {"capture": "x.pt"}
    assert parse_workload("needle:needles=3,strength=2.5,causal=false") == (
        "needle", {"needles": 3, "strength": 2.5, "causal": False})
    with pytest.raises(AttnZooError, match="unknown workload 'nope'"):
        plan(Suite(workloads=("nope",)))
    with pytest.raises(AttnZooError, match="bench: unknown workload 'neddle'; did you mean 'needle'"):
        plan(Suite(workloads=("neddle",)))
    with pytest.raises(AttnZooError, match="unknown method 'exakt'.*'exact'"):
        plan(Suite(methods=("exakt",)))
    skips = {p.case["method"]: p.skip for p in plan(Suite(methods=("block_sparse", "nystrom", "exact"),
                                                         lengths=(32,), workloads=("gaussian",)))[0]}
    assert skips["exact"] is None and skips["nystrom"][0] == "capability"
    assert skips["block_sparse"][0] == "parameters" and "mask_mod" in skips["block_sparse"][1]


def test_density_counts_the_visible_pairs_a_method_reads():
    from attnzoo import get
    from attnzoo.viz import visible_keys

    q, k, _, _ = workloads.make("vertical_slash", heads=2, length=96, dim=32, seed=3, dtype=torch.float64)
    n, w = 96, 20
    causal_pairs = n * (n + 1) // 2
    band = sum(min(i + 1, w) for i in range(n))  # each row reads its last w keys (itself included)
    assert metrics.method_density(get("sliding_window", window=w, block=16), q, k, causal=True) == \
        pytest.approx(band / causal_pairs)
    for name, params in (("block_topk", {"block": 16, "topk": 2}), ("vertical_slash", {"n_vertical": 8,
                                                                                       "n_slash": 8, "block": 16})):
        method = get(name, **params)
        read = visible_keys(method, n, causal=True, heads=2, workload="vertical_slash", seed=3)  # one-hot probe
        got = metrics.method_density(method, q, k, causal=True)
        assert 0 < got < 1 and got == pytest.approx(float(read.sum()) / (2 * causal_pairs))
    assert metrics.method_density(get("exact"), q, k, causal=True) == 1.0
    assert metrics.method_density(get("lsh"), q, k, causal=True) is None  # does not expose what it reads


def test_heatmaps_of_a_long_causal_problem_read_its_first_tokens():
    q, k = torch.randn(1, 2, 600, 8), torch.randn(1, 2, 600, 8)
    qm, km = metrics.map_inputs(q, k, causal=True, inputs={})
    assert qm.shape[2] == km.shape[2] == metrics.MAP_TOKENS and torch.equal(qm, q[:, :, :metrics.MAP_TOKENS])
    for causal, inputs in ((False, {}), (True, {"g": q})):  # non-causal or extra per-token inputs: whole
        assert metrics.map_inputs(q, k, causal=causal, inputs=inputs)[1] is k


# --------------------------------------------------------------- results file
def test_results_file_reports_and_repairs_a_cut_trailing_line(tmp_path):
    store = ResultsFile(tmp_path)
    store.append({"type": "run", "run_id": "r"})
    store.append({"type": "case", "key": "a", "status": "ok"})
    with open(store.path, "ab") as f:
        f.write(b'{"type": "case", "key": "b", "sta')  # a write cut short by a kill
    contents = store.read()
    assert contents.done == {"a"} and contents.problems and "unterminated" in contents.problems[0][1]
    notes = store.repair()
    assert len(notes) == 1 and "line 3" in notes[0]
    assert store.read().problems == [] and b"sta" in store.path.with_name("results.jsonl.corrupt").read_bytes()
    store.append({"type": "case", "key": "b", "status": "ok"})
    assert store.read().done == {"a", "b"}


def test_results_file_refuses_corruption_in_the_middle(tmp_path):
    store = ResultsFile(tmp_path / "r.jsonl")
    store.append({"type": "case", "key": "a"})
    with open(store.path, "ab") as f:
        f.write(b"garbage\n")
    store.append({"type": "case", "key": "b"})
    with pytest.raises(AttnZooError, match="line 2 is corrupt but valid records follow"):
        store.read()


def test_compare_matches_cases_by_key():
    base = {"method": "m", "workload": "gaussian", "workload_params": {}, "length": 64, "status": "ok",
            "rel_error": 1e-7}
    now = [dict(base, key="k1", time_s=0.5), dict(base, key="k2", time_s=1.0, length=128),
           dict(base, key="k3", status="skipped")]
    other = [dict(base, key="k1", time_s=1.0), dict(base, key="k3", time_s=1.0)]
    rows = tables.compare(now, other)
    assert [(r["length"], r["ratio"], r["ratio_sdpa"]) for r in rows] == [(64, 2.0, None)]
    # relative to SDPA: the other run's machine was 2.5x slower at SDPA, so the method did not get slower
    now[0]["sdpa_s"], other[0]["sdpa_s"] = 0.1, 0.25
    assert tables.compare(now, other)[0]["ratio_sdpa"] == pytest.approx(0.8)


def _timed(key: str, times: list[float], sdpa: list[float]) -> tuple[dict, list[dict]]:
    """A case record timed in ``len(times)`` rounds (its own record is round 1) and its round records."""
    case = {"type": "case", "key": key, "method": "m", "workload": "gaussian", "workload_params": {}, "length": 64,
            "status": "ok", "rel_error": 1e-7, "time_s": times[0], "sdpa_s": sdpa[0], "speedup": sdpa[0] / times[0],
            "spread": 0.01, "flops": 2e9, "gemm_gflops": 100.0}
    rounds = [{"type": "round", "key": key, "round": r, "status": "ok", "time_s": t, "sdpa_s": s}
              for r, (t, s) in enumerate(zip(times[1:], sdpa[1:]), start=2)]
    return case, rounds


def test_rounds_merge_into_the_best_round_and_their_spread(tmp_path):
    case, rounds = _timed("k", [1.0, 3.0, 2.0], [1.0, 1.0, 2.0])
    store = ResultsFile(tmp_path)
    for record in [case, *rounds[::-1], {"type": "round", "key": "k", "round": 4, "status": "failed", "reason": "x"}]:
        store.append(record)
    contents = ResultsFile(tmp_path).read()
    assert len(contents.cases) == 1 and [r["round"] for r in contents.rounds] == [3, 2, 4]
    c = contents.cases[0]
    assert c["round_times"] == [1.0, 3.0, 2.0] and c["round_sdpa"] == [1.0, 1.0, 2.0]  # round order; failed left out
    # ÷ SDPA per round: 1, 3, 1: the best is round 1 (the first of the ties)
    assert c["time_s"] == 1.0 and c["sdpa_s"] == 1.0 and c["speedup"] == 1.0 and c["round1_time_s"] == 1.0
    assert c["spread"] == pytest.approx((3.0 - 1.0) / 1.0)
    assert c["gflops"] == pytest.approx(2.0) and c["pct_gemm"] == pytest.approx(2.0)
    alone = ResultsFile(tmp_path / "one")
    alone.append(case)
    assert alone.read().cases[0]["time_s"] == 1.0 and alone.read().cases[0]["spread"] == 0.01  # one round: as is
    case, rounds = _timed("k", [2.0, 3.0, 1.5], [1.0, 2.0, 1.0])  # ÷ SDPA 2, 1.5, 1.5: round 2 is best
    best = merge_rounds([case], rounds)[0]
    assert (best["time_s"], best["sdpa_s"], best["speedup"]) == (3.0, 2.0, pytest.approx(2 / 3))


def test_compare_flags_only_beyond_the_tolerance_and_the_rounds_spread():
    def rows(now_times, other_times, now_sdpa=(1.0, 1.0, 1.0), other_sdpa=(1.0, 1.0, 1.0)):
        (a, ra), (b, rb) = _timed("k", list(now_times), list(now_sdpa)), _timed("k", list(other_times), list(other_sdpa))
        return tables.compare(merge_rounds([a], ra), merge_rounds([b], rb))

    steady = rows([1.0, 1.02, 0.98], [1.3, 1.32, 1.28])  # 30 % apart, rounds tight: flagged
    assert steady[0]["flag"] == "faster" and steady[0]["ratio_sdpa"] == pytest.approx(1.28 / 0.98)
    assert rows([1.3, 1.32, 1.28], [1.0, 1.02, 0.98])[0]["flag"] == "slower"
    noisy = rows([1.0, 1.35, 0.95], [1.3, 1.32, 1.28])  # 30 % apart in the median, but the rounds overlap
    assert noisy[0]["flag"] == "" and noisy[0]["now_spread"] == pytest.approx(0.4)
    assert rows([1.0, 1.02, 0.98], [1.1, 1.12, 1.08])[0]["flag"] == ""  # disjoint rounds, within ±15 %
    # ÷ SDPA decides: the other run's machine was 1.3x slower at SDPA too, so nothing changed
    assert rows([1.0, 1.02, 0.98], [1.3, 1.32, 1.28], other_sdpa=(1.3, 1.3, 1.3))[0]["flag"] == ""
    single = rows([1.0], [1.3], now_sdpa=(1.0,), other_sdpa=(1.0,))  # one round each: the tolerance alone
    assert single[0]["flag"] == "faster" and rows([1.0], [1.1], (1.0,), (1.0,))[0]["flag"] == ""
    summary = tables.compare_summary(steady + noisy + single + rows([1.0, 1.0, 1.0], [1.05, 1.0, 1.0]))
    assert summary.startswith("1 of 4 cases within ±15%") and "2 faster" in summary and "0 slower" in summary


def test_advice_picks_within_max_err_and_never_a_different_model():
    rows = [{"method": "lightning", "speedup": 9.0, "rel_error": 60.0},
            {"method": "fast", "speedup": 4.0, "rel_error": 0.2}, {"method": "good", "speedup": 1.5, "rel_error": 1e-4},
            {"method": "exact", "speedup": 1.0, "rel_error": 1e-7}]
    text = tables.advice(tables.Board("gaussian", True, 1024, rows), max_err=1e-3)
    assert text.startswith("pick (rel err ≤ 0.001): good (1.50× SDPA") and "at any error: fast (4.00× SDPA" in text
    assert "never picked (different models, not approximations): lightning" in text
    assert "pick (rel err ≤ 0.5): fast" in tables.advice(tables.Board("gaussian", True, 1024, rows), max_err=0.5)
    assert "no approximation" in tables.advice(tables.Board("gaussian", True, 1024, rows[:2]), max_err=1e-3)
    assert tables._row({"method": "gla", "family": "linear RNN", "time_s": 1.0, "spread": 0.0})["family"] == \
        "linear RNN (different model)"


# ------------------------------------------------------------------ end to end
def test_quick_suite_end_to_end_writes_results_and_report(tmp_path):
    out = tmp_path / "quick"
    res = _bench(tmp_path, "--lengths", "32,64", "--heads", "2", "--head-dim", "8", "--repeat", "1", "--min-time", "0",
                 "--rounds", "2", "--out", str(out), timeout=400)
    assert res.returncode == 0, res.stderr + res.stdout
    contents = ResultsFile(out).read()
    run = contents.runs[0]
    for field in ("torch", "git", "cpu", "threads", "gemm_gflops", "peak_memory"):
        assert field in run["machine"]
    assert run["machine"]["threads"] == 1
    cases = contents.cases
    methods = {m for m in attnzoo.methods() if not m.startswith("_")}  # "_" = test doubles of this process
    # the causal real workload is SmolLM2 at the longest length given (none reaches 2048)
    assert {(c["workload"], c["length"]) for c in cases} == {("structured", 32), ("structured", 64), ("real", 64)}
    assert {c["method"] for c in cases} == methods and len(cases) == 3 * len(methods)
    # every registered method has its three cases; whatever other families do, the exact ones must measure cleanly
    for c in cases:
        assert c["status"] == "ok" or c["reason"], c
        if c["status"] == "ok":
            assert c["time_s"] > 0 and c["speedup"] > 0 and 0 <= c["rel_error"] and c["threads"] == 1
            assert c["gflops"] > 0 and c["pct_gemm"] == pytest.approx(100 * c["gflops"] / c["gemm_gflops"])
            assert c["dim"] == (64 if c["workload"] == "real" else 8)  # the real workload has SmolLM2's head dim
            assert c["density"] is None or 0 < c["density"] <= 1
            assert len(c["round_times"]) == 2 and c["time_s"] in c["round_times"]
    exact = [c for c in cases if c["family"] == "exact"]
    n_exact = sum(cls.family is attnzoo.Family.EXACT for name, cls in attnzoo.methods().items() if name in methods)
    assert len(exact) == 3 * n_exact and all(c["status"] == "ok" and c["rel_error"] < 1e-5 and c["cosine"] > 0.9999
                                    and c["recall"] == 1.0 and c["density"] == 1.0 for c in exact)
    window = next(c for c in cases if c["method"] == "sliding_window" and c["workload"] == "real")
    assert window["density"] == 1.0  # its 512-token window covers 64 tokens
    assert "density" in res.stdout
    assert "fastest first" in res.stdout and "× SDPA" in res.stdout and "exact_tiled" in res.stdout
    assert "pick (rel err ≤" in res.stdout
    page = (out / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" data-file="([^"]+)"', page)
    kinds = {Path(f).name.split("-")[0] for _, f in images}
    assert kinds == {"time_vs_length", "pareto", "heatmaps"}
    for data, rel in images:
        assert (out / rel).is_file() and base64.b64decode(data) == (out / rel).read_bytes()
        assert f'href="{rel}"' in page
    assert "Machine" in page and run["machine"]["torch"] in page
    # a cut trailing line is reported by `attnzoo report` (terminal and page), never silently dropped
    from typer.testing import CliRunner

    from attnzoo.cli import app

    lines = len((out / "results.jsonl").read_text().splitlines())  # a run header, cases and round records
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"type": "case", "ke')
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "again" / "report.html")])
    assert res.exit_code == 0, res.output
    assert f"line {lines + 1}" in res.output and "unterminated" in res.output
    again = (tmp_path / "again" / "report.html").read_text()
    assert "Unreadable line" in again and (tmp_path / "again" / "plots").is_dir()


def test_killed_run_resumes_with_every_case_exactly_once_and_every_outcome_recorded(tmp_path):
    out = tmp_path / "resume"
    methods = ("zz_band", "zz_boom", "zz_crash", "zz_noncausal", "zz_needs_x", "zz_gated", "zz_sleepy", "exact")
    lengths = (16, 32, 48)
    args = ["--plugin", "azbench_plugin", "--methods", ",".join(methods), "--lengths", ",".join(map(str, lengths)),
            "--heads", "2", "--head-dim", "8", "--workload", "gaussian", "--repeat", "2", "--time-cap", "0.1",
            "--rounds", "2", "--out", str(out), "--no-report"]
    proc = subprocess.Popen([sys.executable, "-m", "attnzoo.cli", "bench", "--threads", "1", *args],
                            env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count('"type": "case"') >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its worker, mid-run
    proc.wait()
    done_before = len(_cases(out))
    assert 3 <= done_before < 24
    with open(results, "ab") as f:  # and a record cut short, as a kill during a write leaves it
        f.write(b'{"type": "case", "key": "{\\"method\\"')
    res = _bench(tmp_path, "--resume", "--out", str(out), "--no-report", "--compare", str(out))
    assert res.returncode == 0, res.stderr + res.stdout
    assert "results.jsonl line" in res.stdout and "moved to results.jsonl.corrupt" in res.stdout
    assert f"{done_before} of 24 cases already" in res.stdout
    contents = ResultsFile(out).read()
    keys = [c["key"] for c in contents.cases]
    assert len(keys) == len(set(keys)) == 24
    assert {(json.loads(k)["method"], json.loads(k)["length"]) for k in keys} == {
        (m, n) for m in methods for n in lengths}
    assert len(contents.runs) == 2 and contents.runs[1]["resumed"]
    assert contents.runs[1]["suite"] == contents.runs[0]["suite"]  # --resume kept the run's options

    # every outcome is recorded with its reason; none stopped the run
    by = {(c["method"], c["length"]): c for c in contents.cases}
    for n in lengths:
        assert by["zz_boom", n]["status"] == "failed" and f"kaboom at length {n}" in by["zz_boom", n]["reason"]
        assert by["zz_noncausal", n]["status"] == "skipped" and "--no-causal" in by["zz_noncausal", n]["reason"]
        assert by["zz_needs_x", n]["status"] == "skipped" and "'x'" in by["zz_needs_x", n]["reason"]
        assert by["zz_gated", n]["status"] == "ok" and by["zz_gated", n]["rel_error"] < 1e-5
        band = by["zz_band", n]
        assert band["status"] == "ok" and 0 < band["recall"] < 1 and band["rel_error"] > 1e-3
        assert by["exact", n]["recall"] == 1.0 and by["exact", n]["rel_error"] < 1e-5
    # a method that kills the worker is one failed case; the worker restarts and its longer lengths are skipped
    assert by["zz_crash", 16]["status"] == "failed" and "worker died (exit code 3" in by["zz_crash", 16]["reason"]
    assert all(by["zz_crash", n]["skip_kind"] == "earlier failure" for n in (32, 48))
    # the sleepy method ran once, exceeded the 0.1 s cap, and its longer lengths were skipped with the
    # reason, even across the kill (the resumed run relearns the cap from the saved results)
    assert by["zz_sleepy", 16]["status"] == "ok" and by["zz_sleepy", 16]["time_s"] > 0.1
    assert all("over the per-case cap of 0.1 s" in by["zz_sleepy", n]["reason"] for n in (32, 48))
    assert "skipped (capability" in res.stdout and "failed zz_boom@" in res.stdout  # the summary names them
    assert "other/now" in res.stdout and " 1.00 " in res.stdout  # --compare against itself: equal times
    # every ok case was timed in two fresh workers, each round once, across the kill
    ok = [c for c in contents.cases if c["status"] == "ok"]
    assert ok and all(len(c["round_times"]) == 2 for c in ok)
    rounds = [(r["key"], r["round"]) for r in contents.rounds]
    assert len(rounds) == len(set(rounds)) == len(ok)
    assert f"{len(ok)} of {len(ok)} cases within ±15%" in " ".join(res.stdout.split())


def test_a_round_cut_short_is_timed_again_on_resume(tmp_path):
    out = tmp_path / "rounds"
    args = ["--methods", "exact,sliding_window", "--lengths", "16,32", "--heads", "2", "--head-dim", "8",
            "--workload", "gaussian", "--repeat", "1", "--min-time", "0", "--rounds", "2", "--out", str(out),
            "--no-report"]
    res = _bench(tmp_path, *args, timeout=400)
    assert res.returncode == 0, res.stderr + res.stdout
    records = (out / "results.jsonl").read_text().splitlines()
    assert len(ResultsFile(out).read().rounds) == 4
    (out / "results.jsonl").write_text("\n".join(records[:-2]) + "\n")  # a kill in round 2 lost its last records
    res = _bench(tmp_path, "--resume", "--out", str(out), "--no-report", timeout=400)
    assert res.returncode == 0, res.stderr + res.stdout
    contents = ResultsFile(out).read()
    assert [r["round"] for r in contents.rounds] == [2, 2, 2, 2] and len(contents.runs) == 2  # each case once
    assert all(len(c["round_times"]) == 2 for c in contents.cases)
    # even rounds run the cases in reverse (so a drift of the machine spreads over each case's rounds), and
    # the resumed run timed the two cases the cut lost, in the same order
    assert [r["key"] for r in contents.rounds] == [c["key"] for c in contents.cases][::-1]


def test_real_workload_capture_is_kept_on_disk_and_read_back(tmp_path, monkeypatch):
    from _tiny_lm import save_tiny_llama

    from attnzoo.bench import capture

    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path / "cache"))
    model = str(save_tiny_llama(tmp_path / "llama", max_positions=256))
    # the bench's main process captures before a case is timed; the worker then only reads the file
    assert workloads.prepare_real({"model": model, "layer": 1}, length=48, batch=1) is True
    assert workloads.prepare_real({"model": model, "layer": 1}, length=48, batch=1) is False
    first = workloads.make("real", model=model, heads=4, length=48, layer=1)
    files = list((tmp_path / "cache" / "captures").glob("*.pt"))
    assert [f.name.split("-")[1:3] for f in files] == [["48x1", "layer1"]]
    capture.cached_layer.cache_clear()  # a new process: only the file is left
    monkeypatch.setattr(capture, "capture_qkv", lambda *a, **k: pytest.fail("captured again"))
    again = workloads.make("real", model=model, heads=4, length=48, layer=1)
    assert torch.equal(first.q, again.q) and torch.equal(first.v, again.v) and again.meta["layer"] == 1
    with pytest.raises(AttnZooError, match="layer expected 0..1"):
        workloads.make("real", model=model, heads=4, length=48, layer=5)



def test_capture_from_minilm_reproduces_the_models_attention(tmp_path):
    from transformers import AutoModel

    from attnzoo.bench import capture

    record = capture.capture_qkv(length=48, batch=2)
    path = capture.save(record, tmp_path / "qkv.pt")
    loaded = capture.load(path)
    model = AutoModel.from_pretrained(capture.default_model_dir(), attn_implementation="eager").eval()
    seen = []
    hooks = [layer.attention.self.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
             for layer in model.encoder.layer]
    with torch.no_grad():
        hidden = model(input_ids=loaded["input_ids"]).last_hidden_state
    for h in hooks:
        h.remove()
    assert len(loaded["q"]) == len(seen) == 6
    assert torch.allclose(hidden, loaded["hidden"], atol=1e-4)  # recording did not change the model
    for q, k, v, expected in zip(loaded["q"], loaded["k"], loaded["v"], seen):
        assert q.shape == (2, 12, 48, 32)
        out = attnzoo.attention(q.double(), k.double(), v.double(), method="naive")
        assert torch.allclose(out.transpose(1, 2).reshape(2, 48, -1).float(), expected, atol=1e-4)
    assert not torch.equal(loaded["input_ids"][0], loaded["input_ids"][1])  # consecutive windows of the text
    from typer.testing import CliRunner

    from attnzoo.cli import app

    res = CliRunner().invoke(app, ["capture", "--model", str(capture.default_model_dir()), "--out",
                                   str(tmp_path / "cli.pt"), "--length", "48", "--batch", "2"])
    assert res.exit_code == 0, res.output
    assert "6 layers, q (2, 12, 48, 32)" in res.output
    res = CliRunner().invoke(app, ["capture", "--out", str(tmp_path / "smol.pt"), "--length", "32"])
    assert res.exit_code == 0 and "30 layers, q (1, 9, 32, 64)" in res.output, res.output  # default: SmolLM2
    assert torch.equal(capture.load(tmp_path / "cli.pt")["q"][3], loaded["q"][3])
    real = workloads.make("real", length=48, heads=4, batch=2, capture=str(path), layer=2)
    assert torch.equal(real.q, loaded["q"][2][:, :4]) and torch.equal(real.v, loaded["v"][2][:, :4])


def test_worker_env_fixes_malloc_unless_the_user_set_it(monkeypatch):
    from attnzoo.bench.runner import STEADY_MALLOC, worker_env

    for name in (*STEADY_MALLOC, "ATTNZOO_BENCH_THREADS"):
        monkeypatch.delenv(name, raising=False)
    env = worker_env(threads=1, plugins=("mine",))
    assert {name: env[name] for name in STEADY_MALLOC} == STEADY_MALLOC
    assert env["ATTNZOO_BENCH_THREADS"] == "1" and env["ATTNZOO_BENCH_PLUGINS"] == "mine"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(attnzoo.__file__).resolve().parents[1])
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert worker_env(threads=None)["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert "ATTNZOO_BENCH_THREADS" not in worker_env(threads=None)


def test_the_bench_builds_the_cpu_extensions_before_any_worker_starts(tmp_path, monkeypatch):
    """A first build (~20 s of CPU per extension, minutes on a loaded machine) inside a worker would count
    against a timed case's timeout and fail it: the main process builds them before the first worker."""
    from attnzoo.bench import runner
    from attnzoo.core import cpp

    events = []
    monkeypatch.setattr(cpp, "prebuild", lambda: events.append("prebuild") or [])
    monkeypatch.setattr(runner.Worker, "__init__", lambda self, *a, **k: (_ for _ in ()).throw(
        RuntimeError(f"worker started after {events}")))
    suite = runner.Suite(methods=("exact",), lengths=(16,), heads=2, head_dim=8, workloads=("gaussian",))
    with pytest.raises(RuntimeError, match=r"worker started after \['prebuild'\]"):
        runner.run(suite, tmp_path / "out", on_note=lambda note: None)


def test_prebuild_builds_every_extension_once_or_none_when_disabled(monkeypatch):
    from attnzoo.core import cpp

    names = sorted(p.name for p in (cpp._CSRC).glob("*.cpp"))
    monkeypatch.setattr(cpp, "_built", {})
    monkeypatch.setenv("ATTNZOO_CPP", "0")
    assert cpp.prebuild() == [] and sorted(cpp._built) == names and not any(cpp._built.values())
