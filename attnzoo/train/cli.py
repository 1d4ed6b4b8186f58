"""``attnzoo task ...``: train tiny models on trained tasks and compare mixers.

``attnzoo task list`` shows the tasks and mixers, ``attnzoo task train NAME``
trains one model, ``attnzoo task mqar`` sweeps mixers × model dims × pairs
(results appended, resumable, with a report), ``attnzoo task report`` rebuilds a
report. Registered on the main app by :mod:`attnzoo.cli`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import AttnZooError

app = typer.Typer(help="Train tiny models on synthetic tasks (MQAR, ListOps, retrieval, passkey_train) per mixer.",
                  no_args_is_help=True, add_completion=False)
console = Console(width=None if Console().is_terminal else 160)
RESULTS_ROOT = Path("task-results")

#: the MQAR presets. ``quick`` (the default) takes about five minutes of one core; ``full`` is the
#: issue's grid with the budget of the table in docs/training.md (hours on two shared cores).
PRESETS = {
    "quick": {"mixers": "exact,sliding_window,gla,based,linear", "dims": "64", "pairs": "8,16",
              "vocab": 64, "steps": 300, "batch": 32, "eval_size": 256, "patience": 4},
    "full": {"mixers": "exact,sliding_window,gla,based,linear,lightning,aaren,landmark", "dims": "64,128",
             "pairs": "8,32,64", "vocab": 160, "steps": 800, "batch": 32, "eval_size": 256, "patience": 4},
}
#: window sizes small enough that local mixers cannot see every pair at once (the defaults cover the sequence),
#: landmark blocks of 8 (8 to 32 blocks per sequence)
MQAR_MIXER_PARAMS = {"sliding_window": {"window": 16}, "based": {"window": 16, "feature_dim": 16},
                     "landmark": {"block": 8}}


def _fail(e: AttnZooError) -> typer.Exit:
    console.print(f"[red]error:[/] {escape(str(e))}")
    return typer.Exit(2)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AttnZooError(f"task: {option} expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise AttnZooError(f"task: {option} expected positive integers, got {text!r}")
    return out


def _mixer_params(items: list[str] | None) -> dict[str, dict]:
    """``["based:window=16"]`` -> ``{"based": {"window": 16}}``."""
    from ..checks import parse_params

    out: dict[str, dict] = {}
    for item in items or []:
        mixer, sep, rest = item.partition(":")
        if not sep:
            raise AttnZooError(f"--mixer-param: expected MIXER:NAME=VALUE, got {item!r}")
        out.setdefault(mixer, {}).update(parse_params([rest]))
    return out


def parse_curriculum(items: list[str] | None) -> tuple[tuple[str, tuple], ...]:
    """``["pairs=8,16,32"]`` -> ``(("pairs", (8, 16, 32)),)``: a task parameter's value per curriculum stage."""
    from ..checks import parse_params

    out = []
    for item in items or []:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise AttnZooError(f"--curriculum: expected NAME=V1,V2,... (a task parameter's value per stage), got {item!r}")
        out.append((name.strip(), tuple(parse_params([f"{name.strip()}={v}"])[name.strip()]
                                        for v in values.split(",") if v.strip())))
    return tuple(out)


def lead_up(curriculum: tuple[tuple[str, tuple], ...], name: str, value) -> tuple[tuple[str, tuple], ...]:
    """The stages of ``curriculum`` whose ``name`` is below ``value`` (a grid column's curriculum leads up to it)."""
    values = dict(curriculum).get(name)
    if values is None:
        return curriculum
    keep = [i for i, v in enumerate(values) if v < value]
    return tuple((n, tuple(vs[i] for i in keep)) for n, vs in curriculum) if keep else ()


def parse_mixer(text: str, shared: dict | None = None) -> tuple[str | list, dict]:
    """``--mixer`` text (and ``--mixer-param`` values) -> the ``(mixer, mixer_params)`` of a case: one
    ``NAME(K=V,...)`` entry is that mixer in every layer, several entries a plan with one per layer."""
    plan, shared = parse_plan(text), dict(shared or {})
    if isinstance(plan, list) and len(plan) == 1:  # one entry with parameters: every layer
        plan, shared = plan[0][0], {**plan[0][1], **shared}
    return plan, shared


def parse_plan(text: str) -> str | list:
    """``"exact"`` -> ``"exact"``; ``"sliding_window(window=16),exact"`` -> one ``[name, params]`` per layer."""
    from ..checks import parse_params

    entries, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            entries.append(text[start:i].strip())
            start = i + 1
    if depth or not all(entries):
        raise AttnZooError(f"--mixer: expected NAME or NAME(K=V,...) entries separated by commas, got {text!r}")
    plan = []
    for e in entries:
        name, _, rest = e.partition("(")
        params = parse_params([p for p in rest.rstrip(")").split(",") if p.strip()]) if rest else {}
        plan.append([name.strip(), params])
    return plan[0][0] if len(plan) == 1 and not plan[0][1] else plan


def print_table(cases: list[dict], task: str) -> None:
    from .report import accuracy_table

    headers, rows = accuracy_table(cases, task)
    table = Table(title=f"{task}: held-out accuracy")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def _announce(record: dict) -> None:
    from .report import mixer_label, setting

    what = f"{mixer_label(record)} d={record['d_model']} {setting(record)}"
    if record["status"] == "ok":
        console.print(f"  {escape(what)}: accuracy {record['accuracy']:.3f} in {record['steps']} steps "
                      f"({record['seconds']:.0f} s, {record['stopped']})")
    else:
        console.print(f"  {escape(what)}: [red]failed[/] {escape(record.get('reason', ''))}")


def _log_eval(case: dict, entry: dict) -> None:
    from .report import mixer_label, setting

    stage = f" stage {entry['stage']}" if case.get("curriculum") else ""
    console.print(f"    {escape(mixer_label(case))} d={case['d_model']} {escape(setting(case))}{stage} step {entry['step']}: "
                  f"loss {entry['loss']:.3f}, held-out {entry['metric']:.3f}"
                  + (f" ({entry['seconds']:.0f} s)" if "seconds" in entry else ""), highlight=False)


@app.command("list")
def list_tasks() -> None:
    """Print the trained tasks with their parameters, and every mixer name."""
    from ..tasks import tasks
    from .mixers import mixer_names

    table = Table(title="trained tasks")
    for col in ("name", "output", "parameters (default)"):
        table.add_column(col)
    for name, cls in sorted(tasks().items()):
        if cls.kind == "trained":
            ps = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
            table.add_row(name, cls.output, ps)
    console.print(table)
    console.print("mixers (causal): " + ", ".join(mixer_names(causal=True)))


@app.command("train")
def train(
    task: str = typer.Argument(..., help="a trained task (see `attnzoo task list`)"),
    mixer: str = typer.Option("exact", help="a registered method or learned layer; comma-separated = one per layer, "
                                            "each NAME or NAME(K=V,...), e.g. 'sliding_window(window=16),exact'"),
    param: list[str] = typer.Option(None, help="task parameter NAME=VALUE (repeatable)"),
    mixer_param: list[str] = typer.Option(None, help="mixer parameter NAME=VALUE (repeatable)"),
    d_model: int = typer.Option(64, min=1), layers: int = typer.Option(2, min=1), heads: int = typer.Option(2, min=1),
    conv: int = typer.Option(4, min=0, help="short causal convolution before each mixer (0: none)"),
    steps: int = typer.Option(2000, min=1), lr: float = typer.Option(3e-3), batch: int = typer.Option(64, min=1),
    eval_size: int = typer.Option(512, min=1), target: float = typer.Option(0.99), seed: int = typer.Option(0),
    patience: int = typer.Option(8, min=1, help="evaluations (every 50 steps) without improvement before stopping"),
    curriculum: list[str] = typer.Option(None, help="a curriculum: task parameter NAME=V1,V2,... trained on in turn "
                                                    "before the task itself (repeatable: parameters move together), "
                                                    "e.g. pairs=8,16,32; see docs/training.md"),
    stage_steps: int = typer.Option(400, min=1, help="most steps per curriculum stage (part of --steps)"),
    stage_target: float = typer.Option(0.9, help="held-out accuracy that ends a curriculum stage early"),
    stage_required: bool = typer.Option(False, help="stop at the first curriculum stage that ends below "
                                                    "--stage-target and score the model on the task as it is"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    log_evals: bool = typer.Option(False, help="print every held-out evaluation (a line per 50 steps; for logs)"),
    out: Optional[Path] = typer.Option(None, help="also append the result to this results folder (skipped when "
                                                  "already there; default: not saved)"),
) -> None:
    """Train one tiny model on one task and print its held-out accuracy."""
    import torch

    from ..checks import parse_params
    from .sweep import TrainConfig, make_case, train_case

    torch.set_num_threads(threads)
    try:
        cfg = TrainConfig(d_model=d_model, n_layers=layers, n_heads=heads, conv=conv, steps=steps, lr=lr,
                          batch=batch, eval_size=eval_size, target=target, seed=seed, patience=patience,
                          curriculum=parse_curriculum(curriculum), stage_steps=stage_steps, stage_target=stage_target,
                          stage_required=stage_required)
        plan, shared = parse_mixer(mixer, parse_params(mixer_param))
        case = make_case(task, parse_params(param), plan, shared, cfg)
        if out is None:
            record = train_case(case, progress=progress,
                                on_eval=(lambda e: _log_eval(case, e)) if log_evals else None)
        else:
            from .sweep import run_sweep

            written = run_sweep([case], out, resume=True, progress=progress, suite={"command": "train"},
                                on_eval=_log_eval if log_evals else None)
            if not written:
                console.print(f"{task} / {mixer}: already in {out}; nothing trained")
                return
            record = written[0]
            if record["status"] != "ok":
                raise AttnZooError(record["reason"])
    except AttnZooError as e:
        raise _fail(e) from None
    console.print(f"{task} / {mixer} d={d_model}: held-out accuracy [bold]{record['accuracy']:.4f}[/] "
                  f"(best at step {record['best_step']}, stopped: {record['stopped']} after {record['steps']} steps, "
                  f"{record['seconds']:.1f} s; {record['parameters']} parameters, state {record['state_size']} floats)")


def _preset_help(key: str) -> str:
    return f"quick: {PRESETS['quick'][key]}; --full: {PRESETS['full'][key]}"


@app.command("mqar")
def mqar(
    mixers: Optional[str] = typer.Option(None, help="comma-separated mixers (methods or learned layers) ("
                                                   + _preset_help("mixers") + ")"),
    dims: Optional[str] = typer.Option(None, help="model dimensions, comma-separated (" + _preset_help("dims") + ")"),
    pairs: Optional[str] = typer.Option(None, help="key-value pairs, comma-separated (" + _preset_help("pairs") + ")"),
    seq_len: Optional[int] = typer.Option(None, min=8, help="tokens per sequence (default max(64, 4·pairs))"),
    vocab: Optional[int] = typer.Option(None, min=8, help="vocabulary size (" + _preset_help("vocab") + ")"),
    mixer_param: list[str] = typer.Option(None, help="MIXER:NAME=VALUE (repeatable); defaults: " + ", ".join(
        f"{m}:{k}={v}" for m, ps in MQAR_MIXER_PARAMS.items() for k, v in ps.items())),
    steps: Optional[int] = typer.Option(None, min=1, help="most training steps per model (" + _preset_help("steps") + ")"),
    lr: float = typer.Option(3e-3), layers: int = typer.Option(2, min=1), heads: int = typer.Option(2, min=1),
    batch: Optional[int] = typer.Option(None, min=1, help="sequences per step (" + _preset_help("batch") + ")"),
    eval_size: Optional[int] = typer.Option(None, min=1, help="held-out sequences (" + _preset_help("eval_size") + ")"),
    patience: Optional[int] = typer.Option(None, min=1, help="evaluations (every 50 steps) without improvement "
                                                             "before stopping (" + _preset_help("patience") + ")"),
    quick: bool = typer.Option(False, "--quick", help="the quick preset (the default): about 10 minutes on 2 cores"),
    full: bool = typer.Option(False, "--full", help="the full grid: 8 mixers × d 64,128 × pairs 8,32,64 (hours on "
                                                    "2 cores)"),
    out: Optional[Path] = typer.Option(None, help=f"results folder (default {RESULTS_ROOT}/mqar-<time>)"),
    resume: bool = typer.Option(False, help="continue the results in --out (default: the latest run)"),
    report: bool = typer.Option(True, help="write report.html next to the results"),
    curriculum: list[str] = typer.Option(None, help="a curriculum: task parameter NAME=V1,V2,... trained on in turn "
                                                    "before the task itself (repeatable: parameters move together), "
                                                    "e.g. pairs=8,16,32 (each column keeps the pair counts below its own); see docs/training.md"),
    stage_steps: int = typer.Option(400, min=1, help="most steps per curriculum stage (part of --steps)"),
    stage_target: float = typer.Option(0.9, help="held-out accuracy that ends a curriculum stage early"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    seed: int = typer.Option(0),
    log_evals: bool = typer.Option(False, help="print every held-out evaluation (a line per 50 steps; for logs of "
                                               "long runs)"),
) -> None:
    """Zoology's MQAR: accuracy of a 2-layer model per mixer × model dimension × number of pairs.

    Options not given come from the preset (quick unless --full)."""
    import torch

    from .sweep import TrainConfig, grid, run_sweep

    torch.set_num_threads(threads)
    try:
        if quick and full:
            raise AttnZooError("task mqar: pass at most one of --quick and --full")
        preset = PRESETS["full" if full else "quick"]
        dim_list = _ints(dims or preset["dims"], "--dims")
        pair_list = _ints(pairs or preset["pairs"], "--pairs")
        mixer_list = [m.strip() for m in (mixers or preset["mixers"]).split(",") if m.strip()]
        if not mixer_list:
            raise AttnZooError(f"task mqar: --mixers expected at least one name, got {mixers!r}")
        cfg = TrainConfig(n_layers=layers, n_heads=heads, lr=lr, seed=seed, patience=patience or preset["patience"],
                          steps=steps or preset["steps"], eval_size=eval_size or preset["eval_size"],
                          batch=batch or preset["batch"], stage_steps=stage_steps, stage_target=stage_target)
        stages = parse_curriculum(curriculum)
        params = {**MQAR_MIXER_PARAMS}
        for m, ps in _mixer_params(mixer_param).items():
            params[m] = {**params.get(m, {}), **ps}
        cases = [case for p in pair_list
                 for case in grid("mqar", mixer_list, dim_list,
                                  [{"pairs": p, "seq_len": seq_len or max(64, 4 * p), "vocab_size": vocab or preset["vocab"]}],
                                  dataclasses.replace(cfg, curriculum=lead_up(stages, "pairs", p)), params)]
        if out is None:
            runs = sorted(RESULTS_ROOT.glob("mqar-*/results.jsonl"), key=lambda p: p.stat().st_mtime)
            if resume and not runs:
                raise AttnZooError(f"task: --resume found no run under {RESULTS_ROOT}/; pass --out FOLDER")
            out = runs[-1].parent if resume else RESULTS_ROOT / f"mqar-{dt.datetime.now():%Y%m%d-%H%M%S}"
        console.print(f"MQAR ({'full' if full else 'quick'} preset): {len(cases)} models ({len(mixer_list)} mixers × "
                      f"{len(dim_list)} dims × {len(pair_list)} pair counts) -> {out}")
        run_sweep(cases, out, resume=resume, on_case=_announce, on_eval=_log_eval if log_evals else None,
                  suite={"preset": "full" if full else "quick", "mixers": mixer_list, "dims": list(dim_list),
                         "pairs": list(pair_list), **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "d_model"},
                         "curriculum": {k: list(v) for k, v in stages}})
    except AttnZooError as e:
        raise _fail(e) from None
    from .sweep import load_cases

    print_table(load_cases(out), "mqar")
    if report:
        from .report import build_report

        console.print(f"report: {build_report(out)}")


@app.command("report")
def report_cmd(results: Path = typer.Argument(..., help="a results folder or results.jsonl"),
               markdown: bool = typer.Option(False, "--markdown", help="print the tables as Markdown (for docs), "
                                                                      "each cell with its steps and stop reason")) -> None:
    """Print the accuracy tables of a results file and write its report.html."""
    from .report import build_report, markdown_table
    from .sweep import load_cases

    try:
        cases = load_cases(results)
        for task in dict.fromkeys(c["task"] for c in cases):
            if markdown:
                print(f"{task}:\n\n{markdown_table(cases, task)}\n")
            else:
                print_table(cases, task)
        console.print(f"report: {build_report(results)}")
    except AttnZooError as e:
        raise _fail(e) from None


from .vision_cli import vision as _vision  # noqa: E402  (attnzoo task vision; torch loads inside it)

app.command("vision")(_vision)
