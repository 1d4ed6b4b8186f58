"""Starting process groups: under ``torchrun`` (:func:`init_process_group`) or
in local worker processes (:func:`run_local`, for tests, benchmarks and demos).

The timeout given here is the process group's: every communication of the
parallel functions that waits longer than it (a rank died, or never reached
the call) raises :class:`ParallelError` on the ranks still alive.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import AttnZooError
from .comm import ParallelError


def default_backend() -> str:
    """``"nccl"`` when CUDA (and NCCL) is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_process_group(backend: str | None = None, *, timeout: float = 60.0, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with a short timeout (seconds) and clear errors.

    ``backend`` defaults to :func:`default_backend`; ``kwargs`` go through
    (``init_method``, ``rank``, ``world_size``, ...; under torchrun the
    environment supplies them). A rank that never joins makes the others
    raise :class:`ParallelError` after ``timeout`` seconds instead of waiting
    for torch's default of 10 to 30 minutes.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise AttnZooError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    backend = backend or default_backend()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParallelError(
            f"init_process_group: could not form the {backend} process group within {timeout} s: a rank did not "
            f"join (check that every rank was started with the same world size and address); backend error: {first}"
        ) from e


#: seconds the other ranks get to report once one rank has failed, before they are terminated
_FAILURE_GRACE_S = 5.0


def _worker(rank: int, world_size: int, store_path: str, backend: str, timeout: float, fn: Callable,
            args: tuple, results) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the workers share this machine's cores
        init_process_group(backend, timeout=timeout, init_method=f"file://{store_path}", rank=rank,
                           world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException as e:  # report every failure to the parent, which re-raises it
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """Worker processes fork from a clean server process that has imported torch once
    (``forkserver``): starting P workers then costs a fork each, not P imports of torch."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "attnzoo.parallel", "attnzoo.catalog"])
    return ctx


def run_local(fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout: float = 30.0,
              wall_timeout: float = 300.0, missing_ok: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one process group.

    ``fn`` must be importable (a module-level function) and its return value
    picklable. Returns the values by rank. A rank that raises makes this raise
    :class:`ParallelError` with its traceback; a rank that exits without a
    value does too, unless ``missing_ok`` (fault-injection tests), when its
    value is None. ``timeout`` is the process group's; ``wall_timeout`` bounds
    the whole run, after which the workers are terminated. Once a rank has
    failed, the rest get a few seconds to report, then are terminated: the
    error comes at once, not after the slowest rank's timeout.
    """
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store, backend, timeout, fn, args, results),
                             daemon=True) for r in range(world_size)]
        for proc in procs:
            proc.start()
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + wall_timeout
        while len(got) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.2)
                got[rank] = (ok, value)
                if not ok:  # a rank failed: the others' reports get a short grace, not the wall timeout
                    deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = {r: v for r, (ok, v) in got.items() if not ok}
    if failed:  # the cause first: a rank's own error before the ParallelErrors it set off on the others
        rank, tb = min(failed.items(), key=lambda item: (item[1].startswith("ParallelError"), item[0]))
        raise ParallelError(f"run_local: rank {rank} of {world_size} raised:\n{tb}")
    missing = [r for r in range(world_size) if r not in got]
    if missing and not missing_ok:
        codes = {r: procs[r].exitcode for r in missing}
        raise ParallelError(f"run_local: rank(s) {missing} returned no result (exit codes {codes}) "
                            f"within {wall_timeout} s")
    return [got[r][1] if r in got else None for r in range(world_size)]
