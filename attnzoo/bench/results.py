"""The results file: JSON lines appended one case at a time, safe to interrupt and resume.

Line types: ``{"type": "run", ...}`` opens each (resumed) session with the
machine block (host, CPU, torch, thread count, GEMM ceiling, attnzoo git
revision) and the suite; ``{"type": "case", "key": ..., "status": ...}`` is one
finished case (ok, skipped or failed), measured in the first round;
``{"type": "round", "key": ..., "round": r, ...}`` is that case timed again in
round r, a fresh worker process (see :func:`merge_rounds`). Each line is written with a single
``write`` and flushed to disk before the next case starts, so a kill loses at
most the case in flight and can leave at most one partial trailing line.
Reading reports such a line (never drops it silently); :meth:`ResultsFile.repair`
moves it aside into ``results.jsonl.corrupt`` before a resumed run appends.
A record that lost only its newline is kept: :meth:`ResultsFile.append` ends the
file with one before writing. :meth:`ResultsFile.lock` lets one process write a
results folder at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AttnZooError

FILENAME = "results.jsonl"


def case_key(case: dict) -> str:
    """The identity of a case (method, parameters, workload, sizes, causal, seed) as a canonical string."""
    return json.dumps(case, sort_keys=True, separators=(",", ":"))


def workload_label(case: dict) -> str:
    """``needle:needles=16`` — a case's workload with its parameters, as the tables show it."""
    params = ",".join(f"{k}={v}" for k, v in sorted(case["workload_params"].items()))
    return case["workload"] + (f":{params}" if params else "")


def git_revision() -> str:
    """``git describe`` of the attnzoo checkout (with ``-dirty``), or why it is unknown."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers depend on, measured in the benchmark's main process."""
    import torch

    from .. import __version__

    return {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "attnzoo": __version__, "git": git_revision()}


@dataclass
class Contents:
    """A parsed results file: run headers, case records, and the problems found reading it."""

    runs: list[dict] = field(default_factory=list)
    #: case records, with the later rounds' times merged in (:func:`merge_rounds`)
    cases: list[dict] = field(default_factory=list)
    #: the later rounds' records as stored (``round`` >= 2)
    rounds: list[dict] = field(default_factory=list)
    #: (1-based line number, description) of each unreadable line
    problems: list[tuple[int, str]] = field(default_factory=list)
    #: byte offset where trailing unreadable lines begin (None when the file ends cleanly)
    corrupt_tail_at: int | None = None

    @property
    def done(self) -> set[str]:
        return {c["key"] for c in self.cases}


def merge_rounds(cases: list[dict], rounds: list[dict]) -> list[dict]:
    """Each ok case with the times of every round it was measured in (its own record is round 1).

    A case gains ``round_times`` and ``round_sdpa`` (seconds per call, one entry
    per ok round, in round order) and reports its best round: the one with the
    smallest time relative to the SDPA time measured alongside it (the smallest
    time when SDPA was not timed) gives ``time_s``, ``sdpa_s`` and ``speedup``;
    ``spread`` becomes the between-round spread of the SDPA-relative time,
    (max - min) / median. Why the best round: other processes and a fresh
    process's memory placement only ever slow a case down, and in back-to-back
    quick benches of unchanged code (3 rounds, 112 cases, load 6-12) the best
    round left 18 cases outside ±15 % against 28 for one round and 32 for the
    median of three. The first round's own numbers stay in ``round1_time_s`` /
    ``round1_spread``.
    """
    later: dict[str, list[dict]] = {}
    for r in rounds:
        if r.get("status") == "ok":
            later.setdefault(r["key"], []).append(r)
    merged = []
    for c in cases:
        extra = sorted(later.get(c["key"], ()), key=lambda r: r["round"])
        if c.get("status") != "ok" or "time_s" not in c:
            merged.append(c)
            continue
        times = [c["time_s"]] + [r["time_s"] for r in extra]
        sdpa = [c.get("sdpa_s")] + [r.get("sdpa_s") for r in extra]
        c = {**c, "round_times": times, "round_sdpa": sdpa, "round1_time_s": c["time_s"],
             "round1_spread": c.get("spread")}
        if len(times) > 1:
            rel = relative_times(c)
            best = rel.index(min(rel))
            c["time_s"], c["spread"] = times[best], (max(rel) - min(rel)) / statistics.median(rel)
            if all(sdpa):
                c["sdpa_s"], c["speedup"] = sdpa[best], sdpa[best] / times[best]
            if c.get("flops") is not None:
                c["gflops"] = c["flops"] / c["time_s"] / 1e9
                if c.get("gemm_gflops"):
                    c["pct_gemm"] = 100 * c["gflops"] / c["gemm_gflops"]
        merged.append(c)
    return merged


def relative_times(case: dict) -> list[float]:
    """A merged ok case's time per round, divided by the SDPA time measured alongside it in that round
    (plain seconds when a round lacks SDPA's time): the values ``--compare`` weighs."""
    times, sdpa = case.get("round_times") or [case["time_s"]], case.get("round_sdpa") or [case.get("sdpa_s")]
    return [t / s for t, s in zip(times, sdpa)] if all(sdpa) else list(times)


class ResultsFile:
    """One results file; ``path`` is the ``.jsonl`` file or a folder holding ``results.jsonl``."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path / FILENAME if path.is_dir() or not path.suffix else path

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def read(self) -> Contents:
        if not self.path.exists():
            raise AttnZooError(f"results: {self.path} does not exist")
        data = self.path.read_bytes()
        contents = Contents()
        offset, last_good_end = 0, 0
        for number, raw in enumerate(data.split(b"\n"), start=1):
            offset += len(raw) + 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                kind = record["type"]
            except (ValueError, KeyError, TypeError) as e:
                complete = offset <= len(data)
                what = "a line" if complete else "an unterminated last line (write cut short)"
                contents.problems.append((number, f"{what} of {len(raw)} bytes is not a valid record "
                                                  f"({type(e).__name__}): {raw[:60]!r}"))
                continue
            if contents.problems:
                first = contents.problems[0][0]
                raise AttnZooError(f"results: {self.path} line {first} is corrupt but valid records follow it "
                                   f"(line {number}); inspect the file: {contents.problems[0][1]}")
            {"run": contents.runs, "round": contents.rounds}.get(kind, contents.cases).append(record)
            last_good_end = min(offset, len(data))
        if contents.problems:
            contents.corrupt_tail_at = last_good_end
        contents.cases = merge_rounds(contents.cases, contents.rounds)
        return contents

    def repair(self) -> list[str]:
        """Move unreadable trailing lines to ``<file>.corrupt`` and truncate; returns what was done."""
        contents = self.read()
        if contents.corrupt_tail_at is None:
            return []
        data = self.path.read_bytes()
        aside = self.path.with_name(self.path.name + ".corrupt")
        with open(aside, "ab") as f:
            f.write(data[contents.corrupt_tail_at:].rstrip(b"\n") + b"\n")
        with open(self.path, "r+b") as f:
            f.truncate(contents.corrupt_tail_at)
        return [f"{self.path.name} line {n}: {what} — moved to {aside.name}; its case will run again"
                for n, what in contents.problems]

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's ``.lock`` for one writer; a second writer gets an AttnZooError at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(".lock")
        with open(lock_path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise AttnZooError(f"bench: {self.path.parent} is being written by {holder}; wait for it to "
                                   "finish (or stop it) before resuming, or choose another --out") from None
            f.truncate(0)
            f.write(f"attnzoo bench (pid {os.getpid()})")
            f.flush()
            try:
                yield
            finally:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # the last record lost its newline
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
