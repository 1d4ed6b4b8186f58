"""``attnzoo task vision``: train the tiny ViT with each mixer on digits and the long-range grid task and print
accuracy, parameters and time per epoch (added to the ``task`` app by attnzoo/train/cli.py; torch and
attnzoo.tasks load inside the command, so the CLI starts without them)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import AttnZooError

console = Console(width=None if Console().is_terminal else 160)


def vision(
    mixers: str = typer.Option("global,swin,dina,hilo", help="comma-separated mixers, or 'all' "
                               "(see attnzoo.layers.vision.MIXERS)"),
    tasks: str = typer.Option("digits,longrange", help="comma-separated: digits, longrange"),
    full: bool = typer.Option(False, "--full", help="the longer budget (default: quick, ~1 min per mixer unloaded)"),
    dim: int = typer.Option(32, help="model width"),
    seed: int = typer.Option(0, help="data split and initialisation seed"),
) -> None:
    """Tiny ViT per mixer on scikit-learn digits (12×12 token grid) and a long-range pixel comparison."""
    from ..layers.vision import MIXERS
    from ..tasks.vision import TASKS, run_one

    names = sorted(MIXERS) if mixers.strip() == "all" else [m.strip() for m in mixers.split(",") if m.strip()]
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        for t in task_list:
            if t not in TASKS:
                raise AttnZooError(f"--tasks: expected names from {list(TASKS)}, got {t!r}")
        for m in names:
            if m not in MIXERS:
                raise AttnZooError(f"--mixers: expected names from {sorted(MIXERS)}, got {m!r}")
        table = Table(title=f"vision task ({'full' if full else 'quick'}): held-out accuracy")
        for h in ("mixer", "task", "accuracy", "params", "s/epoch", "total s"):
            table.add_column(h, justify="left" if h in ("mixer", "task") else "right")
        for m in names:
            for t in task_list:
                r = run_one(m, t, quick=not full, seed=seed, dim=dim, progress=console.is_terminal)
                console.print(f"  {m} / {t}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)")
                table.add_row(m, t, f"{r['accuracy']:.3f}", f"{r['params']:,}", f"{r['epoch_s']:.1f}",
                              f"{r['seconds']:.0f}")
    except AttnZooError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(table)
