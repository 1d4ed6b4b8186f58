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
from .trainer import evaluate, fit
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
    #: a curriculum: ``(("pairs", (8, 16, 32)),)`` trains on the task with pairs=8, then 16, then 32, then the
    #: task itself; each stage lasts until its held-out accuracy reaches ``stage_target`` or ``stage_steps``
    #: steps. Several parameters move together (equal counts). ``steps`` is the budget of all stages together.
    curriculum: tuple[tuple[str, tuple], ...] = ()
    stage_steps: int = 400
    stage_target: float = 0.9
    #: stop the run at the first stage that ends below ``stage_target`` (the model is then scored on the task
    #: as it is, ``stopped = "stage"``), instead of training the later stages of a curriculum it has lost
    stage_required: bool = False


#: the TrainConfig fields that exist only with a curriculum (left out of other cases, so their keys stay as before)
CURRICULUM_FIELDS = ("curriculum", "stage_steps", "stage_target", "stage_required")


def make_case(task: str, task_params: dict, mixer: str, mixer_params: dict, cfg: TrainConfig) -> dict:
    case = {"task": task, "task_params": dict(task_params), "mixer": mixer, "mixer_params": dict(mixer_params),
            **dataclasses.asdict(cfg)}
    if cfg.curriculum:
        case["curriculum"] = {name: list(values) for name, values in cfg.curriculum}
        stages(case)  # a malformed curriculum fails here, before any training
        if not cfg.stage_required:
            del case["stage_required"]  # the keys of cases without it stay as before
    else:
        for name in CURRICULUM_FIELDS:
            del case[name]
    return case


def stages(case: dict) -> list[dict]:
    """The task-parameter overrides of each curriculum stage of ``case`` (empty without a curriculum)."""
    curriculum = case.get("curriculum") or {}
    counts = {len(v) for v in curriculum.values()}
    if len(counts) > 1:
        raise AttnZooError(f"task: --curriculum expected the same number of stages for every parameter, got "
                           f"{ {k: len(v) for k, v in curriculum.items()} }")
    if curriculum and case["steps"] <= case["stage_steps"] * counts.pop():
        raise AttnZooError(f"task: --steps expected more than stage_steps × stages = "
                           f"{case['stage_steps']} × {len(next(iter(curriculum.values())))} (the budget of every stage "
                           f"together, the task itself last), got {case['steps']}")
    return [dict(zip(curriculum, values)) for values in zip(*curriculum.values())]


def build_model(case: dict, task) -> TinyModel:
    """The seeded :class:`TinyModel` that :func:`train_case` trains for ``case`` on ``task`` (its made task)."""
    return TinyModel(**task.model_config(), mixer=case["mixer"], mixer_params=case["mixer_params"],
                     d_model=case["d_model"], n_layers=case["n_layers"], n_heads=case["n_heads"],
                     conv=case["conv"], seed=case["seed"])


def train_case(case: dict, *, progress: bool = False, on_eval: Callable[[dict], None] | None = None) -> dict:
    """Build the task and a seeded :class:`TinyModel`, :func:`fit` it (after the curriculum's stages, if any,
    each a :func:`fit` of its own on the task with that stage's parameters); the measured fields of the record.
    ``on_eval`` receives every evaluation (its ``step`` counted over all stages, ``stage`` its index, ``seconds``
    the wall time since the case started, for logs that show how fast a run goes)."""
    task = make_task(case["task"], **case["task_params"])
    if task.kind != "trained":
        raise AttnZooError(f"task: {case['task']!r} is a {task.kind} task, not a trained one (see `attnzoo task list`)")
    plan = [(make_task(case["task"], **{**case["task_params"], **over}), over) for over in stages(case)]
    for stage, over in plan:
        if stage.seq_len > task.seq_len:
            raise AttnZooError(f"task: a curriculum stage expected seq_len <= the task's {task.seq_len} (the model's "
                               f"positions), got {stage.seq_len} at {over}")
    model = build_model(case, task)
    done, curve, record_stages, seconds, start = 0, [], [], 0.0, time.perf_counter()
    for i, (current, over) in enumerate(plan + [(task, None)]):
        last = over is None

        def log(entry: dict, offset: int = done, index: int = i) -> None:
            if on_eval is not None:
                on_eval({**entry, "step": offset + entry["step"], "stage": index,
                         "seconds": time.perf_counter() - start})

        result = fit(model, current.batches(case["batch"], case["seed"]),
                     current.held_out(case["eval_size"], max(case["batch"], 256), case["seed"]),
                     steps=case["steps"] - done if last else case["stage_steps"], lr=case["lr"],
                     weight_decay=case["weight_decay"], eval_every=case["eval_every"],
                     patience=case["patience"] if last else case["stage_steps"],
                     target=case["target"] if last else case["stage_target"], on_eval=log, progress=progress,
                     desc=f"{case['task']} {case['mixer']} d={case['d_model']}" + ("" if last else f" {over}"))
        seconds += result.seconds
        curve += [(done + h["step"], round(h["metric"], 4)) for h in result.history]
        if not last:
            record_stages.append({**over, "steps": result.steps, "accuracy": result.best_metric,
                                  "stopped": result.stopped})
        done += result.steps
        if not last and case.get("stage_required") and result.stopped != "target":
            score = evaluate(model, task.held_out(case["eval_size"], max(case["batch"], 256), case["seed"]))
            result = dataclasses.replace(result, best_metric=score, steps=0, best_step=0, stopped="stage")
            break
    out = {"accuracy": result.best_metric, "best_step": done - result.steps + result.best_step, "steps": done,
           "stopped": result.stopped, "seconds": round(seconds, 2), "final_loss": result.final_loss,
           "parameters": sum(p.numel() for p in model.parameters()),
           "state_size": model.state_size(task.seq_len), "seq_len": task.seq_len, "curve": curve}
    return {**out, "stages": record_stages} if plan else out


def run_sweep(cases: list[dict], out: str | Path, *, resume: bool = False, suite: dict | None = None,
              on_case: Callable[[dict], None] | None = None, progress: bool = False,
              on_eval: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Train every case not already in ``out``'s results file; returns the records written now.
    ``on_eval(case, evaluation)`` is called at each held-out evaluation (see :func:`train_case`)."""
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
            record = {"status": "ok", **train_case(
                case, progress=progress, on_eval=None if on_eval is None else lambda e, c=case: on_eval(c, e))}
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


