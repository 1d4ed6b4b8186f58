"""Plan files and calibrators: a tiny Llama with one planted copy-from-far-back KV head."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo.hf as azhf  # noqa: E402
import attnzoo.plan as P  # noqa: E402
from attnzoo import AttnZooError  # noqa: E402
from attnzoo.plan.base import calibration_prompts, capture_grads  # noqa: E402

HIDDEN, HEADS, HEADS_KV, HEAD_DIM, LAYERS, VOCAB = 64, 4, 2, 32, 2, 1000
PLANTED = (1, 1)  # (layer, KV head) that copies from far back


def planted_model() -> transformers.LlamaForCausalLM:
    """Every KV head attends (almost) only to the BOS sink, except PLANTED, which attends to earlier
    copies of the current token. RoPE's theta is huge so the dims used below barely rotate."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS_KV, head_dim=HEAD_DIM, attention_bias=True,
                                      max_position_embeddings=4096, bos_token_id=0,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e12})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    sink_dim = HIDDEN - 1                       # only the BOS embedding has this coordinate
    slow = list(range(HEAD_DIM // 2 - 8, HEAD_DIM // 2)) + list(range(HEAD_DIM - 8, HEAD_DIM))  # barely rotated
    per = HEADS // HEADS_KV
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_()
        emb[:, sink_dim] = 0
        emb[0] = 0
        emb[0, sink_dim] = 1.0
        proj = torch.linalg.qr(torch.randn(HIDDEN - 1, len(slow)))[0].T * 4.0   # (16, 63) orthonormal rows, x4
        for layer_i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            for w in (a.q_proj.weight, a.k_proj.weight, a.q_proj.bias, a.k_proj.bias):
                w.zero_()
            for kv in range(HEADS_KV):
                krows = [kv * HEAD_DIM + d for d in slow]
                if (layer_i, kv) == PLANTED:   # q = k = the token's projection: matches its earlier copies
                    a.k_proj.weight[krows, :HIDDEN - 1] = proj
                    for qh in range(kv * per, (kv + 1) * per):
                        a.q_proj.weight[[qh * HEAD_DIM + d for d in slow], :HIDDEN - 1] = proj
                else:                          # k reads the BOS coordinate, q is a constant: attend to the sink
                    a.k_proj.weight[kv * HEAD_DIM + slow[0], sink_dim] = 1.0
                    for qh in range(kv * per, (kv + 1) * per):
                        a.q_proj.bias[qh * HEAD_DIM + slow[0]] = 30.0
    return model


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.mark.parametrize("name,params", [("razor", {"probe": 128}),
                                         ("duo", {"samples": 1, "prompt_length": 512, "queries": 32})])
def test_calibrator_finds_planted_head(model, name, params):
    # 4 KV heads in all; budget 0.5 at 512 tokens: streaming heads hold 64 or 65 tokens, one head keeps all
    cal = P.make_calibrator(name, budget=0.5, length=512, window=60, **params)
    assert cal.allocate(LAYERS * HEADS_KV) == 1
    scores = cal.scores(model)
    assert scores.shape == (LAYERS, HEADS_KV)
    others = torch.cat([scores.flatten()[:PLANTED[0] * HEADS_KV + PLANTED[1]],
                        scores.flatten()[PLANTED[0] * HEADS_KV + PLANTED[1] + 1:]])
    assert scores[PLANTED] > 5 * others.max()
    plan = cal.run(model, model_name="tiny")
    kinds = {(i, h): plan.kind(i, h) for i in range(LAYERS) for h in range(HEADS_KV)}
    assert kinds == {key: "full" if key == PLANTED else "streaming" for key in kinds}
    assert plan.kv_fraction(512) <= 0.5


@pytest.mark.parametrize("name,params,reduced", [
    ("moa", {"samples": 1, "prompt_length": 512, "observe": 4}, "snapkv"),
    ("moa", {"samples": 1, "prompt_length": 512, "policy": "streaming"}, "streaming"),
    ("moa", {"samples": 1, "prompt_length": 512, "policy": "novelty"}, "novelty"),
    ("moa", {"samples": 1, "prompt_length": 512, "policy": "novelty", "score": "gradient"}, "novelty"),
    ("duo_gates", {"samples": 1, "prompt_length": 256, "steps": 20, "window": 30}, "streaming"),
    ("minference", {"samples": 1, "prompt_length": 512}, "streaming"),
    ("zipvl", {"samples": 1, "prompt_length": 512, "observe": 4}, "snapkv"),
])
def test_option_calibrators_find_planted_head(model, name, params, reduced):
    # moa / duo_gates: budget 0.5 of the KV; minference: 0.5 of the prefill FLOPs. The planted head keeps
    # the full cache (moa, duo_gates) or gets another pattern than the local heads (minference)
    plan = P.make_calibrator(name, budget=0.5, length=512, **params).run(model, model_name="tiny")
    scores = torch.tensor(plan.calibrator["scores"])
    second = scores.flatten().sort().values[-2]   # (gates: the others' fall to ~0.6 under the L1 term alone)
    floor = 1e-5 if params.get("score") == "gradient" else 0.01   # a random model's answer loss moves little
    assert scores[PLANTED] > floor and scores[PLANTED] - second > 0.3 * scores[PLANTED]
    kinds = {(i, h): plan.kind(i, h) for i in range(LAYERS) for h in range(HEADS_KV)}
    planted = kinds.pop(PLANTED)
    if name == "zipvl":  # the sink heads' mass sits on one token; the copying head spreads over the copies
        budgets = {(i, h): g.params["budget"] for i, groups in enumerate(plan.layers) for g in groups for h in g.heads}
        assert budgets.pop(PLANTED) > max(budgets.values())
        planted = "full"
    assert set(kinds.values()) == {reduced} and planted == ("vertical_slash" if name == "minference" else "full")
    assert plan.kv_fraction(512) <= (1.0 if name == "minference" else 0.5)
    assert plan.needs_cache == (name != "minference")


def test_capture_grads_is_the_answer_loss_gradient(model):
    # g · d predicts the loss change when layer 1's attention output moves by ε·d (finite difference, float64)
    ids, start = calibration_prompts(model, None, 1, 256, 3)[0]
    model = model.double()
    implementation = model.config._attn_implementation
    try:
        layers = capture_grads(model, ids, start)
        assert model.config._attn_implementation == implementation
        assert len(layers) == LAYERS and all(g.shape == q.shape for q, k, v, g in layers)
        assert layers[0][3][0, :, :2].abs().sum() > 0      # early rows matter through later layers' keys
        d = torch.randn(layers[1][3].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

        def loss(eps):
            hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
                lambda m, a: (a[0] + eps * d[0].transpose(0, 1).reshape(a[0].shape),))
            try:
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0, start - 1:-1]
                return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[start:])).item()
            finally:
                hook.remove()

        eps = 1e-4
        predicted = float((layers[1][3].double() * d).sum())
        assert abs((loss(eps) - loss(-eps)) / (2 * eps) - predicted) <= 1e-3 * abs(predicted) + 1e-6
        assert all(p.requires_grad for p in model.parameters())    # unfrozen again
    finally:
        model.float()


def _restore_losses(cal, model, configs, prompt):
    from attnzoo.plan.restore import _STATE, _restored_attention
    from attnzoo.plan.base import swapped_attention

    prepared = cal._prepare(model, HEADS_KV, *prompt)
    holders = {}
    with swapped_attention(model, "attnzoo_restore", _restored_attention, _STATE,
                           lambda i: holders.setdefault(i, [None])):
        return cal._losses(model, holders, [prepared], configs), prepared


@pytest.mark.parametrize("policy,compensate", [("novelty", "mass"), ("novelty", "none"), ("streaming", "none")])
def test_restore_scores_what_the_cache_reads(model, policy, compensate):
    # none restored = the answer's NLL through attnzoo's own cache holding the uniform reduced plan;
    # every head restored = exact attention's NLL
    cal = P.make_calibrator("restore", budget=0.5, length=512, policy=policy, compensate=compensate)
    ids, start, context = prompt = calibration_prompts(model, None, 1, 512, 5, context=True)[0]
    context -= 1
    every = list(range(LAYERS * HEADS_KV))
    got, prepared = _restore_losses(cal, model, [[], every], prompt)
    x = torch.tensor([ids])
    with torch.no_grad():
        exact = torch.nn.functional.cross_entropy(model(x).logits[0, start - 1:-1], x[0, start:], reduction="sum")
        reduced = cal.shares(context).choice(cal.share)
        plan = P.head_plan("tiny", P.model_shapes(model), [[reduced] * HEADS_KV] * LAYERS)
        azhf.apply(model, plan)
        try:
            cache = azhf.make_cache(model, plan)
            model(x[:, :context], cache=cache, use_cache=True)
            assert max(max(layer.kv.held) for layer in cache.layers) < context   # the reduced heads evicted
            logits = model(x[:, context:-1], cache=cache, use_cache=True).logits[0, start - 1 - context:]
        finally:
            azhf.remove(model)
    through_cache = torch.nn.functional.cross_entropy(logits, x[0, start:], reduction="sum")
    torch.testing.assert_close(got, torch.stack([through_cache, exact]), atol=1e-3, rtol=1e-4)


def test_restore_scores_the_planted_head():
    # streaming heads lose the far-back key; only the planted copy head reads it: restoring any other head
    # leaves the answer's loss exactly as it was (they read the BOS sink, which every reduced head keeps)
    model = planted_model()
    cal = P.make_calibrator("restore", budget=0.5, length=512, samples=1, prompt_length=512, policy="streaming",
                            compensate="none")
    plan = cal.run(model, model_name="tiny")
    scores = torch.tensor(plan.calibrator["scores"])
    assert scores[PLANTED].abs() > 1e-3
    scores[PLANTED] = 0
    assert scores.abs().max() < 1e-5
    assert sum(plan.kind(i, h) == "full" for i in range(LAYERS) for h in range(HEADS_KV)) == 1
    assert plan.kv_fraction(512) <= 0.5


def test_restore_greedy_finds_heads_that_help_together(monkeypatch):
    # a fake loss: heads 1, 2, 6 each help, 5 a little alone and most next to 2; budget for three
    from attnzoo.plan.restore import Restore

    def losses(self, model, holders, prompts, configs):
        def loss(c):
            c = set(c)
            return 10.0 - 0.5 * (1 in c) - 0.4 * (6 in c) - 0.45 * (2 in c) - 0.1 * (5 in c) - 3.0 * ({2, 5} <= c)
        calls.append(len(configs))
        return torch.tensor([loss(c) for c in configs])

    calls = []
    monkeypatch.setattr(Restore, "_prepare", lambda self, model, heads_kv, *prompt: {"layers": [None] * 4})
    monkeypatch.setattr(Restore, "_losses", losses)
    monkeypatch.setattr("attnzoo.plan.restore.heads_kv_of", lambda model: 2)
    cal = P.make_calibrator("restore", budget=0.4, length=1000, low=0.1, compensate="none", candidates=3)
    assert cal.full_heads(8) == 2    # floor(8 · (400 - 101) / (1000 - 101)) = floor(2.66): 100 tokens + the mean one
    monkeypatch.setattr(Restore, "full_heads", lambda self, heads: 3)
    choices, scores = cal.choose(planted_model(), None)
    full = {i * 2 + h for i in range(4) for h in range(2) if choices[i][h][1] == "full"}
    assert full == {1, 2, 5}          # 1, then 2 (0.45 > 6's 0.4), then 5 (+3.1 next to 2, 6 only 0.4)
    torch.testing.assert_close(scores.flatten(), torch.tensor([0, 0.5, 0.45, 0, 0, 0.1, 0.4, 0]))
    assert calls == [2, 8, 3, 3]      # none and all restored, every head, then the previous round's best three
    assert cal.trace == {"exact": 5.55, "reduced": 10.0, "kept": [[0, 1], [1, 0], [2, 1]], "loss": [9.5, 9.05, 5.95]}


def test_allocate_options():
    from attnzoo.plan.base import allocate_options

    errors = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0], [0.9, 0.0, 0.0]])
    costs = torch.tensor([1.0, 2.0, 8.0]).expand(3, -1)
    assert allocate_options(errors, costs, 3.0).tolist() == [0, 0, 0]
    assert allocate_options(errors, costs, 4.0).tolist() == [0, 0, 1]    # the biggest drop per token first
    assert allocate_options(errors, costs, 11.0).tolist() == [2, 0, 1]
    with pytest.raises(AttnZooError, match="cheapest option"):
        allocate_options(errors, costs, 2.0)


def test_per_head_params_in_one_layer(model):
    """Each KV head of a layer its own policy and size: the cache holds what the plan says."""
    shapes = {"layers": LAYERS, "heads": HEADS, "heads_kv": HEADS_KV, "head_dim": HEAD_DIM}
    snap = ("policy", "snapkv", {"budget": 40, "observe": 4})
    plan = P.head_plan("tiny", shapes, [[("policy", "streaming", {"sinks": 2, "window": 20, "compensation": False}),
                                         snap], [("policy", "full", {}),
                                                 ("policy", "streaming", {"sinks": 4, "window": 60})]])
    assert plan.kv_fraction(300) == pytest.approx((22 + 40 + 300 + 65) / 1200)
    ids = torch.randint(100, VOCAB, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        azhf.apply(model, plan)
        try:
            cache = azhf.make_cache(model, plan)
            model(ids, cache=cache, use_cache=True)
        finally:
            azhf.remove(model)
    assert [layer.kv.held for layer in cache.layers] == [[22, 40], [300, 64]]
    with pytest.raises(AttnZooError, match="expected a 'budget'"):
        P.head_plan("tiny", shapes, [[snap, ("policy", "snapkv", {"observe": 4})], [snap, snap]])


def _plan(shapes=None, layers=None):
    shapes = shapes or {"layers": LAYERS, "heads": HEADS, "heads_kv": HEADS_KV, "head_dim": HEAD_DIM}
    return P.split_plan("tiny", shapes, layers or [[0], [0, 1]], sinks=2, window=8, compensation=True)


def test_round_trip(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "plan.json")
    again = P.load(path)
    assert again == plan and again.to_dict() == json.loads(path.read_text())
    assert again.cache_layers() == [("heads", {"groups": (((0,), "full", {}), ((1,), "streaming", {
        "sinks": 2, "window": 8, "compensate": True}))}), ("full", {})]


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["layers"].pop(), "missing layers \\[1\\]"),
    (lambda d: d["layers"][0]["groups"][1].update(policy="evict_all"), "unknown policy 'evict_all'"),
    (lambda d: d["layers"][0]["groups"][1].update(policy=None, method="no_such_method"), "no_such_method"),
    (lambda d: d["layers"][0]["groups"][1].update(heads=[0]), "missing \\[1\\], repeated \\[0\\]"),
    (lambda d: d["layers"][0]["groups"][1]["params"].update(budget=3), "no parameter 'budget'"),
    (lambda d: d["layers"][0]["groups"][1]["params"].update(window=0), "window"),
    (lambda d: d.update(version=7), "'version' expected 1"),
])
def test_refusals(tmp_path, edit, match):
    data = _plan().to_dict()
    edit(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(AttnZooError, match=match):
        P.load(tmp_path / "bad.json")


def test_other_shapes_refused(model):
    plan = _plan({"layers": LAYERS, "heads": HEADS, "heads_kv": HEADS_KV, "head_dim": 16})
    with pytest.raises(AttnZooError, match="head_dim 16 \\(model: 32\\)"):
        azhf.apply(model, plan)


def test_all_full_plan_equals_exact(model):
    ids = torch.randint(100, VOCAB, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        plan = _plan(layers=[[0, 1], [0, 1]])
        azhf.apply(model, plan)
        try:
            cache = azhf.make_cache(model, plan)
            assert [layer.kv.policy.name for layer in cache.layers] == ["full", "full"]
            got = model(ids, cache=cache, use_cache=True).logits
        finally:
            azhf.remove(model)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_split_plan_cache_holds_less(model):
    ids = torch.randint(100, VOCAB, (1, 300), generator=torch.Generator().manual_seed(2))
    plan = _plan(layers=[[0], [1]])
    with torch.no_grad():
        azhf.apply(model, plan)
        try:
            cache = azhf.make_cache(model, plan)
            model(ids, cache=cache, use_cache=True)
            full = azhf.make_cache(model, "full")
            model(ids, cache=full, use_cache=True)
        finally:
            azhf.remove(model)
    # half the KV heads hold 2 + 8 + 1 of 300 tokens
    assert cache.nbytes < 0.6 * full.nbytes
    assert [layer.kv.policy.name for layer in cache.layers] == ["heads", "heads"]
    assert [layer.kv.held for layer in cache.layers] == [[300, 10], [10, 300]]  # what the plan says


def test_budget_too_small_refused():
    with pytest.raises(AttnZooError, match="budget"):
        P.make_calibrator("razor", budget=0.001, length=512, window=64)
    with pytest.raises(AttnZooError, match="unknown calibrator"):
        P.make_calibrator("no_such_calibrator")


def test_list_parameters_as_text():
    """A spec that splits on commas (benchmarks/plans.py --calibrators) passes lists joined by '+'."""
    from attnzoo.eval.cases import parse_spec

    name, params = parse_spec("moa:policy=novelty,tasks=passkey+niah_single,spans=0.5+0.015625")
    cal = P.make_calibrator(name, **params)
    assert cal.tasks == ("passkey", "niah_single") and cal.spans == (0.015625, 0.5)
    cal = P.make_calibrator("minference", patterns="streaming+block_topk", spans="0.25,0.125")
    assert cal.patterns == ("streaming", "block_topk") and cal.spans == (0.125, 0.25)
    with pytest.raises(AttnZooError, match="'spans'"):
        P.make_calibrator("moa", spans="0.5+half")
    with pytest.raises(AttnZooError, match="'tasks'.*'nope'"):
        P.make_calibrator("moa", tasks="passkey+nope")
    with pytest.raises(AttnZooError, match="'patterns'"):
        P.make_calibrator("minference", patterns="streaming+dense")


def test_eval_reads_a_plan_file(tmp_path):
    from attnzoo.eval import cases

    path = _plan().save(tmp_path / "plan.json")
    plan, cache = cases.load_plan(path)
    assert plan == _plan() and cache == {"policy": plan}
    assert cases.plan_case(path)["kind"] == "plan"
    prefill = P.head_plan("tiny", plan.shapes, [[("method", "streaming", {"sinks": 4, "window": 60})] * 2] * 2)
    assert cases.load_plan(prefill.save(tmp_path / "prefill.json")) == (prefill, None)  # the full cache


def test_eval_refuses_window_next_to_budget():
    from attnzoo.eval import cases

    with pytest.raises(AttnZooError, match="both window=252 and budget=1"):
        cases.policy_params("streaming", {"sinks": 4, "window": 252}, 1, 2048)


def test_cli_show(tmp_path):
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from attnzoo.cli import app

    path = _plan().save(tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["plan", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "streaming KV heads" in result.output and (tmp_path / "plan.png").stat().st_size > 0
    bad = CliRunner().invoke(app, ["plan", "--calibrator", "razor", "--budget", "0.001", "--length", "512",
                                   "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "budget" in bad.output


def test_cli_calibrates_and_eval_scores_the_plan(tmp_path):
    """`attnzoo plan` on a saved tiny Llama (duo on passkey prompts), then the eval runner on the plan."""
    from typer.testing import CliRunner

    from _tiny_lm import save_tiny_llama
    from attnzoo.bench.results import ResultsFile
    from attnzoo.cli import app
    from attnzoo.eval import cases as C
    from attnzoo.eval import runner as R

    folder = str(save_tiny_llama(tmp_path / "llama", max_positions=1024))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", folder, "--calibrator", "duo", "--budget", "0.5",
                                      "--length", "300", "-p", "prompt_length=300", "-p", "samples=1",
                                      "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = P.load(out)
    assert plan.calibrator["name"] == "duo" and plan.kv_fraction(300) <= 0.5
    assert sum(plan.kind(i, h) == "full" for i in range(2) for h in range(2)) == 1
    run = R.Plan(tasks=(("passkey", {}),), lengths=(300,), samples=1, model=folder, recall=False,
                 cases=(C.plan_case(out),))
    row = ResultsFile(R.run(run, tmp_path / "eval", on_note=lambda m: None)).read().cases[0]
    assert row["status"] == "ok", row.get("reason")
    assert row["kv_bytes"] < 0.7 * row["kv_full_bytes"]


def test_max_drop_picks_the_cheapest_plan_within_the_drop(model):
    """--max-drop: budgets are tried cheapest first; the first whose accuracy drop fits is returned."""
    from attnzoo.plan.budget import cheapest_within

    calls = []

    def accuracy(model, tokenizer, plan, tasks, samples, length, seed):  # stands in for greedy generation
        calls.append(plan)
        return 1.0 if plan is None or plan.calibrator["params"]["budget"] >= 1 / 8 else 0.5

    cal = P.make_calibrator("moa", length=512, samples=1, prompt_length=512, observe=4)
    plan = cheapest_within(cal, model, None, 0.2, accuracy=accuracy, model_name="tiny")
    tried = plan.calibrator["max_drop"]["tried"]
    assert [t["budget"] for t in tried] == [1 / 64, 1 / 32, 1 / 16, 1 / 8]
    assert [t["accuracy"] for t in tried] == [0.5, 0.5, 0.5, 1.0] and plan.kv_fraction(512) <= 0.125
    assert plan.calibrator["params"]["budget"] == 1 / 8 and len(calls) == 5   # exact + four plans
    assert cheapest_within(cal, model, None, 0.5, accuracy=accuracy).calibrator["params"]["budget"] == 1 / 64
    with pytest.raises(AttnZooError, match="no budget .* within 0.1 of exact's 1.000"):
        cheapest_within(cal, model, None, 0.1, accuracy=lambda *a: 1.0 if a[2] is None else 0.5)
    with pytest.raises(AttnZooError, match="max_drop expected"):
        cheapest_within(cal, model, None, 1.5, accuracy=accuracy)


def test_cli_max_drop_scores_plans_by_generation(tmp_path):
    """`attnzoo plan --max-drop` on a saved tiny Llama: real greedy generation on the calibration tasks."""
    from typer.testing import CliRunner

    from _tiny_lm import save_tiny_llama
    from attnzoo.cli import app

    folder = str(save_tiny_llama(tmp_path / "llama", max_positions=1024))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", folder, "--calibrator", "moa", "--max-drop", "1",
                                      "--length", "600", "-p", "prompt_length=600", "-p", "samples=1",
                                      "-p", "observe=4", "--check-samples", "1", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = P.load(out).calibrator["max_drop"]
    assert md["tasks"] == ["passkey", "niah_multikey"] and len(md["tried"]) == 1 and md["tried"][0]["budget"] == 1 / 64
    assert "tried 0.015625" in result.output.replace("\n", " ")
