"""The vision task: data, the tiny ViT over every mixer, a tiny training run and the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnzoo.cli import app
from attnzoo.layers.vision import MIXERS
from attnzoo.tasks.vision import Budget, TinyViT, digits, load_results, longrange, run, run_one


def test_digits_and_longrange_data():
    d = digits()
    assert d.train_x.shape[1:] == (1, 24, 24) and len(d.train_x) + len(d.test_x) == 1797
    assert 0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1.0 and d.classes == 10
    lr = longrange(n_train=60, n_test=10)
    x, y = lr.train_x, lr.train_y
    assert x.shape == (60, 2, 12, 12)
    for img, label in zip(x, y):
        r, c = torch.nonzero(img[1], as_tuple=True)
        assert len(r) == 2 and abs(int(c[0]) - int(c[1])) >= 7
        assert int(label) == int(img[0, r[0], c[0]] == img[0, r[1], c[1]])
    assert 0.2 < float(y.float().mean()) < 0.8


@pytest.mark.parametrize("mixer", [pytest.param(m, marks=() if m in ("global", "swin", "poolformer") else
                                                 pytest.mark.slow) for m in sorted(MIXERS)])
def test_tiny_vit_runs_every_mixer(mixer):
    m = TinyViT(mixer, channels=2, image=12, patch=1, classes=2, dim=16)
    out = m(torch.randn(2, 2, 12, 12))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.slow
def test_run_one_trains_and_reports():
    r = run_one("swin", "digits", budget=Budget(4, 16, 1e-3, 4), dim=16)
    assert r["mixer"] == "swin" and 0.0 <= r["accuracy"] <= 1.0 and r["params"] > 0 and r["epoch_s"] > 0
    assert r["steps"] == 4 and r["grid"] == [12, 12] and r["chance"] == pytest.approx(51 / 359)


def test_run_writes_each_case_and_resumes(tmp_path):
    out, seen = tmp_path / "vision.jsonl", []
    kw = dict(tasks=("longrange",), out=out, budget=Budget(2, 16, 1e-3, 2), dim=8,
              on_record=lambda r, reused: seen.append((r["mixer"], reused)))
    first = run(["eca"], **kw)
    assert [r["mixer"] for r in load_results(out)] == ["eca"] and first[0]["steps"] == 2
    run(["eca", "poolformer"], **kw)  # eca is read back, poolformer trained and appended
    assert seen == [("eca", False), ("eca", True), ("poolformer", False)]
    assert [r["mixer"] for r in load_results(out)] == ["eca", "poolformer"]


def test_cli_refuses_unknown_names():
    res = CliRunner().invoke(app, ["task", "vision", "--mixers", "nope"])
    assert res.exit_code == 2 and "--mixers" in res.output
    res = CliRunner().invoke(app, ["task", "vision", "--tasks", "cifar"])
    assert res.exit_code == 2 and "--tasks" in res.output
