"""Recover `attnzoo eval` rows from docs/eval.md's generated tables (the raw rows were lost with the machine).

    python measurements/eval/recover.py [--commit c1c5251] [--out measurements/eval/recovered-c1c5251.jsonl]

docs/eval.md (at ``--commit``) holds, between ``<!-- tables ... -->`` and ``<!-- /tables -->``, one table per
length (and one per perplexity length): a row per case with the score and sample count per task, then means over
the row's tasks (KV held / full, prefill s, × exact, s/token, recall, density) and the first task's resolved
parameters; under each table the statements (``--per-task``) with each qualifying case's held share of the cache.
This script turns them back into ``results.jsonl`` case rows, one per (case, task, length), such that
``attnzoo eval-table`` over them prints the same tables and statements (``regen.py --check`` compares):

* score: the fraction k / n or k / 2n (accuracy; multi-value and multi-query score halves) that prints as the
  cell; a perplexity is solved inside its printed interval so that "min of exact" prints as printed;
* a cell with n = 6 pooled seeds 0 and 1: one row with ``"seed": null`` and ``"seeds": [0, 1]`` (which seed gave
  which samples is not recoverable); ``pool()`` passes it through with its own score and n;
* the row means (KV bytes held and full, prefill s, s/token, recall, density) are given to each of the case's task
  rows. Where a printed figure needs per-task values to come out (× exact is a mean of per-task ratios to exact's
  prefill; the statements print each task's held share), per-task values are solved inside the printed rounding:
  exact's prefill per task (constrained by every single-task row's P × X), each row's prefill per task, and the
  held bytes per task from the statements' shares. **These per-task figures are consistent with the doc, not
  measured**: only the printed means (and the shares the statements print) are data.

Lost for good: per-task memory and times, per-sample scores and predictions, peak RSS, prompt tokens, run
records (machine, load), task_resolved. Every row carries ``"recovered": "docs/eval.md@<commit>"``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

MIB = 2 ** 20
ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m"
LENGTHS = {"2K": 2048, "4K": 4096, "8K": 8192}
TAIL = ("min of exact", "KV held / full MiB", "prefill s", "× exact", "s/token", "recall", "density",
        "parameters")
EPS = 1e-9


# ----------------------------------------------------------------------------------------------- parsing
def value(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_case(label: str) -> dict:
    """``cache=tokenselect:pages=1.0@0.125`` -> kind, name, params, budget (as ``describe`` prints them)."""
    label = re.sub(r" \((?:before [^)]*|different model)\)$", "", label)  # eval-table's marks, not the case
    kind, _, rest = label.partition("=")
    budget = None
    if "@" in rest:
        rest, _, b = rest.rpartition("@")
        budget = value(b)
    name, _, ps = rest.partition(":")
    params = {}
    for item in filter(None, ps.split(",")):
        k, _, v = item.partition("=")
        params[k] = value(v)
    return {"kind": kind, "name": name, "params": params, "budget": budget}


def parse_resolved(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k] = True if v == "True" else False if v == "False" else value(v)
    return out


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


STATEMENT = re.compile(r"^(?:- )?keep ≥ 95% of exact on every task \((.*?)\) at ≤ 0\.125 of the KV cache: (.*)$")
CLAIM = re.compile(r"(\S+) \(holds ([0-9.]+) of the cache, ([0-9.]+) of exact\)")


def parse_doc(text: str) -> list[dict]:
    """The generated tables: [{title, length, tasks, rows: [{label, scores: {task: (text, n)}, tail...}],
    overall: {label: share}, per_task: {task: {label: share}}}]."""
    body = text.split("<!-- tables:", 1)[1].split("<!-- /tables -->", 1)[0]
    sections = []
    for chunk in re.split(r"^### ", body, flags=re.M)[1:]:
        title, _, rest = chunk.partition("\n")
        lines = rest.splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("| case"))
        header = cells(lines[head])
        tasks = [h[:-4] for h in header[1:-len(TAIL)]]
        rows = []
        for line in lines[head + 2:]:
            if not line.startswith("|"):
                break
            c = cells(line)
            scores = {}
            for t, s in zip(tasks, c[1:1 + len(tasks)]):
                if s:
                    m = re.fullmatch(r"([0-9.]+) \((\d+)\)", s)
                    scores[t] = (m.group(1), int(m.group(2)))
            tail = dict(zip(TAIL, c[1 + len(tasks):]))
            kv, full = (float(x) for x in tail["KV held / full MiB"].split(" / "))
            rows.append({"label": c[0], "scores": scores, "min": tail["min of exact"], "kv": kv, "full": full,
                         "prefill": tail["prefill s"], "x": tail["× exact"], "decode": tail["s/token"],
                         "recall": tail["recall"], "density": tail["density"], "params": tail["parameters"]})
        overall, per_task = {}, {}
        for line in lines:
            m = STATEMENT.match(line)
            if not m:
                continue
            claims = {c.group(1): (c.group(2), c.group(3)) for c in CLAIM.finditer(m.group(2))}
            if line.startswith("- "):
                per_task[m.group(1)] = claims
            else:
                overall = claims
        length = LENGTHS[title.split()[-1]]
        sections.append({"title": title, "length": length, "tasks": tasks, "rows": rows, "overall": overall,
                         "per_task": per_task, "perplexity": title.startswith("Perplexity")})
    return sections


# ----------------------------------------------------------------------------------------------- solving
def interval(text: str, places: int) -> tuple[float, float]:
    """The open interval of values that print as ``text`` with ``places`` decimals."""
    v, h = float(text), 0.5 * 10 ** -places
    return v - h + EPS, v + h - EPS


def accuracy(text: str, n: int) -> float:
    for den in (n, 2 * n):
        for k in range(den + 1):
            if f"{k / den:.2f}" == text:
                return k / den
    raise ValueError(f"no k/{n} or k/{2 * n} prints as {text}")


def sqrt_mean_sq(es: list[float]) -> float:
    return (sum(math.sqrt(e) for e in es) / len(es)) ** 2


def solve_exact_prefill(sec: dict, exact: dict) -> dict[str, float]:
    """Exact's prefill per task: inside every single-task row's P × X interval, its mean printing as exact's P,
    and low enough that every multi-task row can reach its P and × exact (mean(√e)² < P·X)."""
    tasks = list(exact["scores"])
    lo = {t: 0.0 for t in tasks}
    hi = {t: math.inf for t in tasks}
    for r in sec["rows"]:
        if r is exact or len(r["scores"]) != 1 or not r["x"]:
            continue
        (t,) = r["scores"]
        p, x = interval(r["prefill"], 1), interval(r["x"], 2)
        lo[t], hi[t] = max(lo[t], p[0] * x[0]), min(hi[t], p[1] * x[1])
    mean = interval(exact["prefill"], 1)
    for t in tasks:
        if lo[t] >= hi[t]:
            raise ValueError(f"{sec['title']}: exact's prefill on {t} has no value ({lo[t]:.3f} >= {hi[t]:.3f})")
    # start from the middle of each bounded interval, free tasks at the value that makes the mean right
    e = {t: (lo[t] + hi[t]) / 2 if hi[t] < math.inf else None for t in tasks}
    free = [t for t in tasks if e[t] is None]
    target = float(exact["prefill"])
    if free:
        rest = (target * len(tasks) - sum(v for v in e.values() if v is not None)) / len(free)
        for t in free:
            e[t] = max(rest, lo[t] + 1e-6)
    for _ in range(2000):  # nudge into the mean interval and the multi-task rows' bounds
        m = sum(e.values()) / len(tasks)
        bad = [r for r in sec["rows"] if r is not exact and len(r["scores"]) > 1 and r["x"]
               and sqrt_mean_sq([e[t] for t in r["scores"]]) >= interval(r["prefill"], 1)[1] *
               interval(r["x"], 2)[1] * (1 - 1e-4)]
        if mean[0] < m < mean[1] and not bad:
            return e
        if not mean[0] < m < mean[1]:
            step = (target - m) * len(tasks) / max(1, len(tasks))
            for t in tasks:
                e[t] = min(max(e[t] + step, lo[t] + 1e-9), hi[t] - 1e-9)
        for r in bad:  # lower the row's tasks' exact times where they have room, raise the others
            for t in r["scores"]:
                e[t] = max(lo[t] + 1e-9, e[t] - 0.01)
            for t in tasks:
                if t not in r["scores"]:
                    e[t] = min(hi[t] - 1e-9, e[t] + 0.01 * len(r["scores"]) / max(1, len(tasks) - len(r["scores"])))
    raise ValueError(f"{sec['title']}: no per-task exact prefill satisfies the table")


def solve_prefill(r: dict, e: dict[str, float]) -> dict[str, float]:
    """Per-task prefill of a row: mean = P, mean(e_t / p_t) = × exact, from p_t = k e_t^β."""
    tasks = list(r["scores"])
    P = float(r["prefill"])
    if not r["x"]:
        return {t: P for t in tasks}
    X = float(r["x"])
    es = [e[t] for t in tasks]
    if len(tasks) == 1:  # p within P's interval with e / p within X's: the point nearest P
        p_lo, p_hi = interval(r["prefill"], 1)
        x_lo, x_hi = interval(r["x"], 2)
        lo, hi = max(p_lo, es[0] / x_hi), min(p_hi, es[0] / x_lo)
        assert lo < hi, (r["label"], lo, hi)
        return {tasks[0]: min(max(P, lo), hi)}

    def f(beta: float) -> float:
        a = sum(v ** beta for v in es) / len(es)
        b = sum(v ** (1 - beta) for v in es) / len(es)
        return a * b

    target = X * P
    if target < f(0.5) * (1 + 1e-5):  # the printed P and × exact are rounded: take them from the top of their range
        P = interval(r["prefill"], 1)[1] - 1e-6
        X = max(X, f(0.5) * (1 + 1e-5) / P)
        if X >= interval(r["x"], 2)[1]:
            raise ValueError(f"{r['label']}: P·X {target:.3f} below mean(√e)² {f(0.5):.3f}")
        target = X * P
    hi = 1.0  # p_t = k e_t^β: mean(p)·mean(e/p) = f(β) runs from mean(√e)² (β = 0.5) up, unbounded if the e_t differ
    while f(hi) < target and hi < 64:
        hi *= 2
    if f(hi) >= target:
        lo = 0.5
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        beta = (lo + hi) / 2
        k = P / (sum(v ** beta for v in es) / len(es))
        return {t: k * v ** beta for t, v in zip(tasks, es)}
    # (equal e_t) p_t = k e_t (1 + a d_t), d alternating ±1 about 0: the product grows from mean(e) without bound
    d = [1.0 if i % 2 == 0 else -1.0 for i in range(len(es))]
    d = [x - sum(d) / len(d) for x in d]
    top = 1 / max(abs(x) for x in d)

    def g(a: float) -> float:
        ps = [v * (1 + a * x) for v, x in zip(es, d)]
        return (sum(ps) / len(ps)) * (sum(v / q for v, q in zip(es, ps)) / len(ps))

    lo, hi = 0.0, top * (1 - 1e-12)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < target else (lo, mid)
    a = (lo + hi) / 2
    ps = [v * (1 + a * x) for v, x in zip(es, d)]
    k = P / (sum(ps) / len(ps))
    return {t: k * q for t, q in zip(tasks, ps)}


def solve_kv(r: dict, shares: dict[str, str], overall: str | None) -> tuple[dict, dict]:
    """Held and full bytes per task: means printing as the row's MiB, each stated task's share as printed."""
    tasks = list(r["scores"])
    full = {t: r["full"] * MIB for t in tasks}
    kv = {t: r["kv"] * MIB for t in tasks}
    known = [t for t in tasks if t in shares]
    for t in known:
        kv[t] = float(shares[t]) * full[t]
    unknown = [t for t in tasks if t not in shares]
    if unknown:
        rest = (r["kv"] * MIB * len(tasks) - sum(kv[t] for t in known)) / len(unknown)
        for t in unknown:
            kv[t] = rest
    return kv, full


def check_kv(r, kv, full, shares, overall) -> list[str]:
    problems = []
    n = len(kv)
    if f"{sum(kv.values()) / n / MIB:.1f}" != f"{r['kv']:.1f}":
        problems.append(f"kv mean {sum(kv.values()) / n / MIB}")
    if f"{sum(full.values()) / n / MIB:.1f}" != f"{r['full']:.1f}":
        problems.append("full mean")
    for t, s in shares.items():
        if f"{kv[t] / full[t]:.3f}" != s:
            problems.append(f"share {t}")
    if overall is not None and f"{sum(kv[t] / full[t] for t in kv) / n:.3f}" != overall:
        problems.append(f"overall share {sum(kv[t] / full[t] for t in kv) / n:.4f} vs {overall}")
    return problems


def fit_kv(r, shares, overall):
    """solve_kv, then nudge full bytes per task (inside the printed rounding) until every printed figure holds."""
    import random

    kv, full = solve_kv(r, shares, overall)
    if not check_kv(r, kv, full, shares, overall):
        return kv, full
    rng = random.Random(0)
    tasks = list(kv)
    for _ in range(20000):
        full = {t: (r["full"] + rng.uniform(-0.049, 0.049)) * MIB for t in tasks}
        shares_here = {t: float(shares[t]) + rng.uniform(-0.00049, 0.00049) for t in shares}
        kv = {t: shares_here[t] * full[t] for t in shares_here}
        unknown = [t for t in tasks if t not in shares_here]
        if unknown:
            rest = ((r["kv"] + rng.uniform(-0.049, 0.049)) * MIB * len(tasks) - sum(kv.values())) / len(unknown)
            kv.update({t: rest for t in unknown})
        if not check_kv(r, kv, full, shares, overall):
            return kv, full
    raise ValueError(f"{r['label']}: no held bytes fit {check_kv(r, kv, full, shares, overall)}")


def solve_perplexity(sec: dict) -> dict[str, float]:
    """Perplexities inside their printed intervals with exact / row printing as the row's min of exact."""
    exact = next(r for r in sec["rows"] if r["label"] == "prefill=exact")
    (t,) = exact["scores"]
    e_lo, e_hi = interval(exact["scores"][t][0], 1)
    for steps in (11, 101, 1001):
        for i in range(steps):
            e = e_lo + (e_hi - e_lo) * (i + 0.5) / steps
            out = {"prefill=exact": e}
            for r in sec["rows"]:
                if r is exact:
                    continue
                a_lo, a_hi = interval(r["scores"][t][0], 1)
                m_lo, m_hi = interval(r["min"], 2)
                lo, hi = max(a_lo, e / m_hi), min(a_hi, e / m_lo)
                if lo >= hi:
                    break
                out[r["label"]] = (lo + hi) / 2
            else:
                return out
    raise ValueError(f"{sec['title']}: no perplexities fit")


def rows_of(sec: dict, commit: str) -> list[dict]:
    """The section's rows, one per (case, task)."""
    exact = next((r for r in sec["rows"] if r["label"] == "prefill=exact"), None)
    e = solve_exact_prefill(sec, exact) if exact else {}
    ppl = solve_perplexity(sec) if sec["perplexity"] else {}
    out = []
    for r in sec["rows"]:
        case = parse_case(r["label"])
        prefill = {t: float(e[t]) for t in r["scores"]} if r is exact else solve_prefill(r, e)
        shares = {t: claims[r["label"]][0] for t, claims in sec["per_task"].items() if r["label"] in claims}
        if len(sec["tasks"]) == 1 and r["label"] in sec["overall"]:
            shares = {sec["tasks"][0]: sec["overall"][r["label"]][0]}
        overall = sec["overall"].get(r["label"], (None,))[0]
        kv, full = fit_kv(r, shares, overall)
        for t, (text, n) in r["scores"].items():
            name, _, tp = t.partition(":")
            task_params = parse_case(f"x={name}:{tp}")["params"] if tp else {}
            pooled = n == 6
            key_case = {"task": name, "task_params": task_params, "length": sec["length"], **case,
                        "samples": 3, "seed": None if pooled else 0, "model": MODEL}
            row = {"type": "case", "run_id": f"recovered-{commit}", "key": json.dumps(key_case, sort_keys=True,
                                                                                     separators=(",", ":")),
                   "suite_kind": "eval", **key_case, "status": "ok",
                   "metric": "perplexity" if sec["perplexity"] else "accuracy"}
            if sec["perplexity"]:
                row["score"] = ppl[r["label"]]
                row["scores"] = [math.log(row["score"])] * n
            else:
                row["score"] = accuracy(text, n)
            row["n"] = n
            if pooled:
                row["seeds"] = [0, 1]
            row.update({"prefill_s": prefill[t], "decode_s_per_token": float(r["decode"]) if r["decode"] else None,
                        "kv_bytes": kv[t], "kv_full_bytes": full[t],
                        "recall": float(r["recall"]) if r["recall"] else None,
                        "density": float(r["density"]) if r["density"] else None,
                        "resolved": parse_resolved(r["params"]), "recovered": f"docs/eval.md@{commit}"})
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="c1c5251")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.commit}:docs/eval.md"], check=True,
                          capture_output=True, text=True).stdout
    out = args.out or Path(__file__).with_name(f"recovered-{args.commit}.jsonl")
    rows = [row for sec in parse_doc(text) for row in rows_of(sec, args.commit)]
    run = {"type": "run", "run_id": f"recovered-{args.commit}", "resumed": False,
           "recovered": f"docs/eval.md@{args.commit}",
           "note": "rows recovered from docs/eval.md's generated tables by measurements/eval/recover.py; the raw "
                   "rows of sessions 3-9 were lost with the machine (see measurements/eval/README.md)"}
    out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in [run, *rows]))
    print(f"{out}: {len(rows)} rows from docs/eval.md@{args.commit}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
