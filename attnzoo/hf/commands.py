"""The body of ``attnzoo eval-model`` (registered in :mod:`attnzoo.cli`): runs the evaluation, prints the table."""

from __future__ import annotations

import platform

import torch
import transformers
from rich.console import Console
from rich.table import Table

from ..checks import parse_params  # noqa: F401  (re-exported: the --param parser)
from ..errors import AttnZooError
from .evaluate import SENTENCES, evaluate_methods, load_encoder, load_sentences, minilm_path


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def eval_model_table(console: Console, *, model: str | None, sentences: str | None, methods: list[str] | None,
                     params: list[str] | None = None, max_tokens: int = 512, threads: int | None = None) -> int:
    """Print the cosine table; returns the exit code (0 ok, 1 a method errored, 2 bad input)."""
    transformers.utils.logging.disable_progress_bar()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        overrides = parse_params(params)
        texts = load_sentences(sentences)
        tokenizer, encoder = load_encoder(model)
        rows = evaluate_methods(encoder, tokenizer, texts, methods=methods, params=overrides,
                                max_tokens=max_tokens)
    except AttnZooError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    name = model or "all-MiniLM-L6-v2"
    table = Table(title=f"{name}: sentence-embedding cosine to the unmodified model")
    for col in ("method", "family", "status", "cos mean", "cos min", "max |Δ|", "time (s)", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = {"ok": "[green]ok[/]", "skipped": "[yellow]skipped[/]"}.get(r.status, "[red]error[/]")
        table.add_row(r.method, r.family, status, _fmt(r.cos_mean, ".6f"), _fmt(r.cos_min, ".6f"),
                      _fmt(r.max_abs, ".2e"), _fmt(r.seconds, ".2f"), r.note)
    console.print(table)
    console.print(f"model: {model or minilm_path()}; {len(texts)} sentences from {sentences or SENTENCES}")
    console.print(f"machine: {platform.machine()} {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
                  f"transformers {transformers.__version__}; at most {max_tokens} padded tokens a batch; "
                  f"parameters: {overrides or 'defaults'}")
    return 1 if any(r.status == "error" for r in rows) else 0
