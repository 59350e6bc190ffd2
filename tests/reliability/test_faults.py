"""Relay faults during a managed conversation: nothing half-stored, nothing lost, recovery.

Faults come from the loopback relay (429 bursts with Retry-After, 500/503, streams cut or
truncated mid-answer, malformed JSON, stalls past the timeout, dropped connections). The
conversation runs through ``RunnableWithMessageHistory`` over a ``ManagedChatMessageHistory``
and through ``create_agent`` with the ``ContextWindowMiddleware``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from langchain_holysheep.errors import HolySheepError
from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.stores import MessageStore
from langchain_holysheep.summarize import SummaryFailureWarning
from langchain_holysheep.testing import Fault, HolySheepTestServer
from tests.reliability.support import (
    SYSTEM,
    StoreSpec,
    make_chain,
    make_model,
    make_window,
    open_store,
    prompt_problems,
    question,
    stored_tags,
    summary_problems,
    sync_turn,
    tag_responder,
    transcript_problems,
)

SESSION = "fault-session"
MAX_RETRIES = 1
TIMEOUT = 0.5

# (id, faults queued for the failing call, whether to stream). Each queue outlasts the retries,
# so the call fails; the relay is healthy again afterwards.
FAILING: list[tuple[str, list[Fault], bool]] = [
    ("429-burst", [Fault.rate_limited(retry_after=0)] * (MAX_RETRIES + 1), False),
    ("500", [Fault.server_error(500)] * (MAX_RETRIES + 1), False),
    ("503", [Fault.unavailable(retry_after=0)] * (MAX_RETRIES + 1), False),
    # A 200 with a body that is not a completion is not retried by the client: one is enough.
    ("malformed-json", [Fault.malformed_body()], False),
    ("stall", [Fault.slow(TIMEOUT + 1.0)] * (MAX_RETRIES + 1), False),
    ("disconnect", [Fault.disconnect()] * (MAX_RETRIES + 1), False),
    ("stream-cut", [Fault.stream_cut(after_chunks=4)], True),
    ("stream-truncated", [Fault.stream_truncated(after_chunks=4)], True),
    ("stream-malformed", [Fault.stream_malformed(after_chunks=4)], True),
    ("stream-429-burst", [Fault.rate_limited(retry_after=0)] * (MAX_RETRIES + 1), True),
    ("stream-stall", [Fault.slow(TIMEOUT + 1.0)] * (MAX_RETRIES + 1), True),
]


@pytest.fixture
def summary_server() -> Iterator[HolySheepTestServer]:
    """A second relay for the summarizer, so injected faults hit only the chat model."""
    with HolySheepTestServer(responder=tag_responder) as srv:
        yield srv


@pytest.fixture
def sqlite_store(tmp_path: Any) -> Iterator[MessageStore]:
    store = open_store(StoreSpec("sqlite", str(tmp_path / "c.db"), "faults"))
    yield store
    store.close()


def _snapshot(store: MessageStore) -> list[tuple[int, str, object]]:
    return [(m.seq, m.message.type, m.message.content) for m in store.read(SESSION)]


def _ask(chain: Any, text: str, stream: bool) -> None:
    config = {"configurable": {"session_id": SESSION}}
    if stream:
        for _ in chain.stream({"question": text}, config):
            pass
    else:
        chain.invoke({"question": text}, config)


async def _aask(chain: Any, text: str, stream: bool) -> None:
    config = {"configurable": {"session_id": SESSION}}
    if stream:
        async for _ in chain.astream({"question": text}, config):
            pass
    else:
        await chain.ainvoke({"question": text}, config)


def _last_sent_prompt_ok(server: HolySheepTestServer, text: str) -> None:
    sent = [r for r in server.chat_requests if r.status == 200][-1].messages
    assert sent[0]["role"] == "system"
    assert sent[-1] == {"role": "user", "content": text}
    assert [m["content"] for m in sent].count(text) == 1  # the retried question is not doubled


@pytest.mark.parametrize(("faults", "stream"), [(f, s) for _, f, s in FAILING],
                         ids=[name for name, _, _ in FAILING])  # fmt: skip
def test_failed_call_stores_nothing_and_the_conversation_carries_on(
    server: HolySheepTestServer,
    summary_server: HolySheepTestServer,
    sqlite_store: MessageStore,
    faults: list[Fault],
    stream: bool,
) -> None:
    model = make_model(server.base_url, server.api_key or "", max_retries=MAX_RETRIES,
                       timeout=TIMEOUT)  # fmt: skip
    summarizer = make_model(summary_server.base_url, summary_server.api_key or "")
    chain = make_chain(model, sqlite_store, make_window(summarizer))
    for turn in range(2):
        _ask(chain, question(SESSION, turn), stream)
    before = _snapshot(sqlite_store)
    requests_before = len(server.chat_requests)

    server.inject(*faults)
    with pytest.raises(HolySheepError):
        _ask(chain, question(SESSION, 2), stream)
    assert server.pending_faults == 0
    # The failed call stored no half answer and not the question either (the caller retries).
    assert _snapshot(sqlite_store) == before
    assert len(server.chat_requests) - requests_before == len(faults)

    # Once the fault clears the same question goes through and is stored exactly once.
    for turn in range(2, 6):
        _ask(chain, question(SESSION, turn), stream)
        _last_sent_prompt_ok(server, question(SESSION, turn))
    assert transcript_problems(sqlite_store, SESSION, 6) == []


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
async def test_async_failed_call_stores_nothing(
    server: HolySheepTestServer,
    summary_server: HolySheepTestServer,
    sqlite_store: MessageStore,
    stream: bool,
) -> None:
    model = make_model(server.base_url, server.api_key or "", max_retries=MAX_RETRIES,
                       timeout=TIMEOUT)  # fmt: skip
    summarizer = make_model(summary_server.base_url, summary_server.api_key or "")
    chain = make_chain(model, sqlite_store, make_window(summarizer))
    await _aask(chain, question(SESSION, 0), stream)
    before = _snapshot(sqlite_store)
    cut = Fault.stream_cut(after_chunks=4) if stream else Fault.server_error(502)
    server.inject(*([cut] if stream else [cut] * (MAX_RETRIES + 1)))
    with pytest.raises(HolySheepError):
        await _aask(chain, question(SESSION, 1), stream)
    assert _snapshot(sqlite_store) == before
    for turn in range(1, 4):
        await _aask(chain, question(SESSION, turn), stream)
    assert transcript_problems(sqlite_store, SESSION, 4) == []


def test_429_burst_within_retries_is_invisible(
    server: HolySheepTestServer, sqlite_store: MessageStore
) -> None:
    model = make_model(server.base_url, server.api_key or "", max_retries=3, timeout=TIMEOUT)
    chain = make_chain(model, sqlite_store, make_window(None))
    server.inject(
        Fault.rate_limited(retry_after=0.2), Fault.rate_limited(retry_after=0), Fault.unavailable()
    )
    _ask(chain, question(SESSION, 0), stream=False)
    statuses = [r.status for r in server.chat_requests]
    assert statuses == [429, 429, 503, 200]
    assert [r.retry_count for r in server.chat_requests] == [0, 1, 2, 3]
    # Retry-After was honoured: the first retry came no sooner than it asked.
    first, second = server.chat_requests[:2]
    assert second.received_at - first.received_at >= 0.2
    assert transcript_problems(sqlite_store, SESSION, 1) == []


def test_summarizer_failing_every_call_for_100_turns_loses_nothing(
    server: HolySheepTestServer, sqlite_store: MessageStore
) -> None:
    """A summarizer that always fails: every prompt valid and within budget, nothing lost."""
    kinds = [
        Fault.server_error(500),
        Fault.unavailable(retry_after=0),
        Fault.rate_limited(retry_after=0),
        Fault.malformed_body(),
        Fault.disconnect(),
        Fault.http_error(502),
    ]
    calls = {"n": 0}

    def always_fail(body: dict[str, Any]) -> Fault | None:
        calls["n"] += 1
        return kinds[calls["n"] % len(kinds)]

    turns = 100
    with HolySheepTestServer(fault_policy=always_fail) as broken:
        summarizer = make_model(broken.base_url, broken.api_key or "", max_retries=0, timeout=1.0)
        window = make_window(summarizer, max_tokens=1000)
        history = ManagedChatMessageHistory(SESSION, sqlite_store, window, reserved_tokens=60)
        model = make_model(server.base_url, server.api_key or "")
        failed_plans = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SummaryFailureWarning)
            for turn in range(turns):
                result = sync_turn(history, model, SESSION, turn)
                assert prompt_problems(result) == [], f"turn {turn}"
                assert len(sqlite_store.read(SESSION)) == 2 * (turn + 1)
                plan = history.last_plan
                assert plan is not None or turn == 0  # an empty session needs no plan
                failed_plans += bool(plan and plan.summary_failed)
                # The recap never appears: there is no summary to show.
                assert sqlite_store.get_session(SESSION).summary is None
        assert calls["n"] >= 10, "the summarizer was hardly asked; the test proves nothing"
        assert failed_plans >= 10
        assert any(issubclass(w.category, SummaryFailureWarning) for w in caught)
        assert transcript_problems(sqlite_store, SESSION, turns) == []
        record = sqlite_store.get_session(SESSION)
        assert record.summarized_through == 0  # nothing folded into a summary that failed

    # The summarizer comes back: the pending messages are folded, nothing was skipped.
    with HolySheepTestServer(responder=tag_responder) as healthy:
        window = make_window(make_model(healthy.base_url, healthy.api_key or ""), max_tokens=1000)
        history = ManagedChatMessageHistory(SESSION, sqlite_store, window, reserved_tokens=60)
        for turn in range(turns, turns + 3):
            result = sync_turn(history, model, SESSION, turn)
            assert prompt_problems(result) == []
        record = sqlite_store.get_session(SESSION)
        assert record.summary is not None
        assert record.summarized_through > 0
        assert transcript_problems(sqlite_store, SESSION, turns + 3) == []
        assert summary_problems(record, stored_tags(sqlite_store, SESSION)) == []


# -- the agent middleware --------------------------------------------------------------------


def _agent(
    server: HolySheepTestServer, summary_server: HolySheepTestServer, plans: list[Any]
) -> Any:
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    from langchain_holysheep.middleware import ContextWindowMiddleware

    model = make_model(server.base_url, server.api_key or "", max_retries=MAX_RETRIES,
                       timeout=TIMEOUT)  # fmt: skip
    summarizer = make_model(summary_server.base_url, summary_server.api_key or "")
    window = make_window(summarizer, max_tokens=1000)
    system_prompt = SYSTEM.content
    assert isinstance(system_prompt, str)
    return create_agent(
        model,
        tools=[],
        system_prompt=system_prompt,
        middleware=[ContextWindowMiddleware(window=window, on_plan=plans.append)],
        checkpointer=InMemorySaver(),
    )


def _check_agent_state(agent: Any, config: dict[str, Any], turns: int) -> None:
    messages = agent.get_state(config).values["messages"]
    humans = [m.content for m in messages if isinstance(m, HumanMessage)]
    assert humans == [question("agent", t) for t in range(turns)]
    assert len(messages) == 2 * turns
    for t in range(turns):
        assert isinstance(messages[2 * t + 1], AIMessage)
        assert f"[agent#T{t}]" in str(messages[2 * t + 1].content)


AGENT_FAULTS = [
    ("500", [Fault.server_error(500)] * (MAX_RETRIES + 1), False),
    ("429-burst", [Fault.rate_limited(retry_after=0)] * (MAX_RETRIES + 1), False),
    ("stall", [Fault.slow(TIMEOUT + 1.0)] * (MAX_RETRIES + 1), False),
    ("malformed-json", [Fault.malformed_body()], False),
    ("stream-cut", [Fault.stream_cut(after_chunks=4)], True),
]


@pytest.mark.parametrize(("faults", "stream"), [(f, s) for _, f, s in AGENT_FAULTS],
                         ids=[name for name, _, _ in AGENT_FAULTS])  # fmt: skip
def test_agent_failed_model_call_keeps_the_question_once_and_resumes(
    server: HolySheepTestServer,
    summary_server: HolySheepTestServer,
    faults: list[Fault],
    stream: bool,
) -> None:
    plans: list[Any] = []
    agent = _agent(server, summary_server, plans)
    config: dict[str, Any] = {"configurable": {"thread_id": "agent-thread"}}

    def ask(turn: int | None) -> None:
        payload = None if turn is None else {"messages": [HumanMessage(question("agent", turn))]}
        if stream:
            for _ in agent.stream(payload, config, stream_mode="messages"):
                pass
        else:
            agent.invoke(payload, config)

    for turn in range(8):
        ask(turn)
    server.inject(*faults)
    with pytest.raises(HolySheepError):
        ask(8)
    state = agent.get_state(config)
    messages = state.values["messages"]
    # The checkpoint holds the question once and no half answer; the model node is pending.
    assert isinstance(messages[-1], HumanMessage)
    assert messages[-1].content == question("agent", 8)
    assert state.next == ("model",)
    ask(None)  # resume the interrupted run once the relay is healthy
    for turn in range(9, 12):
        ask(turn)
    _check_agent_state(agent, config, 12)
    # Every prompt the middleware planned is valid and within its limit, faults or not.
    assert plans
    for plan in plans:
        assert find_prompt_problems(plan.messages) == []
        assert plan.tokens.total <= plan.tokens.prompt_limit
    assert any(plan.compacted for plan in plans), "the window never compacted"


async def test_async_agent_failed_model_call_resumes(
    server: HolySheepTestServer, summary_server: HolySheepTestServer
) -> None:
    plans: list[Any] = []
    agent = _agent(server, summary_server, plans)
    config: dict[str, Any] = {"configurable": {"thread_id": "agent-async"}}
    for turn in range(6):
        await agent.ainvoke({"messages": [HumanMessage(question("agent", turn))]}, config)
    server.inject(*[Fault.server_error(503)] * (MAX_RETRIES + 1))
    with pytest.raises(HolySheepError):
        await agent.ainvoke({"messages": [HumanMessage(question("agent", 6))]}, config)
    assert server.pending_faults == 0
    state = await agent.aget_state(config)
    assert state.values["messages"][-1].content == question("agent", 6)
    await agent.ainvoke(None, config)
    for turn in range(7, 10):
        await agent.ainvoke({"messages": [HumanMessage(question("agent", turn))]}, config)
    _check_agent_state(agent, config, 10)
    assert all(find_prompt_problems(plan.messages) == [] for plan in plans)
    assert any(plan.compacted for plan in plans)
