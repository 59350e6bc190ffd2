"""End to end: RunnableWithMessageHistory + ChatHolySheep (loopback server) + durable stores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core._api.deprecation import LangChainDeprecationWarning
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.history import RunnableWithMessageHistory

from langchain_holysheep.chat_models import ChatHolySheep
from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.testing import Fault, HolySheepTestServer
from tests.unit_tests.stores.conftest import StoreHarness

TURNS = 24


@pytest.fixture
def server() -> Iterator[HolySheepTestServer]:
    with HolySheepTestServer() as srv:
        yield srv


# ChatHolySheep(model=...) is the documented constructor; the pydantic mypy plugin types the
# __init__ of a populate_by_name model with field names only (model_name), hence ignore[call-arg].
def _chain(
    server: HolySheepTestServer, harness: StoreHarness
) -> tuple[RunnableWithMessageHistory, ContextWindow]:
    model = ChatHolySheep(  # type: ignore[call-arg]
        model="deepseek-v3.2", base_url=server.base_url, api_key=server.api_key, max_retries=0
    )
    window = ContextWindow(model="deepseek-v3.2", max_tokens=1500, summarizer=model)
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are Sheepdog, a terse support assistant."),
            MessagesPlaceholder("history"),
            ("human", "{question}"),
        ]
    )
    with pytest.warns(LangChainDeprecationWarning, match="RunnableWithMessageHistory"):
        chain = RunnableWithMessageHistory(
            prompt | model,
            lambda session_id: ManagedChatMessageHistory(
                session_id, harness.store, window, reserved_tokens=100
            ),
            input_messages_key="question",
            history_messages_key="history",
        )
    return chain, window


def _question(turn: int) -> str:
    return f"turn {turn}: where is parcel {turn}? " + "It was due last week, please check. " * 4


def _check_turn(server: HolySheepTestServer, harness: StoreHarness, turn: int) -> None:
    sent = [r for r in server.chat_requests if r.status == 200][-1].messages
    assert sent[0]["role"] == "system"
    assert sent[-1] == {"role": "user", "content": _question(turn)}
    transcript = harness.store.read("user-1")
    assert len(transcript) == 2 * (turn + 1)  # nothing lost, nothing duplicated
    assert [m.message.content for m in transcript[::2]] == [_question(t) for t in range(turn + 1)]
    assert all(isinstance(m.message, AIMessage) for m in transcript[1::2])


def _config() -> RunnableConfig:
    return {"configurable": {"session_id": "user-1"}}


def test_sync_conversation_is_bounded_and_durable(
    durable_harness: StoreHarness, server: HolySheepTestServer
) -> None:
    chain, _ = _chain(server, durable_harness)
    history_sizes = []
    for turn in range(TURNS):
        if turn == TURNS // 2:
            server.inject(Fault.http_error(500))
            with pytest.raises(Exception, match="500"):
                chain.invoke({"question": "this one fails"}, config=_config())
            # A failed model call stores neither the question nor a half answer.
            assert len(durable_harness.store.read("user-1")) == 2 * turn
        answer = chain.invoke({"question": _question(turn)}, config=_config())
        assert isinstance(answer, AIMessage)
        _check_turn(server, durable_harness, turn)
        history_sizes.append(len(server.chat_requests[-1].messages))
    assert max(history_sizes) < 2 * TURNS  # the prompt stayed bounded
    record = durable_harness.store.get_session("user-1")
    assert record.window_start > 0
    assert record.summary  # the window compacted and folded old turns into the summary


async def test_async_conversation_is_bounded_and_durable(
    durable_harness: StoreHarness, server: HolySheepTestServer
) -> None:
    chain, window = _chain(server, durable_harness)
    for turn in range(TURNS):
        answer = await chain.ainvoke({"question": _question(turn)}, config=_config())
        assert isinstance(answer, AIMessage)
        _check_turn(server, durable_harness, turn)
    history = ManagedChatMessageHistory("user-1", durable_harness.store, window)
    assert len(history.transcript) == 2 * TURNS
    assert len(await history.aget_messages()) < 2 * TURNS
    assert isinstance((await history.aget_messages())[-1], AIMessage)
    assert any(isinstance(m, HumanMessage) for m in history.messages)
