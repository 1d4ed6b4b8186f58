"""The benchmark worker: a subprocess that runs cases sent as JSON lines and answers one line each.

Running cases outside the main process keeps the main process (progress bar,
results file) alive when a method crashes the interpreter, hangs, or exhausts
memory, and gives peak-memory readings a process of their own (see
:mod:`attnzoo.bench.metrics`). The worker keeps the current problem (inputs,
float64 reference, SDPA time) while consecutive cases share it.

Protocol: stdin one ``{"case": {...}, "opts": {...}}`` per line; stdout one
JSON object per line: first ``{"hello": {...}}`` with the worker's machine
measurements, then one result per case. Anything else the methods print goes
to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from dataclasses import dataclass
from functools import cached_property
from typing import Callable
from pathlib import Path

import numpy as np
import torch

from .. import registry
from ..checks import Problem, resolve_scale
from ..core.exact import naive_attention, sdpa_attention
from ..errors import UnsupportedError
from . import metrics, workloads

#: the case fields that define the problem (everything but the method)
PROBLEM_FIELDS = ("workload", "workload_params", "length", "batch", "heads", "heads_kv", "head_dim", "causal",
                  "seed")


@dataclass
class Setup:
    """One problem and what every method on it is compared with."""

    qkv: workloads.QKV
    prob: Problem
    sdpa: Callable[[], torch.Tensor]  # torch SDPA on the problem: timed alongside every method (× SDPA)
    causal: bool

    @cached_property
    def reference(self) -> torch.Tensor:
        """Float64 exact attention, built on first use (a timing-only round never needs it)."""
        q, k, v, _ = self.qkv
        return reference_output(q, k, v, scale=self.prob.scale, causal=self.causal)


def reference_output(q, k, v, *, scale: float, causal: bool) -> torch.Tensor:
    """Exact attention in float64, one (batch, KV head) slice at a time (O(G·Nq·Nk) memory)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(*q.shape[:3], v.shape[3], dtype=torch.float64)
    for b in range(q.shape[0]):
        for g in range(k.shape[1]):
            heads = slice(g * groups, (g + 1) * groups)
            out[b:b + 1, heads], _ = naive_attention(q[b:b + 1, heads].double(), k[b:b + 1, g:g + 1].double(),
                                                     v[b:b + 1, g:g + 1].double(), scale=scale, causal=causal)
    return out


def prepare(case: dict, opts: dict) -> Setup:
    qkv = workloads.make(case["workload"], batch=case["batch"], heads=case["heads"], heads_kv=case["heads_kv"],
                         length=case["length"], dim=case["head_dim"], seed=case["seed"], **case["workload_params"])
    q, k, v, _ = qkv
    prob = Problem(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3],
                   resolve_scale(None, q.shape[3]))
    causal = case["causal"]

    def sdpa():
        return sdpa_attention(q, k, v, scale=prob.scale, causal=causal)

    with torch.no_grad():
        sdpa()  # warm-up
    return Setup(qkv, prob, sdpa, causal)


def _save_map(path: Path, m: torch.Tensor) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, m.numpy().astype(np.float16))
    return str(path)


def measure(case: dict, opts: dict, setup: Setup) -> dict:
    """Run one method on the prepared problem; a dict of metrics (status ok), or skipped/failed with the reason.

    ``opts["time_only"]``: a later round (:mod:`attnzoo.bench.runner`): only the times, which the first round's
    record gains; errors, memory, recall and density were measured there.
    """
    cls = registry.methods()[case["method"]]
    method = cls(**case["params"])
    q, k, v, _ = setup.qkv
    inputs = workloads.make_inputs(cls.inputs, setup.qkv, case["seed"])
    causal = setup.causal

    def call():
        return method(q, k, v, causal=causal, **inputs)

    try:
        out = call()
    except UnsupportedError as e:
        return {"status": "skipped", "skip_kind": "capability", "reason": str(e)}
    if not torch.isfinite(out).all():
        return {"status": "failed", "reason": "the output has NaN or inf entries"}
    peak = None if opts.get("time_only") else metrics.peak_memory(call)[1]
    timing = metrics.time_calls(call, repeat=opts["repeat"], budget_s=opts["budget_s"],
                                min_time_s=opts.get("min_time_s", 0.0), clock=metrics.bench_clock(q.device),
                                alongside=setup.sdpa)
    sdpa_s = timing.ref_median
    if opts.get("time_only"):
        return {"status": "ok", "time_s": timing.median, "time_runs": list(timing.runs), "spread": timing.spread,
                "sdpa_s": sdpa_s}
    flops, flops_source = metrics.method_flops(method, setup.prob, causal)
    result = {"status": "ok", "time_s": timing.median, "time_runs": list(timing.runs), "spread": timing.spread,
              "threads": timing.threads, "clock": timing.clock, "sdpa_s": sdpa_s, "speedup": sdpa_s / timing.median,
              "peak_bytes": peak, "flops": flops, "flops_source": flops_source,
              "gflops": flops / timing.median / 1e9, "gemm_gflops": opts["gemm_gflops"],
              "pct_gemm": 100 * flops / timing.median / 1e9 / opts["gemm_gflops"], "dim": setup.prob.dim,
              **metrics.output_errors(out, setup.reference),
              "recall": metrics.method_recall(method, q, k, v, scale=setup.prob.scale, causal=causal, **inputs),
              "density": metrics.method_density(method, q, k, causal=causal, **inputs)}
    if opts.get("maps_dir"):
        folder = Path(opts["maps_dir"])
        qm, km = metrics.map_inputs(q, k, causal=causal, inputs=inputs)
        exact_path = folder / "exact.npy"
        if not exact_path.exists():
            _save_map(exact_path, metrics.exact_map(qm, km, scale=setup.prob.scale, causal=causal))
        result["exact_map"], result["map_tokens"] = str(exact_path), km.shape[2]
        try:
            result["map"] = _save_map(folder / f"{case['method']}.npy",
                                      metrics.method_map(method, qm, km, causal=causal, **inputs))
        except Exception as e:  # noqa: BLE001 — e.g. a method that needs Dv == D: no heatmap, still a result
            result["map_error"] = f"{type(e).__name__}: {e}"
    return result


def serve(lines, send) -> None:
    """Answer each case line with a result (exceptions become ``failed`` with the message)."""
    setup, setup_key = None, None
    for line in lines:
        if not line.strip():
            continue
        request = json.loads(line)
        case, opts = request["case"], request["opts"]
        try:
            key = json.dumps([case[f] for f in PROBLEM_FIELDS], sort_keys=True)
            if key != setup_key:
                setup, setup_key = None, None  # free the previous problem before building the next
                setup, setup_key = prepare(case, opts), key
            with torch.no_grad():
                result = measure(case, opts, setup)
        except Exception as e:  # noqa: BLE001 — one case's failure must never stop the run
            traceback.print_exc(file=sys.stderr)
            result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        send(result)


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from methods go to stderr, not into the protocol
    threads = os.environ.get("ATTNZOO_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    for module in filter(None, os.environ.get("ATTNZOO_BENCH_PLUGINS", "").split(",")):
        importlib.import_module(module)

    def send(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    send({"hello": {"threads": torch.get_num_threads(), "gemm_gflops": metrics.gemm_ceiling_gflops(),
                    "peak_memory": "VmHWM reset via /proc/self/clear_refs" if metrics.peak_memory_supported()
                    else "unavailable on this OS", "pid": os.getpid()}})
    serve(sys.stdin, send)


if __name__ == "__main__":
    main()
