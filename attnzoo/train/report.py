"""Tables and plots of trained-task results: accuracy by mixer × model dimension × task setting.

``accuracy_table`` is what ``attnzoo task`` prints; :func:`build_report` writes
``report.html`` next to the results file with accuracy-vs-dimension and
accuracy-vs-state-size plots (the bench report's page machinery and styles).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..bench.report import _CSS, _figure, _pyplot, _slug, _style, _table
from ..bench.results import ResultsFile

#: task parameters that vary along a sweep's columns, per task (others are fixed per run)
SETTING = {"mqar": "pairs", "listops": "max_depth", "retrieval": "seq_len", "passkey_train": "seq_len"}


def setting(case: dict) -> str:
    """The short label of a case's task setting, e.g. ``pairs=32`` (every task parameter otherwise), with its
    curriculum, if any: ``pairs=64 (curriculum pairs=8,16,32)`` (a column of its own: another training recipe)."""
    tp = case["task_params"]
    key = SETTING.get(case["task"])
    label = f"{key}={tp[key]}" if key in tp else ",".join(f"{k}={v}" for k, v in sorted(tp.items())) or "default"
    if case.get("curriculum"):
        label += " (curriculum " + " ".join(f"{k}={','.join(map(str, v))}" for k, v in case["curriculum"].items()) + ")"
    return label


def mixer_label(case: dict) -> str:
    """``exact``, ``landmark(block=8)``, or a per-layer plan ``sliding_window(window=16)+exact``."""
    def one(name: str, params: dict) -> str:
        return name + (f"({','.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")

    m = case["mixer"]
    return one(m, case.get("mixer_params") or {}) if isinstance(m, str) else "+".join(one(n, p) for n, p in m)


def _config(case: dict) -> dict:
    """A record's configuration as flat fields: its task parameters and training settings (from its key, since
    the record's own ``steps`` is the steps trained), less what a column's label or a row already says."""
    cfg = json.loads(case["key"]) if case.get("key") else {}
    flat = {k: v for k, v in cfg.items() if k not in _NOT_IN_LABEL and not isinstance(v, (dict, list))}
    return {**flat, **case.get("task_params", {})}


#: configuration fields a column label never needs: the row (mixer), the d= prefix, the curriculum (already in the
#: label), the seed (the seeds of one configuration share a cell) and what records hold besides their configuration
_NOT_IN_LABEL = {"task", "mixer", "mixer_params", "d_model", "curriculum", "seed", "type", "key", "status", "reason",
                 "traceback", "accuracy", "best_step", "stopped", "seconds", "final_loss", "parameters", "state_size",
                 "curve", "stages"}


def column_labels(cases: list[dict]) -> list[str]:
    """Each case's column label: :func:`setting`, followed by every configuration field (a task parameter or a
    training setting, never the seed) that differs between cases which would otherwise share a row and a
    column, e.g. ``max_depth=6 seq_len=1024`` next to ``max_depth=6 seq_len=256``; so two configurations never
    overwrite each other in a table, and the seeds of one configuration are the only cases sharing a cell."""
    configs = [_config(c) for c in cases]
    groups: dict[tuple, list[dict]] = {}
    for c, cfg in zip(cases, configs):
        groups.setdefault((c["task"], mixer_label(c), c["d_model"], setting(c)), []).append(cfg)
    differ: dict[str, set] = {}  # per task: the fields that tell some cell's cases apart
    for (task, *_), group in groups.items():
        differ.setdefault(task, set()).update(
            k for k in set().union(*group) if len({json.dumps(g.get(k), sort_keys=True) for g in group}) > 1)
    return [setting(c) + "".join(f" {k}={cfg[k]}" for k in sorted(differ[c["task"]])
                                 if k in cfg and not setting(c).startswith(f"{k}="))
            for c, cfg in zip(cases, configs)]


def accuracy_table(cases: list[dict], task: str, detail: bool = False) -> tuple[list[str], list[list[str]]]:
    """Rows: mixers (in first-seen order); columns: (d_model, setting) pairs (:func:`column_labels`); cells:
    held-out accuracy (``detail``: followed by the steps trained and why training stopped). A cell with several
    seeds shows each seed's, ``a / b (seeds 0, 1)``.

    A later record of the same case (a rerun) replaces an earlier one; failed cases show ``failed``."""
    mine: dict[tuple, dict] = {}
    for c, label in zip(cases, column_labels(cases)):
        if c["task"] == task:
            mine.setdefault((mixer_label(c), c["d_model"], label), {})[c.get("seed", 0)] = c
    cols = sorted({(d, s) for _, d, s in mine}, key=lambda x: (x[0], _order(x[1])))
    mixers = list(dict.fromkeys(m for m, _, _ in mine))
    headers = ["mixer"] + [f"d={d} {s}" for d, s in cols]

    def one(c: dict) -> str:
        if c["status"] != "ok":
            return c["status"]
        return f"{c['accuracy']:.3f}" + (f" ({c['steps']}, {c['stopped']})" if detail else "")

    rows = []
    for m in mixers:
        row = [m]
        for d, s in cols:
            seeds = mine.get((m, d, s), {})
            cell = " / ".join(one(seeds[k]) for k in sorted(seeds))
            row.append(cell + (f" (seeds {', '.join(map(str, sorted(seeds)))})" if len(seeds) > 1 else ""))
        rows.append(row)
    return headers, rows


def markdown_table(cases: list[dict], task: str) -> str:
    """:func:`accuracy_table` as Markdown, each cell ``accuracy (steps, stop reason)``."""
    headers, rows = accuracy_table(cases, task, detail=True)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _order(label: str):
    """Columns by their setting's number, then by label (``pairs=64`` before ``pairs=64 (curriculum ...)``)."""
    try:
        return (0, float(label.split("=", 1)[1].split()[0]), label)
    except (IndexError, ValueError):
        return (1, 0.0, label)


def _plot(cases: list[dict], task: str, x: str, path: Path, xlabel: str) -> list[str]:
    """One panel per task setting (:func:`column_labels`), accuracy against ``x`` (log axis) per mixer (the mean
    over seeds); one legend for the figure (every mixer, whichever panels it appears in). Returns the legend's
    labels (empty: nothing to plot)."""
    ok = [(c, label) for c, label in zip(cases, column_labels(cases))
          if c["task"] == task and c["status"] == "ok" and c.get(x)]
    if not ok:
        return []
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    settings = sorted({label for _, label in ok}, key=_order)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False, sharey=True)
    mixers = list(dict.fromkeys(mixer_label(c) for c, _ in ok))
    handles = {}
    for ax, s in zip(axes[0], settings):
        for i, m in enumerate(mixers):
            seeds: dict[float, list[float]] = {}  # x -> the accuracy of each seed there (plotted: their mean)
            for c, label in ok:
                if mixer_label(c) == m and label == s:
                    seeds.setdefault(c[x], []).append(c["accuracy"])
            pts = sorted((at, sum(acc) / len(acc)) for at, acc in seeds.items())
            if pts:
                handles[m], = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m,
                                      **{**_style(i), "markersize": 5})
        ax.set(xscale="log", xlabel=xlabel, title=f"{task}: {s}", ylim=(-0.02, 1.02))
        if x == "d_model":  # a handful of dimensions: label exactly those
            ax.xaxis.set_major_locator(FixedLocator(sorted({c[x] for c, _ in ok})))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded 2x10^3 3x10^3 ... labels
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    labels = [m for m in mixers if m in handles]
    fig.legend([handles[m] for m in labels], labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return labels


def build_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: next to the results file) and ``plots/``; returns the page path."""
    store = ResultsFile(results)
    contents = store.read()
    out = Path(out) if out else store.path.parent / "report.html"
    plots = out.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    cases = contents.cases
    parts = [f"<h1>attnzoo trained tasks</h1><p>{len(cases)} trained models from "
             f"<code>{html.escape(str(store.path))}</code>. Accuracy is on a held-out set drawn from a seed stream "
             "disjoint from training, with the best evaluated weights; state size is the floats a model keeps per "
             "sequence to decode (recurrent state for linear mixers, keys and values for attention).</p>"]
    for task in dict.fromkeys(c["task"] for c in cases):
        headers, rows = accuracy_table(cases, task)
        parts.append(f"<h2>{html.escape(task)}</h2>" + _table(headers, rows))
        for x, label in (("d_model", "model dimension"), ("state_size", "decoding state (floats per sequence)")):
            path = plots / f"{_slug(task)}-accuracy-vs-{x}.png"
            if _plot(cases, task, x, path, label):
                parts.append(_figure(path, out.parent, f"{task}: accuracy vs {label}"))
        failed = [c for c in cases if c["task"] == task and c["status"] != "ok"]
        if failed:
            parts.append("<h3>Failed cases</h3>" + _table(["mixer", "d", "setting", "reason"], [
                [mixer_label(c), str(c["d_model"]), setting(c), c.get("reason", "")] for c in failed]))
    parts.append("<h2>Runs</h2>" + "".join(
        f"<h3>run {html.escape(r['run_id'])}{' (resumed)' if r.get('resumed') else ''}</h3>"
        + _table(["key", "value"], [[k, str(v)] for k, v in sorted({**r["machine"], **r["suite"]}.items())])
        for r in contents.runs))
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>attnzoo trained tasks</title>"
                   f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return out
