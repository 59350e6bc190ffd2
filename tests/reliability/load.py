"""Concurrent conversations against the loopback relay and a durable store, then a full audit.

Used by ``tests/reliability/test_load.py`` (small sizes in ``make test``, full sizes under
``HOLYSHEEP_SOAK=1``) and by ``benchmarks/soak.py``, which prints the figures.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.stores import MessageStore
from tests.reliability.support import (
    StoreSpec,
    TurnResult,
    async_turn,
    make_model,
    make_window,
    open_store,
    percentile,
    prompt_problems,
    record_problems,
    sync_turn,
    tag_of,
    transcript_problems,
)


@dataclass
class LoadReport:
    """What a load run measured and found.

    Attributes:
        mode: ``"threads"``, ``"asyncio"`` or ``"processes"``.
        store: ``"sqlite"`` or ``"postgres"``.
        sessions: Concurrent sessions.
        turns: Turns per session.
        wall: Seconds for the whole run.
        overheads: Seconds in the memory layer per turn (history read + append).
        quiet_overheads: The same for turns where the window did not compact.
        compactions: Turns on which the window compacted (and the summarizer ran).
        problems: Lost, duplicated or reordered messages, invalid or oversize prompts.
        errors: Exceptions raised by turns (a healthy run has none).
        max_rss_mb: Peak resident memory of the process, in MB.
    """

    mode: str
    store: str
    sessions: int
    turns: int
    wall: float = 0.0
    overheads: list[float] = field(default_factory=list)
    quiet_overheads: list[float] = field(default_factory=list)
    compactions: int = 0
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    max_rss_mb: float = 0.0

    def add(self, result: TurnResult, compacted: bool) -> None:
        self.overheads.append(result.overhead)
        if compacted:
            self.compactions += 1
        else:
            self.quiet_overheads.append(result.overhead)
        self.problems.extend(prompt_problems(result))

    def merge(self, other: LoadReport) -> None:
        self.overheads.extend(other.overheads)
        self.quiet_overheads.extend(other.quiet_overheads)
        self.compactions += other.compactions
        self.problems.extend(other.problems)
        self.errors.extend(other.errors)
        self.max_rss_mb = max(self.max_rss_mb, other.max_rss_mb)

    def summary(self) -> dict[str, Any]:
        """The figures, in milliseconds where timed."""
        total = self.sessions * self.turns
        return {
            "mode": self.mode,
            "store": self.store,
            "sessions": self.sessions,
            "turns_per_session": self.turns,
            "turns": total,
            "wall_s": round(self.wall, 2),
            "turns_per_s": round(total / self.wall, 1) if self.wall else None,
            "overhead_p50_ms": round(1000 * percentile(self.overheads, 0.50), 2),
            "overhead_p99_ms": round(1000 * percentile(self.overheads, 0.99), 2),
            "quiet_p50_ms": round(1000 * percentile(self.quiet_overheads, 0.50), 2),
            "quiet_p99_ms": round(1000 * percentile(self.quiet_overheads, 0.99), 2),
            "compactions": self.compactions,
            "problems": len(self.problems),
            "errors": len(self.errors),
            "max_rss_mb": round(self.max_rss_mb, 1),
        }


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compacted(history: ManagedChatMessageHistory) -> bool:
    plan = history.last_plan
    return bool(plan is not None and plan.compacted)


def session_name(prefix: str, index: int) -> str:
    """The id of session ``index`` of a run."""
    return f"{prefix}{index:04d}"


@dataclass(frozen=True)
class Relay:
    """Where the chat model and the summarizer are served."""

    base_url: str
    api_key: str


def _pool_options(spec: StoreSpec) -> dict[str, Any]:
    """The PostgreSQL store's pool options for many concurrent sessions (none for SQLite)."""
    return {"max_size": 20} if spec.kind == "postgres" else {}


def _window(relay: Relay, max_tokens: int) -> ContextWindow:
    return make_window(
        make_model(relay.base_url, relay.api_key, max_retries=5), max_tokens=max_tokens
    )


def run_threads(
    spec: StoreSpec,
    relay: Relay,
    *,
    sessions: int,
    turns: int,
    prefix: str = "t",
    max_tokens: int = 1200,
) -> LoadReport:
    """Run ``sessions`` conversations of ``turns`` turns, one thread each, then audit them."""
    report = LoadReport("threads", spec.kind, sessions, turns)
    store = open_store(spec, **_pool_options(spec))
    window = _window(relay, max_tokens)
    model = make_model(relay.base_url, relay.api_key, max_retries=5, timeout=60)
    lock = threading.Lock()
    barrier = threading.Barrier(sessions)

    def conversation(i: int) -> None:
        name = session_name(prefix, i)
        history = ManagedChatMessageHistory(name, store, window, reserved_tokens=40)
        local = LoadReport("threads", spec.kind, 1, turns)
        barrier.wait()
        try:
            for turn in range(turns):
                result = sync_turn(history, model, name, turn)
                local.add(result, _compacted(history))
        except Exception:
            local.errors.append(f"{name}: {traceback.format_exc(limit=4)}")
        with lock:
            report.merge(local)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        list(pool.map(conversation, range(sessions)))
    report.wall = time.perf_counter() - start
    report.problems.extend(audit(store, [session_name(prefix, i) for i in range(sessions)], turns))
    report.max_rss_mb = max_rss_mb()
    store.close()
    return report


async def run_asyncio(
    spec: StoreSpec,
    relay: Relay,
    *,
    sessions: int,
    turns: int,
    prefix: str = "a",
    max_tokens: int = 1200,
) -> LoadReport:
    """Run ``sessions`` conversations as asyncio tasks on one loop, then audit them."""
    report = LoadReport("asyncio", spec.kind, sessions, turns)
    store = open_store(spec, **_pool_options(spec))
    window = _window(relay, max_tokens)
    model = make_model(relay.base_url, relay.api_key, max_retries=5, timeout=60)

    async def conversation(i: int) -> None:
        name = session_name(prefix, i)
        history = ManagedChatMessageHistory(name, store, window, reserved_tokens=40)
        try:
            for turn in range(turns):
                result = await async_turn(history, model, name, turn)
                report.add(result, _compacted(history))
        except Exception:
            report.errors.append(f"{name}: {traceback.format_exc(limit=4)}")

    start = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(sessions)))
    report.wall = time.perf_counter() - start
    names = [session_name(prefix, i) for i in range(sessions)]
    report.problems.extend(await asyncio.to_thread(audit, store, names, turns))
    report.max_rss_mb = max_rss_mb()
    await store.aclose()
    return report


def audit(store: MessageStore, sessions: Sequence[str], turns: int) -> list[str]:
    """Read back every transcript: no message lost, duplicated or reordered."""
    problems: list[str] = []
    for name in sessions:
        problems.extend(transcript_problems(store, name, turns))
    return problems


def shared_problems(
    store: MessageStore, session: str, writers: Sequence[str], turns: int
) -> list[str]:
    """Audit a session many writers appended to: whole pairs, each writer's order, no gaps."""
    stored = store.read(session)
    problems: list[str] = []
    if [m.seq for m in stored] != list(range(len(stored))):
        problems.append(f"{session}: sequence numbers have gaps or duplicates")
    if len(stored) != 2 * turns * len(writers):
        problems.append(f"{session}: {len(stored)} messages, expected {2 * turns * len(writers)}")
    seen: dict[str, list[int]] = {w: [] for w in writers}
    for k in range(0, len(stored) - 1, 2):
        q, a = tag_of(str(stored[k].message.content)), tag_of(str(stored[k + 1].message.content))
        if q is None or q != a or stored[k].message.type != "human":
            problems.append(f"{session}: messages {k}, {k + 1} are not one question and its answer")
            break
        seen.setdefault(q[0], []).append(q[1])
    for writer, order in seen.items():
        if order != list(range(turns)):
            problems.append(f"{session}: writer {writer} turns stored as {order[:12]}...")
    problems.extend(record_problems(store.get_session(session)))
    return problems


def process_worker(
    spec: StoreSpec,
    relay: Relay,
    index: int,
    sessions: int,
    turns: int,
    shared: Sequence[str],
    start: Any,
    results: Any,
) -> None:
    """One OS process: its own sessions plus turns on ``shared`` sessions, all in threads.

    Puts a :class:`LoadReport` summary (and its problems and errors) on ``results``.
    """
    store = open_store(spec, **_pool_options(spec))
    window = _window(relay, 1200)
    model = make_model(relay.base_url, relay.api_key, max_retries=5, timeout=60)
    report = LoadReport("processes", spec.kind, sessions, turns)
    lock = threading.Lock()

    def conversation(name: str, tag: str) -> None:
        history = ManagedChatMessageHistory(name, store, window, reserved_tokens=40)
        local = LoadReport("processes", spec.kind, 1, turns)
        try:
            for turn in range(turns):
                result = sync_turn(history, model, tag, turn)
                # Another writer's pair may land between this one's read and append: the
                # prompt is still valid, but the plan's limit check only applies to our own.
                local.add(result, _compacted(history))
        except Exception:
            local.errors.append(f"{name}: {traceback.format_exc(limit=4)}")
        with lock:
            report.merge(local)

    jobs = [(session_name(f"p{index}-", i), session_name(f"p{index}-", i)) for i in range(sessions)]
    jobs += [(name, f"{name}/p{index}") for name in shared]
    store.get_session("warm-up")  # connect (and set up) before the race starts
    start.wait()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(lambda job: conversation(*job), jobs))
    report.wall = time.perf_counter() - t0
    report.problems.extend(audit(store, [name for name, _ in jobs[:sessions]], turns))
    report.max_rss_mb = max_rss_mb()
    store.close()
    results.put(report)
