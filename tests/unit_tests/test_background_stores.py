"""Background summaries over a shared store: one worker per session, compare-and-swap writes."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage

from langchain_holysheep import ContextPlan, ContextWindow, ManagedChatMessageHistory
from langchain_holysheep.background import SummaryLeaseHeldError
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.stores import MessageStore, SQLiteMessageStore
from langchain_holysheep.summarize import SummaryFailureWarning
from langchain_holysheep.window import WindowState, recap_message
from langchain_holysheep.workload import synthetic_conversation
from tests.unit_tests.test_background_support import (
    GatedSummarizer,
    background_threads,
    make_window,
)

conv = synthetic_conversation(80, seed=1)
SYSTEM = conv.messages[:1]


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MessageStore]:
    """A store two windows (two app processes, as far as they know) share."""
    namespace = f"bg-{uuid.uuid4().hex[:8]}"
    store: MessageStore
    if request.param == "sqlite":
        store = SQLiteMessageStore(tmp_path / "shared.db", namespace=namespace)
    else:
        from langchain_holysheep.stores import PostgresMessageStore

        server = request.getfixturevalue("postgres_server")
        store = PostgresMessageStore(server.url, namespace=namespace)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SummaryFailureWarning)
        yield


def append(store: MessageStore, sid: str, window: ContextWindow, messages: list[Any]) -> None:
    store.append(sid, messages, [window.counter.count_message(m) for m in messages])


def turn(window: ContextWindow, store: MessageStore, sid: str) -> ContextPlan:
    """One model call as a store-backed app makes it: read, step, persist with CAS.

    A background summary may write the session between the read and the write; then, as
    ManagedChatMessageHistory does, read again and plan again.
    """
    for _ in range(5):
        record = store.get_session(sid)
        state = WindowState(
            summary=record.summary,
            summary_tokens=record.summary_tokens,
            summarized_through=record.summarized_through,
            window_start=record.window_start,
            version=record.version,
        )
        stored = store.read(sid, state.load_from)
        plan = window.step(
            SYSTEM,
            [m.message for m in stored],
            offset=state.load_from,
            state=state,
            counts=[m.tokens for m in stored],
            store=store,
            session_id=sid,
        )
        if plan.state == state or store.update_session(
            sid,
            expected_version=record.version,
            summary=plan.state.summary,
            summary_tokens=plan.state.summary_tokens,
            summarized_through=plan.state.summarized_through,
            window_start=plan.state.window_start,
        ):
            return plan
    raise AssertionError("the session state kept changing under five plans")


def test_one_window_summarizes_a_session_at_a_time(shared_store: MessageStore) -> None:
    store, sid = shared_store, "lease"
    first, second = GatedSummarizer(), GatedSummarizer()
    second.gate.set()
    w1, w2 = make_window(first, summary_wait=0), make_window(second, summary_wait=0)
    assert w1.background is not None
    assert w2.background is not None
    try:
        appended = 1
        for cp in conv.call_points:
            append(store, sid, w1, conv.messages[appended:cp])
            appended = cp
            turn(w1, store, sid)
            if w1.background.started:
                break
        assert first.started.wait(5)  # w1's job took the lease and is summarizing
        assert store.get_session(sid).lease_owner == w1.background.owner
        turn(w2, store, sid)  # the same state: w2 wants to summarize the same messages
        assert w2.background.started == 1
        assert w2.background.drain(5)
        assert second.calls == 0, "two workers summarized the session at once"
        (job,) = w2.background._jobs.values()
        assert isinstance(job.future.exception(), SummaryLeaseHeldError)
        first.gate.set()
        assert w1.background.drain(5)
        assert first.calls == 1
        assert store.get_session(sid).lease_owner is None  # released after the job
        # Lease free again: w2's next turn retries and may summarize now.
        turn(w2, store, sid)
        assert w2.background.drain(5)
        assert second.calls == 1
    finally:
        first.gate.set()
        w1.close()
        w2.close()


def pending_session(store: MessageStore, sid: str, window: ContextWindow) -> int:
    """A session whose window let go of more messages than fit verbatim (no summary yet)."""
    cp = conv.call_points[40]
    messages: list[BaseMessage] = conv.messages[1:cp]
    append(store, sid, window, messages)
    newest = max(i for i, m in enumerate(messages) if m.type == "human")
    assert store.update_session(sid, expected_version=0, window_start=newest)
    return newest


def test_a_background_result_is_written_back_with_cas(shared_store: MessageStore) -> None:
    store, sid = shared_store, "write-back"
    gated = GatedSummarizer()
    window = make_window(gated, summary_wait=0)
    background = window.background
    assert background is not None
    try:
        pending_session(store, sid, window)
        plan = turn(window, store, sid)
        # The pending messages did not fit and the summary was not ready: the turn went on.
        assert plan.summary_failed
        assert background.started == 1
        (job,) = background._jobs.values()
        record = store.get_session(sid)
        assert job.through == record.window_start
        gated.gate.set()
        assert background.drain(5)
        after = store.get_session(sid)
        assert background.written_back == 1
        assert after.version == record.version + 1
        assert after.summary is not None
        assert after.summary.startswith("Recap ")
        assert after.summarized_through == job.through
        assert after.window_start == record.window_start
        expected = window.counter.count_message(recap_message(after.summary, job.through))
        assert after.summary_tokens == expected
        # The next turn plans from the written summary: no pending message is left out.
        plan = turn(window, store, sid)
        assert plan.state.summary == after.summary
        assert not plan.summary_failed
    finally:
        gated.gate.set()
        window.close()


@pytest.mark.parametrize("covering", ["more", "the same"])
def test_a_slow_summary_never_overwrites_a_newer_one(
    shared_store: MessageStore, covering: str
) -> None:
    store, sid = shared_store, "stale"
    gated = GatedSummarizer()
    window = make_window(gated, summary_wait=0)
    background = window.background
    assert background is not None
    try:
        pending_session(store, sid, window)
        turn(window, store, sid)
        assert background.started == 1
        record = store.get_session(sid)
        # Another worker writes a newer summary first: one that covers more messages, or one
        # that covers the same ones (the job's start) with other text.
        through = next(
            i
            for i, m in enumerate(conv.messages[1:])
            if m.type == "human" and 0 < i <= record.window_start
        )
        if covering == "the same":
            through = job_start = next(iter(background._jobs.values())).start
            assert job_start == record.summarized_through
        newer = "newer summary from another worker"
        assert store.update_session(
            sid,
            expected_version=record.version,
            summary=newer,
            summary_tokens=window.counter.count_message(recap_message(newer, through)),
            summarized_through=through,
        )
        (job,) = background._jobs.values()
        gated.gate.set()
        assert background.drain(5)
        stale, _ = job.future.result()  # the slow summary did finish...
        after = store.get_session(sid)
        assert background.written_back == 0  # ...but was not written over the newer one
        assert after.summary == newer
        assert after.summarized_through == through
        assert after.version == record.version + 1
        # Nor does this window apply the stale result; what follows extends the newer summary.
        calls, seen = gated.calls, len(gated.transcripts)
        for _ in range(3):
            plan = turn(window, store, sid)
            background.drain(5)
            assert plan.state.summary != stale
        assert gated.calls > calls
        assert any(newer in t for t in gated.transcripts[seen:])
    finally:
        gated.gate.set()
        window.close()


def test_managed_history_persists_background_summaries(shared_store: MessageStore) -> None:
    store, sid = shared_store, "history"
    gated = GatedSummarizer()
    gated.gate.set()
    window = make_window(gated)
    background = window.background
    assert background is not None
    history = ManagedChatMessageHistory(sid, store, window)
    appended = 1
    with window:
        for cp in conv.call_points:
            history.add_messages(conv.messages[appended:cp])
            appended = cp
            sent = SYSTEM + history.messages
            assert find_prompt_problems(sent) == []
            plan = history.last_plan
            assert plan is not None
            assert plan.tokens.total <= plan.tokens.prompt_limit
            assert not plan.dropped_ids
            background.drain(5)
    record = store.get_session(sid)
    assert record.summary is not None
    assert record.summary.startswith("Recap ")
    assert record.summarized_through > 0
    assert record.lease_owner is None
    assert history.transcript == conv.messages[1:appended]  # nothing deleted
    assert background_threads() == []
