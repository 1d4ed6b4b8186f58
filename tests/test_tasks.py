"""attnzoo.tasks: every registered text task's generator (seeded, needles once, length respected) and scorer."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo.tasks as T
from attnzoo.errors import AttnZooError
from attnzoo.tasks import text

from _tiny_lm import byte_tokenizer

TOK = byte_tokenizer()
SMALL = {"common_words": {"repeats": 4, "common": 4, "rare": 2}}  # fits 1K bytes
TEXT_TASKS = [n for n, cls in T.tasks().items() if issubclass(cls, T.TextTask)]


def test_registry_lists_the_real_model_tasks():
    assert {"passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
            "common_words", "perplexity"} <= set(T.tasks())
    for cls in T.tasks().values():
        assert cls.__doc__ and cls.__doc__.strip(), cls


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_generator_is_seeded_fits_the_length_and_answers_score(name):
    task = T.make_task(name, **SMALL.get(name, {}))
    a = task.generate(3, seed=1, tokenizer=TOK, length=1024)
    b = task.generate(3, seed=1, tokenizer=TOK, length=1024)
    c = task.generate(3, seed=2, tokenizer=TOK, length=1024)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    for s in a:
        assert 900 <= s.meta["tokens"] == len(TOK(s.prompt)["input_ids"]) <= 1024
        assert s.answers and all(s.answers)
        assert task.score(s, " " + ", ".join(s.answers) + ".") == 1.0
        assert task.score(s, "I do not know") == 0.0
        if len(s.answers) > 1:
            assert task.score(s, s.answers[0]) == pytest.approx(1 / len(s.answers))


@pytest.mark.parametrize("needle", ["repeat", "ruler"])
@pytest.mark.parametrize("name", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_each_needle_is_present_exactly_once_and_states_its_value_as_declared(name, needle):
    task = T.make_task(name, needle=needle)
    for s in task.generate(4, seed=0, tokenizer=TOK, length=1500):
        needles = s.meta["needles"]
        assert len(needles) == {"niah_single": 1, "niah_multikey": 2, "niah_multivalue": 2, "niah_multiquery": 2}[name]
        for text in needles:
            assert s.prompt.count(text) == 1, text
        for answer in s.answers:  # in one needle, stated twice (repeat) or once (ruler), nowhere else
            assert sum(answer in text for text in needles) == 1
            assert s.prompt.count(answer) == (2 if needle == "repeat" else 1)
        # the question ends where the answer starts: "... The special magic number(s) for KEY is/are"
        assert s.prompt.endswith((" is", " are")) and s.meta["question"].startswith("\nWhat ")


def test_passkey_needle_is_present_exactly_once():
    for s in T.make_task("passkey").generate(4, seed=0, tokenizer=TOK, length=1500):
        assert s.prompt.count(f"The pass key is {s.answers[0]}.") == 1


def test_multikey_asks_for_the_needle_at_the_sample_depth_and_scores_only_its_value():
    task = T.make_task("niah_multikey", distractors=3)
    samples = task.generate(3, seed=0, tokenizer=TOK, length=2000)
    for s, depth in zip(samples, [0.1, 0.5, 0.9]):
        queried = next(t for t in s.meta["needles"] if s.answers[0] in t)
        key = queried.split(" for ")[1].split(" is ")[0]
        assert s.prompt.endswith(f"for {key} is") and s.meta["depth"] == depth
        assert abs(s.prompt.index(queried) / len(s.prompt) - depth) < 0.1
        others = [t.split(" is ")[1].split(".")[0] for t in s.meta["needles"] if t != queried]
        assert len(others) == 3 and task.score(s, " " + others[0] + ".") == 0.0


def test_passkey_depths_spread_over_10_to_90_percent():
    samples = T.make_task("passkey").generate(5, seed=0, tokenizer=TOK, length=2000)
    depths = [s.meta["depth"] for s in samples]
    assert depths == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    positions = [s.prompt.index("The pass key is") / len(s.prompt) for s in samples]
    assert positions == sorted(positions) and positions[0] < 0.2 and positions[-1] > 0.8


def test_word_values_and_noise_haystack():
    task = T.make_task("niah_single", value="word", haystack="noise")
    (s,) = task.generate(1, seed=0, tokenizer=TOK, length=800)
    assert s.answers[0].isalpha() and text.NOISE.split(".")[0] in s.prompt


def test_variable_tracking_chain_follows_its_value():
    (s,) = T.make_task("variable_tracking", hops=3, chains=2).generate(1, seed=0, tokenizer=TOK, length=1500)
    assert len(s.answers) == 4
    first = s.prompt.index(f"VAR {s.answers[0]} = ")
    value = s.prompt[first:].split("= ")[1].split(".")[0]
    assert f"assigned the value {value}" in s.prompt
    for a, b in zip(s.answers, s.answers[1:]):
        assert s.prompt.index(f"VAR {b} = VAR {a}.") > first


def test_common_words_really_are_the_most_common():
    task = T.make_task("common_words", repeats=5, common=3, rare=2)
    (s,) = task.generate(1, seed=0, tokenizer=TOK, length=1200)
    listed = [line.split(". ", 1)[1] for line in s.prompt.splitlines() if line[:1].isdigit()]
    counts = {w: listed.count(w) for w in set(listed)}
    assert set(sorted(counts, key=lambda w: -counts[w])[:3]) == set(s.answers)
    assert all(counts[a] == 5 for a in s.answers) and max(c for w, c in counts.items() if w not in s.answers) == 2


def test_perplexity_windows_are_distinct_and_aggregate_exp_mean():
    task = T.make_task("perplexity")
    samples = task.generate(4, seed=0, tokenizer=TOK, length=4096)
    assert len({s.meta["offset"] for s in samples}) == 4 and all(len(s.prompt) == 4096 for s in samples)
    assert len(text.book_text()) >= 400_000  # >= 100K tokens of a real BPE tokenizer
    assert task.aggregate([task.score(samples[0], torch.full((10,), 2.0)), 4.0]) == pytest.approx(math.exp(3.0))
    with pytest.raises(AttnZooError, match="finite"):
        task.score(samples[0], torch.tensor([float("nan")]))


def test_bad_input_names_the_problem():
    with pytest.raises(AttnZooError, match="did you mean 'passkey'"):
        T.make_task("paskey")
    with pytest.raises(AttnZooError, match="unknown parameter"):
        T.make_task("passkey", hops=2)
    with pytest.raises(AttnZooError, match="'value' expected one of"):
        T.make_task("niah_single", value="colour")
    with pytest.raises(AttnZooError, match="length: expected at least"):
        T.make_task("passkey").generate(1, tokenizer=TOK, length=50)
    with pytest.raises(AttnZooError, match="at most"):
        T.make_task("perplexity").generate(1000, tokenizer=TOK, length=4096)
    with pytest.raises(AttnZooError, match="tokenizer"):
        T.make_task("passkey").generate(1)
