"""``attnzoo plan``: calibrate a per-head plan on a model; ``attnzoo plan show FILE``: a table and a picture.

torch, transformers and the calibrators are imported inside the commands, so ``attnzoo --help`` starts
without torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import AttnZooError

console = Console(width=None if Console().is_terminal else 160)
app = typer.Typer(help="Per-head KV plans calibrated on a model under a budget (`attnzoo plan --out plan.json`, "
                       "`attnzoo plan show plan.json`).", add_completion=False)


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/] {escape(str(e))}")
    raise typer.Exit(2) from None


@app.callback(invoke_without_command=True)
def calibrate(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", help="a known model name (attnzoo models list) or a local causal "
                                                   "LM folder"),
    calibrator: str = typer.Option("razor", help="razor (retrieval-head probe), duo (streaming error, "
                                                 "training-free), duo_gates (trained gates), moa (per-head "
                                                 "spans/budgets), minference (per-head prefill patterns), zipvl "
                                                 "(per-head top-p mass ratios), restore (heads whose full cache "
                                                 "most lowers the answer's loss, greedy)"),
    budget: float = typer.Option(0.125, help="mean share of the context the KV heads hold (minference: of the "
                                             "prefill's attention FLOPs)"),
    length: int = typer.Option(4096, help="context length the budget refers to"),
    max_drop: Optional[float] = typer.Option(None, help="an accuracy budget instead of --budget: the cheapest of "
                                                        "the KV budgets 1/64 ... 1/2 whose greedy accuracy on the "
                                                        "calibration tasks (at --length) is within this of exact's"),
    check_samples: int = typer.Option(2, min=1, help="--max-drop: prompts per calibration task scored per budget"),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="calibrator parameter NAME=VALUE "
                                                                           "(repeatable; e.g. window=128)"),
    out: Optional[Path] = typer.Option(None, help="where to write the plan (JSON)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: every core)"),
) -> None:
    """Calibrate a plan: measure every KV head, give each what it needs within the budget."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        console.print("[red]error:[/] --out expected a path for the plan file (or use `attnzoo plan show FILE`)")
        raise typer.Exit(2)
    import torch

    from .. import models as model_store
    from ..checks import parse_params
    from .base import make_calibrator

    try:
        cal = make_calibrator(calibrator, budget=budget, length=length, **parse_params(param))
        if threads:
            torch.set_num_threads(threads)
        lm, tokenizer = model_store.load(model)
        start = time.perf_counter()
        if max_drop is None:
            plan = cal.run(lm, tokenizer, model_name=model)
        else:
            from .budget import cheapest_within

            plan = cheapest_within(cal, lm, tokenizer, max_drop, samples=check_samples, model_name=model)
        plan.save(out)
    except AttnZooError as e:
        _fail(e)
    full = sum(plan.kind(i, h) == "full" for i in range(plan.shapes["layers"]) for h in range(plan.shapes["heads_kv"]))
    console.print(f"attnzoo plan: {calibrator} on {model} in {time.perf_counter() - start:.1f} s: {full} of "
                  f"{plan.shapes['layers'] * plan.shapes['heads_kv']} KV heads keep the full cache; "
                  f"{plan.kv_fraction(length):.3f} of the KV at {length} tokens → {out}")
    if max_drop is not None:
        md = plan.calibrator["max_drop"]
        console.print(f"accuracy on {', '.join(md['tasks'])}: exact {md['exact']:.3f}; tried "
                      + "; ".join(f"{t['budget']:g}: {t['accuracy']:.3f}" for t in md["tried"]))


@app.command("show")
def show(path: Path = typer.Argument(..., help="a plan file"),
         png: Optional[Path] = typer.Option(None, help="the layers × KV heads picture (default: FILE with .png)"),
         length: Optional[int] = typer.Option(None, help="context for the KV share (default: the calibrator's)")) -> None:
    """A summary table (per layer: full and streaming KV heads) and a layers × KV heads PNG."""
    from .file import load

    try:
        plan = load(path)
    except AttnZooError as e:
        _fail(e)
    cal = plan.calibrator or {}
    length = length or cal.get("params", {}).get("length") or 4096
    s = plan.shapes
    table = Table(title=f"{path.name}: {plan.model} ({s['layers']} layers, {s['heads']} heads, {s['heads_kv']} KV "
                        f"heads, head dim {s['head_dim']}); calibrator {cal.get('name', '-')}")
    for col in ("layer", "full KV heads", "streaming KV heads (sinks+window)", "snapkv KV heads (budget)",
                "novelty KV heads (budget)", "method heads"):
        table.add_column(col)

    def heads(groups, policy: str, size) -> str:
        return "; ".join(f"{','.join(map(str, g.heads))}" + (f" ({size(g.params)})" if size else "")
                         for g in groups if g.policy == policy)

    for i, groups in enumerate(plan.layers):
        methods = "; ".join(f"{g.method} {list(g.heads)}" for g in groups if g.method)
        table.add_row(str(i), heads(groups, "full", None),
                      heads(groups, "streaming", lambda p: f"{p.get('sinks', 4)}+{p.get('window', 512)}"),
                      heads(groups, "snapkv", lambda p: p["budget"]), heads(groups, "novelty", lambda p: p["budget"]),
                      methods)
    console.print(table)
    console.print(f"KV held at {length} tokens: {plan.kv_fraction(length):.3f} of the full cache"
                  + (f"; calibrated in {cal['seconds']} s" if "seconds" in cal else ""))
    try:
        import matplotlib
    except ImportError:
        console.print("[dim]no picture: matplotlib is missing (pip install 'attnzoo[bench]')[/]")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = png or path.with_suffix(".png")
    kinds = sorted({plan.kind(i, h) for i in range(s["layers"]) for h in range(s["heads_kv"])},
                   key=lambda k: ("full", "streaming").index(k) if k in ("full", "streaming") else 2)
    grid = [[kinds.index(plan.kind(i, h)) for h in range(s["heads_kv"])] for i in range(s["layers"])]
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * s["heads_kv"], 1 + 0.22 * s["layers"]))
    cmap = plt.get_cmap("tab10", max(len(kinds), 2))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=max(len(kinds), 2) - 0.5, aspect="auto", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(s["heads_kv"]))
    ax.set_title(f"{plan.model}: {cal.get('name', 'plan')}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(kinds))]
    ax.legend(handles, kinds, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    console.print(f"picture: {png}")
