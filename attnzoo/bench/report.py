"""``attnzoo report RESULTS``: a self-contained ``report.html`` with PNG plots (matplotlib).

The page holds the leaderboard, time vs length on log-log axes (one panel per
family, only with several lengths) with each method's fitted exponent, the error vs speedup Pareto front, side-by-side
attention heatmaps (exact vs each method) on the real workload, the cases
that were skipped or failed and why, and the machine block. Each plot is
written to ``plots/`` next to the page and also embedded in it (base64), so the
page opens anywhere on its own.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from . import tables
from .results import ResultsFile, workload_label

#: errors below this are float32 round-off: drawn at the floor and treated as equal on the Pareto front
_ERROR_FLOOR = 1e-5


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fitted_exponent(lengths, times) -> float | None:
    """Slope of log(time) against log(length) by least squares (None with fewer than 2 lengths)."""
    if len(set(lengths)) < 2:
        return None
    return float(np.polyfit(np.log(lengths), np.log(times), 1)[0])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


def _style(i: int) -> dict:
    """Line style of the i-th series when many share one axis (colour, then dash and marker cycle)."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4],
            "marker": "osv^D"[i // 10 % 5], "markersize": 3}


def _colours(n: int) -> list:
    """``n`` distinct colours: tab10 while it lasts, then evenly spaced hues."""
    plt = _pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def plot_time_vs_length(cases: list[dict], path: Path, title: str) -> dict[str, float | None]:
    """Log-log time per call vs length, one panel per family (distinct colours within a panel, torch SDPA
    in every panel); returns each method's fitted exponent. Needs cases at two lengths or more."""
    plt = _pyplot()
    by_method: dict[str, dict[int, float]] = {}
    family: dict[str, str] = {}
    sdpa: dict[int, float] = {}
    for c in cases:
        by_method.setdefault(c["method"], {})[c["length"]] = c["time_s"]
        family[c["method"]] = c.get("family", "")
        sdpa[c["length"]] = c["sdpa_s"]
    families = sorted(set(family.values()))
    cols = min(3, len(families))
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    for ax in axes.flat[len(families):]:
        ax.axis("off")
    lengths = sorted(sdpa)
    slope = fitted_exponent(lengths, [sdpa[n] for n in lengths])
    exponents = {}
    for ax, fam in zip(axes.flat, families):
        names = sorted(m for m in by_method if family[m] == fam)
        for name, colour in zip(names, _colours(len(names))):
            points = by_method[name]
            ns = sorted(points)
            exponents[name] = fitted_exponent(ns, [points[n] for n in ns])
            label = name if exponents[name] is None else f"{name} (N^{exponents[name]:.2f})"
            ax.plot(ns, [points[n] * 1e3 for n in ns], label=label, color=colour, marker="o", markersize=3)
        ax.plot(lengths, [sdpa[n] * 1e3 for n in lengths], color="black", linewidth=2.5, alpha=0.4,
                label="torch SDPA" + ("" if slope is None else f" (N^{slope:.2f})"))
        ax.set(xscale="log", yscale="log", title=fam)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left")
    fig.supxlabel("sequence length N")
    fig.supylabel("time per call (ms)")
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return exponents


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (speedup, error) points no other point beats on both (faster and no less accurate)."""
    front = []
    for i, (s, e) in enumerate(points):
        dominated = any((s2 >= s and e2 <= e) and (s2 > s or e2 < e) for j, (s2, e2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: list[dict], path: Path, title: str) -> list[str]:
    """Relative error vs speedup over SDPA, coloured by family; returns (and labels) the Pareto front."""
    plt = _pyplot()
    points = [(r["speedup"], max(r["rel_error"], _ERROR_FLOOR)) for r in rows]
    front = pareto_front(points)
    families = sorted({r["family"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 6))
    for family, colour in zip(families, _colours(len(families))):
        mine = [p for r, p in zip(rows, points) if r["family"] == family]
        ax.scatter([s for s, _ in mine], [e for _, e in mine], s=24, color=colour, label=family, zorder=3)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="black", alpha=0.5, zorder=2,
            marker="o", markerfacecolor="none", markersize=10, label="Pareto front (labelled)")
    ax.axvline(1.0, color="grey", linestyle=":", label="torch SDPA speed")
    ax.set(xscale="log", yscale="log", xlabel="speedup over torch SDPA (×)",
           ylabel=f"relative Frobenius error vs exact (float32 floor {_ERROR_FLOOR:g})", title=title)
    ax.margins(x=0.25, y=0.35)  # room for the labels at the edges: no point or label is clipped
    for k, i in enumerate(front):
        ax.annotate(rows[i]["method"], points[i], fontsize=8, xytext=(5, 6 if k % 2 else -11),
                    textcoords="offset points", annotation_clip=False,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [rows[i]["method"] for i in front]


def plot_heatmaps(maps: list[tuple[str, np.ndarray]], path: Path, title: str) -> None:
    """A grid of attention maps, exact first, on one shared colour scale (square-root for contrast)."""
    plt = _pyplot()
    cols = min(6, len(maps))
    rows = math.ceil(len(maps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.4 * rows + 0.4), squeeze=False,
                             layout="constrained")
    from matplotlib.colors import LogNorm

    # attention weights span decades (a row's mass spreads over N keys): a log scale from 1/(100·N) to the
    # largest weight shows both the pattern and its tail; zeros (keys not read) stay black
    n = max(m.shape[-1] for _, m in maps)
    norm = LogNorm(vmin=1.0 / (100 * n), vmax=max(float(m.max()) for _, m in maps) or 1.0, clip=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, maps):
        ax.imshow(np.clip(m.astype(np.float32), norm.vmin, None) * (m > 0), cmap="magma", norm=norm,
                  interpolation="nearest")
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _figure(path: Path, root: Path, caption: str) -> str:
    rel = path.relative_to(root).as_posix()
    data = base64.b64encode(path.read_bytes()).decode()
    rel, caption = html.escape(rel), html.escape(caption)
    return (f'<figure><img src="data:image/png;base64,{data}" data-file="{rel}" alt="{caption}">'
            f'<figcaption>{caption} (<a href="{rel}">{rel}</a>)</figcaption></figure>')


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}
figure{margin:1.5em 0}.scroll{overflow-x:auto;max-width:100%}figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:1px 4px}"""


def build_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: next to the results file) and its ``plots/``; returns the page path."""
    store = ResultsFile(results)
    contents = store.read()
    root = store.path.parent
    out = Path(out) if out else root / "report.html"
    plots = out.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    cases = contents.cases
    max_err = next((r["suite"].get("max_err") for r in reversed(contents.runs) if r["suite"].get("max_err")), 1e-2)
    parts = [f"<h1>attnzoo benchmark</h1><p>{len(cases)} cases from <code>{html.escape(str(store.path))}</code>: "
             f"{sum(c['status'] == 'ok' for c in cases)} measured, "
             f"{sum(c['status'] == 'skipped' for c in cases)} skipped, "
             f"{sum(c['status'] == 'failed' for c in cases)} failed.</p>",
             "".join(f"<p style='color:#b00'><b>Unreadable line {n}</b> (left out of this page; "
                     f"<code>attnzoo bench --resume</code> moves it aside and reruns its case): {html.escape(what)}</p>"
                     for n, what in contents.problems),
             "<p>Time is the median of the timed calls after a warm-up; <b>× SDPA</b> is torch SDPA's time on the "
             "same inputs in the same process divided by the method's; errors are against exact attention in float64; "
             "<b>recall</b> is the share of exact attention mass on the keys the method reads (blank: the method does "
             "not expose its selection); <b>density</b> is the share of the visible (query, key) pairs it reads "
             "(1 for exact; blank: not exposed, or not a subset of the keys); GFLOP/s counts exact attention's FLOPs unless the method reports its "
             "own, and % GEMM compares it with a float32 matmul measured on the same machine; "
             "peak MiB is the worker's resident-set high-water mark during one call above its level before.</p>"]
    for board in tables.leaderboards(cases):
        causal = "causal" if board.causal else "non-causal"
        title = f"{board.workload}, {causal}, N={board.length}"
        group = [c for c in cases if c["status"] == "ok" and workload_label(c) == board.workload
                 and c["causal"] == board.causal]
        slug = _slug(f"{board.workload}-{causal}")
        several = len({c["length"] for c in group}) >= 2
        exponents = plot_time_vs_length(group, plots / f"time_vs_length-{slug}.png",
                                        f"time vs length: {board.workload}, {causal}") if several else {}
        front = plot_pareto(board.rows, plots / f"pareto-{slug}.png", f"error vs speedup: {title}")
        headers = [h for h, _, _ in tables.COLUMNS] + ["exponent"]
        rows = [tables.cells(r) + [tables.fmt(exponents.get(r["method"]), "{:.2f}")] for r in board.rows]
        parts.append(f"<h2>Leaderboard: {html.escape(title)}</h2>"
                     f"<p><b>Pick</b> — {html.escape(tables.advice(board, max_err))}. "
                     f"Pareto front (fastest for its error): {html.escape(', '.join(front))}.</p>"
                     + _table(headers, rows)
                     + (_figure(plots / f"time_vs_length-{slug}.png", out.parent,
                                "time per call vs length, log-log, one panel per family; the legends give each "
                                "method's fitted exponent") if several else
                        "<p>(one length measured: no time-vs-length plot)</p>")
                     + _figure(plots / f"pareto-{slug}.png", out.parent, "relative error vs speedup over SDPA")
                     + _shorter_lengths(cases, board))
    parts.append(_heatmap_section(cases, root, plots, out.parent))
    skipped = tables.not_run(cases)
    if skipped:
        parts.append("<h2>Skipped and failed cases</h2>" + _table(
            ["method", "workload", "N", "status", "reason"],
            [[c["method"], workload_label(c), str(c["length"]),
              c["status"] + (f" ({c['skip_kind']})" if c.get("skip_kind") else ""), c.get("reason") or ""]
             for c in skipped]))
    parts.append("<h2>Machine</h2>" + "".join(
        f"<h3>run {html.escape(r['run_id'])} started {html.escape(r['started'])}"
        f"{' (resumed)' if r.get('resumed') else ''}</h3>"
        + _table(["key", "value"], [[k, str(v)] for k, v in sorted(r["machine"].items())])
        + _table(["suite option", "value"], [[k, str(v)] for k, v in sorted(r["suite"].items())])
        for r in contents.runs))
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>attnzoo benchmark</title>"
                   f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return out


def _shorter_lengths(cases: list[dict], longest: tables.Board) -> str:
    """Collapsed leaderboards of the same workload at its shorter lengths (methods skipped at the longest)."""
    parts = []
    for board in tables.leaderboards(cases, every_length=True):
        if (board.workload, board.causal) == (longest.workload, longest.causal) and board.length < longest.length:
            parts.append(f"<details><summary>N={board.length} ({len(board.rows)} methods)</summary>"
                         + _table([h for h, _, _ in tables.COLUMNS], [tables.cells(r) for r in board.rows])
                         + "</details>")
    return "".join(parts)


def _heatmap_section(cases: list[dict], root: Path, plots: Path, page_dir: Path) -> str:
    """Exact vs each method's attention map (batch 0, head 0) wherever the run saved maps."""
    groups: dict[str, list[dict]] = {}
    for c in cases:
        if c["status"] == "ok" and c.get("map"):
            first = c.get("map_tokens", c["length"])
            groups.setdefault(f"{workload_label(c)}, {'causal' if c['causal'] else 'non-causal'}, "
                              f"N={c['length']}" + (f" (its first {first} tokens)" if first < c["length"] else ""),
                              []).append(c)
    parts = []
    for title, group in groups.items():
        maps = [("exact (reference)", np.load(root / group[0]["exact_map"]))]
        maps += [(c["method"], np.load(root / c["map"])) for c in sorted(group, key=lambda c: c["method"])]
        path = plots / f"heatmaps-{_slug(title)}.png"
        plot_heatmaps(maps, path, f"attention maps, head 0: {title}")
        missing = [f"{c['method']} ({c['map_error']})" for c in cases if c.get("map_error")]
        note = f"<p>No map (the method cannot take v = I): {html.escape('; '.join(missing))}</p>" if missing else ""
        parts.append(f"<h2>Attention maps: {html.escape(title)}</h2>"
                     "<p>Each method's effective attention matrix, read off by running it with v = identity, "
                     "next to exact attention; logarithmic colour scale (black: not read), average-pooled to at most "
                     "128×128.</p>"
                     + note + _figure(path, page_dir, f"attention heatmaps: {title}"))
    return "".join(parts)
