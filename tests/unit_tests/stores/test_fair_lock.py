"""FairLock hands itself over in arrival order and honours timeouts."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from langchain_holysheep.stores import _fair_lock
from langchain_holysheep.stores._fair_lock import FairLock


def _wait_for_waiters(lock: FairLock, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(lock._waiters) < count:
        assert time.monotonic() < deadline, "waiters never queued"
        time.sleep(0.001)


def test_waiters_get_the_lock_in_arrival_order() -> None:
    lock = FairLock()
    assert lock.acquire()
    order: list[int] = []

    def worker(i: int) -> None:
        assert lock.acquire(timeout=5)
        order.append(i)
        lock.release()

    threads = []
    for i in range(20):
        thread = threading.Thread(target=worker, args=(i,))
        thread.start()
        threads.append(thread)
        _wait_for_waiters(lock, i + 1)  # thread i is queued before thread i + 1 starts
    lock.release()
    for thread in threads:
        thread.join()
    assert order == list(range(20))
    assert not lock.locked()


def test_a_timed_out_waiter_leaves_the_queue_and_the_next_one_is_served() -> None:
    lock = FairLock()
    assert lock.acquire()
    assert lock.acquire(timeout=0.01) is False
    assert len(lock._waiters) == 0
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(lock.acquire(timeout=5)))
    thread.start()
    _wait_for_waiters(lock, 1)
    lock.release()
    thread.join()
    assert got == [True]
    assert lock.locked()  # handed over, never free in between
    lock.release()
    assert not lock.locked()
    assert lock.acquire(timeout=0)


def test_a_handoff_that_races_the_timeout_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """release() may hand the lock to a waiter whose wait has just timed out; that waiter
    must then own the lock, or nobody would and every later writer would time out."""
    lock = FairLock()
    real_lock = threading.Lock

    class RacingWaiter:
        """A waiter whose timed wait expires at the moment the holder releases."""

        def __init__(self) -> None:
            self._inner = real_lock()

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            if timeout == 0.05:
                lock.release()  # the holder lets go: ownership is handed to this waiter
                return False  # ...but the wait reports its timeout
            return self._inner.acquire(blocking, timeout)

        def release(self) -> None:
            self._inner.release()

    assert lock.acquire()
    monkeypatch.setattr(_fair_lock, "threading", SimpleNamespace(Lock=RacingWaiter))
    assert lock.acquire(timeout=0.05) is True
    monkeypatch.undo()
    assert lock.locked()
    assert len(lock._waiters) == 0
    assert lock.acquire(timeout=0.01) is False  # still held by the racing waiter
    lock.release()
    assert not lock.locked()


def test_release_of_an_unheld_lock_raises() -> None:
    with pytest.raises(RuntimeError, match="unheld"):
        FairLock().release()
