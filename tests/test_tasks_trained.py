"""Trained tasks: seeded generators agree with their independent scorers, and with hand-worked answers."""

import pytest
import torch

from attnzoo import AttnZooError
from attnzoo.tasks import make_task, tasks
from attnzoo.tasks.trained import IGNORE

SMALL = {"mqar": {"pairs": 6, "seq_len": 40, "vocab_size": 64}, "listops": {"seq_len": 96, "max_depth": 4},
         "retrieval": {"seq_len": 128}, "passkey_train": {"seq_len": 64, "digits": 5}}


@pytest.mark.parametrize("name", sorted(n for n, c in tasks().items() if c.kind == "trained"))
def test_deterministic_and_answers_agree(name):
    task = make_task(name, **SMALL[name])
    x, y = task.tensors(32, seed=7)
    x2, y2 = task.tensors(32, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = task.tensors(32, seed=8)
    assert not torch.equal(x, x3)
    assert x.shape == (32, task.seq_len) and x.dtype == torch.long
    assert 0 <= int(x.min()) and int(x.max()) < task.vocab
    assert torch.equal(task.answer(x), y)
    scored = y[y != IGNORE]
    assert scored.numel() > 0 and 0 <= int(scored.min()) and int(scored.max()) < task.n_out
    # the registry's per-sample view scores a prediction against the same targets
    samples = task.generate(32, seed=7)
    assert torch.equal(samples[1].prompt, x[1])
    assert task.score(samples[1], y[1]) == 1.0
    assert task.score(samples[1], torch.full_like(y[1], -7)) == 0.0
    # training batches and the held-out set come from disjoint seed streams
    train = next(task.batches(8, seed=3))[0]
    held = task.held_out(8, 8, seed=3)[0][0]
    assert not torch.equal(train, held)


def test_mqar_layout():
    task = make_task("mqar", pairs=4, seq_len=24, vocab_size=32)
    x, y = task.tensors(64, seed=0)
    keys, values = x[:, 0:8:2], x[:, 1:8:2]
    assert ((keys >= 1) & (keys < 16)).all() and ((values >= 16) & (values < 32)).all()
    assert all(len(set(r.tolist())) == 4 for r in keys)  # distinct keys per sequence
    assert ((y != IGNORE).sum(1) == 4).all()  # one query per pair
    rows, cols = (y != IGNORE).nonzero(as_tuple=True)
    assert (cols >= 8).all()
    assert torch.equal(x[rows, cols + 1], y[rows, cols])  # the value follows its query key
    for r, c in zip(rows.tolist(), cols.tolist()):
        k = x[r, c].item()
        assert y[r, c] == values[r][keys[r] == k].item()


def test_listops_hand_examples():
    task = make_task("listops", seq_len=16, min_len=1)
    tok = {"MAX": 11, "MIN": 12, "MED": 13, "SM": 14, "]": 15, **{str(d): d + 1 for d in range(10)}}

    def ids(text):
        row = [tok[t] for t in text.replace("[", "").split()]
        return [0] * (16 - len(row)) + row

    exprs = {"[MAX 4 3 [MIN 2 3 ] 1 0 ]": 4, "[SM 9 9 ]": 8, "[MED 1 5 3 7 ]": 3, "[MIN [SM 5 6 ] 2 ]": 1,
             "[MED 2 [MAX 0 9 ] 4 ]": 4}
    x = torch.tensor([ids(e) for e in exprs])
    assert task.answer(x).tolist() == list(exprs.values())
    with pytest.raises(AttnZooError, match="not one complete expression"):
        task.answer(torch.tensor([ids("[MAX 4 3")]))


def test_retrieval_and_passkey_plants():
    task = make_task("retrieval", seq_len=64, code_len=3)
    x, y = task.tensors(200, seed=1)
    assert 0.3 < y.float().mean() < 0.7
    assert ((x == 0).sum(1) == 1).all() and ((x == 1).sum(1) == 2).all()  # one separator, one marker per half
    pk = make_task("passkey_train", seq_len=40, digits=3)
    x, y = pk.tensors(16, seed=2)
    assert ((x == 0).sum(1) == 1).all() and (x[:, 40 - 4] == 1).all()
    assert torch.equal(y[:, 36:39], x[:, 37:40])


def test_bad_parameters_name_the_argument():
    with pytest.raises(AttnZooError, match="seq_len"):
        make_task("mqar", pairs=32, seq_len=64)
    with pytest.raises(AttnZooError, match="queries"):
        make_task("mqar", pairs=4, queries=5)
    with pytest.raises(AttnZooError, match="pairs"):
        make_task("mqar", pairs=0)
    with pytest.raises(AttnZooError, match="did you mean 'mqar'"):
        make_task("mqr")
    with pytest.raises(AttnZooError, match="unknown parameter"):
        make_task("passkey_train", length=3)
    with pytest.raises(AttnZooError, match="n expected"):
        make_task("passkey_train").tensors(0, seed=0)
