"""Property tests: every plan of every random conversation keeps the invariants of DESIGN.md.

Random conversations mix plain turns, tool rounds (complete, partial, out of order,
duplicated), orphan tool results, multimodal and empty content, and messages without ids.
They are planned turn by turn, with random budgets and random summarizer outcomes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from langchain_core.exceptions import ContextOverflowError
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatResult
from pydantic import Field

from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.prompt_cache import cacheable_tokens
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.window import (
    ConversationIndex,
    WindowLimits,
    WindowState,
    finish_turn,
    is_recap,
    layout_turn,
)

WORDS = st.sampled_from("order refund parcel. ok? the a delivery late! 42 ORD-7 code".split())


@st.composite
def contents(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["text", "text", "text", "empty", "blocks"]))
    text = " ".join(draw(st.lists(WORDS, min_size=1, max_size=40)))
    if kind == "empty":
        return ""
    if kind == "blocks":
        return [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]
    return text


@st.composite
def conversations(draw: st.DrawFn) -> list[BaseMessage]:
    """A random conversation (without system messages) that contains a human message."""
    counter = itertools.count()

    def ident() -> str | None:
        return f"m{next(counter)}" if draw(st.booleans()) or draw(st.booleans()) else None

    out: list[BaseMessage] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(
            st.sampled_from(["human", "human", "ai", "tools", "tools", "orphan", "dangling"])
        )
        if kind == "human":
            out.append(HumanMessage(draw(contents()), id=ident()))
        elif kind == "ai":
            out.append(AIMessage(draw(contents()), id=ident()))
        elif kind == "orphan":
            out.append(ToolMessage("stray", tool_call_id=f"x{next(counter)}", id=ident()))
        else:
            n = draw(st.integers(1, 3))
            calls = [
                {"name": "lookup", "args": {"q": i}, "id": f"c{next(counter)}"} for i in range(n)
            ]
            out.append(AIMessage(draw(contents()), tool_calls=calls, id=ident()))
            answered = calls if kind == "tools" else calls[: draw(st.integers(0, n - 1))]
            answered = draw(st.permutations(answered))
            for call in answered:
                out.append(ToolMessage(draw(contents()), tool_call_id=call["id"], id=ident()))
            if kind == "tools" and draw(st.integers(0, 5)) == 0:  # a duplicate result
                out.append(ToolMessage("again", tool_call_id=calls[0]["id"], id=ident()))
    out.append(HumanMessage(draw(contents()), id=ident()))
    if draw(st.booleans()):
        extra = draw(st.sampled_from(["tools", "dangling", "partial"]))
        calls = [
            {"name": "lookup", "args": {}, "id": f"c{next(counter)}"},
            {"name": "x", "args": {}, "id": f"c{next(counter)}"},
        ]
        out.append(AIMessage("", tool_calls=calls, id=ident()))
        if extra == "tools":
            out += [ToolMessage("r", tool_call_id=c["id"], id=ident()) for c in calls]
        elif extra == "partial":
            out.append(ToolMessage("r", tool_call_id=calls[1]["id"], id=ident()))
    return out


def label(message: BaseMessage, pos: int) -> str:
    return message.id or f"#{pos}"


def sendable_turn(messages: list[BaseMessage]) -> list[int]:
    """Positions of the current turn that can be sent (the planner's rules, restated simply)."""
    t = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
    out = [t]
    i = t + 1
    while i < len(messages):
        m = messages[i]
        if isinstance(m, AIMessage) and m.tool_calls:
            ids = {str(c["id"]) for c in m.tool_calls}
            j = i + 1
            got: list[int] = []
            answered: set[str] = set()
            while j < len(messages) and isinstance(messages[j], ToolMessage):
                tid = str(messages[j].tool_call_id)  # type: ignore[attr-defined]
                if tid in ids and tid not in answered:
                    answered.add(tid)
                    got.append(j)
                j += 1
            if answered == ids:
                out += [i, *got]
            i = j
        elif isinstance(m, ToolMessage):
            i += 1
        else:
            out.append(i)
            i += 1
    return out


@dataclass
class Tracker:
    folded: set[int] = field(default_factory=set)


def check_plan(
    plan: Any,
    messages: list[BaseMessage],
    counts: list[int],
    system: list[BaseMessage],
    system_counts: list[int],
    limits: WindowLimits,
    *,
    summarize: bool,
) -> None:
    sent = plan.messages
    assert find_prompt_problems(sent) == [], find_prompt_problems(sent)
    # System messages first, unchanged; then at most one recap, a human message.
    assert sent[: len(system)] == system
    assert all(a is b for a, b in zip(sent, system, strict=False))
    rest = sent[len(system) :]
    assert not any(isinstance(m, SystemMessage) for m in rest)
    assert all(not is_recap(m) for m in rest[1:])
    if rest and is_recap(rest[0]):
        assert plan.state.summary
        assert plan.state.summary in str(rest[0].content)
    # The current turn is sent verbatim (a shortened tool result at most).
    turn = sendable_turn(messages)
    tail = rest[-len(turn) :]
    assert len(rest) >= len(turn)
    for pos, m in zip(turn, tail, strict=False):
        original = messages[pos]
        if m is not original:
            assert limits.truncate
            assert isinstance(original, ToolMessage)
            assert label(original, pos) in plan.truncated_ids
    assert tail[0] is messages[turn[0]]
    # Tokens as counted, within the budget.
    by_identity = {id(m): c for m, c in zip(messages, counts, strict=False)}
    total = sum(system_counts) + limits.fixed
    for m in rest:
        if is_recap(m):
            total += plan.state.summary_tokens
        elif id(m) in by_identity:
            total += by_identity[id(m)]
        else:  # a shortened copy: "short <n>"
            total += int(str(m.content).split()[1])
    assert total == plan.tokens.total <= limits.prompt
    # Every message is exactly one of kept / summarized / pending / dropped.
    groups = [plan.kept_ids, plan.summarized_ids, plan.pending_ids, plan.dropped_ids]
    labels = [label(m, i) for i, m in enumerate(messages)]
    assert sorted(itertools.chain(*groups)) == sorted(labels)
    if summarize:
        assert not any("no summarizer" in r for r in plan.dropped_reasons.values())


def _every_plan_keeps_the_invariants(
    messages: list[BaseMessage],
    data: st.DataObject,
    prompt: int,
    fixed: int,
    marks: list[float],
    window_size: int | None,
    truncate: bool,
    summarize: bool,
) -> None:
    counts = [data.draw(st.integers(1, 400)) for _ in messages]
    snapshot = list(messages)
    system: list[BaseMessage] = [SystemMessage("rules", id="sys")]
    system_counts = [data.draw(st.integers(0, 60))]
    cap = data.draw(st.integers(20, 500)) if truncate else None
    limits = WindowLimits(
        budget=prompt + 500,
        response=400,
        prompt=prompt,
        summary=data.draw(st.integers(0, prompt // 3)),
        fixed=fixed,
        high_water=marks[1],
        low_water=marks[0],
        window_size=window_size,
        message_cap=cap,
        truncate=truncate,
        truncation_floor=min(20, cap or 20),
    )
    humans = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    # Call points: after each human message (and at the end), growing turn by turn.
    ends = sorted({*(h + 1 for h in humans), len(messages)})
    state = WindowState()
    index = ConversationIndex(message_cap=cap)
    previous: Any = None
    folded: set[int] = set()

    def shorten(m: BaseMessage, n: int) -> BaseMessage:
        return m.model_copy(update={"content": f"short {n}"})

    for end in ends:
        index.extend(messages[index.end : end], counts[index.end : end])
        fresh = ConversationIndex(message_cap=cap)
        fresh.extend(messages[:end], counts[:end])
        try:
            layout = layout_turn(
                index, state, limits, system_tokens=sum(system_counts), summarize=summarize
            )
        except ContextOverflowError:
            turn = sendable_turn(messages[:end])
            floor = limits.truncation_floor
            least = sum(
                min(counts[p], floor)
                if truncate and isinstance(messages[p], ToolMessage)
                else counts[p]
                for p in turn
            )
            assert sum(system_counts) + fixed + least > prompt
            with pytest.raises(ContextOverflowError):
                layout_turn(
                    fresh, state, limits, system_tokens=sum(system_counts), summarize=summarize
                )
            previous = None
            continue
        # The incremental index answers like one built from scratch.
        assert layout == layout_turn(
            fresh, state, limits, system_tokens=sum(system_counts), summarize=summarize
        )
        assert not folded & set(layout.fold_positions), "a message was summarized twice"
        assert all(p >= state.summarized_through for p in layout.fold_positions)
        outcome = data.draw(st.sampled_from(["ok", "ok", "fail", "partial"]))
        new_summary = None
        if layout.fold_positions and outcome != "fail":
            through = layout.new_start
            if outcome == "partial":
                through = data.draw(st.integers(state.summarized_through, layout.new_start))
            new_summary = ("recap text", data.draw(st.integers(1, max(1, limits.summary))), through)
            folded |= {p for p in layout.fold_positions if p < through}
        plan = finish_turn(
            layout,
            index,
            state,
            limits,
            system=system,
            system_counts=system_counts,
            summarize=summarize,
            new_summary=new_summary,
            summary_failed=outcome == "fail" and bool(layout.fold_positions),
            shorten=shorten,
        )
        check_plan(
            plan, messages[:end], counts[:end], system, system_counts, limits, summarize=summarize
        )
        # Between compactions the prompt grows append-only.
        if previous is not None and not plan.compacted and not previous.notes:
            turn = previous.messages[-1]
            shortened_ai = any(
                isinstance(m, AIMessage) and not m.tool_calls and cap and counts[i] > cap
                for i, m in enumerate(messages[:end])
                if i >= previous.turn_start
            )
            if not shortened_ai and turn is not None:
                assert plan.messages[: len(previous.messages)] == previous.messages
        previous = plan
        state = plan.state
    assert messages == snapshot


PLANNER_INPUTS: dict[str, Any] = {
    "messages": conversations(),
    "data": st.data(),
    "prompt": st.integers(40, 3000),
    "fixed": st.integers(0, 30),
    "marks": st.tuples(st.floats(0.2, 1.0), st.floats(0.2, 1.0)).map(sorted),
    "window_size": st.none() | st.integers(1, 12),
    "truncate": st.booleans(),
    "summarize": st.booleans(),
}

test_every_plan_keeps_the_invariants = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)(given(**PLANNER_INPUTS)(_every_plan_keeps_the_invariants))

test_every_plan_keeps_the_invariants_thoroughly = pytest.mark.slow(
    settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))(
        given(**PLANNER_INPUTS)(_every_plan_keeps_the_invariants)
    )
)


class FlakySummarizer(FakeListChatModel):
    """A fake summarizer whose calls fail when the next flag says so."""

    fail_flags: list[bool] = Field(default_factory=list)
    seen: list[str] = Field(default_factory=list)

    def _generate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        if self.fail_flags and self.fail_flags.pop(0):
            raise RuntimeError("flaky")
        self.seen.append(str(messages[-1].content))
        return super()._generate(messages, stop, run_manager, **kw)


@given(
    messages=conversations(),
    max_tokens=st.integers(300, 6000),
    marks=st.tuples(st.floats(0.3, 1.0), st.floats(0.3, 1.0)).map(sorted),
    truncate=st.booleans(),
    fail_flags=st.lists(st.booleans(), max_size=6),
    use_summarizer=st.booleans(),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_context_window_plans_keep_the_invariants(
    messages: list[BaseMessage],
    max_tokens: int,
    marks: list[float],
    truncate: bool,
    fail_flags: list[bool],
    use_summarizer: bool,
) -> None:
    summarizer = FlakySummarizer(responses=["Recap so far."], fail_flags=fail_flags, seen=[])
    try:
        window = ContextWindow(
            model="deepseek-v3.2",
            max_tokens=max_tokens,
            summarizer=summarizer if use_summarizer else None,
            high_water=marks[1],
            low_water=marks[0],
            truncate_long_messages=truncate,
        )
    except ValueError:
        assume(False)
        return
    system = [SystemMessage("You are a support agent.", id="sys")]
    full = [*system, *messages]
    snapshot = list(full)
    humans = [i for i, m in enumerate(full) if isinstance(m, HumanMessage)]
    counter = window.counter
    previous: Any = None
    for end in sorted({*(h + 1 for h in humans), len(full)}):
        try:
            plan = window.plan(full[:end])
        except ContextOverflowError:
            previous = None
            continue
        if previous is not None and not (plan.compacted or truncate or previous.notes):
            # Between compactions the prompt grows append-only (a cacheable prefix).
            assert plan.messages[: len(previous.messages)] == previous.messages
            repeated = previous.tokens.total - counter.REPLY_PRIMING
            assert plan.cached_tokens == cacheable_tokens(repeated)
        previous = plan
        sent = plan.messages
        assert find_prompt_problems(sent) == []
        assert sent[0] is system[0]
        recount = sum(counter.count_message(m) for m in sent) + counter.REPLY_PRIMING
        assert recount <= plan.tokens.total <= plan.tokens.prompt_limit
        if not plan.truncated_ids:
            assert recount == plan.tokens.total
        turn = sendable_turn(full[1:end])
        assert sent[-len(turn)] is full[1 + turn[0]]
        groups = [plan.kept_ids, plan.summarized_ids, plan.pending_ids, plan.dropped_ids]
        labels = [label(m, i) for i, m in enumerate(full[1:end])]
        assert sorted(itertools.chain(*groups)) == sorted(labels)
        if use_summarizer:
            assert not any("no summarizer" in r for r in plan.dropped_reasons.values())
    assert full == snapshot
