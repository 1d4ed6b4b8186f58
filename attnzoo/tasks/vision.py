"""The vision task: a tiny ViT with any mixer of :mod:`attnzoo.layers.vision`, trained on two image tasks.

* ``digits`` — scikit-learn's handwritten digits (8×8, 1,797 images, shipped with scikit-learn, offline),
  upsampled ×3 to 24×24 and cut into 2×2 patches: a 12×12 token grid, where 4×4 windows are local.
* ``longrange`` — a synthetic 12×12 grid, dark but for two pixels of colour ±1 (and a marker channel), one in
  the left three columns and one in the right three (at least 7 columns apart): is their colour the same? With mean pooling
  and a linear head the answer (an XOR of the two colours) needs the two pixels to meet inside a mixer, so
  mixers whose reach in two blocks is shorter than the distance stay near chance.

:func:`run` trains one model per (mixer, task) with :func:`attnzoo.train.fit` and reports held-out accuracy,
parameters, seconds per epoch, wall and CPU seconds (the process's CPU time: on one thread, what an idle
machine's wall time would be); ``attnzoo task vision`` prints the table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnZooError
from ..grid import flatten
from ..layers.vision import MIXERS, make_mixer
from ..train.model import Block
from ..train.trainer import fit

TASKS = ("digits", "longrange")

#: per-mixer settings for the two blocks of the model (alternating shift / dilation / sort axis as the papers do)
_BLOCK_KW = {
    "swin": ({}, {"shift": 2}),
    "dina": ({"dilation": 1}, {"dilation": None}),
    "flatformer": ({"axis": 0}, {"axis": 1, "shift": 2}),
}


@dataclass(frozen=True)
class ImageData:
    """Images ``(n, C, H, W)`` and labels, split into train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    patch: int


def digits(seed: int = 0, upsample: int = 3, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's digits, scaled to [0, 1], upsampled (bilinear) and split with a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData(x[tr], y[tr], x[te], y[te], 10, 2)


def longrange(n_train: int = 2000, n_test: int = 500, side: int = 12, seed: int = 0) -> ImageData:
    """Two channels: colour (±1 at the two compared pixels, 0 elsewhere) and marker (1 at those pixels);
    label = same colour."""
    if side < 10:
        raise AttnZooError(f"longrange: side expected >= 10 (the marked pixels must be far apart), got {side}")
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        colour = torch.zeros(n, side, side)
        marker = torch.zeros(n, side, side)
        rows = torch.randint(0, side, (n, 2), generator=gen)
        left = torch.randint(0, 3, (n,), generator=gen)
        right = torch.randint(side - 3, side, (n,), generator=gen)
        idx = torch.arange(n)
        marker[idx, rows[:, 0], left] = 1
        marker[idx, rows[:, 1], right] = 1
        pair = torch.randint(0, 2, (n, 2), generator=gen).float() * 2 - 1
        colour[idx, rows[:, 0], left] = pair[:, 0]
        colour[idx, rows[:, 1], right] = pair[:, 1]
        y = (pair[:, 0] == pair[:, 1]).long()
        return torch.stack([colour, marker], 1), y

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    return ImageData(tx, ty, vx, vy, 2, 1)


class GridMixer(nn.Module):
    """Binds a grid mixer to its grid, so the trainer's sequence :class:`~attnzoo.train.model.Block` holds it."""

    def __init__(self, mixer: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.mixer, self.grid = mixer, grid

    def forward(self, x):
        return self.mixer(x, self.grid)


class TinyViT(nn.Module):
    """Patch embedding + learned positions, ``depth`` pre-norm blocks with the named mixer, mean pool, head."""

    def __init__(self, mixer: str, *, channels: int, image: int, patch: int, classes: int, dim: int = 32,
                 depth: int = 2, heads: int = 2, **mixer_kw):
        super().__init__()
        if image % patch:
            raise AttnZooError(f"TinyViT: patch expected to divide the image side {image}, got {patch}")
        self.grid = (image // patch, image // patch)
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)
        per_block = _BLOCK_KW.get(mixer, ({},) * depth)
        self.blocks = nn.ModuleList(
            Block(dim, GridMixer(make_mixer(mixer, dim, heads, **{**per_block[i % len(per_block)], **mixer_kw}),
                                 self.grid), mlp_ratio=2)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = flatten(self.embed(images).movedim(1, -1), self.grid) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


@dataclass(frozen=True)
class Budget:
    """Training budget of one (mixer, task) run."""

    steps: int
    batch: int
    lr: float
    eval_every: int


QUICK = {"digits": Budget(400, 32, 3e-3, 100), "longrange": Budget(300, 32, 3e-3, 100)}
FULL = {"digits": Budget(1000, 64, 2e-3, 100), "longrange": Budget(2500, 64, 1e-3, 250)}


def _batches(x, y, batch, seed):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, len(y), batch)]


def run_one(mixer: str, task: str, *, quick: bool = True, seed: int = 0, dim: int = 32, depth: int = 2,
            progress: bool = False, budget: Budget | None = None) -> dict:
    """Train and score one model; a record with accuracy, parameters, seconds per epoch and steps."""
    if task not in TASKS:
        raise AttnZooError(f"task: expected one of {list(TASKS)}, got {task!r}")
    if mixer not in MIXERS:
        raise AttnZooError(f"mixer: expected one of {sorted(MIXERS)}, got {mixer!r}")
    data = digits(seed) if task == "digits" else longrange(seed=seed)
    budget = budget or (QUICK if quick else FULL)[task]
    torch.manual_seed(seed)
    model = TinyViT(mixer, channels=data.train_x.shape[1], image=data.train_x.shape[-1], patch=data.patch,
                    classes=data.classes, dim=dim, depth=depth)
    train = _batches(data.train_x, data.train_y, budget.batch, seed)
    held_out = _batches(data.test_x, data.test_y, 256, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(model, train, held_out, steps=budget.steps, lr=budget.lr, eval_every=budget.eval_every,
              patience=budget.steps, warmup=budget.steps // 10, weight_decay=0.05, seed=seed, progress=progress,
              desc=f"{mixer} / {task}")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mixer": mixer, "task": task, "mode": "quick" if quick else "full", "seed": seed, "dim": dim,
            "depth": depth, "accuracy": res.best_metric, "chance": chance(data), "params": sum(p.numel()
            for p in model.parameters()), "epoch_s": seconds / (res.steps / len(train)), "seconds": seconds, "cpu_s": cpu,
            "steps": res.steps, "best_step": res.best_step, "grid": list(model.grid)}


def chance(data: ImageData) -> float:
    """Held-out accuracy of always answering the most frequent held-out class."""
    return float(torch.bincount(data.test_y, minlength=data.classes).max()) / len(data.test_y)


_KEY = ("mixer", "task", "mode", "seed", "dim", "depth")


def load_results(path: str | Path) -> list[dict]:
    """The records of a results file (one JSON object a line); [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(mixers: list[str], tasks: tuple[str, ...] = TASKS, *, out: str | Path | None = None,
        on_record: Callable[[dict, bool], None] | None = None, quick: bool = True, seed: int = 0, dim: int = 32,
        depth: int = 2, **kw) -> list[dict]:
    """:func:`run_one` for every (mixer, task), in that order.

    With ``out`` (a JSON-lines file) each record is appended as soon as it is measured and a case already in
    the file (same mixer, task, mode, seed, dim, depth) is read back instead of retrained, so an interrupted
    run resumes where it stopped. ``on_record(record, reused)`` sees each record as it comes.
    """
    done = {tuple(r.get(k) for k in _KEY): r for r in (load_results(out) if out is not None else [])}
    mode = "quick" if quick else "full"
    records = []
    for m in mixers:
        for t in tasks:
            key = (m, t, mode, seed, dim, depth)
            reused = key in done
            r = done[key] if reused else run_one(m, t, quick=quick, seed=seed, dim=dim, depth=depth, **kw)
            if out is not None and not reused:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a") as f:
                    f.write(json.dumps(r) + "\n")
            if on_record is not None:
                on_record(r, reused)
            records.append(r)
    return records
