"""The vision task: a tiny ViT with any mixer of :mod:`attnzoo.layers.vision`, trained on two image tasks.

* ``digits`` — scikit-learn's handwritten digits (8×8, 1,797 images, shipped with scikit-learn, offline),
  upsampled ×4 to 32×32 and cut into 2×2 patches: a 16×16 token grid, where 4×4 windows are local.
* ``longrange`` — a synthetic 16×16 grid of ±1 "colour" pixels with two marked pixels, one in the left four
  columns and one in the right four (at least 9 columns apart): is their colour the same? With mean pooling
  and a linear head the answer (an XOR of the two colours) needs the two pixels to meet inside a mixer, so
  mixers whose reach in two blocks is shorter than the distance stay near chance.

:func:`run` trains one model per (mixer, task) and reports held-out accuracy,
parameters and seconds per epoch; ``attnzoo task vision`` prints the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnZooError
from ..grid import flatten
from ..layers.vision import MIXERS, make_mixer

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


def digits(seed: int = 0, upsample: int = 4, test_fraction: float = 0.2) -> ImageData:
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


def longrange(n_train: int = 2000, n_test: int = 500, side: int = 16, seed: int = 0) -> ImageData:
    """Two channels: colour (±1 everywhere) and marker (1 at the two compared pixels); label = same colour."""
    if side < 12:
        raise AttnZooError(f"longrange: side expected >= 12 (the marked pixels must be far apart), got {side}")
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        colour = torch.randint(0, 2, (n, side, side), generator=gen).float() * 2 - 1
        marker = torch.zeros(n, side, side)
        rows = torch.randint(0, side, (n, 2), generator=gen)
        left = torch.randint(0, 4, (n,), generator=gen)
        right = torch.randint(side - 4, side, (n,), generator=gen)
        idx = torch.arange(n)
        marker[idx, rows[:, 0], left] = 1
        marker[idx, rows[:, 1], right] = 1
        y = (colour[idx, rows[:, 0], left] == colour[idx, rows[:, 1], right]).long()
        return torch.stack([colour, marker], 1), y

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    return ImageData(tx, ty, vx, vy, 2, 1)


class Block(nn.Module):
    """Pre-norm ViT block on a grid: ``x + mixer(LN(x), grid)``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, mixer: nn.Module, grid: tuple[int, int], mlp_ratio: int = 2):
        super().__init__()
        self.norm1, self.mixer, self.grid = nn.LayerNorm(dim), mixer, grid
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x), self.grid)
        return x + self.mlp(self.norm2(x))


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
            Block(dim, make_mixer(mixer, dim, heads, **{**per_block[i % len(per_block)], **mixer_kw}), self.grid)
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


QUICK = {"digits": Budget(120, 32, 3e-3, 40), "longrange": Budget(240, 32, 2e-3, 80)}
FULL = {"digits": Budget(1000, 64, 2e-3, 100), "longrange": Budget(2500, 64, 1e-3, 250)}


def _fit(model: nn.Module, train: list, held_out: list, budget: Budget, seed: int) -> tuple[float, int]:
    """AdamW with cosine decay for ``budget.steps`` steps over ``train`` (cycled); the best held-out accuracy
    of the evaluations every ``budget.eval_every`` steps and the steps taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, budget.steps)
    best = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(1, budget.steps + 1):
            x, y = train[(step - 1) % len(train)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % budget.eval_every == 0 or step == budget.steps:
                model.eval()
                with torch.no_grad():
                    hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in held_out)
                model.train()
                best = max(best, hits / sum(len(y) for _, y in held_out))
    return best, budget.steps


def _batches(x, y, batch, seed):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, len(y), batch)]


def run_one(mixer: str, task: str, *, quick: bool = True, seed: int = 0, dim: int = 32, depth: int = 2,
            ) -> dict:
    """Train and score one model; a record with accuracy, parameters, seconds per epoch and steps."""
    if task not in TASKS:
        raise AttnZooError(f"task: expected one of {list(TASKS)}, got {task!r}")
    if mixer not in MIXERS:
        raise AttnZooError(f"mixer: expected one of {sorted(MIXERS)}, got {mixer!r}")
    data = digits(seed) if task == "digits" else longrange(seed=seed)
    budget = (QUICK if quick else FULL)[task]
    torch.manual_seed(seed)
    model = TinyViT(mixer, channels=data.train_x.shape[1], image=data.train_x.shape[-1], patch=data.patch,
                    classes=data.classes, dim=dim, depth=depth)
    train = _batches(data.train_x, data.train_y, budget.batch, seed)
    held_out = _batches(data.test_x, data.test_y, 256, seed)
    t0 = time.perf_counter()
    accuracy, steps = _fit(model, train, held_out, budget, seed)
    seconds = time.perf_counter() - t0
    return {"mixer": mixer, "task": task, "accuracy": accuracy, "params": sum(p.numel() for p in model.parameters()),
            "epoch_s": seconds / (steps / len(train)), "seconds": seconds, "steps": steps, "grid": model.grid}


def run(mixers: list[str], tasks: tuple[str, ...] = TASKS, **kw) -> list[dict]:
    """:func:`run_one` for every (mixer, task)."""
    return [run_one(m, t, **kw) for m in mixers for t in tasks]
