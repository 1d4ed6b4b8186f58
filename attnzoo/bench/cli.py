"""The ``attnzoo bench``, ``attnzoo report`` and ``attnzoo capture`` commands.

Every option is checked before the first case runs; torch and the runner load only inside the commands.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from ..errors import AttnZooError
from . import tables
from .results import ResultsFile, workload_label

console = Console(width=None if Console().is_terminal else 160)
RESULTS_ROOT = Path("bench-results")


class _Bar:
    """A rich progress bar with an ETA, driven by the runner."""

    def __init__(self, total: int):
        self.progress = Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.progress.start()
        self.task = self.progress.add_task("starting the worker", total=total)

    def advance(self, description: str) -> None:
        self.progress.update(self.task, advance=1, description=description[:44])

    def close(self) -> None:
        self.progress.stop()


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AttnZooError(f"bench: {option} expected comma-separated integers, got {text!r}") from None
    if not values:
        raise AttnZooError(f"bench: {option} expected at least one integer, got {text!r}")
    return values


def _names(text: str | None, option: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names:
        raise AttnZooError(f"bench: {option} expected comma-separated names, got {text!r}")
    return names


def _stored(path: Path, option: str) -> ResultsFile:
    """A results file that exists, or an error naming the option (checked before any case runs)."""
    store = ResultsFile(path)
    if not store.exists():
        raise AttnZooError(f"bench: {option} expected a results.jsonl file or a folder holding one, "
                           f"got {path} ({store.path} does not exist or is empty)")
    return store


def _latest_results() -> Path:
    runs = sorted((p.parent for p in RESULTS_ROOT.glob("*/results.jsonl")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise AttnZooError(f"bench: --resume found no run under {RESULTS_ROOT}/; pass --out FOLDER")
    return runs[-1]


def _stored_suite(out: Path):
    from .runner import Suite

    stored = ResultsFile(out).read().runs[0]["suite"]
    fields = {f.name for f in dataclasses.fields(Suite)}
    return Suite(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields})


def print_leaderboards(cases: list[dict], max_err: float = 1e-2) -> None:
    for board in tables.leaderboards(cases):
        table = Table(title=f"{board.workload}, {'causal' if board.causal else 'non-causal'}, N={board.length} "
                            "(fastest first)")
        for i, (header, _, _) in enumerate(tables.COLUMNS):
            table.add_column(header, justify="left" if i < 2 else "right")
        for row in board.rows:
            table.add_row(*tables.cells(row))
        console.print(table)
        console.print(f"  [bold]pick[/] {escape(tables.advice(board, max_err))}")
    not_run = tables.not_run(cases)
    skipped: dict[str, list[str]] = {}
    for c in not_run:
        if c["status"] == "skipped":
            skipped.setdefault(c.get("skip_kind", "other"), []).append(f"{c['method']}@{c['length']}")
        else:
            console.print(f"[red]failed[/] {c['method']}@{c['length']} ({workload_label(c)}): "
                          f"{escape(c['reason'][:300])}")
    for kind, which in skipped.items():
        console.print(f"[yellow]skipped ({kind}, {len(which)})[/]: {', '.join(which)}")
    if skipped:
        console.print("[dim]reasons for every skipped case: the report's 'Skipped and failed cases' table[/]")


def print_comparison(current: list[dict], other_path: Path) -> None:
    rows = tables.compare(current, ResultsFile(other_path).read().cases)
    if not rows:
        console.print(f"[yellow]--compare: no case of this run was also measured in {other_path}[/]")
        return
    table = Table(title=f"this run vs {other_path} (other/now > 1: this run is faster; ÷ SDPA: each time "
                        "relative to the SDPA time measured alongside it, steady when the whole machine is slower "
                        "in one run; ±% now/other: the spread of ÷ SDPA over each run's rounds; flag: beyond "
                        f"±{tables.COMPARE_TOLERANCE:.0%} and beyond both runs' rounds)")
    for col in ("workload", "method", "N", "now ms", "other ms", "other/now", "÷ SDPA", "±% now/other", "flag",
                "now err", "other err"):
        table.add_column(col, justify="left" if col in ("workload", "method", "flag") else "right")
    for r in rows:
        rel = "-" if r["ratio_sdpa"] is None else f"{r['ratio_sdpa']:.2f}"
        spread = f"{100 * r['now_spread']:.0f}/{100 * r['other_spread']:.0f}"
        flag = f"[red]{r['flag']}[/]" if r["flag"] == "slower" else r["flag"]
        table.add_row(r["workload"], r["method"], str(r["length"]), f"{r['now_ms']:.2f}", f"{r['other_ms']:.2f}",
                      f"{r['ratio']:.2f}", rel, spread, flag, f"{r['now_err']:.1e}", f"{r['other_err']:.1e}")
    console.print(table)
    console.print(f"[bold]compare[/]: {tables.compare_summary(rows)}")
    if any(r["now_rounds"] != r["other_rounds"] for r in rows):
        console.print("[yellow]warning:[/] the runs timed some cases in different numbers of rounds; the best of "
                      "more rounds is faster by construction (a 3-round run against a 1-round run of the same code "
                      "flagged 36 of 112 cases faster), so compare runs made with the same --rounds")


def bench(
    methods: Optional[str] = typer.Option(None, help="comma-separated method names (default: every registered "
                                                     "one)"),
    lengths: Optional[str] = typer.Option(None, help="comma-separated sequence lengths, e.g. 256,1024,2048  "
                                                     "(default: 256,1024,2048; --full: 256..8192)"),
    heads: Optional[int] = typer.Option(None, help="query heads (default: 4; --full: 8)"),
    heads_kv: Optional[int] = typer.Option(None, help="KV heads (fewer = grouped-query) (default: --heads)"),
    head_dim: Optional[int] = typer.Option(None, help="head dimension D (the real workload uses its model's)  "
                                                      "(default: 64)"),
    batch: Optional[int] = typer.Option(None, help="batch size (default: 1)"),
    causal: Optional[bool] = typer.Option(None, "--causal/--no-causal", help="causal or non-causal  "
                                                                             "(default: causal)"),
    workload: Optional[list[str]] = typer.Option(
        None, help="repeatable: structured, real, gaussian, local, sinks, needle, vertical_slash, clusters, "
                   "outliers; parameters as name:key=value,key=value (default: structured and real; --full: "
                   "structured, gaussian, needle, real)"),
    repeat: Optional[int] = typer.Option(None, help="timed calls per case after one warm-up, at least (see "
                                                    "--min-time) (default: 3; --full: 5)"),
    min_time: Optional[float] = typer.Option(None, help="per case, keep timing calls (within the budget) until "
                                                        "this many seconds are measured; 0: just --repeat calls "
                                                        "(default: 0.1), in each round"),
    rounds: Optional[int] = typer.Option(None, help="fresh worker processes that time each case (the best round "
                                                    "is reported; --compare flags only differences beyond their "
                                                    "spread) (default: 3)"),
    threads: Optional[int] = typer.Option(None, help="torch threads in the worker (default: 1; --full: every "
                                                     "core)"),
    max_err: Optional[float] = typer.Option(None, help="the pick: the fastest approximation within this relative "
                                                       "error of exact; different models (linear, lightning, gla, "
                                                       "based) are never picked (default: 0.01)"),
    time_cap: Optional[float] = typer.Option(None, help="skip a length whose time per call, predicted "
                                                        "quadratically from a shorter one, exceeds this (s)  "
                                                        "(default: 2; --full: 30)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default: bench-results/run-<time>; --resume: "
                                                  "the latest run)"),
    quick: bool = typer.Option(False, "--quick", help="the quick suite (the default): 112 cases in 3 rounds, "
                                                      "minutes on 2 cores (one round: 20-35 s idle)"),
    full: bool = typer.Option(False, "--full", help="lengths 256..8192, 8 heads, more workloads and repeats  "
                                                    "(default: off)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out, keeping its options  "
                                                        "(default: off)"),
    compare: Optional[Path] = typer.Option(None, help="a stored run (results file or folder) to compare times "
                                                      "with; `--compare OLD NEW` compares two stored runs without "
                                                      "running anything (default: none)"),
    compare_with: Optional[list[Path]] = typer.Argument(None, metavar="[NEW]", show_default=False,
                                                        help="with --compare OLD: the run to compare with OLD"),
    plugin: Optional[list[str]] = typer.Option(None, help="repeatable: a module to import first (methods or "
                                                          "input generators registered outside attnzoo)  "
                                                          "(default: none)"),
    make_report: bool = typer.Option(True, "--report/--no-report", help="build report.html after the run  "
                                                                        "(default: --report)", show_default=False),
) -> None:
    """Measure every registered method against exact attention; write results and report.html."""
    try:
        if compare_with:
            if compare is None or len(compare_with) != 1:
                raise AttnZooError("bench: extra arguments are only accepted as `--compare OLD NEW` (two stored "
                                   f"runs), got {' '.join(map(str, compare_with))}")
            old, new = _stored(compare, "--compare OLD"), _stored(compare_with[0], "--compare OLD NEW")
            print_comparison(new.read().cases, old.path)
            return
        if compare is not None:
            _stored(compare, "--compare")
        if make_report and importlib.util.find_spec("matplotlib") is None:
            raise AttnZooError("bench: the report needs matplotlib: pip install 'attnzoo[bench]' (from a checkout: "
                               "pip install -e '.[bench]'), or pass --no-report")
        if quick and full:
            raise AttnZooError("bench: pass at most one of --quick and --full")
        from .runner import PRESETS, plan

        if resume:
            out = out or _latest_results()
            base = _stored_suite(out) if ResultsFile(out).exists() else PRESETS["full" if full else "quick"]
        else:
            out = out or RESULTS_ROOT / dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
            base = PRESETS["full" if full else "quick"]
        suite = base.replace(
            methods=_names(methods, "--methods"), lengths=_ints(lengths, "--lengths"), heads=heads,
            heads_kv=heads_kv, head_dim=head_dim, batch=batch, causal=causal,
            workloads=tuple(workload) if workload else None, repeat=repeat, min_time_s=min_time, rounds=rounds, threads=threads,
            time_cap_s=time_cap, plugins=tuple(plugin) if plugin else None, max_err=max_err)
        plan(suite)  # every option and method name is checked here, before the first case
        from .runner import run

        console.print(f"[bold]attnzoo bench[/] → {out}  (lengths {', '.join(map(str, suite.lengths))}; "
                      f"B={suite.batch} H={suite.heads} D={suite.head_dim}; "
                      f"{'causal' if suite.causal else 'non-causal'}; workloads {', '.join(suite.workloads)})")
        results = run(suite, out, resume=resume, progress=_Bar, on_note=lambda m: console.print(f"[dim]{escape(m)}[/]"))
    except AttnZooError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished cases are saved; continue with "
                      f"`attnzoo bench --resume --out {out}`")
        raise typer.Exit(130) from None
    cases = ResultsFile(results).read().cases
    print_leaderboards(cases, suite.max_err)
    console.print(f"results: {results}")
    if make_report:
        _write_report(results, None)
    if compare is not None:
        print_comparison(cases, compare)
    statuses = {c["status"] for c in cases}
    if "failed" in statuses and "ok" not in statuses:
        console.print("[red]every case failed[/] (reasons above)")
        raise typer.Exit(1)


def _write_report(results: Path, out: Path | None) -> None:
    from .report import build_report

    try:
        for number, what in ResultsFile(results).read().problems:
            console.print(f"[yellow]warning:[/] {escape(str(results))} line {number}: {escape(what)} "
                          "(left out of the report; `attnzoo bench --resume` moves it aside and reruns its case)")
        page = build_report(results, out)
    except AttnZooError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except ImportError as e:
        console.print(f"[red]error:[/] the report needs matplotlib: pip install 'attnzoo[bench]' (from a checkout: "
                      f"pip install -e '.[bench]'): {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"report:  {page}")


def report(results: Path = typer.Argument(..., help="a results.jsonl file or the folder holding it"),
           out: Optional[Path] = typer.Option(None, help="where to write the page (default: next to the results)")
           ) -> None:
    """Build a self-contained report.html (leaderboard, plots, heatmaps, machine) from a results file."""
    _write_report(results, out)


def capture(model: str = typer.Option("smollm2-135m", help="a known model name (attnzoo models list: fetched on "
                                                             "first use) or a transformers model folder"),
            text: Optional[Path] = typer.Option(None, help="a text file (default: the shipped long KJV text for a "
                                                           "known decoder, else the package's prose)"),
            out: Path = typer.Option(..., help="the .pt file to write"),
            length: int = typer.Option(512, help="tokens per window (at most the model's maximum)"),
            batch: int = typer.Option(1, help="consecutive windows of the text")) -> None:
    """Record per-layer, per-head Q/K/V of a real model on real text (for `--workload real:capture=FILE`)."""
    from . import capture as cap

    try:
        record = cap.capture_qkv(model, None if text is None else text.read_text(), length=length, batch=batch)
    except AttnZooError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    path = cap.save(record, out)
    q, k = record["q"][0], record["k"][0]
    console.print(f"wrote {path}: {len(record['q'])} layers, q {tuple(q.shape)}, k/v {tuple(k.shape)} "
                  f"(B, H, N, D) from {record['model']}")


def register(app: typer.Typer) -> None:
    """Add the lab's commands to the ``attnzoo`` app."""
    app.command("bench")(bench)
    app.command("report")(report)
    app.command("capture")(capture)
