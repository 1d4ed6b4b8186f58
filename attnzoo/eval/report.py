"""``report.html`` for an eval run: accuracy vs KV budget, a case × length heatmap, accuracy vs prefill speedup,
and the tables with their picks (the bench report's page machinery: plots embedded and written to ``plots/``)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..bench.report import _CSS, _figure, _pyplot, _slug, _style, _table
from ..bench.results import ResultsFile
from . import table as T
from .cases import describe


def plot_budget_curves(g: T.Group, path: Path) -> None:
    """Score vs the share of the full KV cache held, one line per policy (its budgets), prefill cases as points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_policy: dict[str, list[tuple[float, float]]] = {}
    for r in g.rows:
        if r["status"] != "ok":
            continue
        share = r["kv_bytes"] / r["kv_full_bytes"]
        if r["kind"] == "cache":
            label = describe({**r, "budget": None})
            by_policy.setdefault(label, []).append((share, r["score"]))
        else:
            ax.scatter([share], [r["score"]], marker="x", s=25, label=describe(r))
    for i, (label, points) in enumerate(sorted(by_policy.items())):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, label=label, **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("KV cache held / full cache (mean over generation)")
    ax.set_ylabel(g.metric + f" (n={g.exact['n'] if g.exact else '?'} per point)")
    ax.set_title(f"{g.task}, N={g.length}", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(rows: list[dict], task: str, path: Path) -> None:
    """Score per case (rows) and length (columns) for one task, numbers written in the cells."""
    plt = _pyplot()
    ok = [r for r in T.pool(rows) if T.task_label(r) == task and r["status"] == "ok"]
    names = sorted({describe(r) for r in ok}, key=lambda d: (not d.startswith("prefill=exact"), d))
    lengths = sorted({r["length"] for r in ok})
    grid = np.full((len(names), len(lengths)), np.nan)
    for r in ok:
        grid[names.index(describe(r)), lengths.index(r["length"])] = r["score"]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(lengths), 0.9 + 0.28 * len(names)))
    ax.imshow(grid, aspect="auto", cmap="viridis_r" if ok and ok[0]["metric"] == "perplexity" else "viridis")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}" if value < 10 else f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="w")
    ax.set_title(f"{task}: score by case and length", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(g: T.Group, path: Path) -> bool:
    """Score vs prefill speedup over exact for the prefill cases; False when there is nothing to draw."""
    points = [(g.exact["prefill_s"] / r["prefill_s"], r["score"], describe(r)) for r in g.rows
              if g.exact and r["status"] == "ok" and r["kind"] == "prefill" and r["prefill_s"]]
    if len(points) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (x, y, label) in enumerate(points):
        ax.scatter([x], [y], color=f"C{i % 10}", label=label)
    ax.set_xlabel("prefill speedup over exact (same run)")
    ax.set_ylabel(g.metric)
    ax.set_title(f"{g.task}, N={g.length}", fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_report(results: str | Path, out: str | Path | None = None, *, min_accuracy: float = 0.95) -> Path:
    """Write ``report.html`` (default: next to the results file) and its ``plots/``; returns the page path."""
    store = ResultsFile(results)
    contents = store.read()
    rows = [c for c in contents.cases if c.get("suite_kind") == "eval"]
    return write_report(rows, contents.runs, Path(out) if out else store.path.parent / "report.html",
                        source=str(store.path), min_accuracy=min_accuracy)


def write_report(rows: list[dict], runs: list[dict], out: Path, *, source: str, min_accuracy: float = 0.95) -> Path:
    """The page for eval ``rows`` (of one run or merged from several, ``source`` says which) and their ``runs``."""
    plots = out.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>attnzoo eval</h1><p>{len(rows)} cases from <code>{html.escape(source)}</code>: "
             f"{sum(r['status'] == 'ok' for r in rows)} measured, {sum(r['status'] == 'skipped' for r in rows)} "
             f"skipped, {sum(r['status'] == 'failed' for r in rows)} failed.</p>",
             "<p><b>score</b>: accuracy (exact match of the expected strings, greedy decoding) or perplexity, with "
             "the number of samples it rests on in brackets; <b>of exact</b>: the score as a share of exact "
             "attention's (for perplexity, exact's over the case's); <b>KV MiB held</b>: the mean bytes the cache "
             "held during generation, next to an uncompressed cache's; <b>× exact</b>: exact's prefill time over "
             "the case's, measured in the same run; <b>recall</b>: prefill attention mass kept on three layers "
             "(blank: the method changes the scores rather than choosing keys, or a cache case).</p>"]
    for g in T.groups(rows):
        slug = _slug(f"{g.task}-{g.length}")
        parts.append(f"<h2>{html.escape(g.task)}, N={g.length}</h2><p><b>Pick</b> — "
                     f"{html.escape(T.pick(g, min_accuracy))}</p>"
                     + _table(list(T.COLUMNS), [T.cells(g, r) for r in g.rows]))
        if any(r["status"] == "ok" and r["kind"] == "cache" for r in g.rows):
            plot_budget_curves(g, plots / f"budget-{slug}.png")
            parts.append(_figure(plots / f"budget-{slug}.png", out.parent, "score vs KV cache held"))
        if plot_speedup(g, plots / f"speedup-{slug}.png"):
            parts.append(_figure(plots / f"speedup-{slug}.png", out.parent, "score vs prefill speedup"))
    for task in sorted({T.task_label(r) for r in rows if r["status"] == "ok"}):
        plot_heatmap(rows, task, plots / f"heatmap-{_slug(task)}.png")
        parts.append(f"<h2>{html.escape(task)}: every case at every length</h2>"
                     + _figure(plots / f"heatmap-{_slug(task)}.png", out.parent, f"{task} score heatmap"))
    parts.append("<h2>Runs</h2>" + "".join(
        f"<h3>run {html.escape(r['run_id'])} started {html.escape(r['started'])}</h3>"
        + _table(["key", "value"], [[k, str(v)] for k, v in sorted(r["machine"].items())]) for r in runs))
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>attnzoo eval</title>"
                   f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return out
