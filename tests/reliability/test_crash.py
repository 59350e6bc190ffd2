"""kill -9 a worker mid-append, mid-summary-update and mid-summarizer-call; then restart.

After the restart (a fresh store on the same database) the session must be consistent: every
acknowledged message present exactly once and in order, an unacknowledged batch either whole
or absent, ``summarized_through <= window_start <= message_count``, a summary that covers
exactly a prefix of the transcript, a version that never went back, and a conversation that
carries on (and compacts again) from there.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.stores import MessageStore
from langchain_holysheep.testing import Fault, HolySheepTestServer
from tests.reliability.crash_worker import crash_worker
from tests.reliability.support import (
    StoreSpec,
    is_summary_request,
    make_model,
    make_window,
    open_store,
    prompt_problems,
    record_problems,
    summary_problems,
    sync_turn,
    tag_of,
    tag_responder,
)

pytestmark = pytest.mark.slow

SESSION = "crash-session"
DEADLINE = 120.0

_STALL_FUNCTION = """
CREATE OR REPLACE FUNCTION reliability_stall() RETURNS trigger AS $$
BEGIN
    IF NEW.message LIKE '{"type":"human"%' AND NEW.message LIKE '%CRASH-HERE%' THEN
        PERFORM pg_sleep(2);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql"""
_STALL_TRIGGER = (
    "CREATE TRIGGER reliability_stall BEFORE INSERT ON holysheep_messages "
    "FOR EACH ROW EXECUTE FUNCTION reliability_stall()"
)
_STALLED = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE wait_event = 'PgSleep' AND query LIKE '%holysheep_messages%'"
)


class _Relay:
    """The loopback relay; can stall every summary request after the first ``free`` ones."""

    def __init__(self) -> None:
        self.stall_after: int | None = None
        self.summaries = 0
        self.server = HolySheepTestServer(responder=tag_responder, fault_policy=self._policy)

    def _policy(self, body: dict[str, Any]) -> Fault | None:
        if not is_summary_request(body):
            return None
        self.summaries += 1
        if self.stall_after is not None and self.summaries > self.stall_after:
            return Fault.slow(600)
        return None


@pytest.fixture
def relay() -> Iterator[_Relay]:
    r = _Relay()
    with r.server:
        yield r


def _pg_execute(spec: StoreSpec, *statements: str) -> Any:
    import psycopg

    with psycopg.connect(spec.target, autocommit=True) as conn:
        result = None
        for statement in statements:
            result = (
                conn.execute(statement).fetchall()
                if statement.startswith("SELECT")
                else (conn.execute(statement))
            )
        return result


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _run_and_kill(
    spec: StoreSpec, relay: _Relay, mode: str, arm_at: int
) -> tuple[list[int], int | None]:
    """Start a worker, wait for its crash point, SIGKILL it; return acked turns and version."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.reliability.crash_worker"])
    ours, theirs = ctx.Pipe()
    server = relay.server
    proc = ctx.Process(
        target=crash_worker,
        args=(spec, server.base_url, server.api_key, SESSION, 0, arm_at, mode, theirs),
    )
    # Opened (and set up) before the worker starts: a first use would wait on its lock.
    store = open_store(spec)
    store.get_session(SESSION)
    proc.start()
    theirs.close()
    acked: list[int] = []
    paused = False
    deadline = time.monotonic() + DEADLINE
    try:
        while not paused:
            assert time.monotonic() < deadline, f"the worker never reached the {mode} point"
            assert proc.is_alive(), f"the worker died first (exit code {proc.exitcode})"
            if ours.poll(0.02):
                kind, value = ours.recv()
                assert kind != "done", (
                    f"the worker finished without reaching the crash point ({len(acked)} turns, "
                    f"{relay.summaries} summaries)"
                )
                if kind == "ack":
                    acked.append(value)
                else:
                    paused = True
            if mode == "summarizer" and relay.stall_after is not None:
                paused = relay.summaries > relay.stall_after
        if spec.kind == "postgres" and mode == "append":
            _wait(lambda: _pg_execute(spec, _STALLED)[0][0] > 0, "the stalled append")
        version = store.get_session(SESSION).version
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        if spec.kind == "postgres" and mode == "append":
            _wait(lambda: _pg_execute(spec, _STALLED)[0][0] == 0, "the server to finish")
    finally:
        if proc.is_alive():
            proc.kill()
        store.close()
    return acked, version


def _pairs(store: MessageStore) -> list[int]:
    """The turn of each stored question/answer pair; fails on anything else."""
    stored = store.read(SESSION)
    assert [m.seq for m in stored] == list(range(len(stored))), "gaps or duplicate seqs"
    assert len(stored) % 2 == 0, "a batch was stored in part"
    turns = []
    for k in range(0, len(stored), 2):
        q, a = stored[k].message, stored[k + 1].message
        qt, at = tag_of(str(q.content)), tag_of(str(a.content))
        where = f"messages {k} and {k + 1} are not one question and its answer"
        assert (q.type, a.type) == ("human", "ai"), where
        assert qt is not None, where
        assert qt == at, where
        turns.append(qt[1])
    return turns


def _check_after_restart(
    spec: StoreSpec, relay: _Relay, mode: str, acked: list[int], version_before: int
) -> None:
    store = open_store(spec)  # the restart: a fresh store on the same database
    try:
        turns = _pairs(store)
        n = len(acked)
        assert acked == list(range(n))
        # Every acknowledged turn exactly once, in order; the one in flight whole or absent.
        # SQLite dies before COMMIT: the batch is rolled back. PostgreSQL finishes the
        # statement it was running and may commit it: then it is whole, and only once.
        may_land = mode == "append" and spec.kind == "postgres"
        assert turns in ([*acked, n], acked) if may_land else turns == acked, turns
        record = store.get_session(SESSION)
        assert record_problems(record) == []
        assert record.message_count == 2 * len(turns)
        tags = [t for t in turns for _ in range(2)]
        assert summary_problems(record, tags) == []
        assert record.version >= version_before
        if mode in ("cas", "summarizer"):
            assert record.version == version_before, "the killed update was applied"
        if mode in ("cas", "summarizer"):
            assert record.summary is not None, "the crash came before any summary existed"

        # The conversation carries on from there and compacts again.
        relay.stall_after = None
        summarizer = make_model(relay.server.base_url, relay.server.api_key or "")
        window = make_window(summarizer, max_tokens=700)
        history = ManagedChatMessageHistory(SESSION, store, window, reserved_tokens=40)
        model = make_model(relay.server.base_url, relay.server.api_key or "")
        start = len(turns)
        for turn in range(start, start + 8):
            assert prompt_problems(sync_turn(history, model, SESSION, turn)) == []
        assert _pairs(store) == [*turns, *range(start, start + 8)]
        after = store.get_session(SESSION)
        assert after.version > record.version, "the window never compacted after the restart"
        assert record_problems(after) == []
        tags = [t for t in _pairs(store) for _ in range(2)]
        assert summary_problems(after, tags) == []
    finally:
        store.close()


def _prepare(spec: StoreSpec, mode: str) -> None:
    if spec.kind == "postgres" and mode == "append":
        from langchain_holysheep.stores import PostgresMessageStore

        store = open_store(spec)
        assert isinstance(store, PostgresMessageStore)
        store.setup()
        _pg_execute(
            spec,
            _STALL_FUNCTION,
            "DROP TRIGGER IF EXISTS reliability_stall ON holysheep_messages",
            _STALL_TRIGGER,
        )


def _cleanup(spec: StoreSpec, mode: str) -> None:
    if spec.kind == "postgres" and mode == "append":
        _pg_execute(spec, "DROP TRIGGER IF EXISTS reliability_stall ON holysheep_messages")


# The turn at which the crash point is armed: late enough that a summary already exists.
ARM_AT = {"append": 5, "cas": 10, "summarizer": 0}


@pytest.mark.parametrize("mode", ["append", "cas", "summarizer"])
def test_kill_9_then_restart_leaves_a_consistent_session(
    store_spec: StoreSpec, relay: _Relay, mode: str
) -> None:
    _prepare(store_spec, mode)
    try:
        if mode == "summarizer":
            relay.stall_after = 1  # the first summary succeeds, the second stalls
        acked, version = _run_and_kill(store_spec, relay, mode, ARM_AT[mode])
        assert acked, "the worker acknowledged nothing before the crash"
        _check_after_restart(store_spec, relay, mode, acked, version or 0)
    finally:
        _cleanup(store_spec, mode)
