"""The tiny trainer: seeded models, any mixer, fit reaching a trivially learnable target, the task CLI."""

import re

import pytest
import torch

from attnzoo import AttnZooError
from attnzoo.tasks import make_task
from attnzoo.train import TinyModel, aux_loss, build_mixer, evaluate, fit, mixer_names


pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = TinyModel(vocab=16, d_model=32, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = TinyModel(vocab=16, d_model=32, seed=3)
    c = TinyModel(vocab=16, d_model=32, seed=4)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("causal", [True, False])
def test_every_mixer_trains_a_step(causal):
    x = torch.randint(16, (2, 64))  # a square number of tokens: 2-D grid methods infer an 8x8 grid
    for name in mixer_names(causal):
        if name == "block_sparse":
            continue  # needs a user layout or mask_mod: covered by the sparse tests
        m = TinyModel(vocab=16, mixer=name, d_model=32, n_heads=2, max_len=64, causal=causal)
        y = m(x)
        assert y.shape == (2, 64, 16) and torch.isfinite(y).all(), name
        (y.square().mean() + aux_loss(m)).backward()  # learned predictors train by their distillation loss
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in m.parameters() if p.requires_grad), name


def test_causal_mixers_do_not_see_the_future():
    x = torch.randint(16, (1, 32))
    x2 = x.clone()
    x2[0, 20:] = (x2[0, 20:] + 1) % 16
    for name in ("exact", "gla", "aaren", "based", "lightning", "sliding_window"):
        m = TinyModel(vocab=16, mixer=name, d_model=32, max_len=32, conv=4)
        torch.testing.assert_close(m(x)[0, :20], m(x2)[0, :20], msg=name)


def test_fit_reaches_99_percent_on_easy_mqar():
    task = make_task("mqar", pairs=2, seq_len=16, vocab_size=24)
    model = TinyModel(**task.model_config(), mixer="exact", d_model=32, n_heads=2, conv=4)
    held = task.held_out(256, 256, seed=0)
    before = evaluate(model, held)
    result = fit(model, task.batches(32, seed=0), held, steps=600, lr=1e-2, weight_decay=0.0,
                 eval_every=25, target=0.99, progress=False)
    assert before < 0.2
    assert result.stopped == "target" and result.best_metric >= 0.99, result.history
    assert evaluate(model, held) == result.best_metric  # the best weights are the ones left


def test_fit_is_reproducible_and_stops_on_plateau():
    task = make_task("mqar", pairs=2, seq_len=16, vocab_size=24)

    def run():
        m = TinyModel(**task.model_config(), mixer="exact", d_model=16, n_heads=1)
        return fit(m, task.batches(8, seed=1), task.held_out(32, 32, seed=1), steps=40, eval_every=5,
                   patience=2, lr=1e-9, progress=False)

    a, b = run(), run()
    assert a.history == b.history
    assert a.stopped == "plateau" and a.steps < 40


def test_bad_arguments():
    task = make_task("mqar", pairs=2, seq_len=16, vocab_size=24)
    m = TinyModel(**task.model_config(), d_model=16)
    with pytest.raises(AttnZooError, match="steps"):
        fit(m, task.batches(4, 0), task.held_out(4, 4, 0), steps=0, progress=False)
    with pytest.raises(AttnZooError, match="held_out"):
        fit(m, task.batches(4, 0), [], progress=False)
    with pytest.raises(AttnZooError, match="max_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(AttnZooError, match="unknown method 'exactt'"):
        build_mixer("exactt", 16, 2)
    with pytest.raises(AttnZooError, match="extra inputs"):
        build_mixer("method:gla", 16, 2)
    with pytest.raises(AttnZooError, match="unknown parameter"):
        build_mixer("gla", 16, 2, windw=3)
    with pytest.raises(AttnZooError, match="causal=True"):
        build_mixer("aaren", 16, 2, causal=False)
    with pytest.raises(AttnZooError, match="one name per layer"):
        TinyModel(vocab=8, n_layers=2, mixer=["exact"])


def test_layer_plan_and_state_size():
    m = TinyModel(vocab=8, d_model=32, n_heads=2, n_layers=3, mixer=["exact", "sliding_window", "lightning"],
                  mixer_params=None, max_len=64)
    assert [b.mixer.method for b in m.blocks] == ["exact", "sliding_window", "lightning"]
    # exact keeps K and V for all 64 tokens; the window (512 > 64) the same; lightning 2 heads of 16x16
    assert m.state_size(64) == 2 * 64 * 32 * 2 + 2 * 16 * 16


def test_task_cli(tmp_path):
    from typer.testing import CliRunner

    from attnzoo.cli import app

    res = CliRunner().invoke(app, ["task", "list"])
    assert res.exit_code == 0 and "mqar" in res.output and "listops" in res.output
    out = tmp_path / "run"
    args = ["task", "mqar", "--mixers", "exact,lightning", "--dims", "16", "--pairs", "2", "--seq-len", "16",
            "--vocab", "24", "--steps", "10", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "exact" in res.output and (out / "report.html").exists()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3  # a run header, two cases
    res = CliRunner().invoke(app, args)  # the folder holds results: refuse without --resume
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 3  # nothing left to train: nothing written
    res = CliRunner().invoke(app, ["task", "report", str(out), "--markdown"])
    assert res.exit_code == 0 and "| mixer | d=16 pairs=2 |" in res.output
    assert "| lightning | " in res.output and ", steps) |" in res.output  # accuracy (steps, why it stopped)
    res = CliRunner().invoke(app, ["task", "train", "mqar", "--param", "pairs=2", "--param", "seq_len=16",
                                   "--param", "vocab_size=24", "--steps", "5", "--d-model", "16", "--no-progress"])
    assert res.exit_code == 0 and "held-out accuracy" in res.output
    res = CliRunner().invoke(app, ["task", "train", "mqar", "--param", "pairs=100"])
    assert res.exit_code == 2 and "seq_len" in res.output


def test_mqar_presets(tmp_path):
    """No size flag: the quick preset; --full: the published grid's budget; flags override either."""
    from typer.testing import CliRunner

    from attnzoo.cli import app
    from attnzoo.train.sweep import load_cases

    small = ["--mixers", "exact", "--dims", "16", "--pairs", "2", "--seq-len", "16", "--steps", "2", "--no-report"]
    for preset, vocab in (([], 64), (["--full"], 160)):
        out = tmp_path / f"run{len(preset)}"
        res = CliRunner().invoke(app, ["task", "mqar", *preset, *small, "--out", str(out)])
        assert res.exit_code == 0, res.output
        [case] = load_cases(out)
        assert case["batch"] == 32 and case["eval_size"] == 256 and case["patience"] == 4
        assert case["task_params"] == {"pairs": 2, "seq_len": 16, "vocab_size": vocab} and case["steps"] == 2
    res = CliRunner().invoke(app, ["task", "mqar", "--quick", "--full"])
    assert res.exit_code == 2 and "at most one" in res.output


def test_plan_parser():
    from attnzoo.train.cli import parse_plan

    assert parse_plan("exact") == "exact"
    assert parse_plan("landmark(block=8)") == [["landmark", {"block": 8}]]
    assert parse_plan("sliding_window(window=16,sinks=0), exact") == [["sliding_window", {"window": 16, "sinks": 0}],
                                                                      ["exact", {}]]
    with pytest.raises(AttnZooError, match="--mixer"):
        parse_plan("sliding_window(window=16")


def test_report_plot_legend_names_every_mixer(tmp_path):
    """A mixer measured in one setting only (here gla at 32 pairs) still gets a legend entry."""
    from attnzoo.train.report import _plot

    base = {"task": "mqar", "status": "ok", "mixer_params": {}, "d_model": 64}
    cases = [{**base, "mixer": "exact", "task_params": {"pairs": 8}, "accuracy": 1.0},
             {**base, "mixer": "exact", "task_params": {"pairs": 32}, "accuracy": 1.0},
             {**base, "mixer": "gla", "task_params": {"pairs": 32}, "accuracy": 0.1}]
    assert _plot(cases, "mqar", "d_model", tmp_path / "p.png", "model dimension") == ["exact", "gla"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert _plot(cases, "listops", "d_model", tmp_path / "q.png", "model dimension") == []


def test_curriculum_stages_share_the_step_budget(tmp_path):
    """Each stage trains on the task with its parameters until its held-out target (here 0: the first
    evaluation), then the task itself gets the rest of ``steps``; the record says what each stage did."""
    from typer.testing import CliRunner

    from attnzoo.cli import app
    from attnzoo.train.sweep import load_cases

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["task", "mqar", "--mixers", "exact", "--dims", "16", "--pairs", "2,4", "--seq-len",
                                   "16", "--vocab", "24", "--steps", "40", "--batch", "8", "--eval-size", "16",
                                   "--curriculum", "pairs=3,8", "--stage-steps", "20", "--stage-target", "0",
                                   "--no-report", "--log-evals", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "stage 1 step 40:" in res.output  # a line per evaluation, steps counted over the stages
    assert re.search(r"stage 1 step 40: loss \d+\.\d+, held-out \d\.\d+ \(\d+ s\)", res.output)  # + time so far
    plain, staged = load_cases(out)
    assert "curriculum" not in plain and "stages" not in plain  # the 2-pair column has no easier stage
    assert staged["curriculum"] == {"pairs": [3]}  # stages at or above a column's own pairs are dropped
    [stage] = staged["stages"]
    assert stage == {"pairs": 3, "steps": 20, "stopped": "target", "accuracy": pytest.approx(staged["curve"][0][1], abs=1e-4)}
    assert staged["steps"] == 40 and [s for s, _ in staged["curve"]] == [20, 40]  # the task itself: the rest
    res = CliRunner().invoke(app, ["task", "report", str(out), "--markdown"])
    assert "d=16 pairs=4 (curriculum pairs=3)" in res.output  # another recipe: a column of its own


def test_stage_required_stops_at_a_missed_stage(tmp_path):
    """With --stage-required a stage that ends below its target (here 1.01: unreachable) ends the run: the
    later stages and the task are not trained, the model is scored on the task as it is, stopped = "stage"."""
    from typer.testing import CliRunner

    from attnzoo.cli import app
    from attnzoo.train.sweep import TrainConfig, load_cases, make_case

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["task", "train", "mqar", "--param", "pairs=4", "--param", "seq_len=16",
                                   "--param", "vocab_size=24", "--d-model", "16", "--steps", "60", "--batch", "8",
                                   "--eval-size", "16", "--curriculum", "pairs=2,3", "--stage-steps", "20",
                                   "--stage-target", "1.01", "--stage-required", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    [case] = load_cases(out)
    assert case["stopped"] == "stage" and case["stage_required"] is True
    assert case["stages"] == [{"pairs": 2, "steps": 20, "stopped": "steps", "accuracy": case["stages"][0]["accuracy"]}]
    assert case["steps"] == 20 and [s for s, _ in case["curve"]] == [20]  # no later stage, no task training
    assert 0.0 <= case["accuracy"] <= 1.0
    # without the flag the case (and its key) is as before
    tp = {"pairs": 4, "seq_len": 16}
    assert "stage_required" not in make_case("mqar", tp, "exact", {}, TrainConfig(curriculum=(("pairs", (2,)),)))


def test_curriculum_errors_name_the_option():
    from attnzoo.train.cli import lead_up, parse_curriculum
    from attnzoo.train.sweep import TrainConfig, make_case, train_case

    assert parse_curriculum(["pairs=8,16", "seq_len=64,128"]) == (("pairs", (8, 16)), ("seq_len", (64, 128)))
    assert lead_up((("pairs", (8, 16, 32)), ("seq_len", (64, 64, 128))), "pairs", 16) == (("pairs", (8,)), ("seq_len", (64,)))
    assert lead_up((("pairs", (8,)),), "pairs", 8) == ()
    with pytest.raises(AttnZooError, match="--curriculum"):
        parse_curriculum(["pairs"])
    tp = {"pairs": 4, "seq_len": 16, "vocab_size": 24}
    with pytest.raises(AttnZooError, match="same number of stages"):
        make_case("mqar", tp, "exact", {}, TrainConfig(curriculum=(("pairs", (2, 3)), ("seq_len", (16,)))))
    with pytest.raises(AttnZooError, match="--steps expected more than"):
        make_case("mqar", tp, "exact", {}, TrainConfig(steps=40, stage_steps=20, curriculum=(("pairs", (2, 3)),)))
    case = make_case("mqar", tp, "exact", {}, TrainConfig(d_model=16, curriculum=(("seq_len", (32,)),)))
    with pytest.raises(AttnZooError, match="seq_len <= the task's 16"):
        train_case(case)


def test_on_eval_reports_the_time_since_the_case_started():
    """``on_eval``'s ``seconds`` is the case's wall time so far, counted over the stages (not restarted per stage)."""
    from attnzoo.train.sweep import TrainConfig, make_case, train_case

    cfg = TrainConfig(d_model=16, steps=40, batch=8, eval_size=16, curriculum=(("pairs", (2,)),), stage_steps=20,
                      stage_target=1.01, eval_every=10)
    seen = []
    train_case(make_case("mqar", {"pairs": 4, "seq_len": 16, "vocab_size": 24}, "exact", {}, cfg), on_eval=seen.append)
    assert [(e["stage"], e["step"]) for e in seen] == [(0, 10), (0, 20), (1, 30), (1, 40)]
    times = [e["seconds"] for e in seen]
    assert times[0] > 0 and times == sorted(times) and times[2] > times[1]


@pytest.mark.slow
def test_curriculum_solves_what_the_same_budget_does_not():
    """MQAR with 16 pairs in 128 tokens at d=32: 300 steps on the task itself stay near chance (0.08 measured);
    150 of them on 4 pairs first, then the task, reach 99 % (at step 250 measured). ~1-2 minutes of one core."""
    from attnzoo.train.sweep import TrainConfig, make_case, train_case

    def run(curriculum):
        cfg = TrainConfig(d_model=32, steps=300, batch=32, eval_size=256, eval_every=25, patience=100, lr=1e-2,
                          weight_decay=0.0, curriculum=curriculum, stage_steps=150, stage_target=0.9)
        return train_case(make_case("mqar", {"pairs": 16, "seq_len": 128, "vocab_size": 64}, "exact", {}, cfg))

    plain, staged = run(()), run((("pairs", (4,)),))
    assert plain["accuracy"] < 0.5 and plain["stopped"] == "steps"
    assert staged["accuracy"] >= 0.99 and staged["stopped"] == "target" and staged["stages"][0]["pairs"] == 4


def test_retrieval_close_ends_with_a_separator_and_keeps_the_plain_task():
    """``close`` adds a SEP as the last token; without it the generator's draws are unchanged."""
    task = make_task("retrieval", seq_len=40, code_len=2, code_vocab=4, close=True)
    x, y = task.tensors(64, seed=3)
    assert (x[:, -1] == 0).all() and ((x == 0).sum(1) == 2).all() and ((x == 1).sum(1) == 2).all()
    assert torch.equal(task.answer(x), y)
    plain = make_task("retrieval", seq_len=40, code_len=2, code_vocab=4)
    assert torch.equal(plain.tensors(64, seed=3)[1], y)  # the same labels from the same seed
    make_task("retrieval", seq_len=19, code_len=8)
    with pytest.raises(AttnZooError, match="seq_len expected >= 20"):
        make_task("retrieval", seq_len=19, code_len=8, close=True)


def test_parse_mixer_and_the_step_benchmark(monkeypatch, capsys):
    """``parse_mixer``: one entry with parameters is that mixer in every layer, several entries a plan;
    benchmarks/train_steps.py times a step of each mixer's model next to exact attention's."""
    import runpy
    import sys
    from pathlib import Path

    from attnzoo.train.cli import parse_mixer

    assert parse_mixer("exact") == ("exact", {})
    assert parse_mixer("sliding_window(window=16)", {"x": 1}) == ("sliding_window", {"window": 16, "x": 1})
    assert parse_mixer("sliding_window(window=16),exact") == ([["sliding_window", {"window": 16}], ["exact", {}]], {})
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_steps.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--task", "listops", "--param", "seq_len=32", "--param", "min_len=4",
                                      "--batch", "2", "--d-model", "16", "--repeat", "1", "--steps", "60",
                                      "--mixers", "sliding_window(window=8);gla"])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("listops {'seq_len': 32, 'min_len': 4}, batch 2, d_model 16")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"sliding_window(window=8)", "gla"}
    for s, ratio, minutes, unit in rows.values():
        assert float(s) > 0 and float(ratio) > 0 and unit == "min"


def test_report_keeps_configurations_apart_and_seeds_together():
    """Records that share mixer, width and setting label but differ elsewhere (another length, another learning
    rate) get columns of their own, labelled by what differs, instead of one overwriting the other; the seeds
    of one configuration share a cell, each seed's accuracy shown."""
    from attnzoo.bench.results import case_key
    from attnzoo.train.report import accuracy_table, column_labels, markdown_table
    from attnzoo.train.sweep import TrainConfig, make_case

    def record(acc, seed=0, lr=3e-3, **task_params):
        case = make_case("listops", {"max_depth": 4, **task_params}, "exact", {}, TrainConfig(seed=seed, lr=lr, steps=900))
        return {"type": "case", "key": case_key(case), **case, "status": "ok", "accuracy": acc, "steps": 300 + seed,
                "stopped": "plateau"}

    cases = [record(0.30, seq_len=256), record(0.50, seq_len=256), record(0.31, seed=1, seq_len=256),
             record(0.20, seq_len=1024), record(0.40, seq_len=256, lr=1e-3), record(0.9, max_depth=2, seq_len=64)]
    assert column_labels(cases)[:5] == ["max_depth=4 lr=0.003 seq_len=256"] * 3 + [
        "max_depth=4 lr=0.003 seq_len=1024", "max_depth=4 lr=0.001 seq_len=256"]
    assert column_labels(cases)[5] == "max_depth=2 lr=0.003 seq_len=64"
    headers, [row] = accuracy_table(cases, "listops")
    assert headers == ["mixer", "d=64 max_depth=2 lr=0.003 seq_len=64", "d=64 max_depth=4 lr=0.001 seq_len=256",
                       "d=64 max_depth=4 lr=0.003 seq_len=1024", "d=64 max_depth=4 lr=0.003 seq_len=256"]  # by number, label
    cells = dict(zip(headers, row))
    assert cells["d=64 max_depth=4 lr=0.003 seq_len=256"] == "0.500 / 0.310 (seeds 0, 1)"  # a rerun replaces seed 0
    assert cells["d=64 max_depth=4 lr=0.003 seq_len=1024"] == "0.200"
    assert cells["d=64 max_depth=4 lr=0.001 seq_len=256"] == "0.400"
    assert "| 0.500 (300, plateau) / 0.310 (301, plateau) (seeds 0, 1) |" in markdown_table(cases, "listops")
    assert column_labels(cases[3:4]) == ["max_depth=4"]  # nothing to tell apart: the plain setting label
