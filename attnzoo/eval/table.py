"""The eval's tables and pick, from results rows: per (task, length), every case next to exact."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..bench.tables import different_model, fmt
from ..errors import AttnZooError
from ..tasks import make_task
from .cases import describe, resolved_today

MIB = 2 ** 20


@dataclass
class Group:
    """The rows of one task at one length, exact's row first."""

    task: str
    length: int
    metric: str
    rows: list[dict]
    exact: dict | None


@functools.cache
def _defaults(task: str) -> dict:
    """Today's parameters of ``task`` at its defaults (empty for a task no longer registered)."""
    try:
        return make_task(task).params()
    except AttnZooError:
        return {}


def task_label(row: dict) -> str:
    """``niah_multikey`` or, with task parameters, ``niah_multikey:distractors=1,haystack=noise``.

    The label names the parameters the case was given and, for rows that record every parameter they ran
    with (``task_resolved``), each one whose default has changed since: a row measured before a task's
    defaults changed keeps its own column instead of mixing with today's."""
    params = dict(row.get("task_params") or {})
    today = _defaults(row["task"])
    params.update({k: v for k, v in (row.get("task_resolved") or {}).items()
                   if k not in params and today and today.get(k) != v})
    text = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return row["task"] + (f":{text}" if text else "")


@functools.cache
def _today(kind: str, name: str, params: str, budget, length: int) -> dict:
    return resolved_today({"kind": kind, "name": name, "params": json.loads(params), "budget": budget}, length)


def case_label(row: dict) -> str:
    """``describe(row)``, naming each parameter the row records having run with (``resolved``) that differs from
    what the case resolves to today at its length, and marking ``(before p, q)`` a row that records every parameter
    of its method (prefill rows; rows with ``resolved_all``) but not ``p`` and ``q``, which the method has today: a
    row measured before a default changed, or before a parameter (and what it does) existed, keeps its own line
    instead of merging with today's rows (as :func:`task_label` does for task defaults). A parameter that a row
    need not record (older cache rows record only the budget's) cannot be told apart."""
    changed = changed_defaults(row)
    before = [k for k, v in changed.items() if v is None]
    changed = {k: v for k, v in changed.items() if v is not None}
    text = describe({**row, "params": {**(row.get("params") or {}), **changed}} if changed else row)
    return f"{text} (before {', '.join(sorted(before))})" if before else text


def changed_defaults(row: dict) -> dict:
    """The parameters ``row`` records having run with (``resolved``, not given) whose default resolves to another
    value today, and (as ``None``) those a row recording every parameter lacks."""
    if row["kind"] not in ("prefill", "cache"):
        return {}
    given = row.get("params") or {}
    today = _today(row["kind"], row["name"], json.dumps(given, sort_keys=True), row.get("budget"), row["length"])
    resolved = row.get("resolved") or {}
    out = {k: v for k, v in resolved.items() if k in today and k not in given and k != "budget" and today[k] != v}
    if resolved and (row["kind"] == "prefill" or row.get("resolved_all")):
        out.update({k: None for k in today if k not in resolved and k not in given})
    return out


#: row fields that are per-sample means: pooled as means weighted by the samples
_MEANS = ("prefill_s", "decode_s_per_token", "kv_bytes", "kv_full_bytes", "recall", "density")


def pool(cases: list[dict]) -> list[dict]:
    """One row per case, task and length, pooling the samples of runs with different seeds.

    More samples for a measured case come from a run with another ``--seed`` (new prompts, the same depths), so
    nothing measured is repeated. Per seed the row with the most samples counts; rows of different seeds merge
    into one with every sample's score (the task's own aggregate over them: mean accuracy, or the perplexity of
    the pooled NLL), ``n`` their sum, and the other figures as sample-weighted means. Failed rows pool only when
    no run of the case succeeded."""
    by_case: dict[str, dict[object, dict]] = {}
    for c in cases:
        if c.get("suite_kind") != "eval":
            continue
        ident = {k: v for k, v in json.loads(c["key"]).items() if k not in ("seed", "samples")} if "key" in c else c
        seeds = by_case.setdefault(json.dumps([ident, task_label(c), case_label(c)], sort_keys=True, default=str), {})
        seed = c.get("seed")
        if seed not in seeds or c.get("n", 0) >= seeds[seed].get("n", 0):
            seeds[seed] = c
    out = []
    for seeds in by_case.values():
        ok = [r for r in seeds.values() if r["status"] == "ok"]
        if len(ok) < 2:
            out.append(ok[0] if ok else list(seeds.values())[-1])
            continue
        ok.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
        n = sum(r["n"] for r in ok)
        scores = [s for r in ok for s in r.get("scores") or [r["score"]] * r["n"]]
        row = {**ok[0], "n": n, "seeds": [r.get("seed") for r in ok], "scores": scores,
               "score": make_task(ok[0]["task"], **ok[0].get("task_params", {})).aggregate(scores),
               "predictions": [p for r in ok for p in r.get("predictions") or []],
               "peak_rss": max((r.get("peak_rss") or 0 for r in ok), default=0) or None}
        for key in _MEANS:
            have = [(r[key], r["n"]) for r in ok if r.get(key) is not None]
            row[key] = sum(v * w for v, w in have) / sum(w for _, w in have) if have else None
        out.append(row)
    return out


def groups(cases: list[dict]) -> list[Group]:
    """Rows by (task with its parameters, length), seeds pooled (:func:`pool`)."""
    out: dict[tuple, Group] = {}
    for c in pool(cases):
        key = (task_label(c), c["length"])
        g = out.setdefault(key, Group(key[0], c["length"], c.get("metric") or "accuracy", [], None))
        if c["status"] == "ok":
            g.metric = c["metric"]
            if c["kind"] == "prefill" and c["name"] == "exact":
                g.exact = c
        g.rows.append(c)
    for g in out.values():
        g.rows.sort(key=lambda c: (c is not g.exact, c["kind"] != "prefill", case_label(c)))
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
    return case_label(row) + (" (different model)" if row["kind"] == "prefill" and different_model(row["name"]) else "")


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
        parts.append(f"least memory: {case_label(best)} ({best['kv_bytes'] / MIB:.1f} of "
                     f"{best['kv_full_bytes'] / MIB:.1f} MiB, {fmt(relative(g, best), '{:.2f}')} of exact)")
    faster = [r for r in ok if r["kind"] == "prefill" and r["prefill_s"] < g.exact["prefill_s"]]
    if faster:
        best = min(faster, key=lambda r: r["prefill_s"])
        parts.append(f"fastest prefill: {case_label(best)} ({g.exact['prefill_s'] / best['prefill_s']:.2f}× exact)")
    if not parts:
        return f"nothing kept ≥ {min_accuracy:.0%} of exact's {g.metric} with less memory or time (n={n})"
    return f"keeping ≥ {min_accuracy:.0%} of exact's {g.metric} (n={n} samples): " + "; ".join(parts)


# ------------------------------------------------------- across tasks (docs)
@dataclass
class Wide:
    """Every case at one length with one score per task (the docs' table): ``cases`` maps a case label to its
    rows by task; ``exact`` holds exact's row per task."""

    length: int
    tasks: list[str]
    cases: dict[str, dict[str, dict]]
    exact: dict[str, dict]


def wide(rows: list[dict]) -> list[Wide]:
    """One :class:`Wide` per length: exact first, then prefill methods, then cache policies by name and budget."""
    out = []
    for length in sorted({r["length"] for r in rows if r.get("suite_kind") == "eval"}):
        gs = [g for g in groups(rows) if g.length == length]
        cases: dict[str, dict[str, dict]] = {}
        for g in gs:
            for r in g.rows:
                cases.setdefault(case_label(r), {})[g.task] = r
        order = sorted(cases, key=lambda d: (not d.startswith("prefill=exact"), not d.startswith("prefill="),
                                             _budgetless(d, cases[d]), _budget(cases[d])))
        out.append(Wide(length, [g.task for g in gs], {d: cases[d] for d in order},
                        {g.task: g.exact for g in gs if g.exact}))
    return out


def _any(by_task: dict[str, dict]) -> dict:
    return next(iter(by_task.values()))


def _budgetless(label: str, by_task: dict[str, dict]) -> str:
    return label.rpartition("@")[0] if _any(by_task).get("budget") is not None else label


def _budget(by_task: dict[str, dict]) -> float:
    budget = _any(by_task).get("budget")
    return -1.0 if budget is None else budget / _any(by_task)["length"] if budget >= 1 else budget


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def held_share(by_task: dict[str, dict]) -> float | None:
    """The mean share of the full cache a case held, over its measured tasks."""
    return _mean([r["kv_bytes"] / r["kv_full_bytes"] for r in by_task.values() if r["status"] == "ok"])


def of_exact(w: Wide, by_task: dict[str, dict]) -> float | None:
    """The case's lowest score as a share of exact's over the tasks both measured (None if none)."""
    shares = [relative(Group(t, w.length, r.get("metric") or "accuracy", [], w.exact.get(t)), r)
              for t, r in by_task.items() if r["status"] == "ok"]
    shares = [s for s in shares if s is not None]
    return min(shares) if shares else None


WIDE_TAIL = ("min of exact", "KV held / full MiB", "prefill s", "× exact", "s/token", "recall", "density",
             "parameters")


def wide_cells(w: Wide, label: str, by_task: dict[str, dict]) -> list[str]:
    """A row: the case, its score (n) per task, then means over its measured tasks."""
    ok = [r for r in by_task.values() if r["status"] == "ok"]
    scores = []
    for t in w.tasks:
        r = by_task.get(t)
        if r is None:
            scores.append("")
        elif r["status"] != "ok":
            scores.append(r["status"])
        else:
            scores.append(f"{fmt(r['score'], '{:.1f}' if r['metric'] == 'perplexity' else '{:.2f}')} ({r['n']})")
    if not ok:
        return [label, *scores] + [""] * len(WIDE_TAIL)
    ex = [w.exact[task_label(r)]["prefill_s"] / r["prefill_s"] for r in ok if task_label(r) in w.exact
          and r["prefill_s"]]
    mean = lambda key: _mean([r.get(key) for r in ok])  # noqa: E731
    return [label, *scores, fmt(of_exact(w, by_task), "{:.2f}"),
            f"{mean('kv_bytes') / MIB:.1f} / {mean('kv_full_bytes') / MIB:.1f}", fmt(mean("prefill_s"), "{:.1f}"),
            fmt(_mean(ex), "{:.2f}"), fmt(mean("decode_s_per_token"), "{:.2f}"), fmt(mean("recall"), "{:.3f}"),
            fmt(mean("density"), "{:.3f}"), parameters(ok[0])]


def wide_header(w: Wide) -> list[str]:
    return ["case", *(f"{t} (n)" for t in w.tasks), *WIDE_TAIL]


def keeps(w: Wide, min_accuracy: float = 0.95, max_memory: float = 0.125, slack: float = 0.01) -> list[str]:
    """The cases that keep ``min_accuracy`` of exact's score on every task measured with exact at this length while
    holding at most ``max_memory`` (+ ``slack``) of the full cache, mean over generation (different models never
    count). The slack is for the generated tokens, which a policy keeps on top of its budget of the prompt: a
    1/8 budget at 4K holds 0.127 of the cache after 8 tokens, 0.131 after 30."""
    found = []
    for label, by_task in w.cases.items():
        r = _any(by_task)
        if r["kind"] == "prefill" and (r["name"] == "exact" or different_model(r["name"])):
            continue
        if set(by_task) < set(w.exact) or any(by_task[t]["status"] != "ok" for t in w.exact):
            continue  # not measured on every task exact was: no claim
        share, kept = held_share(by_task), of_exact(w, by_task)
        if share is not None and kept is not None and share <= max_memory + slack and kept >= min_accuracy:
            found.append(f"{label} (holds {share:.3f} of the cache, {kept:.2f} of exact)")
    return found


def per_task(w: Wide) -> list[Wide]:
    """``w`` cut to each task exact measured, one :class:`Wide` per task: the statement task by task, where a
    case measured on some tasks only still makes its claim on those."""
    return [Wide(w.length, [t], {label: {t: by_task[t]} for label, by_task in w.cases.items() if t in by_task},
                 {t: w.exact[t]}) for t in w.tasks if t in w.exact]


def statement(w: Wide, min_accuracy: float = 0.95, max_memory: float = 0.125) -> str:
    """One line: the cases of :func:`keeps` (or none), naming the tasks they were judged on."""
    kept = keeps(w, min_accuracy, max_memory)
    return (f"keep ≥ {min_accuracy:.0%} of exact on every task ({', '.join(w.exact) or 'no exact row'}) at "
            f"≤ {max_memory:g} of the KV cache: " + ("; ".join(kept) if kept else "none"))


# ------------------------------------------------------- what is not measured yet
def covers(row: dict, case: dict) -> bool:
    """Whether an ok ``row`` measured ``case``: the same kind, name and budget, and at least the case's parameters
    (a row given more, e.g. ``dense_below=0`` to reach a method's sparse path at 2K, ran that method too), with
    today's defaults for the rest (:func:`changed_defaults`)."""
    params = row.get("params") or {}
    return (row["status"] == "ok" and (row["kind"], row["name"], row.get("budget")) == (case["kind"], case["name"],
            case.get("budget")) and all(params.get(k) == v for k, v in case["params"].items())
            and not changed_defaults(row))


def cells_of(tasks: list[str], cases: list[dict]) -> int:
    """How many (case, task) cells the ``tasks`` (column labels) and ``cases`` make: a task's cases that it takes."""
    from .cases import applies, parse_spec

    return sum(applies(make_task(parse_spec(t)[0], **parse_spec(t)[1]).kind, c) for t in tasks for c in cases)


def missing(rows: list[dict], tasks: list[str], lengths: list[int], cases: list[dict]) -> dict[int, list[tuple]]:
    """Per length, each of ``cases`` with the ``tasks`` (column labels: ``passkey``, ``niah_single:value=word``) no
    ok row measured it on, as ``(case, [tasks])``; a task only counts for the cases it takes (as the runner)."""
    from .cases import applies, parse_spec

    have: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        if r.get("suite_kind") == "eval":
            have.setdefault((r["length"], task_label(r)), []).append(r)
    labels = {t: task_label({"task": parse_spec(t)[0], "task_params": parse_spec(t)[1]}) for t in tasks}
    kinds = {t: make_task(*parse_spec(t)[:1], **parse_spec(t)[1]).kind for t in tasks}
    out = {}
    for n in lengths:
        gaps = [(describe(c), [t for t in tasks if applies(kinds[t], c)
                               and not any(covers(r, c) for r in have.get((n, labels[t]), []))]) for c in cases]
        out[n] = [(d, ts) for d, ts in gaps if ts]
    return out


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (``|`` in a cell escaped)."""
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])
