"""ContextWindow: the runnable, per-conversation memory, step API, failures, truncation."""

from __future__ import annotations

import asyncio
import threading
import warnings
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import ContextOverflowError
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatResult
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableConfig
from pydantic import Field

from langchain_holysheep import ContextPlan, ContextWindow, TokenCounter
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.summarize import SummaryFailureWarning
from langchain_holysheep.window import WindowState, is_recap
from langchain_holysheep.workload import synthetic_conversation

MODEL = "deepseek-v3.2"


class Summarizer(FakeListChatModel):
    """Fake summarizer: records the transcripts it gets; can be switched to fail."""

    responses: list[str] = Field(default_factory=lambda: ["Recap: the customer discussed orders."])
    transcripts: list[str] = Field(default_factory=list)
    fail: bool = False

    def _record(self, messages: list[BaseMessage]) -> None:
        if self.fail:
            raise RuntimeError("summarizer unavailable")
        self.transcripts.append(str(messages[-1].content))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._record(messages)
        return super()._generate(messages, stop, run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._record(messages)
        return await super()._agenerate(messages, stop, run_manager, **kwargs)


def make_window(**kw: Any) -> ContextWindow:
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 3000)
    return ContextWindow(**kw)


def conversation(turns: int = 40, seed: int = 1) -> list[BaseMessage]:
    return synthetic_conversation(turns, seed=seed).messages


def check(plan: ContextPlan, history: list[BaseMessage]) -> None:
    assert find_prompt_problems(plan.messages) == []
    assert plan.tokens.total <= plan.tokens.prompt_limit
    assert isinstance(plan.messages[0], SystemMessage)
    newest = max(i for i, m in enumerate(history) if isinstance(m, HumanMessage))
    assert plan.messages[-(len(history) - newest) :] == history[newest:]


def test_invoke_returns_messages_and_plan_explains_them() -> None:
    history = conversation()
    window = make_window()
    sent = window.invoke(history)
    assert all(isinstance(m, BaseMessage) for m in sent)
    plan = window.plan(history)
    assert plan.messages == sent
    check(plan, history)
    labels = [*plan.kept_ids, *plan.summarized_ids, *plan.pending_ids, *plan.dropped_ids]
    history_ids: list[str] = []
    for m in history[1:]:
        assert m.id is not None
        history_ids.append(m.id)
    assert sorted(labels) == sorted(history_ids)
    assert "ContextPlan for deepseek-v3.2" in str(plan)


def test_accepts_tuples_dicts_and_prompt_values() -> None:
    window = make_window(max_tokens=2000)
    sent = window.invoke(
        [
            ("system", "Be brief."),
            {"role": "user", "content": "hi"},
            ("ai", "hello"),
            ("human", "?"),
        ]
    )
    assert [m.type for m in sent] == ["system", "human", "ai", "human"]
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be brief."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    chain = prompt | window
    out = chain.invoke({"history": [HumanMessage("a"), AIMessage("b")], "question": "c"})
    assert [m.content for m in out] == ["Be brief.", "a", "b", "c"]
    with pytest.raises(TypeError, match="list of messages"):
        window.invoke(HumanMessage("x"))  # type: ignore[arg-type]


def test_batch_plans_each_conversation() -> None:
    window = make_window()
    a, b = conversation(10, seed=1), conversation(12, seed=2)
    out = window.batch([a, b])
    assert out[0][-1] is a[-1]
    assert out[1][-1] is b[-1]


def test_grown_conversation_counts_only_new_messages() -> None:
    history = conversation(60)
    window = make_window()
    config: RunnableConfig = {"configurable": {"thread_id": "t-1"}}
    window.invoke(history[:50], config)
    misses = window.counter.cache_info()["misses"]
    assert misses >= 49
    window.counter.clear_cache()  # a recount would now show up as misses
    window.invoke(history[:53], config)
    assert window.counter.cache_info()["misses"] - misses == 3


def test_conversations_are_kept_apart_and_bounded() -> None:
    window = make_window(max_conversations=2)
    for i in range(3):
        window.invoke(conversation(5, seed=i), {"configurable": {"session_id": f"s{i}"}})
    assert list(window._rt.conversations) == ["session_id:s1", "session_id:s2"]
    window.forget()
    assert not window._rt.conversations


def test_conversations_with_the_same_first_message_are_told_apart() -> None:
    summarizer = Summarizer(transcripts=[])
    window = make_window(summarizer=summarizer)
    a = conversation(60, seed=1)
    b = [a[0], a[1], *conversation(60, seed=2)[2:]]  # same opening, different chat
    window.plan(a[:100])
    window.plan(b[:100])
    calls = len(summarizer.transcripts)
    window.plan(a[:102])
    window.plan(b[:102])
    assert len(window._rt.conversations) == 1  # one derived key ...
    assert len(next(iter(window._rt.conversations.values()))) == 2  # ... two conversations
    assert len(summarizer.transcripts) - calls <= 2  # no re-summarizing from scratch


def test_a_conversation_recognised_before_another_turn_changed_it_is_checked_again() -> None:
    # Two turns with the same opening can race: one recognises the remembered conversation,
    # the other then extends it with different messages. The first must not take the other's
    # messages for its own (they would be sent in its prompt).
    window = make_window(max_tokens=20_000)
    a = conversation(20, seed=1)
    b = conversation(20, seed=2)
    other = [*a[:10], *b[10:14]]  # same first ten messages, then another chat
    window.plan(a[:10])
    system, mine = window._split(a[:14])
    entry, matched = window._entry(window._key(mine, None), mine)
    window.plan(other)  # the other turn extends the entry first
    with entry.lock:
        plan = window._drive(window._invoke_turn(entry, system, mine, matched))
    sent = [m.content for m in plan.messages[len(system) :]]
    assert sent == [m.content for m in a[len(system) : 14]]
    assert not {m.content for m in b[10:14]} & set(map(str, sent))


def _step(
    window: ContextWindow,
    messages: list[BaseMessage],
    previous: ContextPlan | None = None,
    counts: list[int] | None = None,
) -> ContextPlan:
    state = previous.state if previous is not None else WindowState()
    return window.step(
        messages[:1],
        messages[1 + state.load_from :],
        offset=state.load_from,
        state=state,
        previous=previous,
        counts=counts,
    )


def _index_of(plan: ContextPlan) -> object:
    assert plan._ledger is not None
    return plan._ledger.index


def test_a_step_extends_the_previous_steps_index() -> None:
    window = make_window(max_tokens=20_000)
    history = conversation(20)
    first = _step(window, history[:9])
    second = _step(window, history[:13], first)
    assert _index_of(second) is _index_of(first)  # extended, not rebuilt
    assert second.messages == _step(make_window(max_tokens=20_000), history[:13]).messages
    # Equal messages (a checkpointer hands back copies) are recognised too.
    copies = [m.model_copy() for m in history[:15]]
    third = _step(window, copies, second)
    assert _index_of(third) is _index_of(first)
    assert [m.content for m in third.messages] == [m.content for m in copies]


def test_a_retried_or_forked_step_does_not_reuse_an_index_another_step_extended() -> None:
    window = make_window(max_tokens=20_000)
    a = conversation(20, seed=1)
    b = conversation(20, seed=2)
    first = _step(window, a[:9])
    _step(window, a[:13], first)  # one continuation extends the index ...
    fork = [*a[:9], *b[9:13]]
    forked = _step(window, fork, first)  # ... another one from the same plan
    assert [m.content for m in forked.messages] == [m.content for m in fork]
    assert _index_of(forked) is not _index_of(first)


def test_two_steps_extending_one_plan_at_once_each_send_their_own_messages() -> None:
    window = make_window(max_tokens=20_000)
    a = conversation(20, seed=1)
    fork = [*a[:9], *conversation(20, seed=2)[9:13]]
    first = _step(window, a[:9])
    count = window.counter.message_counts
    a_counting, b_done = threading.Event(), threading.Event()

    def counts_slowly_in_a(messages: Any) -> list[int]:
        if threading.current_thread().name == "A":  # A has taken the index: B comes now
            a_counting.set()
            b_done.wait(5)
        return count(messages)

    window.counter.message_counts = counts_slowly_in_a  # type: ignore[method-assign]
    plans: dict[str, ContextPlan] = {}
    thread_a = threading.Thread(
        target=lambda: plans.__setitem__("a", _step(window, a[:13], first)), name="A"
    )
    thread_a.start()
    assert a_counting.wait(5)
    plans["b"] = _step(window, fork, first)
    b_done.set()
    thread_a.join(5)
    assert [m.content for m in plans["a"].messages] == [m.content for m in a[:13]]
    assert [m.content for m in plans["b"].messages] == [m.content for m in fork]


class _PaddedCounter(TokenCounter):
    """Counts 10 more per message: another window's counter, with other figures."""

    def message_counts(self, messages: Any) -> list[int]:
        return [n + 10 for n in super().message_counts(messages)]


def test_a_step_takes_no_index_from_another_windows_plan() -> None:
    history = conversation(20)
    other = make_window(max_tokens=20_000, counter=_PaddedCounter(MODEL))
    window = make_window(max_tokens=20_000)
    theirs = _step(other, history[:9])
    mine = _step(window, history[:13], theirs)
    assert _index_of(mine) is not _index_of(theirs)
    assert mine.tokens.total == _step(make_window(max_tokens=20_000), history[:13]).tokens.total


def test_a_step_rebuilds_when_the_stored_counts_differ() -> None:
    window = make_window(max_tokens=20_000)
    history = conversation(20)
    counts = window.counter.message_counts(history[1:13])
    first = _step(window, history[:9], counts=counts[:8])
    changed = [*counts[:3], counts[3] + 5, *counts[4:]]
    second = _step(window, history[:13], first, counts=changed)
    assert _index_of(second) is not _index_of(first)
    assert second.tokens.recent == sum(changed)


def test_a_plan_of_the_invoke_path_lends_its_index_to_no_step() -> None:
    # The invoke path keeps extending its own index: a step may not extend it as well.
    window = make_window(max_tokens=20_000)
    history = conversation(20)
    planned = window.plan(history[:9])
    stepped = window.step(
        history[:1], history[1:13], offset=0, state=planned.state, previous=planned
    )
    assert _index_of(stepped) is not _index_of(planned)
    assert window.plan(history[:13]).messages == stepped.messages


def test_a_named_conversation_of_system_messages_only_is_refused_clearly() -> None:
    window = make_window()
    config: RunnableConfig = {"configurable": {"thread_id": "only-system"}}
    with pytest.raises(ValueError, match="no human message"):
        window.plan([SystemMessage("You are terse.")], config)


def test_limits_follow_the_window_settings() -> None:
    window = make_window()
    before = window.limits(10)
    assert window.limits(10) is before  # memoized while nothing changes
    window.high_water = 0.8
    assert window.limits(10).high_mark < before.high_mark
    assert window.limits(10, reserved_tokens=50).fixed == before.fixed + 50


def test_caller_list_is_never_mutated() -> None:
    history = conversation(80)
    before = [m.model_copy(deep=True) for m in history]
    window = make_window(summarizer=Summarizer(transcripts=[]), truncate_long_messages=True)
    for end in range(20, len(history), 7):
        window.invoke(history[:end])
    assert history == before


def test_compaction_summarizes_each_message_once() -> None:
    history = conversation(80)
    summarizer = Summarizer(transcripts=[])
    window = make_window(summarizer=summarizer)
    calls = synthetic_conversation(80, seed=1).call_points
    last = None
    for cp in calls:
        last = window.plan(history[:cp])
        check(last, history[:cp])
        window.plan(history[:cp])  # same conversation again: no new summary
    assert last is not None
    assert last.state.summary is not None
    seen: list[str] = []
    for transcript in summarizer.transcripts:
        for m in history[1:]:
            if str(m.content) and str(m.content)[:60] in transcript:
                seen.append(str(m.id))
    assert len(seen) == len(set(seen)), "a message was summarized twice"
    with_text = {str(m.id) for m in history[1:] if str(m.content)}
    assert set(last.summarized_ids) & with_text <= set(seen)
    assert any(is_recap(m) for m in last.messages)


def test_summarizer_failure_loses_nothing_and_recovers() -> None:
    history = conversation(80)
    calls = synthetic_conversation(80, seed=1).call_points
    summarizer = Summarizer(transcripts=[], fail=True)
    window = make_window(summarizer=summarizer)
    failed_plan = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cp in calls:
            plan = window.plan(history[:cp])
            check(plan, history[:cp])
            assert not plan.summarized_ids
            assert plan.state.summary is None
            assert not plan.dropped_ids  # nothing is lost: kept or pending
            if plan.summary_failed:
                failed_plan = plan
                break
    assert failed_plan is not None
    assert any(issubclass(w.category, SummaryFailureWarning) for w in caught)
    pending = failed_plan.pending_ids
    assert failed_plan.state.summarized_through == 0
    assert failed_plan.state.window_start > 0
    # Pending messages go out verbatim while the budget allows.
    sent_ids = {m.id for m in failed_plan.messages}
    assert set(failed_plan.kept_ids) == sent_ids & {m.id for m in history[1:]}
    summarizer.fail = False
    cp = next(c for c in calls if c > len(history[: failed_plan.turn_start + 3]))
    recovered = window.plan(history[:cp])
    assert not recovered.summary_failed
    assert recovered.state.summary
    assert set(pending) <= set(recovered.summarized_ids)
    assert recovered.state.summarized_through == recovered.state.window_start
    joined = "\n".join(summarizer.transcripts)
    for m in history[1 : recovered.state.summarized_through + 1]:
        if m.type == "human":
            assert str(m.content)[:40] in joined


def test_step_matches_the_invoke_path() -> None:
    history = conversation(60)
    calls = synthetic_conversation(60, seed=1).call_points
    via_invoke = make_window(summarizer=Summarizer(transcripts=[]))
    via_step = make_window(summarizer=Summarizer(transcripts=[]))
    state = WindowState()
    previous: ContextPlan | None = None
    for cp in calls:
        convo = history[1:cp]
        a = via_invoke.plan(history[:cp])
        b = via_step.step(
            history[:1], convo[state.load_from :], offset=state.load_from, state=state,
            previous=previous,
        )  # fmt: skip
        assert [m.content for m in a.messages] == [m.content for m in b.messages]
        assert a.state == b.state
        assert a.cached_tokens == b.cached_tokens
        state, previous = b.state, b


def test_step_uses_stored_counts_and_reserved_tokens() -> None:
    history = conversation(5)
    window = make_window(max_tokens=20_000)
    counts = [window.counter.count_message(m) for m in history[1:]]
    plan = window.step(history[:1], history[1:], offset=0, state=WindowState(), counts=counts)
    with_tools = window.step(
        history[:1], history[1:], offset=0, state=WindowState(), counts=counts, reserved_tokens=500
    )
    assert with_tools.tokens.total == plan.tokens.total + 500
    with pytest.raises(ValueError, match="load_from"):
        window.step(history[:1], history[3:], offset=3, state=WindowState())


async def test_ainvoke_awaits_the_summarizer_without_blocking_the_loop() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    class Waiting(Summarizer):
        async def _agenerate(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            started.set()
            await release.wait()  # only another task on the same loop can set it
            return await super()._agenerate(messages, stop, run_manager, **kw)

    history = conversation(80)
    window = make_window(summarizer=Waiting(transcripts=[]))
    # Grow the conversation until a turn compacts.
    calls = synthetic_conversation(80, seed=1).call_points
    for cp in calls:
        task = asyncio.create_task(window.aplan(history[:cp]))
        _done, _ = await asyncio.wait(
            {task, asyncio.create_task(started.wait())},
            timeout=5,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if started.is_set():
            release.set()  # the loop is free while the summary is awaited
            plan = await asyncio.wait_for(task, 5)
            assert plan.compacted
            assert plan.state.summary
            out = await window.ainvoke(history[:cp])
            assert out == plan.messages
            return
        await task
    pytest.fail("no turn compacted")


def test_overflow_error_from_the_window() -> None:
    window = make_window(max_tokens=1000)
    huge = HumanMessage("word " * 5000)
    with pytest.raises(
        ContextOverflowError, match=r"message of [\d,]+ tokens cannot fit a 1,000-token budget"
    ):
        window.invoke([SystemMessage("s"), huge])


def test_truncation_shortens_a_huge_tool_result_with_a_marker() -> None:
    text = " ".join(f"Sentence number {i} of the report." for i in range(2000))
    history: list[BaseMessage] = [
        SystemMessage("s", id="s"),
        HumanMessage("look it up", id="h0"),
        AIMessage("", tool_calls=[{"name": "report", "args": {}, "id": "c1"}], id="a0"),
        ToolMessage(text, tool_call_id="c1", id="t0"),
    ]
    window = make_window(truncate_long_messages=True)
    plan = window.plan(history)
    assert plan.truncated_ids == ("t0",)
    shortened = plan.messages[-1]
    assert "shortened by the memory system" in str(shortened.content)
    assert str(shortened.content).split("\n[")[0].endswith("of the report.")
    check_text = str(shortened.content)
    assert len(check_text) < len(text)
    assert plan.tokens.total <= plan.tokens.prompt_limit
    assert history[3].content == text  # the caller's message is untouched
    grown = [*history, AIMessage("done", id="a1"), HumanMessage("thanks", id="h1")]
    later = window.plan(grown)
    assert later.messages[: len(plan.messages)] == plan.messages  # same shortened copy
    assert "t0" in later.truncated_ids


def test_window_size_caps_recent_messages() -> None:
    history = conversation(30)
    window = make_window(window_size=6, max_tokens=100_000)
    plan = window.plan(history)
    recent = [m for m in plan.messages if not isinstance(m, SystemMessage)]
    assert len(recent) <= 6


def test_edited_history_starts_afresh() -> None:
    history = conversation(40)
    window = make_window(summarizer=Summarizer(transcripts=[]))
    config: RunnableConfig = {"configurable": {"thread_id": "x"}}
    first = window.plan(history, config)
    assert first.state.summarized_through > 0
    edited = [history[0], HumanMessage("completely different", id="new"), *history[3:20]]
    again = window.plan(edited, config)
    check(again, edited)
    assert again.state.summarized_through <= len(edited)


def test_adaptive_budget_from_the_model_profile() -> None:
    window = ContextWindow(model=MODEL)
    assert window.budget.total_tokens == 128_000
    with pytest.raises(ValueError, match="model"):
        ContextWindow()


def test_custom_counter_and_marks() -> None:
    counter = TokenCounter(MODEL)
    window = ContextWindow(
        model=MODEL, max_tokens=4000, counter=counter, high_water=0.8, low_water=0.4
    )
    assert window.counter is counter
    limits = window.limits(10)
    assert limits.high_mark == int(limits.prompt * 0.8)
    with pytest.raises(ValueError, match="low_water"):
        ContextWindow(model=MODEL, max_tokens=4000, high_water=0.5, low_water=0.7)


def test_a_too_long_summary_is_bounded_to_the_allocation() -> None:
    long = " ".join(f"Fact {i} is important." for i in range(3000))
    summarizer = Summarizer(responses=[long], transcripts=[])
    window = make_window(summarizer=summarizer)
    history = conversation(60)
    plan = None
    for cp in synthetic_conversation(60, seed=1).call_points:
        plan = window.plan(history[:cp])
        check(plan, history[:cp])
    assert plan is not None
    assert plan.state.summary
    limits = window.limits(len(history) - 1)
    assert plan.state.summary_tokens <= limits.summary


def test_a_budget_too_small_for_summaries_warns_at_construction() -> None:
    with pytest.warns(SummaryFailureWarning, match="Raise max_tokens"):
        make_window(max_tokens=300, summarizer=Summarizer(transcripts=[]))


def test_answers_with_reported_usage_calibrate_the_budget_on_the_invoke_path() -> None:
    """In a chain the model's answer comes back as the next turn's newest AI message; its
    reported input tokens (here 30 % above the count) teach the counter the real tokenizer."""
    window = make_window(max_tokens=6000)
    history: list[BaseMessage] = [HumanMessage("What is the status of order ORD-1042? " * 20)]
    limit_before = window.limits(len(history)).prompt
    for turn in range(4):
        plan = window.plan(history)
        reported = round(plan.tokens.total * 1.3)
        answer = AIMessage(
            f"Order ORD-1042 ships tomorrow (answer {turn}).",
            usage_metadata={
                "input_tokens": reported,
                "output_tokens": 12,
                "total_tokens": reported + 12,
            },
        )
        history += [answer, HumanMessage(f"Thanks; and question {turn}?")]
    window.plan(history)
    assert window.counter.calibration == pytest.approx(1.3, rel=0.02)
    assert window.limits(len(history)).prompt < limit_before / 1.25


def test_a_message_dict_without_its_tool_call_id_is_a_clear_error() -> None:
    window = make_window()
    with pytest.raises(ValueError, match=r"message 2 .* lacks the field 'tool_call_id'"):
        window.invoke([("system", "s"), ("human", "hi"), {"role": "tool", "content": "42"}])
