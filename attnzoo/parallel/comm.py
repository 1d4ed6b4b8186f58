"""The communication layer of sequence-parallel attention (docs/methods.md, Sequence parallel).

Everything goes through ``torch.distributed`` (gloo on CPU, NCCL on GPU):
batched point-to-point sends for the rings, ``all_to_all_single`` for
Ulysses and the zig-zag re-layout, one tiny ``all_gather`` to check that the
ranks agree on shapes. This module adds three things on top:

* a :class:`Team` (group, rank, size) resolved once per call;
* error wrapping: any failure of a communication call (a rank died, never
  reached the call, or the process group's timeout expired) becomes a
  :class:`ParallelError` naming the function, the operation and the rank,
  instead of a bare backend error or a hang. The timeout is the process
  group's: ``init_process_group(..., timeout=datetime.timedelta(seconds=30))``
  (or :func:`attnzoo.parallel.init_process_group` with ``timeout=30.0``);
* byte counting: every payload sent or received by these functions is added
  to :func:`comm_stats`, so benchmarks report measured, not guessed, traffic.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import AttnZooError


class ParallelError(AttnZooError):
    """A sequence-parallel call could not complete its communication: a rank
    died, never reached the call, or the process group's timeout expired; or
    the ranks passed disagreeing shards."""


@dataclass
class CommStats:
    """Bytes this process sent to / received from *other* ranks, in total and per operation."""

    bytes_sent: int = 0
    bytes_received: int = 0
    sent_by_op: dict[str, int] = field(default_factory=dict)

    def record(self, op: str, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.sent_by_op[op] = self.sent_by_op.get(op, 0) + sent

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = 0
        self.sent_by_op.clear()


_STATS = CommStats()


def comm_stats() -> CommStats:
    """This process's running byte counter (``comm_stats().reset()`` to start a measurement)."""
    return _STATS


@dataclass(frozen=True)
class Team:
    """The process group one call runs on, with this process's rank in it."""

    fn: str  # the public function, for error messages
    group: dist.ProcessGroup | None
    rank: int
    size: int

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of ``group_rank`` (what point-to-point calls address)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @contextmanager
    def talking(self, what: str):
        """Turn a failing communication call into a :class:`ParallelError`."""
        try:
            yield
        except ParallelError:
            raise
        except (RuntimeError, dist.DistError) as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParallelError(
                f"{self.fn}: {what} failed on rank {self.rank} of {self.size}: another rank died, never reached "
                f"this call, or the process group's timeout expired (set it with init_process_group(timeout=...)); "
                f"backend error: {cause}"
            ) from e


def resolve_team(fn: str, group: dist.ProcessGroup | None) -> Team:
    """The :class:`Team` of ``group`` (None = the default group); refuses an uninitialised torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        raise AttnZooError(
            f"{fn}: expected an initialised torch.distributed process group, got none; call "
            f"attnzoo.parallel.init_process_group() or torch.distributed.init_process_group() first "
            f"(or launch with attnzoo.parallel.run_local / torchrun)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise AttnZooError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return Team(fn, group, dist.get_rank(group), dist.get_world_size(group))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """Point-to-point transfers in flight; :meth:`wait` completes them (raising ParallelError on failure)."""

    def __init__(self, team: Team, what: str, works: list, buffers: list[torch.Tensor]):
        self.team, self.what, self.works = team, what, works
        self.buffers = buffers  # kept alive until the transfers complete

    def wait(self) -> None:
        with self.team.talking(self.what):
            for w in self.works:
                w.wait()
        self.works, self.buffers = [], []


def exchange(team: Team, what: str, sends: list[tuple[torch.Tensor, int]],
             recvs: list[tuple[torch.Tensor, int]], tag: int = 0) -> Pending:
    """Start sending each ``(tensor, peer)`` of ``sends`` and receiving into each of ``recvs``.

    Peers are group ranks. All ranks must post matching transfers in the same
    order (NCCL ignores tags); empty tensors are skipped on both sides.
    """
    ops = [dist.P2POp(dist.isend, t, team.global_rank(p), team.group, tag) for t, p in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, team.global_rank(p), team.group, tag) for t, p in recvs if t.numel()]
    _STATS.record(what, sum(_nbytes(t) for t, _ in sends), sum(_nbytes(t) for t, _ in recvs))
    buffers = [t for t, _ in sends + recvs]
    if not ops:
        return Pending(team, what, [], buffers)
    with team.talking(what):
        return Pending(team, what, dist.batch_isend_irecv(ops), buffers)


def all_to_all_rows(team: Team, what: str, rows: torch.Tensor, send_splits: list[int],
                    recv_splits: list[int]) -> torch.Tensor:
    """``all_to_all_single`` along dim 0: the first ``send_splits[0]`` rows go to rank 0, and so on;
    the result holds ``recv_splits[r]`` rows from each rank ``r`` in rank order."""
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
    row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
    _STATS.record(what, row_bytes * (sum(send_splits) - send_splits[team.rank]),
                  row_bytes * (sum(recv_splits) - recv_splits[team.rank]))
    if team.size == 1:
        return rows
    with team.talking(what):
        dist.all_to_all_single(out, rows, recv_splits, send_splits, group=team.group)
    return out


def all_gather_ints(team: Team, what: str, values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (same length on all ranks), as a list indexed by rank."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    if team.size == 1:
        return [values]
    gathered = [torch.empty_like(mine) for _ in range(team.size)]
    _STATS.record(what, _nbytes(mine) * (team.size - 1), _nbytes(mine) * (team.size - 1))
    with team.talking(what):
        dist.all_gather(gathered, mine, group=team.group)
    return [g.tolist() for g in gathered]
