"""ContextWindow's summary modes: cache-aligned (the last prompt resent) and isolated."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatResult
from pydantic import Field

from langchain_holysheep import ContextPlan, ContextWindow
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.summarize import SUMMARY_INSTRUCTIONS, is_cache_aligned_request
from langchain_holysheep.window import WindowState, is_recap

MODEL = "deepseek-v3.2"
SYSTEM = SystemMessage("You are a support assistant. Be brief.", id="sys")


class Summarizer(FakeListChatModel):
    """Records every request; answers a recap naming how many requests it has seen."""

    model_name: str | None = MODEL
    responses: list[str] = Field(default_factory=lambda: ["unused"])
    requests: list[list[BaseMessage]] = Field(default_factory=list)

    def _answer(self, messages: list[BaseMessage]) -> str:
        self.requests.append(list(messages))
        return f"Recap {len(self.requests)}: the customer asked about orders."

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.responses = [self._answer(messages)]
        self.i = 0
        return super()._generate(messages, stop, run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.responses = [self._answer(messages)]
        self.i = 0
        return await super()._agenerate(messages, stop, run_manager, **kwargs)


def turn(k: int) -> tuple[HumanMessage, AIMessage]:
    words = " ".join(f"w{k}x{i}" for i in range(30))
    return (
        HumanMessage(f"Question {k}: where is order {k}? {words}", id=f"h{k}"),
        AIMessage(f"Answer {k}: order {k} shipped. {words}", id=f"a{k}"),
    )


def chat(window: ContextWindow, turns: int) -> list[list[BaseMessage]]:
    """Run a conversation through ``window.invoke``; return the prompt of every call."""
    conversation: list[BaseMessage] = [SYSTEM]
    sent: list[list[BaseMessage]] = []
    for k in range(turns):
        human, answer = turn(k)
        conversation.append(human)
        sent.append(window.invoke(conversation, config={"configurable": {"thread_id": "t"}}))
        conversation.append(answer)
    return sent


def previous_of(sent: list[list[BaseMessage]], request: list[BaseMessage]) -> list[BaseMessage]:
    """The prompt that ``request`` starts with (the last one sent before it)."""
    for prompt in reversed(sent):
        if request[: len(prompt)] == prompt:
            return prompt
    raise AssertionError("the request repeats no prompt that was sent")


def test_auto_with_the_chat_model_resends_the_last_prompt_then_asks() -> None:
    summarizer = Summarizer()
    window = ContextWindow(model=MODEL, max_tokens=1500, summarizer=summarizer)
    sent = chat(window, 30)
    assert len(summarizer.requests) >= 2
    for request in summarizer.requests:
        assert is_cache_aligned_request(request)
        last = previous_of(sent, request)
        # Byte-identical prefix: exactly the messages returned by the previous call, in order,
        # then at most the answer to it, then the request (a human message, never a system one).
        assert request[: len(last)] == last
        between = request[len(last) : -1]
        assert all(isinstance(m, AIMessage) for m in between)
        assert isinstance(request[-1], HumanMessage)
        assert sum(isinstance(m, SystemMessage) for m in request) == 1
    # The new summary reaches the next prompt as a framed recap in a human message.
    final = sent[-1]
    assert isinstance(final[0], SystemMessage)
    assert is_recap(final[1])
    assert isinstance(final[1], HumanMessage)
    assert f"Recap {len(summarizer.requests)}:" in str(final[1].content)
    assert all(not find_prompt_problems(p) for p in sent)


def test_auto_with_another_model_and_isolated_mode_ask_in_isolation() -> None:
    for summarizer, mode in (
        (Summarizer(model_name="gpt-4.1-mini"), "auto"),
        (Summarizer(model_name=None), "auto"),
        (Summarizer(), "isolated"),
    ):
        window = ContextWindow(
            model=MODEL, max_tokens=1500, summarizer=summarizer, summary_mode=mode
        )
        chat(window, 30)
        assert summarizer.requests, (summarizer.model_name, mode)
        for request in summarizer.requests:
            assert not is_cache_aligned_request(request)
            assert [type(m) for m in request] == [SystemMessage, HumanMessage]
            assert str(request[0].content).startswith(SUMMARY_INSTRUCTIONS[:80])
            assert "<transcript>" in str(request[1].content)


def test_explicit_cache_aligned_mode_with_another_model() -> None:
    summarizer = Summarizer(model_name="gpt-4.1-mini")
    window = ContextWindow(
        model=MODEL, max_tokens=1500, summarizer=summarizer, summary_mode="cache_aligned"
    )
    chat(window, 30)
    assert summarizer.requests
    assert all(is_cache_aligned_request(r) for r in summarizer.requests)


def test_unknown_summary_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="summary_mode"):
        ContextWindow(model=MODEL, max_tokens=1500, summarizer=Summarizer(), summary_mode="x")  # type: ignore[arg-type]


def conversation_of(turns: int) -> list[BaseMessage]:
    messages: list[BaseMessage] = []
    for k in range(turns):
        messages.extend(turn(k))
    return messages


def run_steps(window: ContextWindow, turns: int, *, keep_previous: bool) -> list[ContextPlan]:
    """Drive ``step`` as a store-backed caller does; optionally forget the previous plan."""
    messages = conversation_of(turns)
    state = WindowState()
    previous: ContextPlan | None = None
    plans = []
    for k in range(turns):
        tail = messages[state.load_from : 2 * k + 1]
        plan = window.step(
            [SYSTEM],
            tail,
            offset=state.load_from,
            state=state,
            previous=previous if keep_previous else None,
        )
        plans.append(plan)
        state, previous = plan.state, plan
    return plans


def test_step_without_the_previous_plan_falls_back_to_isolation() -> None:
    # E.g. the first call after a restart: there is no prompt to resend.
    summarizer = Summarizer()
    run_steps(
        ContextWindow(model=MODEL, max_tokens=1500, summarizer=summarizer), 30, keep_previous=False
    )
    assert summarizer.requests
    assert not any(is_cache_aligned_request(r) for r in summarizer.requests)

    summarizer = Summarizer()
    plans = run_steps(
        ContextWindow(model=MODEL, max_tokens=1500, summarizer=summarizer), 30, keep_previous=True
    )
    assert summarizer.requests
    assert all(is_cache_aligned_request(r) for r in summarizer.requests)
    compactions = [k for k, p in enumerate(plans) if p.state.summarized_through and p.compacted]
    assert len(compactions) == len(summarizer.requests)
    for request, k in zip(summarizer.requests, compactions, strict=True):
        last = list(plans[k - 1].messages)
        assert request[: len(last)] == last
        # The request covers at least the messages the new state records as summarized: every
        # message in [old summarized_through, new summarized_through) is in the request.
        before, after = plans[k - 1].state, plans[k].state
        folded = conversation_of(30)[before.summarized_through : after.summarized_through]
        assert folded
        assert all(any(m is f or m == f for m in request) for f in folded)


def test_a_stale_prompt_is_not_resent_after_the_summary_changed() -> None:
    # Another writer changes the summary after every call: the previous prompt's recap is then
    # never the current summary, so resending it would fold into an outdated recap.
    summarizer = Summarizer()
    window = ContextWindow(model=MODEL, max_tokens=1500, summarizer=summarizer)
    messages = conversation_of(30)
    state = WindowState()
    previous: ContextPlan | None = None
    for k in range(30):
        tail = messages[state.load_from : 2 * k + 1]
        previous = window.step(
            [SYSTEM], tail, offset=state.load_from, state=state, previous=previous
        )
        state = previous.state
        if state.summary is not None:
            state = replace(state, summary=f"{state.summary} Edited elsewhere.")
    first, *later = summarizer.requests
    assert is_cache_aligned_request(first)  # no summary yet, nothing to be stale
    assert later
    for request in later:
        assert not is_cache_aligned_request(request)
        assert "Edited elsewhere." in str(request[1].content)


async def test_ainvoke_is_cache_aligned_too() -> None:
    summarizer = Summarizer()
    window = ContextWindow(model=MODEL, max_tokens=1500, summarizer=summarizer)
    conversation: list[BaseMessage] = [SYSTEM]
    sent: list[list[BaseMessage]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no summary failure along the way
        for k in range(30):
            human, answer = turn(k)
            conversation.append(human)
            sent.append(await window.ainvoke(conversation))
            conversation.append(answer)
    assert summarizer.requests
    for request in summarizer.requests:
        assert is_cache_aligned_request(request)
        last = previous_of(sent, request)
        assert request[: len(last)] == last
