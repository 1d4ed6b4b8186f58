"""The registry as the single source of truth, and the contract every registered method keeps."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import attnzoo as az
from attnzoo.cli import app

#: generators for the extra per-call inputs methods may declare (extend when a method adds one)
EXTRA_INPUTS = {
    "g": lambda q: -F.softplus(torch.randn_like(q)),  # gla log-gates <= 0
}


def test_methods_lists_the_core_and_info_describes_them():
    names = set(az.methods())
    assert {"naive", "exact", "exact_tiled", "flash_decode"} <= names
    i = az.info("exact_tiled")
    assert i.family is az.Family.EXACT and i.supports.lse and i.supports.grad
    assert [(p.name, p.default, p.min) for p in i.params] == [("q_tile", 256, 1), ("k_tile", 512, 1)]
    assert "FlashAttention" in i.papers


def test_get_returns_a_reusable_configured_method():
    m = az.get("flash_decode", splits=3)
    assert m.splits == 3 and m == az.get("flash_decode", splits=3)
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    torch.testing.assert_close(m(q, k, v), az.attention(q, k, v, method="flash_decode", splits=3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.splits = 4


def test_register_rejects_non_methods_and_name_clashes():
    with pytest.raises(TypeError, match="Method subclass"):
        az.register(int)

    class NotADataclass(az.Method):
        name: ClassVar[str] = "_not_a_dataclass"

    with pytest.raises(TypeError, match="frozen"):
        az.register(NotADataclass)

    @dataclasses.dataclass(frozen=True)
    class Clash(az.Method):
        name: ClassVar[str] = "exact"

    with pytest.raises(TypeError, match="already taken"):
        az.register(Clash)


#: parameters a method cannot run without (no default makes sense), used by the contract test
REQUIRED_PARAMS = {
    "block_sparse": {"mask_mod": lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 3 == 0},
}


def _inputs_for(cls, q):
    missing = [n for n in cls.inputs if n not in EXTRA_INPUTS]
    assert not missing, f"{cls.name}: add a generator for extra input(s) {missing} to EXTRA_INPUTS"
    return {n: EXTRA_INPUTS[n](q) for n in cls.inputs}


def _public_methods():
    return [n for n in az.methods() if not n.startswith("_")]


@pytest.mark.parametrize("name", _public_methods())
def test_every_method_keeps_the_calling_convention(name):
    """Shape, dtype, finiteness, empty inputs and NaN rejection for every registered method."""
    cls = az.methods()[name]
    causal = cls.supports.causal
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 16, generator=gen)
    k = torch.randn(2, 4, 64, 16, generator=gen)
    v = torch.randn(2, 4, 64, 8, generator=gen)
    extra = _inputs_for(cls, q)
    m = az.get(name, **REQUIRED_PARAMS.get(name, {}))
    with torch.no_grad():
        out = m(q, k, v, causal=causal, **extra)
        assert out.shape == (2, 4, 64, 8) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        out16 = m(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal,
                  **{n: t.bfloat16() for n, t in extra.items()})
        assert out16.dtype == torch.bfloat16
        empty = m(q[:, :, :0], k, v, causal=causal, **{n: t[:, :, :0] for n, t in extra.items()})
        assert empty.shape == (2, 4, 0, 8)
        bad = q.clone()
        bad[1, 2, 3, 4] = math.nan
        with pytest.raises(az.AttnZooError, match="^q: contains NaN"):
            m(bad, k, v, causal=causal, **extra)


def test_cli_list_and_info():
    runner = CliRunner()
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for name in ("exact", "exact_tiled", "flash_decode", "naive"):
        assert name in res.output
    res = runner.invoke(app, ["info", "exact_tiled"])
    assert res.exit_code == 0 and "q_tile" in res.output and "FlashAttention" in res.output
    res = runner.invoke(app, ["info", "exact_tile"])
    assert res.exit_code == 2 and "did you mean" in res.output


def test_generic_registry_looks_up_builds_and_checks_one_way():
    from attnzoo.registry import Registry, check_params, param

    r = Registry("task")

    @r.register("copy")
    def copy(shape, *, length: int = 8, rate: float = 0.5, kind: str | None = None):
        return shape, length, rate, kind

    @dataclasses.dataclass
    class Toy:
        name: ClassVar[str] = "toy"
        size: int = param(4, min=1, max=10)

        def __post_init__(self):
            az.registry.check_fields(self)

    r.add("toy", Toy)
    assert list(r) == ["copy", "toy"] and "copy" in r and len(r) == 2
    assert r.build("copy", length=3)("s") == ("s", 3, 0.5, None)
    assert r.build("toy", size=5).size == 5
    assert [p.name for p in r.params("copy")] == ["length", "rate", "kind"]
    with pytest.raises(az.AttnZooError, match=r"task: unknown task 'cpy'; did you mean 'copy'\? \(available: copy, toy\)"):
        r.lookup("cpy")
    with pytest.raises(az.AttnZooError, match=r"copy: unknown parameter\(s\) \['len'\]; valid parameters: length, rate, kind"):
        r.build("copy", len=3)
    with pytest.raises(az.AttnZooError, match=r"copy: parameter 'length' expected int, got 'abc' \(str\)"):
        r.check("copy", {"length": "abc"})
    with pytest.raises(az.AttnZooError, match=r"copy: parameter 'rate' expected a finite number, got nan"):
        check_params("copy", copy, {"rate": math.nan})
    with pytest.raises(az.AttnZooError, match=r"toy: parameter 'size' expected a value in \[1, 10\], got 11"):
        r.build("toy", size=11)
    with pytest.raises(TypeError, match="already taken"):
        r.add("copy", lambda: None)
    assert r.remove("toy") is Toy and "toy" not in r


def test_share_parameters_scale_with_the_sequence_length():
    """A ``share`` parameter given as a fraction is that share of the call's keys / key blocks, rounded up."""
    from attnzoo import get
    from attnzoo.checks import Problem

    frac, count = get("block_topk", block=16, topk=0.125, dense_below=0), get("block_topk", block=16, topk=4)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))  # 32 key blocks: 1/8 = 4
    assert torch.equal(frac(q, k, v, causal=True), count(q, k, v, causal=True))
    assert frac.fit(Problem(1, 2, 2, 100, 100, 16, 16, 0.25)).topk == 1  # 7 blocks: ceil(0.875) = 1
    assert get("vertical_slash", n_vertical=0.25).resolve_shares(1000)["n_vertical"] == 250
    assert get("hip", block_k=4).resolve_shares(1000) == {"topk": 32}  # 1/8 of 250 key blocks of 4, rounded up
    assert frac.resolve_shares(4096) == {"topk": 32, "guard": 16}  # and the default guard, 1/16
    assert count.resolve_shares(4096) == {"guard": 16}
    assert [p.share for p in az.info("block_topk").params if p.name == "topk"] == ["block"]
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(az.AttnZooError, match="'topk' expected"):
            get("block_topk", topk=bad)
