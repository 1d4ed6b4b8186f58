"""``attnzoo task vision``: train the tiny ViT with each mixer on digits and the long-range grid task and print
accuracy, parameters and time per epoch (added to the ``task`` app by attnzoo/train/cli.py; torch and
attnzoo.tasks load inside the command, so the CLI starts without them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import AttnZooError

console = Console(width=None if Console().is_terminal else 160)


def vision(
    mixers: str = typer.Option("global,swin,dina,hilo", help="comma-separated mixers, or 'all' (global first, "
                               "then every name of attnzoo.layers.vision.MIXERS)"),
    tasks: str = typer.Option("digits,longrange", help="comma-separated: digits, longrange"),
    full: bool = typer.Option(False, "--full", help="the longer budget (default: quick, at most ~1 min per mixer on 2 idle cores with --threads 2, ~1.25 min for the slowest two on one)"),
    dim: int = typer.Option(32, help="model width"),
    seed: int = typer.Option(0, help="data split and initialisation seed"),
    out: Optional[Path] = typer.Option(None, help="results file (JSON lines; default "
                                       "task-results/vision-quick.jsonl or vision-full.jsonl)"),
    resume: bool = typer.Option(True, help="reuse the cases already in --out (--no-resume: start the file anew)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (the models are tiny: a second thread gains "
                                "little and costs much on a busy machine)"),
) -> None:
    """Tiny ViT per mixer on scikit-learn digits (12×12 token grid) and a long-range pixel comparison."""
    import torch

    from ..layers.vision import MIXERS
    from ..tasks.vision import TASKS, run

    torch.set_num_threads(threads)

    names = (["global"] + [m for m in MIXERS if m != "global"] if mixers.strip() == "all"
             else [m.strip() for m in mixers.split(",") if m.strip()])
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    out = out or Path("task-results") / f"vision-{'full' if full else 'quick'}.jsonl"
    try:
        for t in task_list:
            if t not in TASKS:
                raise AttnZooError(f"--tasks: expected names from {list(TASKS)}, got {t!r}")
        for m in names:
            if m not in MIXERS:
                raise AttnZooError(f"--mixers: expected names from {sorted(MIXERS)}, got {m!r}")
        if not resume and out.exists():
            out.unlink()

        def announce(r: dict, reused: bool) -> None:
            how = "from " + str(out) if reused else f"{r['seconds']:.0f} s"
            console.print(f"  {r['mixer']} / {r['task']}: accuracy {r['accuracy']:.3f} ({how})")

        console.print(f"results: {out}")
        records = run(names, tuple(task_list), out=out, on_record=announce, quick=not full, seed=seed, dim=dim,
                      progress=console.is_terminal)
    except AttnZooError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(results_table(records, task_list, f"vision task ({'full' if full else 'quick'}): held-out accuracy"))


def results_table(records: list[dict], task_list: list[str], title: str) -> Table:
    """One row per mixer: accuracy per task (chance in the header), parameters, wall and CPU seconds per mixer."""
    by = {(r["mixer"], r["task"]): r for r in records}
    mixers = list(dict.fromkeys(r["mixer"] for r in records))
    table = Table(title=title)
    table.add_column("mixer")
    for t in task_list:
        ch = next((r["chance"] for r in records if r["task"] == t and "chance" in r), None)
        table.add_column(t + (f" (chance {ch:.2f})" if ch is not None else ""), justify="right")
    for h in ("params", "s/epoch " + task_list[0], "total s", "total CPU s"):
        table.add_column(h, justify="right")
    for m in mixers:
        rs = [by.get((m, t)) for t in task_list]
        first = rs[0]
        cpu = [r.get("cpu_s") for r in rs if r]  # records of older files may lack it
        table.add_row(m, *(f"{r['accuracy']:.3f}" if r else "—" for r in rs),
                      f"{first['params']:,}" if first else "—", f"{first['epoch_s']:.1f}" if first else "—",
                      f"{sum(r['seconds'] for r in rs if r):.0f}",
                      f"{sum(cpu):.0f}" if cpu and None not in cpu else "—")
    return table
