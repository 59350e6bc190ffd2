"""A first-come, first-served lock for the writer threads of one process."""

from __future__ import annotations

import threading
from collections import deque


class FairLock:
    """A mutex that hands itself to waiting threads in arrival order.

    ``threading.Lock`` makes no promise of order: under a hundred writer threads the one
    that happens to be scheduled when the lock is released wins, and an unlucky thread can
    wait far longer than its share. Here ``release`` passes ownership straight to the
    longest-waiting thread, so a thread waits for at most the writers queued before it.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()
        self._held = False

    def acquire(self, timeout: float = -1) -> bool:
        """Take the lock, waiting behind earlier arrivals for up to ``timeout`` seconds.

        Args:
            timeout: Seconds to wait; a negative value waits without limit.

        Returns:
            True when the lock is held, False when the wait timed out.
        """
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=timeout if timeout >= 0 else -1):
            return True  # release() handed the lock over
        with self._mutex:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                # release() handed the lock over between the timeout and this check: keep it.
                return True
            return False

    def release(self) -> None:
        """Release the lock, handing it to the longest-waiting thread if there is one.

        Raises:
            RuntimeError: The lock is not held.
        """
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            if self._waiters:
                self._waiters.popleft().release()  # ownership passes; _held stays True
            else:
                self._held = False

    def locked(self) -> bool:
        """Whether some thread holds the lock."""
        with self._mutex:
            return self._held
