"""Seeded attention-input generators (docs/methods.md, Benchmark workloads) with known structure.

Each workload returns q, k, v in attnzoo's layout plus ``meta`` describing
what was planted, so tests and benchmarks can check that a sparse or
approximate method finds it. Strengths are given in units of the *scaled*
score ``scale · q·k`` (``scale = D ** -0.5``), so a strength of 8 means the
planted key beats an ordinary key by about e^8 in the softmax, whatever D is.

    >>> from attnzoo.bench import workloads
    >>> qkv = workloads.make("needle", length=4096, heads=8, dim=64, seed=0)
    >>> qkv.meta["needles"][:2]     # planted (query, key) pairs
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ..errors import AttnZooError
from ..registry import Registry


class QKV(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    meta: dict


@dataclass(frozen=True)
class Shape:
    """Sizes of one generated problem (queries are the last ``len_q`` positions)."""

    batch: int
    heads: int
    heads_kv: int
    len_q: int
    len_k: int
    dim: int
    dim_v: int

    @property
    def q_positions(self) -> torch.Tensor:
        return torch.arange(self.len_q) + (self.len_k - self.len_q)


#: workload generators ``fn(shape, gen, **params)`` by name; their parameters are the ones with a default
WORKLOADS: Registry[Callable[..., tuple]] = Registry("workload", owner="workload {name}")


def workload(name: str):
    """Register a generator ``fn(shape, gen, **params) -> (q, k, meta)`` (v Gaussian) or ``(q, k, v, meta)``."""
    return WORKLOADS.register(name)


def make(name: str = "gaussian", *, batch: int = 1, heads: int = 8, heads_kv: int | None = None,
         length: int = 1024, len_q: int | None = None, dim: int = 64, dim_v: int | None = None, seed: int = 0,
         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **params: Any) -> QKV:
    """Generate one seeded problem: q ``(B, H, len_q, D)``, k/v ``(B, Hkv, length, D)``."""
    build = WORKLOADS.build(name, **params)  # unknown names and parameters, mistyped values: refused here
    heads_kv = heads if heads_kv is None else heads_kv
    len_q = length if len_q is None else len_q
    for arg, val in (("batch", batch), ("heads", heads), ("heads_kv", heads_kv), ("length", length), ("dim", dim)):
        if not isinstance(val, int) or val < 1:
            raise AttnZooError(f"workload: {arg} expected a positive int, got {val!r}")
    if heads % heads_kv:
        raise AttnZooError(f"workload: heads_kv expected a divisor of heads={heads}, got {heads_kv}")
    if not 0 < len_q <= length:
        raise AttnZooError(f"workload: len_q expected 1..length={length}, got {len_q}")
    shape = Shape(batch, heads, heads_kv, len_q, length, dim, dim if dim_v is None else dim_v)
    gen = torch.Generator().manual_seed(seed)
    built = build(shape, gen)
    v = torch.randn(batch, heads_kv, length, shape.dim_v, generator=gen)
    if len(built) == 4:  # a workload with its own values (real Q/K/V)
        q, k, v, meta = built
    else:
        q, k, meta = built
    meta = {"workload": name, "seed": seed, **params, **meta}
    return QKV(*(t.to(device=device, dtype=dtype) for t in (q, k, v)), meta)


# ------------------------------------------------------------------ helpers
def _gauss(shape: Shape, gen: torch.Generator, std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randn(shape.batch, shape.heads, shape.len_q, shape.dim, generator=gen) * std
    k = torch.randn(shape.batch, shape.heads_kv, shape.len_k, shape.dim, generator=gen) * std
    return q, k


def _score_unit(shape: Shape) -> float:
    """Norm a direction must have in both q and k for their scaled product to be 1."""
    return shape.dim ** 0.25


def _rotary(positions: torch.Tensor, dim: int, period: float) -> torch.Tensor:
    """``(N, dim)`` features in channels 0-1 whose dot product is ``cos(2π (i - j) / period)``."""
    if dim < 2:
        raise AttnZooError(f"workload: dim expected >= 2 for positional structure, got {dim}")
    angle = 2 * math.pi * positions.float() / period
    feats = torch.zeros(len(positions), dim)
    feats[:, 0] = torch.cos(angle)
    feats[:, 1] = torch.sin(angle)
    return feats


def _free_direction(shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """A random unit direction outside the two rotary channels."""
    u = torch.randn(shape.dim, generator=gen)
    u[:2] = 0
    return u / u.norm()


def _add_locality(q, k, shape: Shape, strength: float, period: float) -> None:
    """Add a rotary component so pairs at distance ≪ period score up to ``strength`` higher."""
    unit = _score_unit(shape) * math.sqrt(strength)
    q += unit * _rotary(shape.q_positions, shape.dim, period)
    k += unit * _rotary(torch.arange(shape.len_k), shape.dim, period)


# --------------------------------------------------------------- workloads
@workload("gaussian")
def _gaussian(shape: Shape, gen: torch.Generator, temperature: float = 1.0):
    """G1: i.i.d. Gaussian q, k with scaled scores ~ temperature · N(0, 1); the dense worst case."""
    q, k = _gauss(shape, gen, math.sqrt(temperature))
    return q, k, {}


@workload("local")
def _local(shape: Shape, gen: torch.Generator, strength: float = 6.0, period: float | None = None):
    """Local band: a slow rotary component makes nearby keys score ``strength`` above far ones."""
    q, k = _gauss(shape, gen, 0.5)
    period = period or 4.0 * shape.len_k
    _add_locality(q, k, shape, strength, period)
    return q, k, {"period": period}


@workload("needle")
def _needle(shape: Shape, gen: torch.Generator, needles: int = 8, strength: float = 10.0,
            sink: float = 4.0, locality: float = 2.0, causal: bool = True):
    """G2: needles + sink + locality. Planted (query, key) pairs score ``strength`` above the rest.

    The needle keys are drawn among the keys each needle query may see when
    ``causal``; ``meta['needles']`` lists ``(query_index, key_index)`` with
    query indices among the ``len_q`` queries (per batch and KV-head group,
    every query head of the group sharing the needle).
    """
    q, k = _gauss(shape, gen, 0.5)
    _add_locality(q, k, shape, locality, 4.0 * shape.len_k)
    # sink: every query shares a direction u that key 0 carries strongly
    unit = _score_unit(shape) * math.sqrt(sink)
    u = _free_direction(shape, gen)
    q += unit * u
    k[:, :, 0] += unit * u
    pairs = []
    group = shape.heads // shape.heads_kv
    for _ in range(needles):
        i = int(torch.randint(shape.len_q, (1,), generator=gen))
        hi = int(shape.q_positions[i]) + 1 if causal else shape.len_k
        j = int(torch.randint(1, max(2, hi), (1,), generator=gen)) if hi > 1 else 0
        direction = q[:, :, i].view(shape.batch, shape.heads_kv, group, shape.dim).mean(dim=2)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        q_norm = q[:, :, i].norm(dim=-1).mean()
        k[:, :, j] += direction * strength / (float(q_norm) * shape.dim ** -0.5)
        pairs.append((i, j))
    return q, k, {"needles": pairs}


@workload("vertical_slash")
def _vertical_slash(shape: Shape, gen: torch.Generator, columns: int = 8, strength: float = 6.0,
                    period: int = 64, slash: float = 4.0):
    """G4: a few "column" keys every query likes, plus diagonals at offsets ≡ 0 mod ``period``."""
    q, k = _gauss(shape, gen, 0.5)
    unit = _score_unit(shape) * math.sqrt(strength)
    u = _free_direction(shape, gen)
    cols = torch.randperm(shape.len_k, generator=gen)[:columns]
    q += unit * u
    k[:, :, cols] += unit * u
    _add_locality(q, k, shape, slash, float(period))
    return q, k, {"columns": sorted(cols.tolist()), "period": period}


@workload("clusters")
def _clusters(shape: Shape, gen: torch.Generator, clusters: int = 8, spread: float = 0.3,
              strength: float = 4.0):
    """G5: q and k drawn around ``clusters`` shared centres (Gaussian mixture)."""
    centres = torch.randn(clusters, shape.dim, generator=gen)
    centres = centres / centres.norm(dim=-1, keepdim=True) * _score_unit(shape) * math.sqrt(strength)
    zq = torch.randint(clusters, (shape.batch, shape.heads, shape.len_q), generator=gen)
    zk = torch.randint(clusters, (shape.batch, shape.heads_kv, shape.len_k), generator=gen)
    noise_q, noise_k = _gauss(shape, gen, spread)
    return centres[zq] + noise_q, centres[zk] + noise_k, {"clusters": clusters}


@workload("outliers")
def _outliers(shape: Shape, gen: torch.Generator, key_offset: float = 10.0, q_channels: int = 2,
              q_gain: float = 20.0):
    """G6: channel outliers: a large per-channel offset on K and a few Q channels × ``q_gain``."""
    q, k = _gauss(shape, gen)
    k += key_offset * torch.randn(shape.dim, generator=gen)
    chans = torch.randperm(shape.dim, generator=gen)[:q_channels]
    q[..., chans] *= q_gain
    return q, k, {"q_channels": chans.tolist()}


@workload("sinks")
def _sinks(shape: Shape, gen: torch.Generator, sinks: int = 4, strength: float = 6.0):
    """Attention sinks: the first ``sinks`` keys share a direction every query carries."""
    q, k = _gauss(shape, gen, 0.5)
    unit = _score_unit(shape) * math.sqrt(strength)
    u = _free_direction(shape, gen)
    q += unit * u
    k[:, :, :sinks] += unit * u
    return q, k, {"sinks": list(range(min(sinks, shape.len_k)))}


#: the patterns ``structured`` deals out to its KV heads, in order (``needle`` carries a sink too)
STRUCTURED_PATTERNS = ("local", "needle", "vertical_slash", "clusters")


@workload("structured")
def _structured(shape: Shape, gen: torch.Generator):
    """Heterogeneous heads, as in real models: KV head g (and its query heads) gets pattern g mod 4.

    The patterns are a local band; needles with an attention sink and locality; vertical
    columns with diagonals; clusters (each built by its own generator at this shape), so
    four heads already hold every planted structure.
    """
    group = shape.heads // shape.heads_kv
    built = {p: WORKLOADS[p](shape, gen) for p in STRUCTURED_PATTERNS[:shape.heads_kv]}
    q, k = _gauss(shape, gen)
    patterns = []
    for g in range(shape.heads_kv):
        pattern = STRUCTURED_PATTERNS[g % len(STRUCTURED_PATTERNS)]
        pq, pk, _ = built[pattern]
        q[:, g * group:(g + 1) * group] = pq[:, g * group:(g + 1) * group]
        k[:, g] = pk[:, g]
        patterns.append(pattern)
    return q, k, {"head_patterns": patterns, **{f"{p}_meta": m for p, (_, _, m) in built.items()}}


@workload("real")
def _real(shape: Shape, gen: torch.Generator, layer: int | None = None, capture: str | None = None,
          model: str | None = None, text: str | None = None):
    """Real Q/K/V of a pretrained model on real text. The bench's causal suites run SmolLM2-135M (the eval's
    decoder, ``model="smollm2-135m"``) on the shipped long KJV text, where sparse methods are really sparse;
    with no ``model`` (non-causal suites) it is all-MiniLM-L6-v2 on data/ prose.

    ``capture`` loads a file written by ``attnzoo capture``; otherwise the model is run on ``batch``
    windows of ``length`` tokens of ``text`` (a file path; default the model's shipped text) once, and the
    layer kept in the attnzoo cache (:func:`attnzoo.bench.capture.cached_layer`). ``layer`` defaults
    to the middle layer; the first ``heads`` heads are used; ``dim`` is the model's.
    """
    from . import capture as cap

    if capture is not None:
        record = cap.load(capture)
        layers = len(record["q"])
        layer = layers // 2 if layer is None else layer
        if not 0 <= layer < layers:
            raise AttnZooError(f"workload real: layer expected 0..{layers - 1}, got {layer}")
        q, k, v = record["q"][layer], record["k"][layer], record["v"][layer]
    else:
        text_value = None if text is None else open(text).read()
        record = cap.cached_layer(model, text_value, length=shape.len_k, batch=shape.batch, layer=layer)
        layer = record["layer"]
        q, k, v = record["q"][0], record["k"][0], record["v"][0]
    if q.shape[0] < shape.batch or k.shape[2] < shape.len_k:
        raise AttnZooError(f"workload real: the capture holds batch {q.shape[0]} × length {k.shape[2]}; "
                           f"asked for batch {shape.batch} × length {shape.len_k}")
    group = q.shape[1] // k.shape[1]
    if shape.heads_kv == shape.heads and group > 1 and shape.heads <= q.shape[1]:
        # multi-head attention asked of a grouped-query model: each query head gets its own KV head's copy
        pick = torch.arange(shape.heads) // group
        k, v = k[:, pick], v[:, pick]
    elif shape.heads > q.shape[1] or shape.heads // shape.heads_kv != group:
        raise AttnZooError(f"workload real: the model has {q.shape[1]} query and {k.shape[1]} KV heads; "
                           f"asked for heads={shape.heads}, heads_kv={shape.heads_kv} (the same group size, or "
                           "heads_kv = heads)")
    n, b = shape.len_k, shape.batch
    q = q[:b, :shape.heads, n - shape.len_q:n]
    k, v = k[:b, :shape.heads_kv, :n], v[:b, :shape.heads_kv, :n]
    meta = {"model": "/".join(Path(record["model"]).parts[-2:]), "layer": layer,
            "text_sha256": record.get("text_sha256"), "dim": q.shape[-1]}
    return q.float(), k.float(), v.float(), meta


#: the decoder the causal ``real`` workload runs when no model or capture is named
CAUSAL_REAL_MODEL = "smollm2-135m"
#: the causal real workload runs at the suite's lengths from here up (at shorter lengths the sparse methods'
#: windows and budgets cover nearly every key), or at the longest length given when none reaches it
REAL_SPARSE_FROM = 2048


def real_params(params: dict, causal: bool) -> dict:
    """The ``real`` workload's parameters for a suite: causal suites default to the decoder
    (:data:`CAUSAL_REAL_MODEL`), non-causal ones to MiniLM (no model named)."""
    if causal and not params.get("model") and not params.get("capture"):
        return {**params, "model": CAUSAL_REAL_MODEL}
    return params


def real_lengths(lengths, params: dict) -> list[int]:
    """The lengths the ``real`` workload runs at: every one for MiniLM or a capture file; for a decoder the
    ones >= :data:`REAL_SPARSE_FROM`, or the longest when none is."""
    lengths = sorted(lengths)
    if not params.get("model") or params.get("capture"):
        return lengths
    return [n for n in lengths if n >= REAL_SPARSE_FROM] or lengths[-1:]


def prepare_real(params: dict, *, length: int, batch: int) -> bool:
    """Make sure the ``real`` workload's capture for these parameters is on disk (run the model now if not;
    then free it). Returns whether it ran the model."""
    if params.get("capture"):
        return False
    from . import capture as cap

    text = params.get("text")
    args = (params.get("model"), None if text is None else open(text).read())
    kw = {"length": length, "batch": batch, "layer": params.get("layer")}
    ran = not cap.capture_file(*args, **kw)[3].exists()
    cap.cached_layer(*args, **kw)
    cap.cached_layer.cache_clear()
    cap._load.cache_clear()  # the model: the worker reads the file
    return ran


def max_length(name: str, params: dict | None = None) -> int | None:
    """The longest length a workload can produce (None = any): the model's limit for ``real``."""
    if name != "real":
        return None
    from . import capture as cap

    params = params or {}
    if params.get("capture"):
        return int(cap.load(params["capture"])["k"][0].shape[2])
    cap.require_transformers()
    return cap.max_tokens(cap.resolve_model(params["model"]) if params.get("model") else cap.default_model_dir())


# ------------------------------------------------------------ extra inputs
#: generators for methods' extra per-call inputs, keyed by input name (``Method.inputs``)
INPUTS: Registry[Callable[[Shape, torch.Generator], torch.Tensor]] = Registry("extra input")


def input_generator(name: str):
    """Register ``fn(shape, gen) -> tensor`` producing the extra input ``name`` for the benchmark."""
    return INPUTS.register(name)


@input_generator("g")
def _gla_gates(shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """GLA log-gates ``(B, Hq, N, D)`` ≤ 0: ``logsigmoid(x) / 16`` (fla's gate_logit_normalizer)."""
    x = torch.randn(shape.batch, shape.heads, shape.len_k, shape.dim, generator=gen)
    return torch.nn.functional.logsigmoid(x) / 16


def make_inputs(names, qkv: QKV, seed: int = 0) -> dict[str, torch.Tensor]:
    """Generated extra inputs for ``names`` at the shape of ``qkv``; raises naming a missing generator."""
    q, k, v, _ = qkv
    shape = Shape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    out = {}
    for name in names:
        if name not in INPUTS:
            raise AttnZooError(f"workload: no generator for extra input {name!r} "
                               "(register one with @attnzoo.bench.workloads.input_generator)")
        out[name] = INPUTS[name](shape, torch.Generator().manual_seed(seed + 1)).to(q.dtype)
    return out
