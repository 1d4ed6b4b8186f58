"""Train one model per case (task × mixer × size) and append each result to a results file, resumably.

A case is a dict (task, task parameters, mixer, mixer parameters, model and
training settings); its canonical JSON is the key a resumed run skips on. The
file is :class:`attnzoo.bench.results.ResultsFile` (a run header per session,
one ``case`` record per trained model, flushed before the next starts).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bench.results import ResultsFile, case_key, machine_info
from ..errors import AttnZooError
from ..tasks import make_task
from .trainer import fit
from .model import TinyModel


@dataclass(frozen=True)
class TrainConfig:
    """Model size and training settings shared by every case of a sweep."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    conv: int = 4
    steps: int = 2000
    lr: float = 3e-3
    weight_decay: float = 0.1
    batch: int = 64
    eval_size: int = 512
    eval_every: int = 50
    patience: int = 8
    target: float = 0.99
    seed: int = 0


def make_case(task: str, task_params: dict, mixer: str, mixer_params: dict, cfg: TrainConfig) -> dict:
    return {"task": task, "task_params": dict(task_params), "mixer": mixer, "mixer_params": dict(mixer_params),
            **dataclasses.asdict(cfg)}


def train_case(case: dict, *, progress: bool = False) -> dict:
    """Build the task and a seeded :class:`TinyModel`, :func:`fit` it; the measured fields of the record."""
    task = make_task(case["task"], **case["task_params"])
    if task.kind != "trained":
        raise AttnZooError(f"task: {case['task']!r} is a {task.kind} task, not a trained one (see `attnzoo task list`)")
    model = TinyModel(**task.model_config(), mixer=case["mixer"], mixer_params=case["mixer_params"],
                      d_model=case["d_model"], n_layers=case["n_layers"], n_heads=case["n_heads"],
                      conv=case["conv"], seed=case["seed"])
    result = fit(model, task.batches(case["batch"], case["seed"]),
                 task.held_out(case["eval_size"], max(case["batch"], 256), case["seed"]),
                 steps=case["steps"], lr=case["lr"], weight_decay=case["weight_decay"],
                 eval_every=case["eval_every"], patience=case["patience"], target=case["target"],
                 progress=progress, desc=f"{case['task']} {case['mixer']} d={case['d_model']}")
    return {"accuracy": result.best_metric, "best_step": result.best_step, "steps": result.steps,
            "stopped": result.stopped, "seconds": round(result.seconds, 2), "final_loss": result.final_loss,
            "parameters": sum(p.numel() for p in model.parameters()),
            "state_size": model.state_size(task.seq_len), "seq_len": task.seq_len,
            "curve": [(h["step"], round(h["metric"], 4)) for h in result.history]}


def run_sweep(cases: list[dict], out: str | Path, *, resume: bool = False, suite: dict | None = None,
              on_case: Callable[[dict], None] | None = None, progress: bool = False) -> list[dict]:
    """Train every case not already in ``out``'s results file; returns the records written now."""
    store = ResultsFile(out)
    done: set[str] = set()
    if store.exists():
        if not resume:
            raise AttnZooError(f"task: {store.path} already holds results; pass --resume to continue it "
                               "or choose another --out")
        store.repair()
        done = store.read().done
        if all(case_key(c) in done for c in cases):
            return []
    store.append({"type": "run", "run_id": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S"),
                  "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "resumed": bool(done), "machine": {**machine_info(), "threads": torch.get_num_threads()},
                  "suite": suite or {}})
    written = []
    for case in cases:
        key = case_key(case)
        if key in done:
            continue
        start = time.perf_counter()
        try:
            record = {"status": "ok", **train_case(case, progress=progress)}
        except AttnZooError as e:
            record = {"status": "failed", "reason": str(e), "seconds": round(time.perf_counter() - start, 2)}
        except Exception as e:  # a crashing mixer is one failed case, not a lost sweep
            record = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=5), "seconds": round(time.perf_counter() - start, 2)}
        record = {"type": "case", "key": key, **case, **record}
        store.append(record)
        written.append(record)
        if on_case is not None:
            on_case(record)
    return written


def grid(task: str, mixers: Iterable[str], dims: Iterable[int], task_grid: list[dict], cfg: TrainConfig,
         mixer_params: dict[str, dict] | None = None) -> list[dict]:
    """Cases for every (task parameters, mixer, model dimension), smallest problems first."""
    return [make_case(task, tp, m, (mixer_params or {}).get(m, {}), dataclasses.replace(cfg, d_model=d))
            for tp in task_grid for d in dims for m in mixers]


def load_cases(out: str | Path) -> list[dict]:
    return ResultsFile(out).read().cases


