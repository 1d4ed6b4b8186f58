"""Turn case records into the tables the terminal and the report show (leaderboard, skips, comparison)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .results import relative_times, workload_label

#: ``--compare`` flags a case only beyond this relative difference (and beyond the rounds' spread)
COMPARE_TOLERANCE = 0.15

#: leaderboard columns: (header, record field, format)
COLUMNS = (
    ("method", "method", "{}"),
    ("family", "family", "{}"),
    ("N", "length", "{}"),
    ("time ms", "time_ms", "{:.2f}"),
    ("±%", "spread_pct", "{:.0f}"),
    ("× SDPA", "speedup", "{:.2f}"),
    ("peak MiB", "peak_mib", "{:.1f}"),
    ("rel err", "rel_error", "{:.1e}"),
    ("cosine", "cosine", "{:.4f}"),
    ("recall", "recall", "{:.3f}"),
    ("density", "density", "{:.3f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("% GEMM", "pct_gemm", "{:.0f}"),
)


#: methods that are a different attention model, not an approximation of softmax attention: their distance
#: from exact is by design (a model trained with them would learn around it), so no error or accuracy limit
#: makes them a fair pick; tables label them and picks leave them out
DIFFERENT_MODELS = {
    "linear": "linear attention with elu+1 features instead of softmax",
    "lightning": "linear attention with a decay per head",
    "gla": "gated linear attention (a recurrent model; the bench's gates are random)",
    "based": "Taylor-feature linear attention plus a sliding window",
}


def different_model(method: str) -> str | None:
    """Why ``method`` is a different model rather than an approximation of softmax attention, or None."""
    return DIFFERENT_MODELS.get(method)


def fmt(value, spec: str) -> str:
    """A cell: blank for a missing value (not applicable / not measured), never a made-up number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return spec.format(value)


def _row(case: dict) -> dict:
    peak = case.get("peak_bytes")
    family = case.get("family", "") + (" (different model)" if different_model(case["method"]) else "")
    return {**case, "family": family, "time_ms": case["time_s"] * 1e3, "spread_pct": case["spread"] * 100,
            "peak_mib": None if peak is None else peak / 2**20}


@dataclass
class Board:
    """The ranked results of one workload at one length (the longest measured)."""

    workload: str
    causal: bool
    length: int
    rows: list[dict]


def leaderboards(cases: list[dict], every_length: bool = False) -> list[Board]:
    """Per (workload, causal): the ok cases at the longest length any method reached (or, with
    ``every_length``, one board per length, longest first), fastest first."""
    groups: dict[tuple[str, bool], list[dict]] = {}
    for c in cases:
        if c["status"] == "ok":
            groups.setdefault((workload_label(c), c["causal"]), []).append(c)
    boards = []
    for (label, causal), group in groups.items():
        lengths = sorted({c["length"] for c in group}, reverse=True)
        for length in lengths if every_length else lengths[:1]:
            rows = sorted((_row(c) for c in group if c["length"] == length), key=lambda r: r["time_s"])
            boards.append(Board(label, causal, length, rows))
    return boards


def advice(board: Board, max_err: float = 1e-2) -> str:
    """What to pick from a leaderboard: the fastest method within ``max_err`` relative error of exact.

    Methods that are a different model (:data:`DIFFERENT_MODELS`) are never picked, however fast, and are
    named as such; the fastest approximation at any error is shown next to the pick.
    """
    rows = board.rows
    if not rows:
        return ""
    approx = [r for r in rows if not different_model(r["method"])]
    pick = next((r for r in approx if r["rel_error"] <= max_err), None)
    if pick is None:
        text = f"no approximation of softmax attention reached rel err ≤ {max_err:g}"
    else:
        text = f"pick (rel err ≤ {max_err:g}): {pick['method']} ({pick['speedup']:.2f}× SDPA, rel err " \
               f"{pick['rel_error']:.1e})"
    if approx and approx[0] is not pick:
        text += (f"; fastest at any error: {approx[0]['method']} ({approx[0]['speedup']:.2f}× SDPA, rel err "
                 f"{approx[0]['rel_error']:.1e})")
    others = [r["method"] for r in rows if different_model(r["method"])]
    if others:
        text += f"; never picked (different models, not approximations): {', '.join(others)}"
    return text


def cells(row: dict) -> list[str]:
    return [fmt(row.get(field), spec) for _, field, spec in COLUMNS]


def not_run(cases: list[dict]) -> list[dict]:
    """Skipped and failed cases, with their reasons, in run order."""
    return [c for c in cases if c["status"] != "ok"]


def compare(current: list[dict], other: list[dict], tolerance: float = COMPARE_TOLERANCE) -> list[dict]:
    """Cases measured (ok) in both runs, matched by case key: times, the ratio other / current, and a flag.

    ``ratio_sdpa`` is the same ratio of each time relative to its run's SDPA time
    (``sdpa_s``, measured alongside the case): other/now of ``1 / speedup``. A
    machine that is slower during one run slows SDPA too, so this ratio stays
    near 1 for unchanged code where the plain one drifts (None when a record
    lacks ``sdpa_s``).

    ``flag`` is ``"slower"`` / ``"faster"`` (this run against the other) only when the
    difference is both beyond ``tolerance`` (of ``ratio_sdpa``, else ``ratio``) and
    beyond the measured between-round spread: the two runs' per-round values (each
    round's time ÷ its SDPA time, :func:`attnzoo.bench.results.relative_times`) do
    not overlap. With one round per run only the tolerance applies. Else ``flag`` is "".
    """
    before = {c["key"]: c for c in other if c["status"] == "ok"}
    rows = []
    for c in current:
        o = before.get(c["key"])
        if c["status"] == "ok" and o is not None:
            ratio = o["time_s"] / c["time_s"]
            rel = ratio * c["sdpa_s"] / o["sdpa_s"] if c.get("sdpa_s") and o.get("sdpa_s") else None
            if rel is None:  # compare plain times per round
                now_v, other_v = c.get("round_times") or [c["time_s"]], o.get("round_times") or [o["time_s"]]
            else:
                now_v, other_v = relative_times(c), relative_times(o)
            overlap = min(now_v) <= max(other_v) and min(other_v) <= max(now_v)
            if len(now_v) == 1 and len(other_v) == 1:
                overlap = False  # no spread measured: the tolerance alone decides
            diff = (ratio if rel is None else rel) - 1
            flag = "" if abs(diff) <= tolerance or overlap else ("faster" if diff > 0 else "slower")
            rows.append({"method": c["method"], "workload": workload_label(c), "length": c["length"],
                         "now_ms": c["time_s"] * 1e3, "other_ms": o["time_s"] * 1e3, "ratio": ratio,
                         "ratio_sdpa": rel, "now_err": c["rel_error"], "other_err": o["rel_error"],
                         "now_rounds": len(now_v), "other_rounds": len(other_v),
                         "now_spread": _spread(now_v), "other_spread": _spread(other_v), "flag": flag})
    return sorted(rows, key=lambda r: (r["workload"], r["method"], r["length"]))


def _spread(values: list[float]) -> float:
    """(max - min) / median: 0 for a single value."""
    return (max(values) - min(values)) / statistics.median(values)


def compare_summary(rows: list[dict], tolerance: float = COMPARE_TOLERANCE) -> str:
    """One line: how many compared cases lie within ±tolerance (÷ SDPA where known) and how many are flagged."""
    if not rows:
        return "no case in common"
    within = sum(abs((r["ratio"] if r["ratio_sdpa"] is None else r["ratio_sdpa"]) - 1) <= tolerance for r in rows)
    slower = sum(r["flag"] == "slower" for r in rows)
    faster = sum(r["flag"] == "faster" for r in rows)
    return (f"{within} of {len(rows)} cases within ±{tolerance:.0%} (÷ SDPA where both runs timed SDPA); "
            f"flagged beyond ±{tolerance:.0%} and the between-round spread: {slower} slower, {faster} faster")
