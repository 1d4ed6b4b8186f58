"""Building attnzoo's C++ CPU extensions (``core/csrc``) on first use.

Each extension is one source file (plus the shared headers of ``csrc``), compiled with
``torch.utils.cpp_extension`` into ``$ATTNZOO_CPP_CACHE`` (default ``~/.cache/attnzoo/cpp``), keyed by the
sources, torch's version and the CPU, and registered as torch ops. Where it cannot be built (no compiler,
a build error, or ``ATTNZOO_CPP=0``) :func:`available` is False and every caller keeps its eager path: an
extension is only ever a faster way to the same result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
#: a build lock older than this (seconds) was left by a killed build (a build takes ~20 s of CPU)
_STALE_LOCK_S = 600
#: source file name -> whether its build succeeded in this process
_built: dict[str, bool] = {}
#: compile/link flags of every extension besides -O3 and the CPU's own (part of the cache key). ``-fopenmp``:
#: each ``at::parallel_for`` runs on torch's OpenMP threads (the same libgomp, by soname); without it ATen's
#: inline ``parallel_for`` compiles to one sequential call, and MKL threads each small GEMM on its own instead
#: (at 2 threads the block kernel's forward ran 4x slower than at 1). Every body opens ``SequentialBlas``
#: (flash_common.h).
_OPENMP = ["-fopenmp"]


def _cpu_tag() -> str:
    """The CPU's feature flags (the build uses -march=native), so a shared cache never serves another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _wait_for_build(lock: Path, poll: float = 0.5) -> None:
    """Wait while another process holds this build's lock (torch's build lock); a lock older than
    ``_STALE_LOCK_S`` was left by a process killed mid-build and is removed. torch's own wait only ends when
    the lock goes away, so a process already waiting on a dead build's lock would wait forever."""
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll)


def _build(source: str) -> None:
    files = [_CSRC / source, *sorted(_CSRC.glob("*.h"))]
    text = b"".join(f.read_bytes() for f in files)
    key = hashlib.sha256(text + torch.__version__.encode() + _cpu_tag().encode() + " ".join(_OPENMP).encode()
                         ).hexdigest()[:16]
    build = Path(os.environ.get("ATTNZOO_CPP_CACHE", Path.home() / ".cache" / "attnzoo" / "cpp")) / key
    # compile a copy kept in the build folder: checkouts at other paths with the same sources (worktrees, a
    # reinstall) then share the build, where their own paths would rewrite its ninja file and rebuild each time
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (src / f.name).exists():  # written once (same key, same bytes): a rewrite would look newer to ninja
            tmp = src / f".{f.name}.{os.getpid()}.tmp"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, src / f.name)
    _wait_for_build(build / "lock")
    from torch.utils.cpp_extension import load

    load(name=f"attnzoo_{Path(source).stem}_{key}", sources=[str(src / source)], build_directory=str(build),
         is_python_module=False, extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", *_OPENMP],
         extra_ldflags=_OPENMP, extra_include_paths=[str(src)], verbose=False)


def built(source: str) -> bool | None:
    """Whether ``source``'s extension was built in this process (None: not tried yet; nothing is built here)."""
    return _built.get(source)


def available(source: str) -> bool:
    """Whether the extension of ``csrc/<source>`` is built (building it now, once per process, if needed)."""
    if source not in _built:
        ok = False
        if os.environ.get("ATTNZOO_CPP", "1") != "0":
            try:
                _build(source)
                ok = True
            except Exception as e:  # no compiler, no ninja, a build error: the eager paths serve
                log.warning("attnzoo: the CPU extension %s could not be built (%s); using eager paths", source,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
        _built[source] = ok
    return _built[source]


def prebuild() -> list[str]:
    """Build every extension of ``csrc`` now (each once per process; a cached build only loads): the sources
    that were built or loaded. A process that times its work in child processes (``attnzoo bench``) calls
    this first, so that no child pays a first build (~20 s of CPU each) inside a timed case's timeout."""
    return [src.name for src in sorted(_CSRC.glob("*.cpp")) if available(src.name)]
