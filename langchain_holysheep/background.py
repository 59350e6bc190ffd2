"""Running summaries written off the critical path, in worker threads or asyncio tasks.

A :class:`~langchain_holysheep.memory.ContextWindow` with ``background_summary=True`` starts
folding what its next compaction will drop before the compaction is due; this module runs those
jobs, keeps their results, and with a shared store holds the session's summarization lease and
writes results back with compare-and-swap.

Results are content-addressed: a job is filed under the summary it extends, the position it
starts at and the message there, and is used only if the messages it read are still the ones
at those positions. A result whose summary is no longer the conversation's (a newer summary
exists) is never found again and is discarded.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import hashlib
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from langchain_core.messages import BaseMessage

from langchain_holysheep.summarize import SummaryError

if TYPE_CHECKING:
    from langchain_holysheep.stores.base import MessageStore, SessionRecord
    from langchain_holysheep.window import ConversationIndex

__all__ = [
    "DEFAULT_LEASE_TTL",
    "BackgroundSummaries",
    "SummaryChain",
    "SummaryJob",
    "SummaryLeaseHeldError",
    "anchor_key",
    "messages_digest",
]

logger = logging.getLogger(__name__)

DEFAULT_LEASE_TTL: Final = 120.0
"""Seconds a summarization lease lasts when the window's ``summary_timeout`` does not say."""

EXIT_GRACE = 10.0
"""Seconds the interpreter-exit hook waits, in all, for running summaries before abandoning
them (their daemon threads stop with the interpreter; a store lease they held expires)."""

_THREAD_PREFIX: Final = "holysheep-background-summary"

Fold = Callable[[Any], "str | SummaryError"]
"""Runs the summarizer on a fold request (``ContextWindow._fold``)."""
AFold = Callable[[Any], Awaitable["str | SummaryError"]]
"""Async twin of :data:`Fold` (``ContextWindow._afold``)."""
Bound = Callable[[str, int, int], tuple[str, int, int]]
"""``(text, allowance, through) -> (text, recap_tokens, through)``: fits a summary."""


class SummaryLeaseHeldError(RuntimeError):
    """Another worker holds the session's summarization lease; this job did not run."""


def _message_key(message: BaseMessage) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(message.type.encode())
    digest.update(b"\0")
    digest.update((message.id or "").encode("utf-8", "surrogatepass"))
    digest.update(b"\0")
    digest.update(repr(message.content).encode("utf-8", "surrogatepass"))
    return digest.digest()


def anchor_key(previous: str | None, start: int, first: BaseMessage) -> tuple[bytes, int, bytes]:
    """Return the key a job is filed under: the summary it extends and where it starts.

    Args:
        previous: The summary the job folds into (``None`` before the first summary).
        start: Position of the first message the job reads.
        first: The message at ``start``.
    """
    summary = b"\1" if previous is None else b"\0" + previous.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(summary, digest_size=16).digest(), start, _message_key(first)


def messages_digest(messages: Sequence[BaseMessage]) -> bytes:
    """Return a digest of messages (ids and contents), to check a result still applies."""
    digest = hashlib.blake2b(digest_size=16)
    for message in messages:
        digest.update(_message_key(message))
    return digest.digest()


@dataclass(eq=False)
class SummaryJob:
    """One background summary: fold messages ``[start, through)`` into ``previous``.

    Attributes:
        key: Where the job is filed (see :func:`anchor_key`).
        previous: The summary the job extends.
        start: First position it reads.
        through: The result covers messages ``[0, through)``.
        positions: The sendable positions it reads (dropped messages are skipped).
        digest: :func:`messages_digest` of the messages at ``positions``.
        request: What the summarizer is asked (a ``FoldRequest``); released once the job ran.
        allowance: The most the recap message carrying the result may count.
        store: With ``session_id``: the shared store whose lease the job holds while it runs
            and where the result is written back (compare-and-swap).
        session_id: The session in ``store``.
        future: ``(text, recap_tokens)``, or the error that stopped the job.
    """

    key: tuple[bytes, int, bytes]
    previous: str | None
    start: int
    through: int
    positions: tuple[int, ...]
    digest: bytes
    request: Any
    allowance: int
    store: MessageStore | None = None
    session_id: str | None = None
    future: concurrent.futures.Future[tuple[str, int]] = field(
        default_factory=concurrent.futures.Future
    )
    begun: bool = False
    _checked: weakref.ref[ConversationIndex] | None = field(default=None, repr=False)

    def begin(self) -> bool:
        """Mark the job running, or settle it as cancelled; called once, by its runner."""
        self.begun = True
        return self.future.set_running_or_notify_cancel()

    def matches(self, index: ConversationIndex) -> bool:
        """Return whether the messages this job read are still at their positions."""
        if self.through > index.end or self.start < index.offset:
            return False
        if self._checked is not None and self._checked() is index:
            return True  # an index is append-only: what matched once still matches
        if messages_digest([index.message(p) for p in self.positions]) != self.digest:
            return False
        self._checked = weakref.ref(index)
        return True

    @property
    def result(self) -> tuple[str, int] | None:
        """``(text, recap_tokens)`` if the job succeeded, else ``None``."""
        future = self.future
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()
        return None


@dataclass(frozen=True)
class SummaryChain:
    """What the background jobs offer a conversation in a given state.

    Attributes:
        text: The newest ready summary extending the state's, or ``None``.
        recap_tokens: Its recap message's token count.
        through: It covers messages ``[0, through)``.
        running: A job extending ``text`` (or the state's summary) that is still running.
        failure: Why the job extending it last stopped, if it failed (it was discarded so that
            the next turn retries).
    """

    text: str | None = None
    recap_tokens: int = 0
    through: int = 0
    running: SummaryJob | None = None
    failure: BaseException | None = None

    @property
    def empty(self) -> bool:
        """Whether no job, ready or running, extends the state."""
        return self.text is None and self.running is None


_LIVE: weakref.WeakSet[BackgroundSummaries] = weakref.WeakSet()
_EXIT_HOOK = threading.Lock()
_exit_registered = False


def _close_all_at_exit() -> None:
    """Interpreter exit: cancel queued jobs and give running ones a short grace period."""
    deadline = _now() + EXIT_GRACE
    for summaries in list(_LIVE):
        try:
            summaries.close(timeout=max(0.0, deadline - _now()))
        except Exception:  # pragma: no cover - best effort at exit
            logger.debug("closing background summaries at exit failed", exc_info=True)


def _register_exit_hook() -> None:
    global _exit_registered
    with _EXIT_HOOK:
        if not _exit_registered:
            atexit.register(_close_all_at_exit)
            _exit_registered = True


class BackgroundSummaries:
    """The background summary jobs of one ContextWindow: started, found, awaited, closed.

    Sync callers run jobs in daemon threads (at most ``max_workers`` at once; the rest wait
    their turn); async callers run them as tasks of the running event loop. Each job, with a
    store, first takes the session's lease (a job that cannot is skipped: another worker is
    summarizing) and, when its result extends the stored summary and covers only messages the
    window already let go of, writes it back with compare-and-swap. Errors are logged; the job
    is dropped so the next turn retries.
    """

    def __init__(
        self,
        fold: Fold,
        afold: AFold,
        bound: Bound,
        *,
        max_workers: int = 4,
        max_jobs: int = 4096,
        lease_ttl: float = DEFAULT_LEASE_TTL,
    ) -> None:
        """Create an empty set of jobs.

        Args:
            fold: Runs the summarizer (sync).
            afold: Runs the summarizer (async).
            bound: Fits a summary text to its recap allowance.
            max_workers: Threads summarizing at once.
            max_jobs: Jobs remembered (least recently used are forgotten first).
            lease_ttl: Seconds a store lease lasts (the longest a summary may take).
        """
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be positive, got {lease_ttl}")
        self._fold = fold
        self._afold = afold
        self._bound = bound
        self.max_workers = max_workers
        self.max_jobs = max_jobs
        self.lease_ttl = lease_ttl
        self.owner = f"holysheep:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        """This window's name as a lease holder."""
        self._jobs: OrderedDict[tuple[bytes, int, bytes], SummaryJob] = OrderedDict()
        self._cond = threading.Condition()
        self._running = 0
        self._threads: set[threading.Thread] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._names = itertools.count(1)
        self.closed = False
        self.started = 0
        """Jobs started (for tests and benchmarks)."""
        self.written_back = 0
        """Results written to a store by the background job itself."""
        self.waits = 0
        """Turns that waited for a job because the budget left no other choice."""
        self.waited_seconds = 0.0
        """Their total wait."""
        _LIVE.add(self)
        _register_exit_hook()

    # -- finding ---------------------------------------------------------------------------------

    def chain(self, index: ConversationIndex, summary: str | None, start: int) -> SummaryChain:
        """Follow the jobs that extend ``summary`` (covering ``[0, start)``) in ``index``.

        Ready results are chained (each extends the one before); the walk stops at a running
        job, a failed one (discarded, so it is retried) or a missing one.
        """
        text: str | None = None
        tokens = 0
        through = start
        previous = summary
        failure: BaseException | None = None
        running: SummaryJob | None = None
        with self._cond:
            while through < index.end:
                key = anchor_key(previous, through, index.message(through))
                job = self._jobs.get(key)
                if job is None or not job.matches(index):
                    break
                self._jobs.move_to_end(key)
                if not job.future.done():
                    running = job
                    break
                result = job.result
                if result is None:
                    failure = (
                        job.future.exception()
                        if not job.future.cancelled()
                        else SummaryError("the background summary was cancelled")
                    )
                    del self._jobs[key]
                    break
                text, tokens = result
                previous, through = text, job.through
        return SummaryChain(text, tokens, through, running, failure)

    def register(self, job: SummaryJob) -> bool:
        """File a new job (replacing a stale one under its key); ``False`` once closed."""
        with self._cond:
            if self.closed:
                return False
            self._jobs[job.key] = job
            self._jobs.move_to_end(job.key)
            while len(self._jobs) > self.max_jobs:
                _, old = self._jobs.popitem(last=False)
                old.future.cancel()
            return True

    # -- running ---------------------------------------------------------------------------------

    def start_thread(self, job: SummaryJob) -> None:
        """Run ``job`` in a daemon thread (it waits while ``max_workers`` others run)."""
        # The job runs in a copy of the caller's context, so callbacks registered through
        # context variables (get_usage_callback, tracing) see the summarizer's calls.
        thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._thread_main, job),
            name=f"{_THREAD_PREFIX}-{next(self._names)}",
            daemon=True,
        )
        with self._cond:
            if self.closed:
                _cancel(job)
                return
            self.started += 1
            self._threads.add(thread)
        thread.start()

    def start_task(self, job: SummaryJob) -> None:
        """Run ``job`` as a task of the running event loop."""
        with self._cond:
            if self.closed:
                _cancel(job)
                return
            self.started += 1
        task = asyncio.get_running_loop().create_task(
            self._task_main(job), name=f"{_THREAD_PREFIX}-{next(self._names)}"
        )
        with self._cond:
            self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            with self._cond:
                self._tasks.discard(task)
            if not job.begun:
                _cancel(job)  # cancelled before its first step: nobody else will settle it

        task.add_done_callback(done)

    def _thread_main(self, job: SummaryJob) -> None:
        try:
            with self._cond:
                while self._running >= self.max_workers and not self.closed:
                    self._cond.wait()
                if self.closed:
                    _cancel(job)
                    return
                self._running += 1
            try:
                if job.begin():
                    self._run(job)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify()
        finally:
            with self._cond:
                self._threads.discard(threading.current_thread())

    def _run(self, job: SummaryJob) -> None:
        store, session_id = job.store, job.session_id
        leased = False
        result: tuple[str, int] | None = None
        error: Exception | None = None
        try:
            if store is not None and session_id is not None:
                leased = store.acquire_lease(session_id, self.owner, self.lease_ttl)
                if not leased:
                    raise SummaryLeaseHeldError(_lease_held(session_id))
            outcome = self._fold(job.request)
            if isinstance(outcome, BaseException):
                raise outcome
            text, tokens, _ = self._bound(outcome, job.allowance, job.through)
            if store is not None and session_id is not None:
                self._write_back(store, session_id, job, text, tokens)
            result = (text, tokens)
        except Exception as exc:
            error = exc
        finally:
            job.request = None
            if leased and store is not None and session_id is not None:
                try:
                    store.release_lease(session_id, self.owner)
                except Exception as exc:  # the lease expires on its own
                    logger.warning("releasing the summary lease of %r failed: %s", session_id, exc)
            # Settled last: whoever waits for the job sees the lease released.
            _settle(job, result, error)

    async def _task_main(self, job: SummaryJob) -> None:
        if not job.begin():
            return
        store, session_id = job.store, job.session_id
        leased = False
        result: tuple[str, int] | None = None
        error: BaseException | None = None
        try:
            if store is not None and session_id is not None:
                leased = await store.aacquire_lease(session_id, self.owner, self.lease_ttl)
                if not leased:
                    raise SummaryLeaseHeldError(_lease_held(session_id))
            outcome = await self._afold(job.request)
            if isinstance(outcome, BaseException):
                raise outcome
            text, tokens, _ = self._bound(outcome, job.allowance, job.through)
            if store is not None and session_id is not None:
                await self._awrite_back(store, session_id, job, text, tokens)
            result = (text, tokens)
        except asyncio.CancelledError:
            error = SummaryError("the background summary was cancelled")
            raise
        except Exception as exc:
            error = exc
        finally:
            job.request = None
            if leased and store is not None and session_id is not None:
                try:
                    await store.arelease_lease(session_id, self.owner)
                except BaseException as exc:  # the lease expires on its own
                    logger.warning("releasing the summary lease of %r failed: %s", session_id, exc)
            _settle(job, result, error)

    # -- writing back ----------------------------------------------------------------------------

    def _write_back(
        self, store: MessageStore, session_id: str, job: SummaryJob, text: str, tokens: int
    ) -> bool:
        for _ in range(3):
            record = store.get_session(session_id)
            if not _writable(record, job):
                return False
            try:
                if store.update_session(
                    session_id,
                    expected_version=record.version,
                    summary=text,
                    summary_tokens=tokens,
                    summarized_through=job.through,
                ):
                    self._wrote(session_id, job)
                    return True
            except ValueError:  # the session was cleared under us
                return False
        return False

    async def _awrite_back(
        self, store: MessageStore, session_id: str, job: SummaryJob, text: str, tokens: int
    ) -> bool:
        for _ in range(3):
            record = await store.aget_session(session_id)
            if not _writable(record, job):
                return False
            try:
                if await store.aupdate_session(
                    session_id,
                    expected_version=record.version,
                    summary=text,
                    summary_tokens=tokens,
                    summarized_through=job.through,
                ):
                    self._wrote(session_id, job)
                    return True
            except ValueError:
                return False
        return False

    def _wrote(self, session_id: str, job: SummaryJob) -> None:
        with self._cond:
            self.written_back += 1
        logger.debug(
            "session %r: background summary of messages [%d, %d) written",
            session_id,
            job.start,
            job.through,
        )

    # -- waiting ---------------------------------------------------------------------------------

    def wait(self, job: SummaryJob, timeout: float | None) -> bool:
        """Block until ``job`` is done or ``timeout`` seconds pass; return whether it is done.

        A turn calls this only when the budget cannot hold the messages the job folds.
        """
        begin = time.monotonic()
        done, _ = concurrent.futures.wait([job.future], timeout=timeout)
        self._waited(begin)
        return bool(done)

    async def await_job(self, job: SummaryJob, timeout: float | None) -> bool:
        """Async :meth:`wait`: the event loop keeps running meanwhile."""
        begin = time.monotonic()
        if not job.future.done():
            # The wrapper is never cancelled here, so the job is not cancelled with it.
            await asyncio.wait([asyncio.wrap_future(job.future)], timeout=timeout)
        self._waited(begin)
        return job.future.done()

    def _waited(self, begin: float) -> None:
        with self._cond:
            self.waits += 1
            self.waited_seconds += time.monotonic() - begin

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job filed so far is done; return whether all are.

        For tests and benchmarks that need a deterministic point where background work ended.
        """
        with self._cond:
            futures = [job.future for job in self._jobs.values()]
        _, pending = concurrent.futures.wait(futures, timeout=timeout)
        return not pending

    # -- shutdown --------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Threads and tasks not finished yet."""
        with self._cond:
            return len(self._threads) + len(self._tasks)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs, cancel the ones not started, and wait for running ones.

        Threads cannot be interrupted mid-call: a running summary finishes (and is written
        back) within ``timeout`` seconds, or is abandoned (its result is never used). Tasks are
        cancelled.

        Args:
            timeout: Most seconds to wait for running threads; ``None`` waits until they end.
        """
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            threads = list(self._threads)
            tasks = list(self._tasks)
        for task in tasks:
            _cancel_task(task)
        deadline = None if timeout is None else _now() + timeout
        for thread in threads:
            if thread is threading.current_thread():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - _now()))

    async def aclose(self, timeout: float | None = None) -> None:
        """Async :meth:`close`: cancels this loop's tasks and awaits them, joins threads."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            tasks = list(self._tasks)
        loop = asyncio.get_running_loop()
        mine = [t for t in tasks if t.get_loop() is loop]
        for task in tasks:
            _cancel_task(task)
        if mine:
            await asyncio.wait(mine, timeout=timeout)
        await asyncio.to_thread(self.close, timeout)


def _now() -> float:
    return time.monotonic()


def _settle(job: SummaryJob, result: tuple[str, int] | None, error: BaseException | None) -> None:
    if result is not None:
        job.future.set_result(result)
        return
    if error is None:  # pragma: no cover - a BaseException other than cancellation escaped
        error = SummaryError("the background summary stopped")
    if not isinstance(error, SummaryError) or "cancelled" not in str(error):
        _log_failure(job, error)
    job.future.set_exception(error)


def _cancel(job: SummaryJob) -> None:
    """Settle a job that will not run (only its starter calls this, exactly once)."""
    job.future.cancel()
    job.begin()


def _cancel_task(task: asyncio.Task[None]) -> None:
    loop = task.get_loop()
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        task.cancel()
    else:
        loop.call_soon_threadsafe(task.cancel)


def _writable(record: SessionRecord, job: SummaryJob) -> bool:
    """Whether a finished job may be written over ``record`` (compare-and-swap guards the rest).

    The stored summary must still be the one the job extends (else a newer summary exists and
    the result is discarded), and the window must already have let go of every message the
    job folded (else writing it would move the window start and break the cached prefix; the
    result is then used by the compaction that needs it).
    """
    return (
        record.summary == job.previous
        and record.summarized_through == job.start
        and record.window_start >= job.through
        and record.message_count >= job.through
    )


def _lease_held(session_id: str) -> str:
    return (
        f"another worker holds the summarization lease of session {session_id!r}; this "
        "summary was skipped and is retried on a later turn"
    )


def _log_failure(job: SummaryJob, exc: BaseException) -> None:
    if isinstance(exc, SummaryLeaseHeldError):
        logger.debug("%s", exc)
        return
    logger.warning(
        "background summary of messages [%d, %d) failed (%s: %s); they stay pending, are "
        "sent verbatim while the budget allows, and are summarized on a later turn",
        job.start,
        job.through,
        type(exc).__name__,
        exc,
    )
