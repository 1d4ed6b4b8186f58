"""The eval's tables and pick, from results rows: per (task, length), every case next to exact."""

from __future__ import annotations

from dataclasses import dataclass

from ..bench.tables import different_model, fmt
from .cases import describe

MIB = 2 ** 20


@dataclass
class Group:
    """The rows of one task at one length, exact's row first."""

    task: str
    length: int
    metric: str
    rows: list[dict]
    exact: dict | None


def groups(cases: list[dict]) -> list[Group]:
    out: dict[tuple, Group] = {}
    for c in cases:
        if c.get("suite_kind") != "eval":
            continue
        key = (c["task"], c["length"])
        g = out.setdefault(key, Group(c["task"], c["length"], c.get("metric") or "accuracy", [], None))
        if c["status"] == "ok":
            g.metric = c["metric"]
            if c["kind"] == "prefill" and c["name"] == "exact":
                g.exact = c
        g.rows.append(c)
    for g in out.values():
        g.rows.sort(key=lambda c: (c is not g.exact, c["kind"] != "prefill", describe(c)))
    return sorted(out.values(), key=lambda g: (g.task, g.length))


def relative(g: Group, row: dict) -> float | None:
    """The row's figure as a share of exact's: accuracy / exact accuracy, or exact perplexity / perplexity."""
    if g.exact is None or row["status"] != "ok":
        return None
    a, e = row["score"], g.exact["score"]
    if g.metric == "perplexity":
        return e / a if a else None
    return a / e if e else (1.0 if a == 0 else None)


COLUMNS = ("case", "score (n)", "of exact", "KV MiB held / full", "prefill s", "× exact", "s/token", "recall",
           "density", "parameters")


def parameters(row: dict) -> str:
    """The parameters the case ran with, defaults included (a method's shares as counts at this length)."""
    return ",".join(f"{k}={v}" for k, v in sorted((row.get("resolved") or {}).items()) if v is not None)


def label(row: dict) -> str:
    """The case, marked when it is a different model (never picked)."""
    return describe(row) + (" (different model)" if row["kind"] == "prefill" and different_model(row["name"]) else "")


def cells(g: Group, row: dict) -> list[str]:
    if row["status"] != "ok":
        return [label(row), row["status"], "", "", "", "", "", "", "", row.get("reason", "")[:80]]
    spec = "{:.1f}" if g.metric == "perplexity" else "{:.2f}"
    speed = g.exact["prefill_s"] / row["prefill_s"] if g.exact and row["prefill_s"] else None
    return [label(row), f"{fmt(row['score'], spec)} ({row['n']})", fmt(relative(g, row), "{:.2f}"),
            f"{row['kv_bytes'] / MIB:.1f} / {row['kv_full_bytes'] / MIB:.1f}", fmt(row["prefill_s"], "{:.2f}"),
            fmt(speed, "{:.2f}"), fmt(row.get("decode_s_per_token"), "{:.3f}"), fmt(row.get("recall"), "{:.3f}"),
            fmt(row.get("density"), "{:.3f}"), parameters(row)]


def pick(g: Group, min_accuracy: float = 0.95) -> str:
    """The least-memory cache policy and the fastest prefill method keeping ``min_accuracy`` of exact's figure."""
    if g.exact is None:
        return "no exact row to compare with"
    ok = [r for r in g.rows if r["status"] == "ok" and r is not g.exact and (relative(g, r) or 0) >= min_accuracy
          and not (r["kind"] == "prefill" and different_model(r["name"]))]
    n = g.exact["n"]
    parts = []
    held = [r for r in ok if r["kv_bytes"] < g.exact["kv_bytes"]]
    if held:
        best = min(held, key=lambda r: r["kv_bytes"])
        parts.append(f"least memory: {describe(best)} ({best['kv_bytes'] / MIB:.1f} of "
                     f"{best['kv_full_bytes'] / MIB:.1f} MiB, {fmt(relative(g, best), '{:.2f}')} of exact)")
    faster = [r for r in ok if r["kind"] == "prefill" and r["prefill_s"] < g.exact["prefill_s"]]
    if faster:
        best = min(faster, key=lambda r: r["prefill_s"])
        parts.append(f"fastest prefill: {describe(best)} ({g.exact['prefill_s'] / best['prefill_s']:.2f}× exact)")
    if not parts:
        return f"nothing kept ≥ {min_accuracy:.0%} of exact's {g.metric} with less memory or time (n={n})"
    return f"keeping ≥ {min_accuracy:.0%} of exact's {g.metric} (n={n} samples): " + "; ".join(parts)
