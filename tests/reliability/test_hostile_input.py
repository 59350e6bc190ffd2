"""Hostile input, fuzzed with hypothesis: odd messages, odd session ids, odd configuration.

Each input is either handled (stored and read back intact, planned into a valid prompt within
budget) or refused with a clear, documented error (``TypeError``/``ValueError`` at the API,
``ContextOverflowError`` with the numbers) — never an ``AttributeError``/``KeyError`` from
deep inside, and never a store left inconsistent (it is read back after every failure).
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.exceptions import ContextOverflowError
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.stores import (
    MAX_SESSION_ID_LENGTH,
    MessageStore,
    SQLiteMessageStore,
)
from langchain_holysheep.tokens import TokenCounter
from tests.postgres_server import PostgresServer
from tests.reliability.conftest import soak_enabled
from tests.reliability.support import MODEL, record_problems

_T = TypeVar("_T")

# What an API may raise at a caller who passed bad input: documented, with a message.
DOCUMENTED = (TypeError, ValueError, ContextOverflowError)
# What must never escape: a crash inside the package, whatever the input.
INTERNAL = (AttributeError, KeyError, IndexError, UnicodeError, AssertionError, RecursionError,
            ZeroDivisionError, OverflowError)  # fmt: skip

HUGE = "Z" * 30_000  # several thousand tokens: more than the whole budget
# More examples under make soak (HOLYSHEEP_SOAK=1) or HOLYSHEEP_FUZZ_EXAMPLES=N.
EXAMPLES = int(os.environ.get("HOLYSHEEP_FUZZ_EXAMPLES") or (500 if soak_enabled() else 60))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _is_documented(exc: BaseException) -> bool:
    return isinstance(exc, DOCUMENTED) and not isinstance(exc, INTERNAL) and bool(str(exc))


def _outcome(call: Callable[[], _T]) -> tuple[_T | None, Exception | None]:
    """Run ``call``; return its result or the exception it raised (internal crashes escape)."""
    try:
        return call(), None
    except INTERNAL:
        raise
    except Exception as exc:
        return None, exc


@pytest.fixture(scope="module")
def store() -> Iterator[MessageStore]:
    with tempfile.TemporaryDirectory() as tmp:
        s = SQLiteMessageStore(Path(tmp) / "hostile.db", namespace="hostile")
        yield s
        s.close()


@pytest.fixture(scope="module")
def window() -> ContextWindow:
    return ContextWindow(model=MODEL, max_tokens=2000)


# -- strategies ------------------------------------------------------------------------------

_texts = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", " ", "\x00", "\ud800 lone", "\udfff", "'; DROP TABLE x; --", HUGE]),
)
_blocks = st.lists(
    st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, _texts),
        st.just({"type": "text"}),  # a text block without its text
        st.builds(lambda k: {"type": k, "payload": [1, None]}, st.text(min_size=1, max_size=12)),
        st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
        st.just({"no_type": True}),
        _texts,
    ),
    max_size=4,
)
_content = st.one_of(_texts, _blocks)
_ids = st.one_of(st.none(), st.sampled_from(["dup", "dup", "m-1"]), st.text(max_size=20))
_call_ids = st.sampled_from(["c1", "c2", "ghost", ""])


def _human(content: Any, id: Any) -> BaseMessage:
    return HumanMessage(content=content, id=id)


def _ai(content: Any, id: Any, calls: list[str]) -> BaseMessage:
    return AIMessage(
        content=content, id=id,
        tool_calls=[{"name": "lookup", "args": {"q": c}, "id": c} for c in calls],
    )  # fmt: skip


def _tool(content: Any, id: Any, call: str) -> BaseMessage:
    return ToolMessage(content=content, id=id, tool_call_id=call)


_messages = st.one_of(
    st.builds(_human, _content, _ids),
    st.builds(_ai, _content, _ids, st.lists(_call_ids, max_size=2, unique=True)),
    st.builds(_tool, _content, _ids, _call_ids),  # may answer no call at all
    st.builds(lambda c: SystemMessage(content=c), _content),
)
_batches = st.lists(_messages, max_size=6)


# -- message shapes --------------------------------------------------------------------------


def _check_store(store: MessageStore, session: str, expected: list[BaseMessage]) -> None:
    stored = store.read(session)  # raises CorruptMessageError if a row cannot be decoded
    assert [m.seq for m in stored] == list(range(len(stored)))
    assert [(m.message.type, m.message.content) for m in stored] == [
        (m.type, m.content) for m in expected
    ]
    record = store.get_session(session)
    assert record.message_count == len(stored)
    assert record_problems(record) == []


@SETTINGS
@given(batches=st.lists(_batches, min_size=1, max_size=4))
def test_odd_messages_are_stored_intact_and_planned_validly(
    store: MessageStore, window: ContextWindow, batches: list[list[BaseMessage]]
) -> None:
    session = uuid.uuid4().hex
    history = ManagedChatMessageHistory(session, store, window, reserved_tokens=30)
    stored: list[BaseMessage] = []
    for batch in batches:
        _, error = _outcome(lambda batch=batch: history.add_messages(batch))  # type: ignore[misc]
        if error is None:
            stored.extend(batch)
        else:
            assert _is_documented(error), repr(error)
        _check_store(store, session, stored)  # a refused batch wrote nothing
        context, error = _outcome(lambda: history.messages)
        if context is None:
            assert error is not None
            assert _is_documented(error), repr(error)
            continue
        prompt = [SystemMessage("sys"), *context, HumanMessage("next question")]
        assert find_prompt_problems(prompt) == [], (find_prompt_problems(prompt), context)
        plan = history.last_plan
        if context and plan is not None:
            assert plan.tokens.total <= plan.tokens.prompt_limit


_dicts = st.builds(
    lambda role, content: {"role": role, "content": content},
    # A "tool" dict without tool_call_id has its own test below.
    st.sampled_from(["user", "assistant", "system", "developer", "robot", ""]),
    st.one_of(st.none(), _content),
)


@SETTINGS
@given(conversation=st.lists(st.one_of(_messages, _dicts, st.tuples(st.just("user"), _texts)),
                             max_size=8))  # fmt: skip
def test_window_invoke_on_odd_message_likes(window: ContextWindow, conversation: list[Any]) -> None:
    """``ContextWindow.invoke`` takes message-likes: odd ones get a clear error, not a crash."""
    sent, error = _outcome(lambda: window.invoke(conversation))
    if sent is None:
        assert error is not None
        assert _is_documented(error), repr(error)
        return
    assert find_prompt_problems(sent) == [] or not sent


def test_message_like_dict_without_tool_call_id_gets_a_clear_error(window: ContextWindow) -> None:
    """A tool-role dict without ``tool_call_id`` is bad input: say so, not ``KeyError``."""
    with pytest.raises((TypeError, ValueError), match="tool_call_id"):
        window.invoke([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}])


def test_same_id_different_text_is_counted_by_its_own_text(store: MessageStore) -> None:
    """Two different messages that share an id (ids are caller-chosen and not unique across
    sessions) must each be counted by their own text, else the window plans with a count
    that is wrong by a thousand tokens and the prompt it sends exceeds the budget."""
    window = ContextWindow(model=MODEL, max_tokens=2000)
    first = ManagedChatMessageHistory(uuid.uuid4().hex, store, window)
    second = ManagedChatMessageHistory(uuid.uuid4().hex, store, window)
    first.add_messages([HumanMessage("a" * 1200, id="msg-1")])
    second.add_messages([HumanMessage("私" * 1200, id="msg-1")])  # same id, same length
    fresh = TokenCounter(MODEL)
    stored = store.read(second.session_id)[0]
    actual = fresh.count_message(stored.message)
    assert stored.tokens == actual, f"stored count {stored.tokens}, the text counts {actual}"


# -- session ids -----------------------------------------------------------------------------

_sql_ids = st.one_of(
    st.sampled_from([
        "'; DROP TABLE holysheep_messages; --", "\" OR 1=1 --", "%", "_", "\\", "a'b\"c`d",
        "$1", "?", ":name", "%(ns)s", "{}", "NULL", "\u202e", "😀" * 64, " ",
    ]),
    st.text(min_size=1, max_size=MAX_SESSION_ID_LENGTH).filter(lambda s: "\x00" not in s),
)  # fmt: skip


def _session_roundtrip(store: MessageStore, session: str) -> None:
    _, error = _outcome(
        lambda: store.append(session, [HumanMessage("hello"), AIMessage("hi")], [3, 3])
    )
    if error is not None:
        assert _is_documented(error), repr(error)
        # Refused: only ids that cannot be stored as text may be refused.
        assert not _encodable(session), f"a valid id was refused: {error}"
        return
    assert [m.message.content for m in store.read(session)] == ["hello", "hi"]
    assert session in store.list_sessions()
    assert store.get_session(session).message_count == 2
    store.delete_session(session)
    assert session not in store.list_sessions()


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@SETTINGS
@given(session=_sql_ids)
def test_session_ids_with_sql_metacharacters_round_trip(store: MessageStore, session: str) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    store.append(canary, [HumanMessage("keep me")], [3])
    _session_roundtrip(store, session)
    assert [m.message.content for m in store.read(canary)] == ["keep me"]


@pytest.mark.parametrize(
    ("session", "match"),
    [
        ("", "empty"),
        ("x" * 10_240, "10,240 characters long; the limit is 256"),
        ("x" * (MAX_SESSION_ID_LENGTH + 1), "limit is 256"),
        ("nul\x00inside", "NUL"),
        ("lone \ud800", "surrogate"),
        (None, "must be a string"),
        (42, "must be a string"),
    ],
)
def test_unusable_session_ids_get_a_clear_error(
    store: MessageStore, session: Any, match: str
) -> None:
    before = store.list_sessions()
    with pytest.raises((TypeError, ValueError), match=match):
        ManagedChatMessageHistory(session, store)
    with pytest.raises((TypeError, ValueError), match=match):
        store.append(session, [HumanMessage("x")], [1])
    assert store.list_sessions() == before


@pytest.mark.postgres
def test_postgres_session_ids_with_sql_metacharacters(
    reliability_postgres: PostgresServer,
) -> None:
    from langchain_holysheep.stores import PostgresMessageStore

    with PostgresMessageStore.from_conn_string(
        reliability_postgres.url, namespace="hostile-%_'"
    ) as pg:
        other = pg.with_namespace("hostile-other")
        other.append("victim", [HumanMessage("keep me")], [3])

        @SETTINGS
        @given(session=_sql_ids)
        def run(session: str) -> None:
            _session_roundtrip(pg, session)

        run()
        assert [m.message.content for m in other.read("victim")] == ["keep me"]
        assert "victim" not in pg.list_sessions()


# -- configuration values --------------------------------------------------------------------

_ints = st.one_of(st.integers(-5, 5), st.integers(-(10**6), 10**7), st.just(10**12))
_fractions = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 0.9, 1.0, 1.5])
)


@SETTINGS
@given(
    max_tokens=st.one_of(st.none(), _ints),
    high=_fractions,
    low=_fractions,
    window_size=st.one_of(st.none(), st.integers(-3, 40)),
    reserved=st.integers(-10, 10**6),
)
def test_odd_configuration_is_refused_clearly_or_works(
    store: MessageStore,
    max_tokens: int | None,
    high: float,
    low: float,
    window_size: int | None,
    reserved: int,
) -> None:
    def build() -> ManagedChatMessageHistory:
        window = ContextWindow(
            model=MODEL, max_tokens=max_tokens, high_water=high, low_water=low,
            window_size=window_size,
        )  # fmt: skip
        return ManagedChatMessageHistory(uuid.uuid4().hex, store, window, reserved_tokens=reserved)

    history, error = _outcome(build)
    if history is None:
        assert error is not None
        assert _is_documented(error), repr(error)
        return
    assert 0 < low <= high <= 1
    assert not math.isnan(high)
    for turn in range(6):
        history.add_messages([HumanMessage(f"question {turn} " * 20), AIMessage("answer " * 20)])
        context, error = _outcome(lambda: history.messages)
        if context is None:
            assert isinstance(error, (ContextOverflowError, ValueError)), repr(error)
            assert any(ch.isdigit() for ch in str(error)), f"no numbers in: {error}"
            return
        assert find_prompt_problems([SystemMessage("s"), *context, HumanMessage("q")]) == []
        plan = history.last_plan
        assert plan is not None
        assert plan.tokens.total <= plan.tokens.prompt_limit
        if window_size is not None:
            assert len(context) <= max(window_size, 2) + 1  # recap + capped window
