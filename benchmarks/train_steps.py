"""Training-step time of the tiny sequence model (`attnzoo task train`) per mixer, and what a run will cost.

One step = forward + loss (+ the layers' auxiliary losses) + backward + AdamW on one batch of the task at
its parameters, the same model `attnzoo task train` builds (2 blocks, short convolution, d_model 64 unless
told). Each mixer's steps are timed with exact attention's alongside (one after each), so "× exact"
(exact's time ÷ the mixer's; bigger is faster) compares them on the same machine state. One thread by
default, on the ``own`` clock where Linux reports run-queue waits (wall time less the time the thread waited
for a core), so a loaded shared machine still gives an idle core's numbers; a niced run on a loaded machine
takes longer in wall time by the share of a core it gets. "N steps" = ``--steps`` at that time
(evaluations every 50 steps and the start-up not counted).

    python benchmarks/train_steps.py --task listops --param seq_len=1024 --batch 16 \\
        --mixers 'sliding_window(window=64);gla;based(window=16,feature_dim=16)'
    python benchmarks/train_steps.py --task mqar --param pairs=64 --param seq_len=256 --param vocab_size=160 \\
        --batch 32 --d-model 128 --mixers 'gla;aaren'

Mixers are separated by ``;`` (a spec's parameters use commas); ``a,b`` is a plan with one mixer per layer.
"""

from __future__ import annotations

import argparse
import math

import torch

from attnzoo.bench.metrics import bench_clock, time_calls
from attnzoo.checks import parse_params
from attnzoo.tasks import make_task
from attnzoo.train.cli import parse_mixer
from attnzoo.train.sweep import TrainConfig, build_model, make_case
from attnzoo.train.trainer import aux_loss, timed_step, token_loss


def step_fn(task, task_name: str, params: dict, spec: str, cfg: TrainConfig):
    """A closure running one training step of ``spec``'s model on a fixed batch of ``task``."""
    mixer, shared = parse_mixer(spec)
    model = build_model(make_case(task_name, params, mixer, shared, cfg), task)
    x, y = task.tensors(cfg.batch, 0)
    return timed_step(model, lambda: token_loss(model(x), y) + aux_loss(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mqar", help="a trained task (see `attnzoo task list`)")
    ap.add_argument("--param", action="append", default=[], help="task parameter NAME=VALUE (repeatable)")
    ap.add_argument("--mixers", default="exact", help="';'-separated mixer specs as `task train --mixer` takes them")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per mixer (the minimum is kept)")
    ap.add_argument("--steps", type=int, default=600, help="steps of the run to estimate")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = parse_params(args.param)
    task = make_task(args.task, **params)
    cfg = TrainConfig(d_model=args.d_model, batch=args.batch)
    specs = [s.strip() for s in args.mixers.split(";") if s.strip()]
    clock = bench_clock()
    print(f"{args.task} {params}, batch {args.batch}, d_model {args.d_model}; threads {args.threads}, clock {clock}, "
          f"min of {args.repeat} steps; × exact = exact ÷ mixer")
    print(f"{'mixer':40s} {'s/step':>8s} {'× exact':>8s} {f'{args.steps} steps':>12s}")
    ref = step_fn(task, args.task, params, "exact", cfg)
    for spec in specs:
        t = time_calls(step_fn(task, args.task, params, spec, cfg), repeat=args.repeat, budget_s=math.inf,
                       clock=clock, alongside=ref)
        s, ref_s = min(t.runs), min(t.ref_runs)
        print(f"{spec:40s} {s:8.3f} {ref_s / s:8.2f} {args.steps * s / 60:10.1f} min", flush=True)


if __name__ == "__main__":
    main()
