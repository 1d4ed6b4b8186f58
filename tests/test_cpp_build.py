"""The C++ extensions' build lock: a build killed mid-way must not make later (or already waiting) builds hang."""

import os
import threading
import time

from attnzoo.core import cpp


def test_an_old_lock_is_removed_at_once(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 2 * cpp._STALE_LOCK_S
    os.utime(lock, (old, old))
    cpp._wait_for_build(lock, poll=0.01)
    assert not lock.exists()


def test_a_live_build_is_waited_for_and_its_lock_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.2, lock.unlink).start()  # the other process's build ends
    t0 = time.perf_counter()
    cpp._wait_for_build(lock, poll=0.01)
    assert time.perf_counter() - t0 >= 0.15


def test_a_waiting_process_stops_waiting_when_the_lock_goes_stale(tmp_path, monkeypatch):
    """The defect: a process that started waiting on a dead build's fresh lock waited forever."""
    monkeypatch.setattr(cpp, "_STALE_LOCK_S", 0.3)
    lock = tmp_path / "lock"
    lock.touch()
    done = threading.Event()
    threading.Thread(target=lambda: (cpp._wait_for_build(lock, poll=0.01), done.set()), daemon=True).start()
    assert done.wait(5.0), "still waiting on a lock nobody will remove"
    assert not lock.exists()


def test_no_lock_no_wait(tmp_path):
    cpp._wait_for_build(tmp_path / "lock", poll=10.0)
