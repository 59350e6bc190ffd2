"""Durable chat histories side by side: appends/s and context reads/s at 1, 8 and 32 sessions.

Compared in one run, on the same workload and the same database files/server:

* ``holysheep``: ManagedChatMessageHistory over SQLiteMessageStore (WAL, synchronous=NORMAL,
  the default) / PostgresMessageStore; a read is the managed context (what the ContextWindow
  sends), planned from the session record and the window's messages only.
* ``holysheep-full``: the same on SQLite with synchronous=FULL (an fsync per commit, the
  durability SQLAlchemy's default SQLite journal gives the baseline).
* ``lc-community``: langchain-community's SQLChatMessageHistory (SQLAlchemy), on the same
  SQLite file and on the same PostgreSQL server; a read is the whole history.
* ``lc-postgres``: langchain-postgres's PostgresChatMessageHistory (one psycopg connection per
  session thread); a read is the whole history.

Each session is driven by its own thread. Every session is first loaded with ``--preload``
messages; an append adds one turn (a human and an AI message, one call); a read builds a
fresh history object (as RunnableWithMessageHistory does each turn) and reads ``messages``.
A holysheep append also counts the messages' tokens (once, stored with them); the baselines
store no counts. PostgreSQL is a throwaway server started from the local binaries, fsync on
unless ``--no-fsync``. Figures are medians of ``--repeat`` rounds in which the systems take
turns, so a disturbance on a shared machine hits all of them alike.

    .venv/bin/python benchmarks/bench_stores.py [--sessions 1 8 32] [--preload 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore")

from langchain_core.chat_history import BaseChatMessageHistory  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage  # noqa: E402

from langchain_holysheep.history import ManagedChatMessageHistory  # noqa: E402
from langchain_holysheep.memory import ContextWindow  # noqa: E402
from langchain_holysheep.stores import MessageStore, SQLiteMessageStore  # noqa: E402
from tests.postgres_server import throwaway_postgres, unavailable_reason  # noqa: E402


def turn(i: int) -> list[BaseMessage]:
    return [
        HumanMessage(f"turn {i}: where is my parcel {i}? It was due last week, please check."),
        AIMessage(f"turn {i}: parcel {i} left the warehouse yesterday; delivery is tomorrow."),
    ]


@dataclass
class System:
    """One history implementation on one backend: a factory of per-session histories."""

    name: str
    backend: str
    history: Callable[[str], BaseChatMessageHistory]
    session_id: Callable[[int], str]
    per_thread: Callable[[], Any] | None = None  # opens thread-local resources, if any


@dataclass
class Figures:
    appends_per_s: float
    reads_per_s: float
    messages_per_read: float
    errors: int


def run_threads(n: int, work: Callable[[int], int]) -> tuple[float, int]:
    """Run ``work(i)`` in ``n`` threads from a common start; return seconds and errors."""
    barrier = threading.Barrier(n + 1)
    errors = [0] * n

    def body(i: int) -> None:
        barrier.wait()
        try:
            errors[i] += work(i)
        except Exception as exc:
            print(f"    thread {i}: {type(exc).__name__}: {str(exc)[:120]}")
            errors[i] += 1

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(errors)


def measure(system: System, sessions: int, preload: int, appends: int, reads: int) -> Figures:
    run = uuid.uuid4().hex[:6]
    ids = [system.session_id(hash((run, i)) & 0xFFFFFFFF) for i in range(sessions)]
    # Preload every session (not timed), then one read so managed histories compact once.
    for sid in ids:
        h = system.history(sid)
        h.add_messages([m for t in range(preload // 2) for m in turn(t)])
        _ = h.messages

    def appender(i: int) -> int:
        for k in range(appends):
            system.history(ids[i]).add_messages(turn(preload + k))
        return 0

    sizes: list[int] = []

    def reader(i: int) -> int:
        for _ in range(reads):
            sizes.append(len(system.history(ids[i]).messages))
        return 0

    append_s, append_errors = run_threads(sessions, appender)
    read_s, read_errors = run_threads(sessions, reader)
    return Figures(
        sessions * appends / append_s,
        sessions * reads / read_s,
        statistics.fmean(sizes) if sizes else 0.0,
        append_errors + read_errors,
    )


# -- the systems ---------------------------------------------------------------------------------


def holysheep(
    store: MessageStore, backend: str, window: ContextWindow, name: str = "holysheep"
) -> System:
    return System(
        name,
        backend,
        lambda sid: ManagedChatMessageHistory(sid, store, window),
        lambda i: f"session-{i}",
    )


def community(url: str, backend: str, **engine_args: Any) -> System:
    from langchain_community.chat_message_histories import SQLChatMessageHistory
    from sqlalchemy import create_engine

    engine = create_engine(url, **engine_args)
    return System(
        "lc-community",
        backend,
        lambda sid: SQLChatMessageHistory(sid, connection=engine),
        lambda i: f"session-{i}",
    )


@contextmanager
def lc_postgres(url: str, threads: int) -> Iterator[System]:
    import psycopg
    from langchain_postgres import PostgresChatMessageHistory

    with psycopg.connect(url) as conn:
        PostgresChatMessageHistory.create_tables(conn, "lc_chat_history")
    local = threading.local()
    opened: list[psycopg.Connection[Any]] = []
    lock = threading.Lock()

    def connection() -> psycopg.Connection[Any]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = psycopg.connect(url)
            with lock:
                opened.append(conn)
        return conn

    try:
        yield System(
            "lc-postgres",
            "postgres",
            lambda sid: PostgresChatMessageHistory(
                "lc_chat_history", sid, sync_connection=connection()
            ),
            lambda i: str(uuid.UUID(int=i)),
        )
    finally:
        for conn in opened:
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--preload", type=int, default=1000, help="messages per session")
    parser.add_argument("--appends", type=int, default=20, help="turns appended per session")
    parser.add_argument("--reads", type=int, default=10, help="context reads per session")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians kept")
    parser.add_argument("--max-tokens", type=int, default=4000, help="ContextWindow budget")
    parser.add_argument(
        "--no-fsync", action="store_true", help="run PostgreSQL with fsync off (less noise)"
    )
    args = parser.parse_args()

    window = ContextWindow(model="deepseek-v3.2", max_tokens=args.max_tokens)
    results: list[tuple[System, int, Figures]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-stores-")))
        systems: list[System] = []
        sqlite_store = SQLiteMessageStore(tmp / "holysheep.db")
        stack.callback(sqlite_store.close)
        systems.append(holysheep(sqlite_store, "sqlite", window))
        # synchronous=FULL fsyncs every commit, like SQLAlchemy's default rollback journal.
        full_store = SQLiteMessageStore(tmp / "holysheep-full.db", synchronous="FULL")
        stack.callback(full_store.close)
        systems.append(holysheep(full_store, "sqlite", window, "holysheep-full"))
        systems.append(
            community(
                f"sqlite:///{tmp / 'community.db'}",
                "sqlite",
                connect_args={"timeout": 30, "check_same_thread": False},
            )
        )
        reason = unavailable_reason()
        if reason is None:
            server = stack.enter_context(throwaway_postgres(fsync=not args.no_fsync))
            from langchain_holysheep.stores import PostgresMessageStore

            # A warm pool with a connection per session thread, as lc-postgres gets.
            size = max(args.sessions) + 2
            pg_store = PostgresMessageStore(server.url, min_size=size, max_size=size)
            stack.callback(pg_store.close)
            systems.append(holysheep(pg_store, "postgres", window))
            systems.append(community(server.sqlalchemy_url, "postgres", pool_size=size))
            systems.append(stack.enter_context(lc_postgres(server.url, max(args.sessions))))
        else:
            print(f"PostgreSQL skipped: {reason}")

        print(
            f"workload: {args.preload} preloaded messages per session, {args.appends} appended "
            f"turns and {args.reads} context reads per session, one thread per session; "
            f"ContextWindow max_tokens={args.max_tokens}; PostgreSQL fsync "
            f"{'off' if args.no_fsync else 'on'}; {args.repeat} interleaved rounds, medians\n"
        )
        for sessions in args.sessions:
            rounds: dict[str, list[Figures]] = {}
            for _ in range(args.repeat):
                for system in systems:
                    figures = measure(system, sessions, args.preload, args.appends, args.reads)
                    rounds.setdefault(f"{system.name}/{system.backend}", []).append(figures)
            for system in systems:
                runs = rounds[f"{system.name}/{system.backend}"]
                median = Figures(
                    statistics.median(f.appends_per_s for f in runs),
                    statistics.median(f.reads_per_s for f in runs),
                    statistics.median(f.messages_per_read for f in runs),
                    sum(f.errors for f in runs),
                )
                results.append((system, sessions, median))
                print(
                    f"  {system.name:<15} {system.backend:<9} sessions={sessions:<3} "
                    f"appends/s={median.appends_per_s:>8.0f} reads/s={median.reads_per_s:>8.0f} "
                    f"msgs/read={median.messages_per_read:>6.0f} errors={median.errors}"
                )

    print("\n| backend | sessions | history | appends/s | context reads/s | messages per read |")
    print("|---|---:|---|---:|---:|---:|")
    for system, sessions, f in results:
        errors = f" ({f.errors} errors)" if f.errors else ""
        print(
            f"| {system.backend} | {sessions} | {system.name}{errors} | {f.appends_per_s:,.0f} | "
            f"{f.reads_per_s:,.0f} | {f.messages_per_read:,.0f} |"
        )
    print("\nratios, holysheep (default settings) / other on the same backend and session count:")
    for backend in ("sqlite", "postgres"):
        for sessions in args.sessions:
            ours = [
                f
                for s, n, f in results
                if (s.name, s.backend, n) == ("holysheep", backend, sessions)
            ]
            for s, n, f in results:
                if s.backend == backend and n == sessions and s.name != "holysheep" and ours:
                    print(
                        f"  {backend:<9} sessions={sessions:<3} vs {s.name:<15} appends "
                        f"x{ours[0].appends_per_s / f.appends_per_s:.2f}, reads "
                        f"x{ours[0].reads_per_s / f.reads_per_s:.2f}"
                    )


if __name__ == "__main__":
    main()
