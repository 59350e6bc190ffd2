"""The worker process the crash tests kill with SIGKILL at a chosen point.

It runs a managed conversation and reports on a pipe: ``("ack", turn)`` once a turn's append
returned, ``("paused", what, version)`` when it sits at the point where the test kills it.
The points are reached deterministically by hooking the database driver in this process only:

* ``append``: inside the append transaction, after the messages are inserted, before COMMIT
  (SQLite); for PostgreSQL, while the server executes the append statement (a test trigger
  makes it sleep there).
* ``cas``: inside the summary-state update (compare-and-swap), after the UPDATE, before COMMIT.
* ``summarizer``: while the summarizer's model call is in flight (the relay stalls it).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from typing import Any

from langchain_core.messages import HumanMessage

from langchain_holysheep.history import ManagedChatMessageHistory
from tests.reliability.support import (
    SYSTEM,
    StoreSpec,
    make_model,
    make_window,
    open_store,
    question,
)

CRASH_MARKER = " CRASH-HERE"
"""Text in the question whose append a PostgreSQL test trigger stalls."""

_UPDATE_SQL = "UPDATE holysheep_sessions SET summary"


class _Hook:
    armed = False
    pipe: Any = None
    what = ""
    store: Any = None
    session = ""

    @classmethod
    def pause(cls) -> None:
        cls.armed = False
        cls.pipe.send(("paused", cls.what))
        time.sleep(600)  # the test kills us here


def _hook_sqlite(mode: str) -> None:
    class HookedConnection(sqlite3.Connection):
        def executemany(self, sql: str, params: Any, /) -> sqlite3.Cursor:  # type: ignore[override]
            cursor = super().executemany(sql, params)
            if mode == "append" and _Hook.armed and "INSERT INTO holysheep_messages" in sql:
                _Hook.pause()
            return cursor

        def execute(self, sql: str, params: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
            cursor = super().execute(sql, params)
            if mode == "cas" and _Hook.armed and _UPDATE_SQL in sql:
                _Hook.pause()
            return cursor

    sqlite3.connect = functools.partial(sqlite3.connect, factory=HookedConnection)  # type: ignore[assignment]


def _hook_postgres(mode: str) -> None:
    import psycopg

    original = psycopg.Cursor.execute

    def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        result = original(self, query, params, **kwargs)
        if mode == "cas" and _Hook.armed and _UPDATE_SQL in str(query):
            _Hook.pause()
        return result

    psycopg.Cursor.execute = execute  # type: ignore[method-assign]


def crash_worker(
    spec: StoreSpec,
    base_url: str,
    api_key: str,
    session: str,
    first_turn: int,
    arm_at: int,
    mode: str,
    pipe: Any,
) -> None:
    """Run turns from ``first_turn`` on; arm the ``mode`` crash point at turn ``arm_at``."""
    _Hook.pipe, _Hook.what = pipe, mode
    if spec.kind == "sqlite":
        _hook_sqlite(mode)
    else:
        _hook_postgres(mode)
    store = open_store(spec)
    summarizer = make_model(base_url, api_key, max_retries=0, timeout=120)
    window = make_window(summarizer, max_tokens=700, summary_timeout=120)
    history = ManagedChatMessageHistory(session, store, window, reserved_tokens=40)
    model = make_model(base_url, api_key)
    for turn in range(first_turn, first_turn + 200):
        if turn >= arm_at and mode == "cas":
            _Hook.armed = True
        marker = CRASH_MARKER if mode == "append" and turn == arm_at else ""
        ask = HumanMessage(question(session, turn, marker))
        context = history.messages
        answer = model.invoke([SYSTEM, *context, ask])
        if mode == "append" and turn == arm_at:
            _Hook.armed = True
            if spec.kind == "postgres":  # the trigger stalls the statement server-side
                pipe.send(("paused", mode))
        history.add_messages([ask, answer])
        pipe.send(("ack", turn))
    pipe.send(("done", None))
