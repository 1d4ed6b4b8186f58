"""The ``attnzoo`` command line: ``attnzoo list``, ``attnzoo info NAME``, ``bench``, ``report``, ``capture``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from . import registry
from .errors import AttnZooError

app = typer.Typer(help="attnzoo: the efficient-attention literature behind one API.", no_args_is_help=True,
                  add_completion=False)
console = Console(width=None if Console().is_terminal else 140)


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[dim]no[/]"


@app.command("list")
def list_methods() -> None:
    """Print every registered method with its family, cost and capabilities."""
    table = Table(title="attnzoo methods")
    for col in ("name", "family", "complexity", "causal", "non-causal", "decode", "grad", "lse", "training-free"):
        table.add_column(col)
    for name, cls in registry.methods().items():
        s = cls.supports
        table.add_row(name, cls.family.value, cls.complexity, _yes(s.causal), _yes(s.noncausal), _yes(s.decode),
                      _yes(s.grad), _yes(s.lse), _yes(cls.training_free))
    console.print(table)


@app.command("info")
def info(name: str = typer.Argument(..., help="a registered method name (see `attnzoo list`)")) -> None:
    """Print one method: what it does, its parameters with defaults and ranges, and its papers."""
    try:
        m = registry.info(name)
    except AttnZooError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"[bold]{m.name}[/]  ({m.family.value}; {m.complexity})")
    console.print(m.doc)
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in vars(m.supports).items())
    console.print(f"supports: {caps}; training-free: {'yes' if m.training_free else 'no'}")
    if m.params:
        table = Table(title="parameters")
        for col in ("name", "type", "default", "range", "help"):
            table.add_column(col)
        for p in m.params:
            rng = "" if p.choices is None else "one of " + ", ".join(map(str, p.choices))
            if p.min is not None or p.max is not None:
                rng = f"[{'-inf' if p.min is None else p.min}, {'inf' if p.max is None else p.max}]"
            table.add_row(p.name, p.type, repr(p.default), rng, p.help)
        console.print(table)
    for inp, desc in m.inputs.items():
        console.print(f"extra input [bold]{inp}[/]: {desc}")
    if m.papers:
        console.print("papers: " + "; ".join(m.papers))


@app.command("eval-model")
def eval_model(
    model: str = typer.Option(None, help="a local encoder directory (default: the pretrained all-MiniLM-L6-v2)"),
    sentences: str = typer.Option(None, help="a text file, one sentence per line (default: the shipped set)"),
    method: list[str] = typer.Option(None, help="only these methods (repeatable; default: every method)"),
    param: list[str] = typer.Option(None, help="NAME=VALUE for every method with that parameter (repeatable)"),
    max_tokens: int = typer.Option(512, min=1, help="padded tokens per forward pass (sentences are batched by length)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (small batches: 1 is fastest on a shared machine)"),
) -> None:
    """Sentence-embedding cosine similarity to the unmodified encoder, for every non-causal-capable method."""
    from .hf.commands import eval_model_table  # imports transformers only when this command runs

    raise typer.Exit(eval_model_table(console, model=model, sentences=sentences, methods=method or None, params=param,
                                      max_tokens=max_tokens, threads=threads))


from .bench.cli import register as _register_bench  # noqa: E402  (bench, report, capture)

_register_bench(app)

from .eval.cli import register as _register_eval  # noqa: E402  (models, eval)

_register_eval(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
