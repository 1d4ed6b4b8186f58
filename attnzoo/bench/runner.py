"""The benchmark runner: plan the cases from the registry, run them in a worker, append each result.

Every registered method that can run a case is measured; the rest are
recorded as skipped with the reason (a capability it does not declare, an
extra input with no generator, a shorter length that already took longer than
the per-case cap, a predicted memory need beyond what the machine has). A case
that raises, hangs past the timeout or kills the worker is recorded as failed
with the message, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import math
import os
import select
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import registry
from ..core import cpp
from ..errors import AttnZooError
from . import workloads
from .results import ResultsFile, case_key, machine_info, workload_label


@dataclass(frozen=True)
class Suite:
    """What to measure. The defaults are the quick suite (112 cases; one round took 20-35 s on 2 idle cores)."""

    methods: tuple[str, ...] = ()  # empty: every registered method
    lengths: tuple[int, ...] = (256, 1024, 2048)
    batch: int = 1
    heads: int = 4
    heads_kv: int | None = None  # None: heads (multi-head attention)
    head_dim: int = 64
    causal: bool = True
    workloads: tuple[str, ...] = ("structured", "real")  # "name" or "name:param=value,param=value"
    repeat: int = 3  # timed calls per case (after one warm-up) ...
    budget_s: float = 1.0  # ... or fewer once this much time is spent
    min_time_s: float = 0.1  # ... and more (within the budget) until this much is measured: stable medians
    # fresh worker processes that time each case (the first also measures errors, memory, recall): a fresh
    # process's time for the same case moves by up to ~30 % (memory placement, the host), so the best round is
    # reported (results.merge_rounds) and --compare flags only differences beyond the rounds' spread
    rounds: int = 3
    time_cap_s: float = 2.0  # a length whose predicted time per call exceeds this is skipped
    case_timeout_s: float = 60.0  # a case still running after this is killed and recorded as failed
    seed: int = 0
    # torch threads in the worker; None: torch's default (every core). One thread, as torch.utils.benchmark
    # defaults to, keeps a quick look reproducible on a busy machine, where idle-spinning OpenMP threads
    # can make a small call 100x slower.
    threads: int | None = 1
    plugins: tuple[str, ...] = ()  # modules to import first: methods registered outside attnzoo.catalog
    max_err: float = 1e-2  # the pick: the fastest approximation within this relative error of exact

    def replace(self, **changes) -> "Suite":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check(self) -> None:
        """Refuse any option that would make every case fail or be ignored, before the first case runs."""
        def positive_int(option: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttnZooError(f"bench: {option} expected a positive integer, got {value!r}")

        def seconds(option: str, value, allow_zero: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and not allow_zero):
                what = "a finite number of seconds >= 0" if allow_zero else "a positive finite number of seconds"
                raise AttnZooError(f"bench: {option} expected {what}, got {value!r}")

        if not self.lengths:
            raise AttnZooError("bench: --lengths expected at least one sequence length, got none")
        for n in self.lengths:
            positive_int("--lengths", n)
        for option, value in (("--batch", self.batch), ("--heads", self.heads), ("--head-dim", self.head_dim),
                              ("--repeat", self.repeat), ("--rounds", self.rounds)):
            positive_int(option, value)
        positive_int("--heads-kv", self.heads_kv, allow_none=True)
        positive_int("--threads", self.threads, allow_none=True)
        if self.heads_kv is not None and self.heads % self.heads_kv:
            raise AttnZooError(f"bench: --heads-kv expected a divisor of --heads {self.heads}, got {self.heads_kv}")
        for option, value in (("--time-cap", self.time_cap_s), ("budget_s", self.budget_s),
                              ("case_timeout_s", self.case_timeout_s)):
            seconds(option, value)
        seconds("--min-time", self.min_time_s, allow_zero=True)
        if isinstance(self.max_err, bool) or not isinstance(self.max_err, (int, float)) or not self.max_err > 0:
            raise AttnZooError(f"bench: --max-err expected a positive relative error, got {self.max_err!r}")
        if not self.workloads:
            raise AttnZooError("bench: --workload expected at least one workload, got none")
        for spec in self.workloads:
            workloads.WORKLOADS.check(*parse_workload(spec))


PRESETS = {
    "quick": Suite(),
    "full": Suite(lengths=(256, 512, 1024, 2048, 4096, 8192), heads=8, repeat=5, budget_s=5.0, time_cap_s=30.0,
                  case_timeout_s=600.0, workloads=("structured", "gaussian", "needle", "real"), threads=None),
}


# ------------------------------------------------------------------ planning
def parse_workload(spec: str) -> tuple[str, dict]:
    """``"needle:needles=16,strength=8"`` -> ``("needle", {"needles": 16, "strength": 8})``."""
    name, _, rest = spec.partition(":")
    if name not in workloads.WORKLOADS:
        try:
            workloads.WORKLOADS.lookup(name)
        except AttnZooError as e:  # "workload: unknown workload 'x'; did you mean ...? (available: ...)"
            raise AttnZooError(f"bench: {str(e).removeprefix('workload: ')}") from None
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq:
            raise AttnZooError(f"bench: workload parameter expected key=value, got {item!r} in {spec!r}")
        try:
            params[key.strip()] = json.loads(raw)
        except ValueError:
            params[key.strip()] = raw
    return name, params


#: why a case was skipped: (kind, reason); kinds group the terminal summary
Skip = tuple[str, str]


def static_skip(cls: type[registry.Method], case: dict) -> Skip | None:
    """Why ``cls`` cannot run ``case`` at all (declared capabilities, extra inputs), or None."""
    s = cls.supports
    if case["causal"] and not s.causal:
        return "capability", "non-causal only (supports.causal is False); run with --no-causal"
    if not case["causal"] and not s.noncausal:
        return "capability", "causal only (supports.noncausal is False); run with --causal"
    if case["heads_kv"] != case["heads"] and not s.gqa:
        return "capability", f"no grouped-query attention (heads={case['heads']}, heads_kv={case['heads_kv']})"
    missing = [n for n in cls.inputs if n not in workloads.INPUTS]
    if missing:
        return "extra input", (f"needs extra input(s) {missing} with no generator in attnzoo.bench.workloads "
                               "(register one with @input_generator)")
    try:
        cls(**case["params"])
    except AttnZooError as e:  # e.g. block_sparse: a mask_mod or layout is the user's to give
        return "parameters", f"cannot be built with the suite's parameters: {e}"
    return None


@dataclass(frozen=True)
class Planned:
    case: dict
    skip: Skip | None
    heatmap: bool  # save attention maps (the real workload's shortest length)


def import_plugins(modules) -> None:
    """Import modules that register methods or input generators of their own."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise AttnZooError(f"bench: plugin module {module!r} could not be imported: {e}") from e


def plan(suite: Suite) -> tuple[list[Planned], list[str]]:
    """Every case of the suite in run order (workload, length, method), and notes about what was left out."""
    import_plugins(suite.plugins)
    suite.check()
    every = registry.methods()
    names = list(suite.methods) or list(every)
    for name in names:
        registry._lookup(name)  # raises with close matches for a typo
    heads_kv = suite.heads if suite.heads_kv is None else suite.heads_kv
    planned, notes = [], []
    for spec in suite.workloads:
        name, params = parse_workload(spec)
        if name == "real":
            params = workloads.real_params(params, suite.causal)
        try:
            limit = workloads.max_length(name, params)
        except AttnZooError as e:  # e.g. the real workload without transformers installed
            notes.append(f"workload {spec} not run: {e}")
            continue
        lengths = sorted(n for n in suite.lengths if limit is None or n <= limit)
        if len(lengths) < len(suite.lengths):
            notes.append(f"workload {spec}: lengths above {limit} not run (the most its model encodes)")
        if name == "real" and lengths:
            sparse = workloads.real_lengths(lengths, params)
            if len(sparse) < len(lengths):
                notes.append(f"workload {spec} ({params['model']}): run at {', '.join(map(str, sparse))} only "
                             f"(lengths >= {workloads.REAL_SPARSE_FROM}, or the longest given, where sparse "
                             "methods are sparse)")
            lengths = sparse
        for length in lengths:
            for method in names:
                case = {"method": method, "params": {}, "workload": name, "workload_params": params,
                        "length": length, "batch": suite.batch, "heads": suite.heads, "heads_kv": heads_kv,
                        "head_dim": suite.head_dim, "causal": suite.causal, "seed": suite.seed}
                planned.append(Planned(case, static_skip(every[method], case), name == "real" and length == lengths[0]))
    return planned, notes


# -------------------------------------------------------------------- worker
class WorkerError(RuntimeError):
    """The worker timed out or died; the message says which and why."""


#: glibc's malloc raises its mmap threshold each time a process frees a large mmapped block, so whether a
#: tensor of a few MB comes from fresh, page-faulting mmap pages or from the reused heap depends on what
#: the worker ran before. Measured on an idle 2-core machine: the same performer call (N=2048, 1 thread)
#: took 73-122 ms (minimum of 5) in five fresh processes, 60-75 ms with the thresholds fixed. Every worker
#: allocates alike; variables the user set are kept. PyTorch's huge-page allocation (THP_MEM_ALLOC_ENABLE=1) is
#: not set: on a VM with THP in madvise mode it stalled large fresh allocations (benchmarks/prefill.py at 32K,
#: same load: vertical_slash 2.38x SDPA with it vs 3.06x without, hip 1.48x vs 1.60x, block_topk 4.18x vs 4.12x).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def worker_env(threads: int | None, plugins: tuple[str, ...] = ()) -> dict[str, str]:
    """The worker's environment: offline hub, this package importable, threads, plugins, steady malloc."""
    env = {**STEADY_MALLOC, **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if threads:
        env["ATTNZOO_BENCH_THREADS"] = str(threads)
    env["ATTNZOO_BENCH_PLUGINS"] = ",".join(plugins)
    return env


class Worker:
    """A ``python -m attnzoo.bench.worker`` subprocess answering one JSON line per case."""

    def __init__(self, log_path: Path, threads: int | None, plugins: tuple[str, ...] = ()):
        env = worker_env(threads, plugins)
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "attnzoo.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.hello = self._read(timeout=300)["hello"]

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise WorkerError(f"timed out after {timeout:.0f} s (worker killed)")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = self._log_tail()
            self.close()
            raise WorkerError(f"the worker died (exit code {code}; -9 is a kill, e.g. out of memory); "
                              f"last output: {tail}")
        return json.loads(line)

    def _log_tail(self) -> str:
        self.log.flush()
        tail = self.log_path.read_bytes()[-400:].decode(errors="replace").strip().splitlines()
        return " | ".join(tail[-3:])

    def run(self, case: dict, opts: dict, timeout: float) -> dict:
        self.proc.stdin.write((json.dumps({"case": case, "opts": opts}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------- run
def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Limits:
    """Per (workload, method) reasons to skip longer lengths, learned from the lengths already run.

    Attention costs up to O(N²), so time and memory measured at a shorter
    length are scaled quadratically: a length is skipped when its predicted
    time per call exceeds the per-case cap (or a measured one already did), or
    its predicted peak memory exceeds half of what the machine has available.
    """

    def __init__(self, suite: Suite):
        self.suite = suite
        self.reasons: dict[tuple[str, str], Skip] = {}
        self.seen: dict[tuple[str, str], dict] = {}  # the longest measured case

    def learn(self, case: dict, result: dict) -> None:
        key = (workload_label(case), case["method"])
        if result["status"] == "failed" and result.get("worker_error"):
            self.reasons[key] = "earlier failure", f"at length {case['length']}: {result['reason']}"
        elif result["status"] == "ok" and case["length"] >= self.seen.get(key, {"length": 0})["length"]:
            self.seen[key] = {"length": case["length"], "time_s": result["time_s"],
                              "peak_bytes": result.get("peak_bytes")}

    def skip(self, case: dict) -> Skip | None:
        key = (workload_label(case), case["method"])
        if key in self.reasons:
            return self.reasons[key]
        if key not in self.seen:
            return None
        last = self.seen[key]
        growth = (case["length"] / last["length"]) ** 2
        if last["time_s"] * growth > self.suite.time_cap_s:
            return "time cap", (f"{last['time_s']:.2f} s per call at length {last['length']} predicts "
                                f"{last['time_s'] * growth:.1f} s here (quadratic), over the per-case cap of "
                                f"{self.suite.time_cap_s:g} s (raise it with --time-cap)")
        available = _mem_available()
        if last["peak_bytes"] and available and last["peak_bytes"] * growth > available / 2:
            return "memory", (f"predicted peak memory {last['peak_bytes'] * growth / 2**30:.1f} GiB (quadratic from "
                              f"length {last['length']}) exceeds half of the {available / 2**30:.1f} GiB available")
        return None


def _family(name: str) -> str:
    return registry.methods()[name].family.value


def run(suite: Suite, out_dir: str | Path, *, resume: bool = False, progress: Callable | None = None,
        on_note=print) -> Path:
    """Run ``suite`` into ``out_dir/results.jsonl``; returns the results path.

    ``resume`` continues an interrupted run: finished cases are kept, a cut-off
    trailing line is moved aside (and reported through ``on_note``), the rest run.
    ``progress`` is a callable ``(total) -> object with .advance(description) and .close()``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultsFile(out_dir)
    with store.lock():  # one writer per results folder: a second --resume is refused, not interleaved
        return _run(suite, out_dir, store, resume, progress, on_note)


def _run(suite: Suite, out_dir: Path, store: ResultsFile, resume: bool, progress: Callable | None,
         on_note) -> Path:
    if store.exists() and not resume:
        raise AttnZooError(f"bench: {store.path} already holds results; pass --resume to continue that run "
                           "or choose another --out")
    for note in store.repair() if store.exists() else []:
        on_note(f"[results] {note}")
    earlier = store.read().cases if store.exists() else []
    done = {c["key"] for c in earlier}
    planned, notes = plan(suite)
    for note in notes:
        on_note(note)
    todo = [p for p in planned if case_key(p.case) not in done]
    if len(todo) < len(planned):
        on_note(f"resuming: {len(planned) - len(todo)} of {len(planned)} cases already in {store.path}")
    if not todo and not any(_round_todo(store, planned, r) for r in range(2, suite.rounds + 1)):
        return store.path
    run_id = uuid.uuid4().hex[:12]
    cpp.prebuild()  # here, not in a worker: a first build must not count against a case's timeout
    worker = Worker(out_dir / "worker.log", suite.threads, suite.plugins)
    store.append({"type": "run", "run_id": run_id, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "resumed": bool(done), "suite": dataclasses.asdict(suite),
                  "machine": {**machine_info(), **worker.hello}})
    limits = _Limits(suite)
    for case in earlier:  # a resumed run remembers which lengths were too slow or too big
        limits.learn(case, case)
    bar = progress(len(todo)) if progress and todo else None
    captured: set[str] = set()
    try:
        for item in todo:
            case = item.case
            skip = item.skip or limits.skip(case)
            if skip is not None:
                result = {"status": "skipped", "skip_kind": skip[0], "reason": skip[1]}
            else:
                if case["workload"] == "real":
                    _capture_once(case, captured, on_note)
                opts = {"repeat": suite.repeat, "budget_s": suite.budget_s, "min_time_s": suite.min_time_s, "gemm_gflops": worker.hello["gemm_gflops"],
                        "maps_dir": str(out_dir / "maps" / _map_folder(case)) if item.heatmap else None}
                worker, result = _run_in(worker, suite, out_dir, case, opts)
                for field in ("map", "exact_map"):  # relative, so the results folder can move
                    if field in result:
                        result[field] = os.path.relpath(result[field], out_dir)
                limits.learn(case, result)
            store.append({"type": "case", "run_id": run_id, "key": case_key(case), **case,
                          "family": _family(case["method"]), **result})
            if bar:
                bar.advance(f"{workload_label(case)} N={case['length']} {case['method']}")
    finally:
        worker.close()
        if bar:
            bar.close()
    for r in range(2, suite.rounds + 1):
        _time_round(suite, out_dir, store, run_id, r, _round_todo(store, planned, r), progress)
    return store.path


def _run_in(worker: Worker, suite: Suite, out_dir: Path, case: dict, opts: dict) -> tuple[Worker, dict]:
    """Run one case in ``worker`` (a fresh one if it died): the worker to use next and the result; a worker
    timeout or death is the case's failure."""
    if not worker.alive():
        worker = Worker(out_dir / "worker.log", suite.threads, suite.plugins)
    try:
        return worker, worker.run(case, opts, suite.case_timeout_s)
    except WorkerError as e:
        return worker, {"status": "failed", "reason": str(e), "worker_error": True}


def _round_todo(store: ResultsFile, planned: list[Planned], r: int) -> list[dict]:
    """The ok cases not yet timed in round ``r``: plan order in odd rounds, reversed in even ones, so that
    each case's rounds sit at different points of the run and a drift of the machine spreads over them."""
    if not store.exists():
        return []
    contents = store.read()
    ok = {c["key"] for c in contents.cases if c["status"] == "ok"}
    have = {x["key"] for x in contents.rounds if x["round"] == r}
    cases = [p.case for p in planned if case_key(p.case) in ok and case_key(p.case) not in have]
    return cases if r % 2 else cases[::-1]


def _time_round(suite: Suite, out_dir: Path, store: ResultsFile, run_id: str, r: int, cases: list[dict],
                progress: Callable | None) -> None:
    """Time ``cases`` again in a fresh worker process (round ``r``), appending one round record each."""
    if not cases:
        return
    worker = Worker(out_dir / "worker.log", suite.threads, suite.plugins)
    bar = progress(len(cases)) if progress else None
    opts = {"repeat": suite.repeat, "budget_s": suite.budget_s, "min_time_s": suite.min_time_s, "time_only": True}
    try:
        for case in cases:
            worker, result = _run_in(worker, suite, out_dir, case, opts)
            store.append({"type": "round", "run_id": run_id, "key": case_key(case), "round": r, **result})
            if bar:
                bar.advance(f"round {r}/{suite.rounds} {workload_label(case)} N={case['length']} {case['method']}")
    finally:
        worker.close()
        if bar:
            bar.close()


def _capture_once(case: dict, done: set[str], on_note) -> None:
    """Run the real workload's model here, once per (parameters, length, batch), before the worker needs it:
    a capture (a model forward, minutes at 8K on a busy machine) must not count against a case's timeout.
    The worker then reads the cached file. A failure is left to the worker to report as the case's."""
    key = json.dumps([case["workload_params"], case["length"], case["batch"]], sort_keys=True)
    if key in done:
        return
    done.add(key)
    try:
        if workloads.prepare_real(case["workload_params"], length=case["length"], batch=case["batch"]):
            on_note(f"real workload: captured {case['workload_params'].get('model', 'MiniLM')} Q/K/V at "
                    f"{case['length']} tokens (kept in the attnzoo cache for later runs)")
    except AttnZooError:
        pass


def _map_folder(case: dict) -> str:
    causal = "causal" if case["causal"] else "noncausal"
    return f"{case['workload']}-N{case['length']}-{causal}"
