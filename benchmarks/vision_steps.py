"""Training-step time of the vision task's tiny ViT with every mixer, and the quick mode it implies.

One step = forward + backward + AdamW on a batch of 32 (the quick budget's batch) at the task's shapes:
digits (1×24×24 images, 2×2 patches) and longrange (2×12×12, 1×1 patches), both a 12×12 token grid.
Each mixer's steps are timed with the global-attention model's steps alongside (one after each), so
"× global" (global's time ÷ the mixer's; bigger is faster) compares them on the same machine state.
One thread by default, on the ``own`` clock where Linux reports run-queue waits (wall time less the time
the thread waited for a core: a busy shared machine still gives usable numbers). "quick s" = 400 digits
steps + 300 longrange steps at these times (evaluation and start-up not counted; a quick run adds
about 10-15%).

    python benchmarks/vision_steps.py                      # every mixer
    python benchmarks/vision_steps.py --mixers titans,dina --repeat 20
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from attnzoo.bench.metrics import bench_clock, time_calls
from attnzoo.layers.vision import MIXERS
from attnzoo.tasks.vision import QUICK, TinyViT
from attnzoo.train.trainer import timed_step

#: (channels, image side, patch, classes) of each task's model
SHAPES = {"digits": (1, 24, 2, 10), "longrange": (2, 12, 1, 2)}


def step_fn(mixer: str, task: str):
    """A closure running one training step of ``mixer``'s model on a fixed random batch."""
    ch, side, patch, classes = SHAPES[task]
    torch.manual_seed(0)
    model = TinyViT(mixer, channels=ch, image=side, patch=patch, classes=classes)
    x, y = torch.randn(QUICK[task].batch, ch, side, side), torch.randint(0, classes, (QUICK[task].batch,))
    return timed_step(model, lambda: F.cross_entropy(model(x), y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixers", default="all", help="comma-separated MIXERS names, or 'all'")
    ap.add_argument("--repeat", type=int, default=10, help="timed steps per mixer and task (the minimum is kept)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(MIXERS) if args.mixers == "all" else [m.strip() for m in args.mixers.split(",") if m.strip()]
    names = ["global"] + [m for m in names if m != "global"]
    clock = bench_clock()
    print(f"threads {args.threads}, clock {clock}, min of {args.repeat} steps; × global = global ÷ mixer")
    print(f"{'mixer':14s} {'digits ms':>10s} {'× global':>9s} {'longrange ms':>13s} {'× global':>9s} {'quick s':>8s}")
    ref = {t: step_fn("global", t) for t in SHAPES}
    for name in names:
        row, quick = [], 0.0
        for task in SHAPES:
            t = time_calls(step_fn(name, task), repeat=args.repeat, budget_s=math.inf, clock=clock,
                           alongside=ref[task])
            ms, ref_ms = 1000 * min(t.runs), 1000 * min(t.ref_runs)
            row += [f"{ms:10.1f}", f"{ref_ms / ms:9.2f}"]
            quick += QUICK[task].steps * ms / 1000
        print(f"{name:14s} {row[0]} {row[1]} {row[2]:>13s} {row[3]} {quick:8.0f}", flush=True)


if __name__ == "__main__":
    main()
