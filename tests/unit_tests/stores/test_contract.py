"""The MessageStore contract, run against every store (in-memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_holysheep.stores import (
    MAX_SESSION_ID_LENGTH,
    CorruptMessageError,
    SessionRecord,
)
from tests.unit_tests.stores.conftest import StoreHarness


def _texts(harness: StoreHarness, session_id: str) -> list[str]:
    return [str(m.message.content) for m in harness.store.read(session_id)]


def _rich_messages() -> list[BaseMessage]:
    return [
        SystemMessage("You are terse.", id="m-sys"),
        HumanMessage("héllo wörld — 你好 🐑 \u200b", id="m-1", name="alice"),
        AIMessage(
            content=[
                {"type": "text", "text": "Let me check."},
                {"type": "reasoning", "reasoning": "need the order"},
                {"type": "some_future_block", "payload": {"nested": [1, 2.5, None, True]}},
            ],
            tool_calls=[
                {
                    "name": "lookup_order",
                    "args": {"order_id": "A-1", "deep": {"x": [1]}},
                    "id": "c1",
                },
                {"name": "refund_status", "args": {}, "id": "c2"},
            ],
            usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
            response_metadata={"model_name": "deepseek-v3.2", "model_provider": "holysheep"},
            additional_kwargs={"refusal": None},
            id="m-2",
        ),
        ToolMessage("order A-1: shipped", tool_call_id="c1", name="lookup_order", id="m-3"),
        ToolMessage("boom", tool_call_id="c2", status="error", artifact={"code": 500}, id="m-4"),
        AIMessageChunk(content="partial answer", id="m-5"),
        HumanMessage("NUL \x00 inside, a lone surrogate \ud800, and quotes ' \" ;--", id="m-6"),
        HumanMessage("", id="m-7"),
    ]


# -- ordering and round trips --------------------------------------------------------------------


def test_unknown_session_reads_as_empty_version_zero(harness: StoreHarness) -> None:
    store = harness.store
    assert store.get_session("nobody") == SessionRecord("nobody")
    assert store.read("nobody") == []
    assert store.list_sessions() == []


def test_append_numbers_messages_from_zero_without_gaps(harness: StoreHarness) -> None:
    store = harness.store
    assert store.append("s", [HumanMessage("a"), AIMessage("b")], [3, 4]) == [0, 1]
    assert store.append("s", [HumanMessage("c")], [5]) == [2]
    assert store.append("s", [], []) == []
    stored = store.read("s")
    assert [(m.seq, m.message.content, m.tokens) for m in stored] == [
        (0, "a", 3),
        (1, "b", 4),
        (2, "c", 5),
    ]
    assert store.get_session("s").message_count == 3
    assert [m.seq for m in store.read("s", 1)] == [1, 2]
    assert [m.seq for m in store.read("s", 1, 2)] == [1]
    assert store.read("s", 3) == []
    assert store.read("s", 1, 1) == []


def test_empty_append_creates_no_session(harness: StoreHarness) -> None:
    assert harness.store.append("s", [], []) == []
    assert harness.store.list_sessions() == []


def test_messages_round_trip_exactly(harness: StoreHarness) -> None:
    messages = _rich_messages()
    harness.store.append("s", messages, list(range(len(messages))))
    stored = harness.store.read("s")
    assert [m.message for m in stored] == messages
    assert [type(m.message) for m in stored] == [type(m) for m in messages]
    assert [m.tokens for m in stored] == list(range(len(messages)))
    ai = stored[2].message
    assert isinstance(ai, AIMessage)
    assert [c["id"] for c in ai.tool_calls] == ["c1", "c2"]
    assert ai.usage_metadata == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}


def test_large_message_round_trips(harness: StoreHarness) -> None:
    big = ("large message ✓ " * 200_000)[:3_000_000]
    harness.store.append("s", [HumanMessage(big)], [750_000])
    (stored,) = harness.store.read("s")
    assert stored.message.content == big
    assert stored.tokens == 750_000


def test_session_ids_are_opaque_strings(harness: StoreHarness) -> None:
    store = harness.store
    hostile = [
        "'; DROP TABLE holysheep_messages; --",
        "%(ns)s %s ? ?1 $1",
        "a" * MAX_SESSION_ID_LENGTH,
        "🐑 ünïcödé",
        " leading and trailing ",
    ]
    for i, session_id in enumerate(hostile):
        store.append(session_id, [HumanMessage(f"m{i}")], [1])
    for i, session_id in enumerate(hostile):
        assert _texts(harness, session_id) == [f"m{i}"]
    assert store.list_sessions() == sorted(hostile)


# -- bad input: a clear error and nothing written -------------------------------------------------


@pytest.mark.parametrize(
    ("session_id", "error", "words"),
    [
        ("a" * (MAX_SESSION_ID_LENGTH + 1), ValueError, "257 characters long; the limit is 256"),
        ("x" * 10_240, ValueError, "10,240 characters long"),
        ("", ValueError, "empty"),
        ("a\x00b", ValueError, "NUL"),
        ("bad \udc80", ValueError, "lone surrogate"),
        (42, TypeError, "must be a string, got int"),
        (None, TypeError, "got NoneType"),
    ],
)
def test_bad_session_id_is_refused_everywhere(
    harness: StoreHarness, session_id: object, error: type[Exception], words: str
) -> None:
    store = harness.store
    calls: list[Callable[[], object]] = [
        lambda: store.append(session_id, [HumanMessage("x")], [1]),  # type: ignore[arg-type]
        lambda: store.read(session_id),  # type: ignore[arg-type]
        lambda: store.get_session(session_id),  # type: ignore[arg-type]
        lambda: store.update_session(session_id, expected_version=0),  # type: ignore[arg-type]
        lambda: store.delete_session(session_id),  # type: ignore[arg-type]
        lambda: store.acquire_lease(session_id, "w", 1.0),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(error, match=words):
            call()
    assert store.list_sessions() == []


def test_bad_batches_write_nothing(harness: StoreHarness) -> None:
    store = harness.store
    store.append("s", [HumanMessage("keep")], [1])
    bad_batches: list[tuple[list[object], list[object], type[Exception], str]] = [
        ([HumanMessage("a"), HumanMessage("b")], [1], ValueError, "2 messages but 1 token counts"),
        ([HumanMessage("a")], [-1], ValueError, "token count 0 is -1"),
        ([HumanMessage("a")], [1.5], TypeError, "token count 0 is a float"),
        ([HumanMessage("a")], [True], TypeError, "token count 0 is a bool"),
        (
            [HumanMessage("a"), "not a message"],
            [1, 1],
            TypeError,
            "message 1 of the batch is a str",
        ),
        (
            [HumanMessage("a"), AIMessage("b", additional_kwargs={"raw": b"\x00bytes"})],
            [1, 1],
            ValueError,
            "message 1 of the batch \\(ai\\) cannot be stored as JSON",
        ),
        ([RemoveMessage(id="x")], [0], ValueError, "type 'remove'"),
    ]
    for messages, counts, error, words in bad_batches:
        with pytest.raises(error, match=words):
            store.append("s", messages, counts)  # type: ignore[arg-type]
    assert _texts(harness, "s") == ["keep"]
    assert store.get_session("s").message_count == 1


def test_bad_read_ranges_are_refused(harness: StoreHarness) -> None:
    with pytest.raises(ValueError, match="start is -1"):
        harness.store.read("s", -1)
    with pytest.raises(ValueError, match="end is 1; it must be None or an int >= start \\(2\\)"):
        harness.store.read("s", 2, 1)


def test_corrupt_row_names_session_and_seq(harness: StoreHarness) -> None:
    store = harness.store
    store.append("chat-7", [HumanMessage(str(i)) for i in range(4)], [1] * 4)
    harness.corrupt("chat-7", 1, "{not json")
    harness.corrupt("chat-7", 2, '{"type": "evil", "data": {}}')
    with pytest.raises(CorruptMessageError, match="seq=1 of session 'chat-7'") as info:
        store.read("chat-7")
    assert (info.value.session_id, info.value.seq) == ("chat-7", 1)
    assert info.value.namespace == store.namespace
    with pytest.raises(CorruptMessageError, match="seq=2 of session 'chat-7'"):
        store.read("chat-7", 2)
    # The readable rest stays readable, and nothing was rewritten.
    assert [m.message.content for m in store.read("chat-7", 0, 1)] == ["0"]
    assert [m.message.content for m in store.read("chat-7", 3)] == ["3"]
    assert store.append("chat-7", [HumanMessage("4")], [1]) == [4]


# -- compare-and-swap ---------------------------------------------------------------------------


def test_update_session_is_compare_and_swap(harness: StoreHarness) -> None:
    store = harness.store
    store.append("s", [HumanMessage(str(i)) for i in range(10)], [1] * 10)
    assert store.update_session(
        "s", expected_version=0, summary="recap", summary_tokens=7, summarized_through=4,
        window_start=6, calibration=1.1,
    )  # fmt: skip
    record = store.get_session("s")
    assert (record.summary, record.summary_tokens, record.summarized_through) == ("recap", 7, 4)
    assert (record.window_start, record.version, record.calibration) == (6, 1, 1.1)
    # A stale writer loses and changes nothing.
    assert not store.update_session("s", expected_version=0, summary="stale", window_start=9)
    assert store.get_session("s") == record
    # A partial update keeps the other fields.
    assert store.update_session("s", expected_version=1, window_start=8)
    record2 = store.get_session("s")
    assert (record2.summary, record2.summarized_through, record2.window_start) == ("recap", 4, 8)
    assert record2.version == 2
    # Appends never move the version: they do not invalidate the summary state.
    store.append("s", [HumanMessage("x")], [1])
    assert store.get_session("s").version == 2
    assert store.update_session("s", expected_version=2, summary=None, calibration=None)
    assert store.get_session("s").summary is None


def test_update_of_unknown_session(harness: StoreHarness) -> None:
    store = harness.store
    assert not store.update_session("ghost", expected_version=3, summary="x")
    assert store.list_sessions() == []
    assert store.update_session("ghost", expected_version=0, summary="first")
    assert store.get_session("ghost").version == 1
    assert store.list_sessions() == ["ghost"]


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"summarized_through": 5, "window_start": 4}, ValueError, "summarized_through=5, wind"),
        ({"window_start": 11}, ValueError, "window_start=11 and message_count=10"),
        ({"summarized_through": -1}, ValueError, "summarized_through is -1"),
        ({"summary_tokens": "7"}, TypeError, "summary_tokens must be an int"),
        ({"calibration": 0.0}, ValueError, "calibration is 0.0"),
        ({"summary": 3}, TypeError, "summary must be a str or None"),
        ({"version": 9}, TypeError, "unknown field"),
        ({"message_count": 0}, TypeError, "unknown field"),
    ],
)
def test_invalid_session_update_is_refused(
    harness: StoreHarness, fields: dict[str, object], error: type[Exception], words: str
) -> None:
    store = harness.store
    store.append("s", [HumanMessage(str(i)) for i in range(10)], [1] * 10)
    before = store.get_session("s")
    with pytest.raises(error, match=words):
        store.update_session("s", expected_version=0, **fields)
    assert store.get_session("s") == before


def test_only_one_of_racing_updates_wins(harness: StoreHarness) -> None:
    store = harness.store
    store.append("s", [HumanMessage(str(i)) for i in range(20)], [1] * 20)
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def worker(i: int) -> None:
        barrier.wait()
        results.append(
            store.update_session(
                "s", expected_version=0, summary=f"w{i}", summarized_through=i, window_start=i
            )
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    record = store.get_session("s")
    assert record.version == 1
    assert record.summary == f"w{record.summarized_through}"


# -- namespaces ---------------------------------------------------------------------------------


def test_namespaces_are_isolated(harness: StoreHarness) -> None:
    a = harness.store
    b = a.with_namespace(a.namespace + "-other")
    a.append("shared-id", [HumanMessage("from a")], [1])
    a.update_session("shared-id", expected_version=0, summary="a's summary")
    assert b.read("shared-id") == []
    assert b.get_session("shared-id") == SessionRecord("shared-id")
    assert b.list_sessions() == []
    # b cannot change a's session: its writes land in its own namespace.
    assert not b.update_session("shared-id", expected_version=1, summary="hijack")
    b.delete_session("shared-id")
    assert b.append("shared-id", [HumanMessage("from b")], [1]) == [0]
    assert b.acquire_lease("shared-id", "b-worker", 60)
    assert _texts(harness, "shared-id") == ["from a"]
    record = a.get_session("shared-id")
    assert (record.summary, record.version, record.lease_owner) == ("a's summary", 1, None)
    assert [m.message.content for m in b.read("shared-id")] == ["from b"]
    assert a.list_sessions() == b.list_sessions() == ["shared-id"]
    with pytest.raises(ValueError, match="namespace is empty"):
        a.with_namespace("")


# -- delete ---------------------------------------------------------------------------------------


def test_delete_session_removes_everything(harness: StoreHarness) -> None:
    store = harness.store
    store.append("s", [HumanMessage("a"), AIMessage("b")], [1, 1])
    store.append("t", [HumanMessage("other")], [1])
    store.update_session("s", expected_version=0, summary="x", summarized_through=1, window_start=1)
    store.delete_session("s")
    store.delete_session("never-existed")
    assert store.read("s") == []
    assert store.get_session("s") == SessionRecord("s")
    assert store.list_sessions() == ["t"]
    assert store.append("s", [HumanMessage("again")], [1]) == [0]
    assert _texts(harness, "t") == ["other"]


# -- leases ---------------------------------------------------------------------------------------


def test_lease_excludes_other_owners_until_released_or_expired(harness: StoreHarness) -> None:
    store = harness.store
    store.append("s", [HumanMessage("a")], [1])
    assert store.acquire_lease("s", "w1", 60)
    assert not store.acquire_lease("s", "w2", 60)
    assert store.acquire_lease("s", "w1", 60)  # renewal
    record = store.get_session("s")
    assert record.lease_owner == "w1"
    assert record.lease_expires_at is not None
    assert record.lease_expires_at > time.time() - 5
    assert record.version == 0  # leases do not touch the CAS version
    assert not store.release_lease("s", "w2")
    assert store.release_lease("s", "w1")
    assert not store.release_lease("s", "w1")
    assert store.acquire_lease("s", "w2", 0.05)
    time.sleep(0.2)  # let w2's lease lapse
    assert store.acquire_lease("s", "w1", 60)
    assert store.get_session("s").lease_owner == "w1"
    with pytest.raises(ValueError, match="ttl is 0"):
        store.acquire_lease("s", "w1", 0)


# -- concurrency inside one process ------------------------------------------------------------


def _check_total_order(stored: list[tuple[int, str]], writers: int, batches: int) -> None:
    seqs = [seq for seq, _ in stored]
    assert seqs == list(range(writers * batches * 2)), "sequence numbers have gaps or duplicates"
    texts = [text for _, text in stored]
    assert sorted(texts) == sorted(
        f"w{w}-b{b}-{part}" for w in range(writers) for b in range(batches) for part in "qa"
    ), "a message was lost or duplicated"
    for i in range(0, len(texts), 2):  # each batch is contiguous
        assert texts[i].endswith("-q")
        assert texts[i + 1] == texts[i][:-1] + "a"
    for w in range(writers):  # each writer's batches keep their order
        mine = [t for t in texts if t.startswith(f"w{w}-") and t.endswith("-q")]
        assert mine == [f"w{w}-b{b}-q" for b in range(batches)]


def test_appends_from_many_threads_are_totally_ordered(harness: StoreHarness) -> None:
    store = harness.store
    writers, batches = 8, 15
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        barrier.wait()
        try:
            for b in range(batches):
                store.append("s", [HumanMessage(f"w{w}-b{b}-q"), AIMessage(f"w{w}-b{b}-a")], [1, 2])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = [(m.seq, str(m.message.content)) for m in store.read("s")]
    _check_total_order(stored, writers, batches)
    assert store.get_session("s").message_count == writers * batches * 2


async def test_async_appends_are_totally_ordered(harness: StoreHarness) -> None:
    store = harness.store
    writers, batches = 6, 8

    async def writer(w: int) -> None:
        for b in range(batches):
            await store.aappend(
                "s", [HumanMessage(f"w{w}-b{b}-q"), AIMessage(f"w{w}-b{b}-a")], [1, 2]
            )

    await asyncio.gather(*(writer(w) for w in range(writers)))
    stored = [(m.seq, str(m.message.content)) for m in await store.aread("s")]
    _check_total_order(stored, writers, batches)


# -- async twins -----------------------------------------------------------------------------------


async def test_async_twins_match_the_sync_contract(harness: StoreHarness) -> None:
    store = harness.store
    messages = _rich_messages()
    assert await store.aappend("s", messages, [2] * len(messages)) == list(range(len(messages)))
    assert [m.message for m in await store.aread("s")] == messages
    assert [m.seq for m in await store.aread("s", 2, 4)] == [2, 3]
    record = await store.aget_session("s")
    assert (record.version, record.message_count) == (0, len(messages))
    assert await store.aupdate_session("s", expected_version=0, summary="r", summarized_through=2,
                                       window_start=3)  # fmt: skip
    assert not await store.aupdate_session("s", expected_version=0, summary="stale")
    assert (await store.aget_session("s")).summary == "r"
    assert await store.aacquire_lease("s", "w", 30)
    assert not await store.aacquire_lease("s", "v", 30)
    assert await store.arelease_lease("s", "w")
    assert await store.alist_sessions() == ["s"]
    harness.corrupt("s", 1, "]")
    with pytest.raises(CorruptMessageError, match="seq=1 of session 's'"):
        await store.aread("s")
    with pytest.raises(ValueError, match="257 characters"):
        await store.aappend("x" * 257, [HumanMessage("a")], [1])
    with pytest.raises(ValueError, match="2 messages but 1 token counts"):
        await store.aappend("s", [HumanMessage("a"), HumanMessage("b")], [1])
    await store.adelete_session("s")
    assert await store.aread("s") == []
    assert await store.alist_sessions() == []
    # Sync and async views agree.
    await store.aappend("t", [HumanMessage("a")], [1])
    assert [m.message.content for m in store.read("t")] == ["a"]
