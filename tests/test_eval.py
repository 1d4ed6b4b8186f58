"""attnzoo eval: case parsing and budgets, the runner on a tiny random Llama (rows, KV bytes, recall, resume),
the CLI's bad input; SmolLM2 answering a passkey in the slow suite."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from attnzoo.bench.results import ResultsFile
from attnzoo.cache.policy import make_policy
from attnzoo.cli import app
from attnzoo.errors import AttnZooError
from attnzoo.eval import cases as C
from attnzoo.eval import runner as R

from _tiny_lm import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_positions=1024))


def test_spec_parsing_keeps_parameters_with_their_item():
    assert C.split_specs("exact,sliding_window:window=64,block=32,streaming") == [
        "exact", "sliding_window:window=64,block=32", "streaming"]
    assert C.parse_spec("quest:sinks=16,page=8") == ("quest", {"sinks": 16, "page": 8})
    assert C.policy_case("h2o:budget=0.25") == {"kind": "cache", "name": "h2o", "params": {}, "budget": 0.25}
    assert C.describe(C.policy_case("quest:sinks=16", 0.125)) == "cache=quest:sinks=16@0.125"


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv", "quest", "tokenselect", "infllm", "razor",
                                  "recycled", "retrieval"])
@pytest.mark.parametrize("fraction", [1 / 16, 1 / 8, 1 / 4])
@pytest.mark.parametrize("length", [512, 2048, 8192])
def test_fractional_budgets_give_a_valid_policy_within_the_budget(name, fraction, length):
    params = C.policy_params(name, {}, fraction, length)
    policy = make_policy(name, **params)
    tokens = round(fraction * length)
    held = params.get("budget", params.get("window", 0) + params.get("sinks", 0))
    assert held == tokens and getattr(policy, "sinks", 1) >= 1


def test_token_budgets_below_the_minimum_name_the_defaults_that_force_it():
    with pytest.raises(AttnZooError, match=r"expected >= 641, forced by sinks=128 and local=512"):
        make_policy("tokenselect", **C.policy_params("tokenselect", {}, 256, 4096))
    with pytest.raises(AttnZooError, match=r"expected >= 895, forced by sinks=4 and local=512 rounded out to units "
                                           r"of 128, plus one unit to select; got 256 \(lower sinks/local"):
        make_policy("infllm", **C.policy_params("infllm", {}, 256, 4096))
    for name in ("streaming", "razor"):  # sinks + a window of 1 would silently hold more than the budget
        with pytest.raises(AttnZooError, match=rf"{name}: budget expected >= 5 tokens, forced by sinks=4"):
            C.policy_params(name, {}, 4, 4096)
    with pytest.raises(AttnZooError, match=r"so budget expected >= 33 with observe=32"):
        C.check_case({**C.policy_case("snapkv", 16), "length": 4096}, 4096)
    assert C.policy_case("zipvl", 0.125)["budget"] is None and not C.takes_budget("quantized")  # sizes itself
    with pytest.raises(AttnZooError, match="takes no budget"):
        C.policy_case("zipvl:budget=256")
    with pytest.raises(AttnZooError, match="needs a budget"):
        C.policy_case("h2o")
    with pytest.raises(AttnZooError, match="budget expected"):
        C.policy_case("h2o", 1.5)
    with pytest.raises(AttnZooError, match="did you mean 'snapkv'"):
        C.policy_case("snapk", 0.1)
    with pytest.raises(AttnZooError, match="did you mean 'sliding_window'"):
        C.method_case("sliding_windo")


def test_method_parameters_show_shares_as_counts_at_the_length():
    params = C.method_parameters(C.method_case("hip"), 2048)
    assert params["topk"] == 32 and params["block"] == 16 and params["block_k"] == 8  # 1/8 of 256 key blocks
    assert C.method_parameters(C.method_case("block_topk:topk=3"), 2048)["topk"] == 3


def test_runner_rows_on_a_tiny_llama(tiny, tmp_path):
    plan = R.Plan(tasks=(("passkey", {}), ("perplexity", {})), lengths=(300,), samples=2, model=tiny,
                  cases=(C.method_case("exact"), C.method_case("sliding_window:window=32,block=16"),
                         C.method_case("lightning"), C.policy_case("streaming", 0.25), C.policy_case("snapkv", 96)))
    path = R.run(plan, tmp_path, on_note=lambda m: None)
    rows = {(r["task"], C.describe(r)): r for r in ResultsFile(path).read().cases}
    assert len(rows) == 5 + 3  # perplexity takes no cache cases
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("reason") for r in rows.values()]
    exact = rows["passkey", "prefill=exact"]
    assert exact["n"] == 2 and exact["recall"] == 1.0 and 0 <= exact["score"] <= 1
    assert exact["kv_bytes"] == exact["kv_full_bytes"] >= R.full_kv_bytes(R.model_store.load(tiny)[0],
                                                                          exact["prompt_tokens"])
    window = rows["passkey", "prefill=sliding_window:block=16,window=32"]
    assert 0 < window["recall"] < 1 and rows["passkey", "prefill=lightning"]["recall"] is None
    assert 0 < window["density"] < 0.5 and exact["density"] == 1.0 and rows["passkey", "prefill=lightning"]["density"] \
        is None
    assert window["resolved"]["window"] == 32 and window["resolved"]["block"] == 16  # every parameter, defaults too
    assert exact["task_resolved"] == {"depth": None, "question": "inline"}  # the task's too
    from attnzoo.eval import table as T

    group = next(g for g in T.groups(list(rows.values())) if g.task == "passkey")
    assert "block=16" in T.cells(group, window)[-1] and len(T.cells(group, window)) == len(T.COLUMNS)
    stream = rows["passkey", "cache=streaming@0.25"]
    assert stream["resolved"] == {"sinks": 4, "window": 71, "compensate": False}  # every policy parameter too
    assert stream["kv_bytes"] < 0.5 * stream["kv_full_bytes"]
    assert rows["passkey", "cache=snapkv@96"]["resolved"]["budget"] == 96
    ppl = rows["perplexity", "prefill=exact"]
    assert ppl["metric"] == "perplexity" and 1 < ppl["score"] < 1000 and ppl["decode_s_per_token"] is None


def test_resume_after_a_kill_reruns_only_the_cut_case(tiny, tmp_path):
    plan = R.Plan(tasks=(("passkey", {}),), lengths=(300,), samples=1, model=tiny, recall=False,
                  cases=(C.method_case("exact"), C.policy_case("h2o", 0.5)))
    path = R.run(plan, tmp_path, on_note=lambda m: None)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # killed while writing the last row
    with pytest.raises(AttnZooError, match="--resume"):
        R.run(plan, tmp_path)
    notes = []
    R.run(plan, tmp_path, resume=True, on_note=notes.append)
    contents = ResultsFile(path).read()
    assert not contents.problems and len(contents.cases) == 2 and len(contents.runs) == 2
    assert any("moved to results.jsonl.corrupt" in n for n in notes) and any("1 of 2" in n for n in notes)


def test_cli_runs_reports_and_refuses_bad_input(tiny, tmp_path):
    run = CliRunner().invoke(app, ["eval", "--model", tiny, "--tasks", "passkey", "--lengths", "300", "--samples", "1",
                                   "--methods", "exact,lightning", "--policies", "streaming", "--budgets", "0.5",
                                   "--threads", "1", "--no-recall", "--out", str(tmp_path / "run")])
    assert run.exit_code == 0, run.output
    assert "pick" in run.output and (tmp_path / "run" / "report.html").exists()
    assert "lightning" not in run.output.split("pick")[1]  # a different model is never picked
    for args, message in ((["--tasks", "paskey"], "did you mean 'passkey'"),
                          (["--lengths", "2048"], "exceeds the model's context (1024"),
                          (["--policies", "h2o:budget=0"], "budget expected"),
                          (["--methods", "nope"], "unknown method")):
        bad = CliRunner().invoke(app, ["eval", "--model", tiny, "--out", str(tmp_path / "x"), *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    failing = CliRunner().invoke(app, ["eval", "--model", tiny, "--tasks", "passkey", "--lengths", "300",
                                       "--samples", "1", "--methods", "", "--policies", "quantized:bits=4",
                                       "--out", str(tmp_path / "f")])  # group 32 > the tiny head dim 16
    assert failing.exit_code == 1 and "every case failed" in failing.output


def test_cli_refuses_bad_input_before_loading_a_model(tiny, tmp_path, monkeypatch):
    """A budget below a policy's minimum, a folder that is no causal LM and a missing extra: one line, exit 2,
    nothing run (no results file)."""
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    for args, message in (
            (["--model", tiny, "--policies", "tokenselect", "--budgets", "256"],
             "cache=tokenselect@256 at 512 tokens: tokenselect: parameter 'budget' expected >= 641, forced by "
             "sinks=128"),
            (["--model", tiny, "--policies", "streaming", "--budgets", "3"], "expected >= 5 tokens, forced by sinks=4"),
            (["--model", str(tmp_path / "bert")], "is not a causal LM (its config names BertModel)")):
        bad = CliRunner().invoke(app, ["eval", "--tasks", "passkey", "--lengths", "512", "--methods", "",
                                       "--out", str(tmp_path / "x"), *args])
        assert bad.exit_code == 2 and message in bad.output.replace("\n", " "), bad.output
        assert "attnzoo eval →" not in bad.output and not (tmp_path / "x").exists()
    from attnzoo import models

    find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda m, *a: None if m == "gguf" else find_spec(m, *a))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))  # nothing fetched: the first run converts
    bad = CliRunner().invoke(app, ["eval", "--tasks", "passkey", "--lengths", "512", "--methods", "exact",
                                   "--policies", "", "--out", str(tmp_path / "y")])
    lines = [line for line in bad.output.splitlines() if line.startswith("error")]
    assert bad.exit_code == 2 and lines == ["error: models: needs the package(s) gguf: pip install 'attnzoo[eval]'"]


@pytest.mark.slow
def test_smollm2_finds_a_passkey(tmp_path):
    plan = R.Plan(tasks=(("passkey", {}),), lengths=(1024,), samples=2, recall=False,
                  cases=(C.method_case("exact"), C.policy_case("snapkv", 0.25)))
    path = R.run(plan, tmp_path, on_note=lambda m: None)
    rows = ResultsFile(path).read().cases
    assert [r["score"] for r in rows] == [1.0, 1.0], [r.get("predictions") for r in rows]
    assert rows[1]["kv_bytes"] < 0.4 * rows[1]["kv_full_bytes"]


@pytest.mark.parametrize("name, params", [("sliding_window", {"window": 16, "block": 8}),
                                          ("block_topk", {"block": 8, "topk": 2}),
                                          ("streaming", {"sinks": 2, "window": 8, "block": 8})])
def test_lse_recall_is_the_exact_mass_on_the_keys_the_method_reads(name, params):
    """exp(lse_method - lse_exact) per row = the exact attention mass on the method's visible keys (viz)."""
    from attnzoo import get
    from attnzoo.bench import metrics, workloads
    from attnzoo.viz import visible_keys

    q, k, v, _ = workloads.make("vertical_slash", heads=1, length=64, dim=32, seed=3, dtype=torch.float64)
    method = get(name, **params)
    seen = visible_keys(method, 64, causal=True, heads=1, workload="vertical_slash", seed=3)  # one-hot values
    expected = metrics.mass_recall(q, k, seen[None], scale=32 ** -0.5, causal=True)
    got = metrics.method_recall(method, q, k, v, scale=32 ** -0.5, causal=True)
    assert 0 < got < 1 and got == pytest.approx(expected, abs=1e-5)
    assert metrics.method_recall(get("exact"), q, k, v, scale=0.25, causal=True) == 1.0
    assert metrics.method_recall(get("lightning"), q, k, v, scale=0.25, causal=True) is None  # scores changed


def test_real_workload_takes_a_grouped_query_decoder(tiny):
    from attnzoo.bench import workloads

    mha = workloads.make("real", model=tiny, heads=4, heads_kv=4, length=64, layer=1)
    gqa = workloads.make("real", model=tiny, heads=4, heads_kv=2, length=64, layer=1)
    assert mha.q.shape == (1, 4, 64, 16) and mha.k.shape == (1, 4, 64, 16)
    assert torch.equal(mha.k[:, 1], gqa.k[:, 0]) and torch.equal(mha.k[:, 2], gqa.k[:, 1])  # its KV head, copied
    assert workloads.max_length("real", {"model": tiny}) == 1024
    with pytest.raises(AttnZooError, match="the same group size, or heads_kv = heads"):
        workloads.make("real", model=tiny, heads=4, heads_kv=1, length=64)


@pytest.mark.slow
def test_real_workload_from_smollm2_on_the_shipped_text():
    from attnzoo.bench import workloads

    qkv = workloads.make("real", model="smollm2-135m", heads=9, heads_kv=3, length=512)
    assert qkv.q.shape == (1, 9, 512, 64) and qkv.k.shape == (1, 3, 512, 64) and torch.isfinite(qkv.q).all()


def _row(task, length, kind, name, score, held, *, budget=None, status="ok", seed=0, n=3, task_params=None,
         **extra):
    case = {"task": task, "task_params": task_params or {}, "length": length, "kind": kind, "name": name,
            "params": {}, "budget": budget, "samples": n, "seed": seed, "model": "m"}
    return {"type": "case", "run_id": "r", "key": json.dumps(case, sort_keys=True), "suite_kind": "eval", **case,
            "status": status, "metric": "accuracy", "score": score, "n": n, "kv_bytes": held * 8 * 2 ** 20,
            "kv_full_bytes": 8.0 * 2 ** 20, "prefill_s": 2.0, "decode_s_per_token": 0.1, "resolved": {}, **extra}


def _rows():
    return [_row(t, 4096, "prefill", "exact", 1.0, 1.0, recall=1.0) for t in ("passkey", "vt")] + [
        _row("passkey", 4096, "cache", "snapkv", 1.0, 0.127, budget=0.125),   # generated tokens: within the slack
        _row("vt", 4096, "cache", "snapkv", 2 / 3, 0.131, budget=0.125),      # one task below 95 %
        _row("passkey", 4096, "cache", "snapkv", 1.0, 0.064, budget=0.0625),
        _row("vt", 4096, "cache", "snapkv", 1.0, 0.066, budget=0.0625),
        _row("passkey", 4096, "cache", "quest", 1.0, 1.08, budget=0.0625),    # holds everything
        _row("vt", 4096, "cache", "quest", 1.0, 1.08, budget=0.0625),
        _row("passkey", 4096, "cache", "h2o", 1.0, 0.06, budget=0.0625),      # not measured on vt: no claim
        _row("passkey", 4096, "cache", "razor", 1.0, 0.06, budget=0.0625),
        _row("vt", 4096, "cache", "razor", None, 0.0, budget=0.0625, status="failed"),
        _row("passkey", 4096, "cache", "quantized", 1.0, 0.2, params_note="bits=4"),
        _row("vt", 4096, "cache", "quantized", 1.0, 0.2)]


def test_wide_table_one_score_per_task_and_the_memory_statement():
    from attnzoo.eval import table as T

    (w,) = T.wide(_rows())
    assert w.tasks == ["passkey", "vt"] and list(w.cases)[0] == "prefill=exact"
    assert list(w.cases).index("cache=snapkv@0.0625") < list(w.cases).index("cache=snapkv@0.125")
    cells = dict(zip(T.wide_header(w), T.wide_cells(w, "cache=snapkv@0.125", w.cases["cache=snapkv@0.125"])))
    assert cells["passkey (n)"] == "1.00 (3)" and cells["vt (n)"] == "0.67 (3)" and cells["min of exact"] == "0.67"
    assert T.wide_cells(w, "cache=h2o@0.0625", w.cases["cache=h2o@0.0625"])[2] == ""  # vt not measured: blank
    kept = T.keeps(w)
    assert [k.split(" ")[0] for k in kept] == ["cache=snapkv@0.0625"]
    assert "holds 0.065 of the cache" in kept[0]
    assert [k.split(" ")[0] for k in T.keeps(w, min_accuracy=0.6)] == ["cache=snapkv@0.0625", "cache=snapkv@0.125"]
    assert [k.split(" ")[0] for k in T.keeps(w, max_memory=0.25)] == ["cache=quantized", "cache=snapkv@0.0625"]
    assert T.keeps(w, max_memory=0.125, slack=0.0) == [kept[0]]
    assert T.markdown(["a", "b"], [["x|y", "1"]]).splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_missing_names_each_case_with_the_tasks_no_ok_row_measured_it_on():
    from attnzoo.eval import table as T

    cases = C.cases_of("exact,vertical_slash", "quantized:bits=4,snapkv", [0.125])
    assert [C.describe(c) for c in cases] == ["prefill=exact", "prefill=vertical_slash", "cache=quantized:bits=4",
                                              "cache=snapkv@0.125"]
    vt = "variable_tracking"
    rows = [_row("passkey", 2048, "prefill", "exact", 1.0, 1.0), _row("perplexity", 2048, "prefill", "exact", 9.0, 1.0),
            {**_row("passkey", 2048, "prefill", "vertical_slash", 1.0, 1.0), "params": {"dense_below": 0}},
            {**_row("passkey", 2048, "cache", "quantized", 1.0, 0.3), "params": {"bits": 8}},  # not bits=4
            _row("passkey", 2048, "cache", "snapkv", 1.0, 0.13, budget=0.125),
            _row(vt, 2048, "cache", "snapkv", None, 0.13, budget=0.125, status="failed"),
            _row(vt, 2048, "cache", "snapkv", 1.0, 0.13, budget=0.0625),  # another budget
            _row(vt, 2048, "prefill", "exact", 0.0, 1.0, task_params={"hops": 1})]  # another column
    gaps = T.missing(rows, ["passkey", vt, "perplexity"], [2048, 4096], cases)
    assert gaps[2048] == [("prefill=exact", [vt]), ("prefill=vertical_slash", [vt, "perplexity"]),
                          ("cache=quantized:bits=4", ["passkey", vt]), ("cache=snapkv@0.125", [vt])]
    assert gaps[4096] == [(C.describe(c), ["passkey", vt] + ["perplexity"] * (c["kind"] == "prefill")) for c in cases]
    assert T.missing(rows, [f"{vt}:hops=1"], [2048], cases[:1]) == {2048: []}
    assert T.cells_of(["passkey", vt, "perplexity"], cases) == 4 + 4 + 2  # perplexity takes the two prefill cases


def test_table_pools_seeds_and_keeps_task_variants_apart():
    from attnzoo.eval import table as T

    rows = [_row("passkey", 2048, "prefill", "exact", 1.0, 1.0, scores=[1.0] * 3),
            _row("passkey", 2048, "prefill", "exact", 2 / 3, 1.0, seed=1, scores=[1.0, 0.0, 1.0], prefill_s=4.0),
            _row("passkey", 2048, "cache", "snapkv", 1 / 3, 0.2, budget=0.125, scores=[0.0, 1.0, 0.0]),
            _row("passkey", 2048, "cache", "snapkv", 0.0, 0.2, budget=0.125, n=1, scores=[0.0]),  # fewer: ignored
            _row("passkey", 2048, "cache", "snapkv", 1.0, 0.2, budget=0.125, seed=1, scores=[1.0] * 3),
            _row("passkey", 2048, "cache", "h2o", None, 0.1, budget=0.125, seed=1, status="failed"),
            _row("passkey", 2048, "cache", "h2o", 0.0, 0.1, budget=0.125, scores=[0.0] * 3),
            _row("vt", 2048, "prefill", "exact", 1.0, 1.0, task_params={"hops": 1}),
            _row("vt", 2048, "prefill", "exact", 0.0, 1.0)]
    (w,) = T.wide(rows)
    assert w.tasks == ["passkey", "vt", "vt:hops=1"]
    exact, snap = w.exact["passkey"], w.cases["cache=snapkv@0.125"]["passkey"]
    assert exact["n"] == 6 and exact["score"] == 5 / 6 and exact["prefill_s"] == 3.0 and exact["seeds"] == [0, 1]
    assert snap["n"] == 6 and snap["score"] == 4 / 6 and snap["scores"] == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert w.cases["cache=h2o@0.125"]["passkey"]["n"] == 3  # the failed seed adds nothing
    assert w.cases["prefill=exact"]["vt:hops=1"]["score"] == 1.0 and w.exact["vt"]["score"] == 0.0
    cells = dict(zip(T.wide_header(w), T.wide_cells(w, "cache=snapkv@0.125", w.cases["cache=snapkv@0.125"])))
    assert cells["passkey (n)"] == "0.67 (6)" and cells["min of exact"] == "0.80"


def test_rows_measured_before_a_task_default_changed_keep_their_own_column(tmp_path):
    from attnzoo.eval import table as T
    from attnzoo.tasks import make_task

    today = make_task("niah_multikey").params()
    old = {**today, "distractors": 3, "needle": "ruler"}
    rows = [_row("niah_multikey", 2048, "prefill", "exact", 1 / 3, 1.0, task_resolved=old),
            _row("niah_multikey", 2048, "cache", "snapkv", 1 / 3, 0.13, budget=0.125, task_resolved=old),
            _row("niah_multikey", 2048, "prefill", "exact", 2 / 3, 1.0, seed=1, task_resolved=today),
            _row("niah_multikey", 2048, "prefill", "exact", 1.0, 1.0, task_resolved=today),
            _row("niah_multikey", 2048, "prefill", "exact", 0.0, 1.0, task_params={"distractors": 3},
                 task_resolved={**today, "distractors": 3}),
            _row("niah_multikey", 2048, "cache", "h2o", 0.0, 0.13, budget=0.125)]  # no record: today's label
    assert [T.task_label(r) for r in rows] == ["niah_multikey:distractors=3,needle=ruler"] * 2 + [
        "niah_multikey"] * 2 + ["niah_multikey:distractors=3", "niah_multikey"]
    (w,) = T.wide(rows)
    assert w.tasks == ["niah_multikey", "niah_multikey:distractors=3", "niah_multikey:distractors=3,needle=ruler"]
    assert w.exact["niah_multikey"]["n"] == 6 and w.exact["niah_multikey"]["score"] == 5 / 6  # old seed 0 not pooled
    assert w.exact["niah_multikey:distractors=3,needle=ruler"]["score"] == 1 / 3
    # eval-table keeps both when two files hold the same case key measured with different defaults
    for i, part in enumerate(([rows[0]], [rows[3]])):
        ResultsFile(tmp_path / f"r{i}").append(part[0])
    run = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--markdown"])
    assert run.exit_code == 0 and "niah_multikey:distractors=3,needle=ruler (n)" in run.output, run.output
    assert "| prefill=exact | 1.00 (3) | 0.33 (3) |" in run.output


def test_eval_table_command_merges_results_files(tmp_path):
    rows = _rows()
    for i, part in enumerate((rows[:6], rows[6:])):
        store = ResultsFile(tmp_path / f"r{i}")
        for r in part:
            store.append(r)
    run = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--markdown"])
    assert run.exit_code == 0, run.output
    assert "| cache=quest@0.0625 | 1.00 (3) | 1.00 (3) | 1.00 | 8.6 / 8.0 | 2.0 | 1.00 | 0.10 |" in run.output
    assert "| prefill=exact | 1.00 (3) | 1.00 (3) | 1.00 |" in run.output
    assert "at ≤ 0.125 of the KV cache: cache=snapkv@0.0625 (holds 0.065" in run.output
    # --report: one page over both files' rows (every case of both, a budget curve per task)
    page = tmp_path / "merged" / "report.html"
    rep = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--report", str(page)])
    assert rep.exit_code == 0 and page.exists(), rep.output
    text = page.read_text()
    assert f"{len(rows)} cases from" in text and "cache=quest@0.0625" in text and "cache=razor@0.0625" in text
    assert (tmp_path / "merged" / "plots" / "budget-passkey-4096.png").exists()
    # over the passkey alone, h2o (not measured on vt) and razor (failed on vt) make their claims
    only = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--tasks", "passkey"])
    assert only.exit_code == 0 and "vt (n)" not in only.output, only.output
    assert "cache=h2o@0.0625 (holds" in only.output and "cache=razor@0.0625 (holds" in only.output
    wrong = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), "--tasks", "passkee"])
    assert wrong.exit_code == 2 and "expected tasks of these results (passkey, vt), got passkee" in wrong.output
    missing = CliRunner().invoke(app, ["eval-table", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    # --per-task: each task's own statement under the every-task one (h2o claims the passkey, not vt)
    each = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--per-task",
                                    "--markdown"])
    lines = [line for line in each.output.splitlines() if line.startswith("- keep")]
    assert each.exit_code == 0 and len(lines) == 2, each.output
    assert "(passkey)" in lines[0] and "cache=h2o@0.0625 (holds" in lines[0] and "cache=snapkv@0.125" in lines[0]
    assert "(vt)" in lines[1] and "cache=snapkv@0.0625" in lines[1] and "h2o" not in lines[1] \
        and "cache=snapkv@0.125" not in lines[1]
    # --missing: the --full preset's cells without a row, at the results' lengths (4096 here)
    gaps = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--missing",
                                    "--tasks", "passkey"])
    assert gaps.exit_code == 0 and "not measured at N=4096: " in gaps.output and "N=2048" not in gaps.output
    assert "- prefill=sliding_window: every task" in gaps.output and "- cache=snapkv@0.125:" not in gaps.output
    # a task no row measured is missing at every length the results hold (a mistyped one is still refused)
    never = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), str(tmp_path / "r1"), "--missing",
                                     "--tasks", "passkey,perplexity"])
    assert never.exit_code == 0 and "N=4096: 32 of 38 cells (the --full preset's 32 cases on passkey, perplexity):" in never.output
    assert "- prefill=exact: perplexity" in never.output and "- cache=h2o@0.25: passkey" in never.output, never.output
    typo = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r0"), "--missing", "--tasks", "perplexty"])
    assert typo.exit_code == 2 and "perplexity" in typo.output, typo.output
    ResultsFile(tmp_path / "bench").append({**rows[0], "suite_kind": "bench"})
    empty = CliRunner().invoke(app, ["eval-table", str(tmp_path / "bench")])
    assert empty.exit_code == 2 and "no eval rows" in empty.output


def test_eval_table_lengths_keeps_one_length(tmp_path):
    rows = _rows() + [_row("passkey", 2048, "prefill", "exact", 1.0, 1.0)]
    store = ResultsFile(tmp_path / "r")
    for r in rows:
        store.append(r)
    run = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r"), "--markdown", "--lengths", "2048"])
    assert run.exit_code == 0 and "N=2048" in run.output and "N=4096" not in run.output, run.output
    bad = CliRunner().invoke(app, ["eval-table", str(tmp_path / "r"), "--lengths", "2k"])
    assert bad.exit_code == 2 and "--lengths expected comma-separated integers" in bad.output


def _measurements():
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "measurements" / "eval"
    mods = {}
    for name in ("recover", "regen"):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        import sys

        sys.modules[name] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods["recover"], mods["regen"]


def test_docs_eval_tables_are_the_measurements_rows():
    """docs/eval.md's generated sections are what measurements/eval/regen.py makes of measurements/eval/*.jsonl
    (run `python measurements/eval/regen.py` after adding rows)."""
    _, regen = _measurements()
    doc = regen.DOC.read_text()
    assert regen.generated_parts(regen.generate(doc, regen.files())) == regen.generated_parts(doc), \
        "docs/eval.md is stale: run python measurements/eval/regen.py"


@pytest.mark.slow
def test_rows_recovered_from_the_doc_give_back_its_tables(tmp_path):
    """recover.py on tables made from recovered rows alone, then regen.py over what it recovers, prints the same
    tables. (The recovered rows are docs/eval.md@c1c5251's tables; today's doc also holds measured rows whose
    per-task times no table prints, so it is not the round trip's input.)"""
    recover, regen = _measurements()
    doc = regen.generate(regen.DOC.read_text(), sorted(regen.HERE.glob("recovered-*.jsonl")))
    rows = [r for sec in recover.parse_doc(doc) for r in recover.rows_of(sec, "test")]
    assert all(r["recovered"] == "docs/eval.md@test" and r["status"] == "ok" for r in rows)
    assert all(r["seeds"] == [0, 1] and r["seed"] is None for r in rows if r["n"] == 6)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert regen.generated_parts(regen.generate(doc, [path])) == regen.generated_parts(doc)


def test_a_row_measured_before_a_default_changed_keeps_its_own_line():
    """decode9's finding: a case is keyed by the parameters given, so a row measured at an old default merged with
    today's rows. A row that records a parameter resolving to another value today is labelled with it; rows
    that do not record it (older cache rows) still merge."""
    from attnzoo.eval import table as T

    today = C.method_parameters(C.method_case("vertical_slash"), 4096)
    old = _row("passkey", 4096, "prefill", "vertical_slash", 1.0, 1.0, resolved={**today, "n_slash": 512})
    new = _row("niah_single", 4096, "prefill", "vertical_slash", 1.0, 1.0, resolved=today)
    exact = [_row(t, 4096, "prefill", "exact", 1.0, 1.0) for t in ("passkey", "niah_single")]
    assert T.case_label(old) == "prefill=vertical_slash:n_slash=512" and T.case_label(new) == "prefill=vertical_slash"
    (w,) = T.wide([*exact, old, new])
    assert list(w.cases) == ["prefill=exact", "prefill=vertical_slash", "prefill=vertical_slash:n_slash=512"]
    case = C.method_case("vertical_slash")
    assert not T.covers(old, case) and T.covers(new, case)
    # a prefill row records every parameter of its method: one it lacks did not exist when it ran
    pre = _row("passkey", 4096, "prefill", "block_topk", 1.0, 1.0,
               resolved={k: v for k, v in C.method_parameters(C.method_case("block_topk"), 4096).items() if k != "guard"})
    assert T.case_label(pre) == "prefill=block_topk (before guard)" and not T.covers(pre, C.method_case("block_topk"))
    # a cache row records every parameter of its policy now; one without `pages` (older rows) cannot be told apart
    full = C.policy_parameters({**C.policy_case("tokenselect", 0.125)}, 4096)
    assert full["pages"] == 1.0 and full["budget"] == 512
    vote = _row("passkey", 4096, "cache", "tokenselect", 1.0, 1.0, budget=0.125, resolved={**full, "pages": 0.0})
    older = _row("passkey", 4096, "cache", "tokenselect", 1.0, 1.0, budget=0.125, resolved={"budget": 512})
    assert T.case_label(vote) == "cache=tokenselect:pages=0.0@0.125" and T.case_label(older) == "cache=tokenselect@0.125"
