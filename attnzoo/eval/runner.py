"""Run tasks × lengths × cases on a real model; one results.jsonl row per case (the bench's file format).

A row holds the case (task and its parameters, length, ``kind=prefill|cache|plan``, the method /
policy / plan and its parameters, budget, samples, seed, model), then ``status``, the task's figure
(``score``: accuracy in [0, 1], or perplexity) with ``n`` samples and per-sample ``scores``, mean KV
bytes held during generation (``kv_bytes``) and the full cache's bytes at the same length
(``kv_full_bytes``), ``peak_rss`` (bytes above the level before the case), ``prefill_s`` (mean per
sample) and ``decode_s_per_token``, the resolved policy parameters, every task parameter the samples were
made with (``task_resolved``: defaults included, so a later change of a task's defaults stays visible),
and the prefill attention-mass ``recall`` where the method exposes what it reads. Resume and a cut trailing
line are handled exactly as in ``attnzoo bench`` (:class:`attnzoo.bench.results.ResultsFile`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import models as model_store
from .. import registry
from ..bench.metrics import recall_applies
from ..registry import Family
from ..bench.metrics import peak_memory
from ..bench.results import ResultsFile, case_key, machine_info
from ..errors import AttnZooError
from ..tasks import Sample, Task, make_task, tasks
from . import cases as C
from .recall import layer_qkv, prefill_density, prefill_recall, prompt_ids


@dataclass(frozen=True)
class Plan:
    """What to run: every task at every length with every case."""

    tasks: tuple[tuple[str, dict], ...]
    lengths: tuple[int, ...]
    cases: tuple[dict, ...]
    samples: int = 3
    seed: int = 0
    model: str = model_store.DEFAULT_MODEL
    threads: int | None = 1
    #: measure prefill methods' attention-mass recall (one more exact forward per case)
    recall: bool = True

    def expand(self) -> list[dict]:
        """One record per (task, length, case): the identity of a row (its key); only the cases a task takes
        (:func:`cases.applies`: perplexity takes no cache case)."""
        kinds = {t: tasks()[t].kind for t, _ in self.tasks}
        return [{"task": t, "task_params": tp, "length": n, **case, "samples": self.samples, "seed": self.seed,
                 "model": self.model}
                for t, tp in self.tasks for n in self.lengths for case in self.cases if C.applies(kinds[t], case)]


# -------------------------------------------------------------- one sample
def _kv_bytes(cache) -> int:
    """Bytes a transformers cache holds (attnzoo caches count their policy metadata too)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def full_kv_bytes(model, tokens: int) -> int:
    """What an uncompressed float cache of ``tokens`` tokens holds: 2 × layers × KV heads × tokens × head dim."""
    cfg = model.config.get_text_config()
    heads_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads_kv * tokens * head_dim * next(model.parameters()).element_size()


@dataclass
class Outcome:
    score: float
    prediction: str = ""
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)  # held after the prefill and each decode step
    kv_full: list[int] = field(default_factory=list)   # an uncompressed cache of as many tokens
    tokens: int = 0


@functools.cache
def cache_kwarg(cls: type) -> str:
    """transformers >= 5.25 names the cache argument ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def context_tokens(tokenizer, sample: Sample, ids: torch.Tensor) -> int:
    """How many leading tokens of ``ids`` (the whole prompt's) come before the question ``sample.meta["question"]``.

    The context is tokenised alone and matched against the prompt's own tokens, so the two reads of a
    ``question="after"`` run feed exactly the one-pass tokens (a token spanning the boundary goes with the question).
    """
    question = sample.meta.get("question")
    if not isinstance(question, str) or not question or not sample.prompt.endswith(question):
        raise AttnZooError("eval: question='after' needs samples whose meta['question'] is the end of the prompt "
                           f"(text tasks set it), got {question!r}")
    alone = tokenizer(sample.prompt[:-len(question)], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(len(alone), ids.shape[1] - 1)
    context = int((alone[:n] == ids[0, :n]).long().cumprod(0).sum())  # the common prefix (>= 1 question token left)
    if context == 0:
        raise AttnZooError("eval: question='after' found no context tokens before the question")
    return context


def generate(model, tokenizer, sample: Sample, task: Task, make_cache: Callable[[], Any]) -> Outcome:
    """Greedy generation of up to ``task.max_new_tokens``: prefill, then one token at a time.

    With ``task.question == "after"`` the prefill is two reads through the cache: the context (which a
    policy compresses at its end), then the question; ``prefill_s`` counts both.
    """
    ids = prompt_ids(tokenizer, sample)
    split = context_tokens(tokenizer, sample, ids) if getattr(task, "question", "inline") == "after" else 0
    cache = make_cache()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    out_ids, decode_s, held, full = [], [], [], []
    kw = {cache_kwarg(type(model)): cache, "use_cache": True}
    with torch.inference_mode():
        t = time.perf_counter()
        if split:
            model(input_ids=ids[:, :split], logits_to_keep=1, **kw)
        out = model(input_ids=ids[:, split:], logits_to_keep=1, **kw)
        prefill_s = time.perf_counter() - t
        for step in range(task.max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            held.append(_kv_bytes(cache))
            full.append(full_kv_bytes(model, ids.shape[1] + len(out_ids)))
            if token in eos:
                break
            out_ids.append(token)
            if step + 1 == task.max_new_tokens:
                break
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[token]]), **kw)
            decode_s.append(time.perf_counter() - t)
    text = tokenizer.decode(out_ids, skip_special_tokens=True)
    return Outcome(task.score(sample, text), text, prefill_s, decode_s, held, full, ids.shape[1])


def perplexity(model, sample: Sample, task: Task, chunk: int = 1024) -> Outcome:
    """Per-token negative log-likelihood of one window, the vocabulary projection done ``chunk`` rows at a time."""
    ids = prompt_ids(None, sample)
    with torch.inference_mode():
        t = time.perf_counter()
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        last = ids.shape[1] - 1  # position i predicts token i + 1
        nll = torch.cat([torch.nn.functional.cross_entropy(head(hidden[0, i:min(i + chunk, last)]).float(),
                                                           ids[0, i + 1:min(i + chunk, last) + 1], reduction="none")
                         for i in range(0, last, chunk)])
        prefill_s = time.perf_counter() - t
    full = [full_kv_bytes(model, ids.shape[1])]
    return Outcome(task.score(sample, nll), "", prefill_s, [], full, full, ids.shape[1])


# ---------------------------------------------------------------- one case
class Runner:
    """Holds the model and the generated samples; runs one case at a time."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.model, self.tokenizer = model_store.load(plan.model)
        self.context = model_store.context_length(self.model)
        self._samples: dict[tuple, tuple[Task, list[Sample]]] = {}
        self._qkv: tuple = (None, None)

    def samples(self, case: dict) -> tuple[Task, list[Sample]]:
        key = (case["task"], case_key(case["task_params"]), case["length"])
        if key not in self._samples:
            task = make_task(case["task"], **case["task_params"])
            self._samples[key] = task, task.generate(self.plan.samples, seed=self.plan.seed, tokenizer=self.tokenizer,
                                                     length=case["length"])
        return self._samples[key]

    def setup(self, case: dict, length: int) -> tuple[Callable[[], Any], dict]:
        """Route the model for ``case``; returns (a fresh-cache factory, resolved parameters). Scripts that
        score a case their own way (benchmarks/eval_speed.py, measurements/plans/margin.py) call it so each
        case gets exactly the attention and cache ``attnzoo eval`` gives it."""
        import attnzoo.hf as azhf
        from transformers import DynamicCache

        azhf.remove(self.model) if azhf.is_applied(self.model) else None
        if case["kind"] == "prefill":
            azhf.apply(self.model, case["name"], **case["params"])
            resolved = C.method_parameters(case, length) | {"decode": azhf.decode_route(self.model)}
            return (lambda: DynamicCache(config=self.model.config)), resolved
        if case["kind"] == "cache":
            params = C.policy_params(case["name"], case["params"], case["budget"], length)
            azhf.apply(self.model, "exact")
            # the row records every parameter, defaults included: a later default change stays visible (tables)
            return (lambda: azhf.make_cache(self.model, case["name"], **params)), C.policy_parameters(case, length)
        plan, cache = C.load_plan(case["name"])
        azhf.apply(self.model, plan)
        if cache is None:
            return (lambda: DynamicCache(config=self.model.config)), {}
        cache = dict(cache)
        policy = cache.pop("policy")
        return (lambda: azhf.make_cache(self.model, policy, **cache)), cache

    def run(self, case: dict) -> dict:
        """Measure one case; returns the row's result fields (``status`` ok / skipped / failed)."""
        if case["length"] > self.context:
            return {"status": "skipped", "reason": f"length {case['length']} exceeds the model's context "
                                                   f"({self.context} tokens)"}
        task, samples = self.samples(case)
        make_cache, resolved = self.setup(case, case["length"])
        outcomes, peak = [], 0
        for sample in samples:
            if task.kind == "perplexity":
                outcome, rss = peak_memory(lambda: perplexity(self.model, sample, task))
            else:
                outcome, rss = peak_memory(lambda: generate(self.model, self.tokenizer, sample, task, make_cache))
            outcomes.append(outcome)
            peak = max(peak, rss or 0)
        held = [b for o in outcomes for b in o.kv_bytes]
        full = [b for o in outcomes for b in o.kv_full]
        steps = [s for o in outcomes for s in o.decode_s]
        tokens = max(o.tokens for o in outcomes)
        result = {"status": "ok", "metric": task.metric, "score": task.aggregate([o.score for o in outcomes]),
                  "n": len(outcomes), "scores": [o.score for o in outcomes],
                  "predictions": [o.prediction for o in outcomes][:8], "prompt_tokens": tokens,
                  "prefill_s": sum(o.prefill_s for o in outcomes) / len(outcomes),
                  "decode_s_per_token": sum(steps) / len(steps) if steps else None,
                  "kv_bytes": sum(held) / len(held), "kv_full_bytes": sum(full) / len(full), "peak_rss": peak or None,
                  "resolved": resolved, "task_resolved": task.params(),
                  "resolved_all": case["kind"] in ("prefill", "cache")}  # every parameter: see table.case_label
        if case["kind"] == "prefill" and self.plan.recall:
            result["recall"], result["density"] = self.recall(case, samples[0])
        return result

    def recall(self, case: dict, sample: Sample) -> tuple[float | None, float | None]:
        """Mean prefill attention-mass recall and density of the method over three layers (first, middle, last)."""
        method = registry.get(case["name"], **C.method_params(case["params"]))
        if type(method).family is Family.EXACT:
            return 1.0, 1.0
        if not recall_applies(method) and not callable(getattr(method, "layouts", None)):
            return None, None  # it changes the scores and does not expose what it reads: nothing to capture for
        key = (case["task"], case_key(case["task_params"]), case["length"])
        if self._qkv[0] != key:  # one capture per (task, length), shared by its methods
            self._qkv = key, None
            self._qkv = key, layer_qkv(self.model, prompt_ids(self.tokenizer, sample))
        recall = prefill_recall(self._qkv[1], method) if recall_applies(method) else None
        return recall, prefill_density(self._qkv[1], method)

    def close(self) -> None:
        import attnzoo.hf as azhf

        if azhf.is_applied(self.model):
            azhf.remove(self.model)


# ---------------------------------------------------------------- the run
def run(plan: Plan, out_dir: str | Path, *, resume: bool = False, progress: Callable | None = None,
        on_note=print) -> Path:
    """Run ``plan`` into ``out_dir/results.jsonl`` (``resume`` continues an interrupted run); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultsFile(out_dir)
    if store.exists() and not resume:
        raise AttnZooError(f"eval: {store.path} already holds results; pass --resume to continue that run "
                           "or choose another --out")
    for note in store.repair() if store.exists() else []:
        on_note(f"[results] {note}")
    done = {c["key"] for c in store.read().cases} if store.exists() else set()
    planned = plan.expand()
    todo = [c for c in planned if case_key(c) not in done]
    if len(todo) < len(planned):
        on_note(f"resuming: {len(planned) - len(todo)} of {len(planned)} cases already in {store.path}")
    if not todo:
        return store.path
    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    runner = Runner(plan)
    run_id = uuid.uuid4().hex[:12]
    store.append({"type": "run", "run_id": run_id, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "resumed": bool(done), "suite": {**dataclasses.asdict(plan), "kind": "eval"},
                  "machine": {**machine_info(), "threads": torch.get_num_threads()}})
    bar = progress(len(todo)) if progress else None
    try:
        for case in todo:
            try:
                result = runner.run(case)
            except (AttnZooError, RuntimeError, ValueError) as e:
                result = {"status": "failed", "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
            store.append({"type": "case", "run_id": run_id, "key": case_key(case), "suite_kind": "eval", **case,
                          **result})
            if bar:
                bar.advance(f"{case['task']} N={case['length']} {C.describe(case)}")
    finally:
        runner.close()
        torch.set_num_threads(threads)
        if bar:
            bar.close()
    return store.path
