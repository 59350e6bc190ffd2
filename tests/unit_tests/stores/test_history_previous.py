"""The plan sent last turn reaches the next history of the session, and only when it fits.

``RunnableWithMessageHistory`` builds a new ``ManagedChatMessageHistory`` for every call, so
the window remembers the plan each history returned (per store object and session). The next
history uses it for an exact cached-token estimate and for cache-aligned summaries, which
resend that prompt; a plan that no longer describes the stored conversation (the session was
cleared and started again, or another process summarized since) is never used.
"""

from __future__ import annotations

import gc
from dataclasses import replace

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.stores import InMemoryMessageStore
from langchain_holysheep.summarize import is_cache_aligned_request
from langchain_holysheep.window import WindowState, plan_matches
from tests.unit_tests.test_summarize import RecordingModel

MODEL = "deepseek-v3.2"


def recording_summarizer() -> RecordingModel:
    """Answers every summary request with a short recap and keeps the requests."""
    return RecordingModel(responses=["Recap: the user asked questions."])


def window(summarizer: RecordingModel, max_tokens: int = 1500) -> ContextWindow:
    return ContextWindow(
        model=MODEL,
        max_tokens=max_tokens,
        summarizer=summarizer,
        summary_mode="cache_aligned",
        summary_timeout=None,
    )


def words(tag: str, n: int) -> str:
    return f"{tag} " + " ".join(f"{tag}{i % 7}" for i in range(n))


def run_turns(store: InMemoryMessageStore, win: ContextWindow, turns: int, *, fresh: bool) -> None:
    """Turns as RunnableWithMessageHistory runs them: read the history, answer, append both."""
    history = ManagedChatMessageHistory("s", store, win)
    for i in range(turns):
        if fresh:
            history = ManagedChatMessageHistory("s", store, win)
        history.messages  # noqa: B018 - the read plans this turn's prompt
        history.add_messages(
            [HumanMessage(words(f"q{i}", 60)), AIMessage(words(f"a{i}", 60), id=f"a{i}")]
        )


def test_histories_built_anew_every_call_get_cache_aligned_summaries() -> None:
    for fresh in (False, True):
        summarizer = recording_summarizer()
        run_turns(InMemoryMessageStore(), window(summarizer), 30, fresh=fresh)
        aligned = [r for r in summarizer.prompts if is_cache_aligned_request(r)]
        assert len(summarizer.prompts) >= 3, fresh
        # Every summary resends the prompt of the turn before, whether one history object
        # served every turn or a new one each call.
        assert len(aligned) == len(summarizer.prompts), (fresh, len(aligned))


def test_a_plan_from_before_the_session_was_cleared_is_not_resent() -> None:
    """History A answered a conversation; another process cleared the session; the user
    starts again with the same opening messages. A's last prompt contains the opening as one
    run, so a cache-aligned summary would resend it, and with it the answer that was
    deleted."""
    summarizer = recording_summarizer()
    win = window(summarizer, max_tokens=2000)
    store = InMemoryMessageStore()
    opening: list[BaseMessage] = [
        HumanMessage(words("first", 140)),
        AIMessage(words("reply", 140)),
        HumanMessage(words("second", 140)),
        AIMessage(words("more", 140)),
        HumanMessage("and one more thing"),
    ]
    history = ManagedChatMessageHistory("s", store, win)
    history.add_messages([*opening, AIMessage("the DELETED-SECRET answer")])
    assert history.messages  # A's plan of the old conversation (no compaction yet)
    assert summarizer.prompts == []
    old_plan = history.last_plan
    assert old_plan is not None

    ManagedChatMessageHistory("s", store, win).clear()  # "another process" clears it
    assert win.recall_plan(store, "s") is None
    history.add_messages([*opening, AIMessage("a fresh answer"), HumanMessage(words("third", 60))])
    for fresh in (False, True):
        # The stale plan reaches the reader the way it would: A's own last plan, or the
        # window's memory of the session (left by a process that has not seen the clear).
        if fresh:
            reader = ManagedChatMessageHistory("s", store, win)
            win.remember_plan(store, "s", old_plan)
        else:
            reader = history
            reader.last_plan = old_plan
        summarizer.prompts.clear()
        assert reader.messages
        assert summarizer.prompts, "the window should have compacted"
        for request in summarizer.prompts:
            assert not any("DELETED-SECRET" in str(m.content) for m in request), fresh
        # Undo the compaction, so that the other reader compacts the same conversation.
        version = store.get_session("s").version
        assert store.update_session(
            "s", expected_version=version, summary=None, summary_tokens=0,
            summarized_through=0, window_start=0,
        )  # fmt: skip


def test_plans_are_kept_per_store_object_and_go_with_it() -> None:
    summarizer = recording_summarizer()
    win = window(summarizer)
    store, other = InMemoryMessageStore(), InMemoryMessageStore()
    history = ManagedChatMessageHistory("s", store, win)
    history.add_messages([HumanMessage("hello")])
    assert history.messages
    assert win.recall_plan(store, "s") is history.last_plan
    assert win.recall_plan(other, "s") is None
    history.clear()
    assert win.recall_plan(store, "s") is None
    assert history.last_plan is None

    history = ManagedChatMessageHistory("s", store, win)
    history.add_messages([HumanMessage("hello again")])
    assert history.messages
    del history, store
    gc.collect()
    assert len(win._rt.sent_plans) == 0  # the plans went with the store object


def test_plan_matches_checks_the_state_and_every_message_sent() -> None:
    win = ContextWindow(model=MODEL, max_tokens=1500)
    conversation: list[BaseMessage] = [
        HumanMessage("hello", id="h1"),
        AIMessage("hi there", id="a1"),
        HumanMessage("how are you?", id="h2"),
    ]
    state = WindowState()
    plan = win.step([], conversation, offset=0, state=state)
    assert plan_matches(plan, state, conversation, 0)
    assert plan_matches(plan, replace(state, version=7), conversation, 0)  # version aside
    assert plan_matches(plan, state, [*conversation, AIMessage("later", id="a2")], 0)
    assert not plan_matches(plan, replace(state, summary="another recap"), conversation, 0)
    edited = [conversation[0], AIMessage("hi there!", id="a1"), conversation[2]]
    assert not plan_matches(plan, state, edited, 0)
    renumbered = [conversation[0], AIMessage("hi there", id="other"), conversation[2]]
    assert not plan_matches(plan, state, renumbered, 0)
    assert not plan_matches(plan, state, conversation[:2], 0)  # shorter than the plan saw
    assert not plan_matches(plan, state, conversation[1:], 1)  # starts after what it sent
