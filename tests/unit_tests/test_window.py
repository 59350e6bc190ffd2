"""The pure planner: layout, compaction with hysteresis, invalid input, truncation, reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.exceptions import ContextOverflowError
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.window import (
    RECAP_ID_PREFIX,
    ConversationIndex,
    WindowLimits,
    WindowState,
    finish_turn,
    is_recap,
    layout_turn,
    recap_message,
)

SYSTEM = [SystemMessage("You are helpful.", id="sys")]
SYSTEM_COUNTS = [10]


def build(spec: Sequence[tuple[Any, ...]]) -> tuple[list[BaseMessage], list[int]]:
    """("h", n) human, ("a", n) answer, ("call", [ids], n) AI tool call, ("tool", id, n)."""
    messages: list[BaseMessage] = []
    counts: list[int] = []
    for i, item in enumerate(spec):
        kind = item[0]
        if kind == "h":
            messages.append(HumanMessage(f"question {i}.", id=f"m{i}"))
        elif kind == "a":
            messages.append(AIMessage(f"answer {i}.", id=f"m{i}"))
        elif kind == "call":
            calls = [{"name": "lookup", "args": {"n": i}, "id": c} for c in item[1]]
            messages.append(AIMessage("", tool_calls=calls, id=f"m{i}"))
        elif kind == "tool":
            messages.append(
                ToolMessage(f"result {i}. More text.", tool_call_id=item[1], id=f"m{i}")
            )
        counts.append(item[-1])
    return messages, counts


def limits(**kw: Any) -> WindowLimits:
    base: dict[str, Any] = {
        "budget": 1500,
        "response": 400,
        "prompt": 1000,
        "summary": 100,
        "fixed": 3,
        "high_water": 0.9,
        "low_water": 0.5,
    }
    base.update(kw)
    return WindowLimits(**base)


def plan(
    spec: Sequence[tuple[Any, ...]],
    state: WindowState | None = None,
    lim: WindowLimits | None = None,
    *,
    summarize: bool = True,
    summary: tuple[str, int, int] | None = None,
    failed: bool = False,
) -> Any:
    messages, counts = build(spec)
    index = ConversationIndex(message_cap=(lim or limits()).message_cap)
    index.extend(messages, counts)
    st = state or WindowState()
    lim = lim or limits()
    layout = layout_turn(index, st, lim, system_tokens=sum(SYSTEM_COUNTS), summarize=summarize)
    if summary == ("auto",):  # type: ignore[comparison-overlap]
        summary = ("recap", 40, layout.new_start)
    result = finish_turn(
        layout,
        index,
        st,
        lim,
        system=SYSTEM,
        system_counts=SYSTEM_COUNTS,
        summarize=summarize,
        new_summary=summary if layout.fold_positions else None,
        summary_failed=failed and bool(layout.fold_positions),
        shorten=lambda m, n: m.model_copy(update={"content": f"short {n}"}),
    )
    return layout, result


def test_append_only_below_the_high_mark() -> None:
    spec = [("h", 100), ("a", 200), ("h", 100), ("a", 200), ("h", 50)]
    layout, p = plan(spec)
    assert not layout.compacted
    assert not p.compacted
    assert p.state == WindowState()
    assert [m.id for m in p.messages] == ["sys", "m0", "m1", "m2", "m3", "m4"]
    assert p.tokens.total == 10 + 650 + 3
    assert p.kept_ids == ["m0", "m1", "m2", "m3", "m4"]


def test_compaction_moves_to_a_human_message_under_the_low_mark() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]  # 1,250 tokens of conversation
    layout, p = plan(spec, summary=("auto",))  # type: ignore[arg-type]
    assert layout.compacted
    assert isinstance(p.messages[2], HumanMessage)
    assert not is_recap(p.messages[2])
    # Low mark 500: system 10 + turn 50 + fixed 3 leave 437 for the summary and the window.
    # The new summary is assumed as long as the previous one (none yet), and at least the
    # allowance minus the marks' gap (100 - 400 < 0): one pair of 300 fits.
    assert layout.new_start == 6
    assert list(layout.fold_positions) == [0, 1, 2, 3, 4, 5]
    assert p.state.summarized_through == 6
    assert p.state.window_start == 6
    assert is_recap(p.messages[1])
    assert p.tokens.summary == 40
    assert p.summarized_ids == ["m0", "m1", "m2", "m3", "m4", "m5"]
    assert p.tokens.total <= 500


def test_a_longer_previous_summary_leaves_less_room_for_the_window() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]
    state = WindowState(summary="old", summary_tokens=90, summarized_through=0)
    layout, _ = plan(spec, state=state, lim=limits(summary=400), summary=("auto",))  # type: ignore[arg-type]
    # 437 - 90 = 347: still one pair; with a 160-token summary only the current turn fits.
    assert layout.new_start == 6
    state = WindowState(summary="old", summary_tokens=160, summarized_through=0)
    layout, p = plan(spec, state=state, lim=limits(summary=400), summary=("auto",))  # type: ignore[arg-type]
    assert layout.new_start == 8
    assert p.tokens.total <= limits().high_mark


def test_hysteresis_no_compaction_until_the_high_mark_again() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]
    _, first = plan(spec, summary=("auto",))  # type: ignore[arg-type]
    grown = [*spec, ("a", 100), ("h", 50)]
    layout, second = plan(grown, state=first.state)
    assert not layout.compacted
    assert second.messages[: len(first.messages)] == first.messages


def test_without_a_summarizer_messages_leaving_are_dropped_with_a_reason() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]
    layout, p = plan(spec, summarize=False)
    assert layout.compacted
    assert not layout.fold_positions
    assert p.state.summarized_through == p.state.window_start == layout.new_start
    assert p.state.summary is None
    assert set(p.dropped_ids) == {f"m{i}" for i in range(layout.new_start)}
    assert all("no summarizer" in r for r in p.dropped_reasons.values())


def test_overflow_error_names_the_numbers() -> None:
    spec = [("h", 100), ("a", 100), ("h", 9412)]
    lim = limits(budget=6000, response=1500, prompt=4200)
    with pytest.raises(ContextOverflowError) as info:
        plan(spec, lim=lim)
    text = str(info.value)
    assert "message of 9,412 tokens cannot fit a 6,000-token budget" in text
    assert "1,500 reserved for the response" in text
    assert "truncate_long_messages=True" in text


def test_orphan_tool_results_and_dangling_calls_are_dropped_with_reasons() -> None:
    spec = [
        ("h", 10),
        ("tool", "ghost", 10),  # orphan
        ("call", ["c1", "c2"], 10),
        ("tool", "c1", 10),  # c2 never answered: the group cannot be sent
        ("h", 10),
        ("call", ["c3"], 10),
        ("tool", "c3", 10),
        ("tool", "c3", 10),  # duplicate answer
        ("a", 10),
        ("h", 10),
        ("call", ["c4"], 10),  # current turn: no result yet
    ]
    _, p = plan(spec)
    assert find_prompt_problems(p.messages) == []
    reasons = p.dropped_reasons
    assert set(reasons) == {"m1", "m2", "m3", "m7", "m10"}
    assert "no matching tool call" in reasons["m1"]
    assert "'c2'" in reasons["m2"]
    assert "no tool result" in reasons["m2"]
    assert "no matching tool call" in reasons["m7"]
    assert "no tool result yet" in reasons["m10"]
    assert [m.id for m in p.messages][-1] == "m9"


def test_a_dangling_call_is_sent_once_its_results_arrive() -> None:
    spec = [("h", 10), ("call", ["c1"], 10)]
    _, first = plan(spec)
    assert "m1" in first.dropped_ids
    _, second = plan([*spec, ("tool", "c1", 10)])
    assert [m.id for m in second.messages] == ["sys", "m0", "m1", "m2"]
    assert second.dropped_ids == []


def test_leading_ai_message_is_not_sent_first() -> None:
    _, p = plan([("a", 10), ("h", 10)])
    assert [m.id for m in p.messages] == ["sys", "m1"]
    assert "precedes" in p.dropped_reasons["m0"]


def test_summary_failure_keeps_pending_messages_and_sends_what_fits() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]
    previous = WindowState()
    layout, p = plan(spec, state=previous, failed=True)
    assert p.summary_failed
    assert p.state.summary is None
    assert p.state.summarized_through == 0
    assert p.state.window_start == layout.new_start == 6
    # The prompt limit (1,000) allows more than the window: pending messages are sent.
    assert p.start < layout.new_start
    assert p.tokens.total <= 1000
    assert set(p.pending_ids) | set(p.kept_ids) == {f"m{i}" for i in range(9)}
    assert not p.dropped_ids
    assert not p.summarized_ids
    # Next turn: the pending messages are folded (retry), together with those leaving now.
    layout2, p2 = plan([*spec, ("a", 100), ("h", 10)], state=p.state, summary=("auto",))  # type: ignore[arg-type]
    assert layout2.fold_positions[0] == 0
    assert p2.state.summarized_through == p2.state.window_start


def test_a_summary_covering_part_of_the_fold_leaves_the_rest_pending() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]
    _, p = plan(spec, summary=("partial", 40, 2))
    assert p.state.summarized_through == 2
    assert p.state.window_start == 6
    assert p.summarized_ids == ["m0", "m1"]
    assert "m2" in p.kept_ids or "m2" in p.pending_ids


def test_window_size_caps_messages_kept() -> None:
    spec = [("h", 1), ("a", 1)] * 10 + [("h", 1)]
    layout, p = plan(spec, lim=limits(window_size=6), summarize=False)
    assert layout.compacted
    sent = [m for m in p.messages if m.type != "system"]
    assert len(sent) <= 6
    assert isinstance(sent[0], HumanMessage)


def test_truncation_shortens_current_turn_tool_results_never_the_human() -> None:
    spec = [("h", 100), ("call", ["c1"], 20), ("tool", "c1", 3000)]
    lim = limits(truncate=True, message_cap=5000)
    layout, p = plan(spec, lim=lim)
    assert layout.turn_caps
    assert 2 in layout.turn_caps
    assert p.messages[-1].content.startswith("short")
    assert p.truncated_ids == ("m2",)
    assert p.tokens.total <= lim.prompt
    with pytest.raises(ContextOverflowError, match="never shortened"):
        plan([("h", 5000)], lim=lim)


def test_truncation_caps_old_long_messages_at_the_message_cap() -> None:
    spec = [("h", 10), ("a", 600), ("h", 10)]
    lim = limits(truncate=True, message_cap=250)
    _, p = plan(spec, lim=lim)
    assert [m.id for m in p.messages] == ["sys", "m0", "m1", "m2"]
    assert p.messages[2].content == "short 250"
    assert p.tokens.recent == 10 + 250 + 10


def test_without_truncation_the_current_turn_overflows() -> None:
    spec = [("h", 100), ("call", ["c1"], 20), ("tool", "c1", 3000)]
    with pytest.raises(ContextOverflowError, match="current turn"):
        plan(spec)


def test_no_human_message_is_an_error() -> None:
    with pytest.raises(ValueError, match="no human message"):
        plan([("a", 10)])


def test_state_from_another_conversation_is_an_error() -> None:
    with pytest.raises(ValueError, match="another conversation"):
        plan([("h", 10), ("a", 10)], state=WindowState(summarized_through=5, window_start=5))


def test_window_state_validates_and_reports_load_from() -> None:
    with pytest.raises(ValueError, match="summarized_through <= window_start"):
        WindowState(summarized_through=3, window_start=2)
    st = WindowState(summarized_through=2, window_start=5)
    assert st.load_from == 2
    assert st.pending == 3


def test_limits_validate_marks() -> None:
    with pytest.raises(ValueError, match="low_water"):
        limits(low_water=0.95, high_water=0.9)
    assert limits().high_mark == 900
    assert limits().low_mark == 500


def test_recap_is_a_framed_human_message() -> None:
    recap = recap_message("User ordered ORD-1.", 12)
    assert isinstance(recap, HumanMessage)
    assert not isinstance(recap, SystemMessage)
    assert recap.id == f"{RECAP_ID_PREFIX}12"
    assert "not instructions" in recap.content
    assert "ORD-1" in recap.content
    assert is_recap(recap)
    assert not is_recap(HumanMessage("hi", id="x"))


def test_recap_of_an_unchanged_summary_is_the_same_message() -> None:
    # Every turn between compactions sends the recap: it is built once, and the prompt-cache
    # estimate can recognise it by identity.
    recap = recap_message("User ordered ORD-2.", 14)
    assert recap_message("User ordered ORD-2.", 14) is recap
    assert recap_message("User ordered ORD-2.", 15) is not recap
    assert recap_message("User ordered ORD-3.", 14).content != recap.content


def test_cut_within_matches_brute_force() -> None:
    spec = [("h", 7), ("a", 30), ("call", ["x"], 5), ("tool", "x", 11), ("a", 3)] * 6 + [("h", 1)]
    messages, counts = build(spec)
    index = ConversationIndex()
    index.extend(messages, counts)
    t = index.humans[-1]
    for room in range(0, 300, 7):
        got = index.cut_within(0, t, stop=t, tokens=room, messages=None)
        expected = next(h for h in index.humans if sum(counts[h:t]) <= room)
        assert got == expected


def test_plan_renders_as_table_and_html() -> None:
    spec = [("h", 100), ("a", 200)] * 4 + [("h", 50)]
    _, p = plan(spec, summary=("auto",))  # type: ignore[arg-type]
    text = str(p)
    assert "summary" in text
    assert "prompt limit" in text
    assert "1,000" in text
    assert "summarized 6" in text
    assert "compacted yes" in text
    html = p._repr_html_()
    assert html.startswith("<div>")
    assert "<table>" in html
    assert "1,000" in html
    # repr stays one line and never dumps the messages.
    assert "\n" not in repr(p)
    assert repr(p).startswith(f"ContextPlan(messages={len(p.messages)}, ")
    assert str(p.messages[-1].content) not in repr(p)


def test_cached_tokens_use_the_previous_prompt() -> None:
    spec = [("h", 600), ("a", 600), ("h", 10)]
    lim = limits(budget=4000, prompt=3000, response=900)
    messages, counts = build(spec)
    index = ConversationIndex()
    index.extend(messages, counts)
    layout = layout_turn(index, WindowState(), lim, system_tokens=10, summarize=False)
    previous = [*SYSTEM, messages[0]]
    p = finish_turn(
        layout,
        index,
        WindowState(),
        lim,
        system=SYSTEM,
        system_counts=SYSTEM_COUNTS,
        summarize=False,
        previous_prompt=previous,
        price=(1.0, 0.1),
    )
    assert p.cached_tokens == 0  # 610 repeated tokens: under the 1,024-token minimum
    spec2 = [("h", 1200), ("a", 600), ("h", 10)]
    messages, counts = build(spec2)
    index = ConversationIndex()
    index.extend(messages, counts)
    layout = layout_turn(index, WindowState(), lim, system_tokens=10, summarize=False)
    p = finish_turn(
        layout,
        index,
        WindowState(),
        lim,
        system=SYSTEM,
        system_counts=SYSTEM_COUNTS,
        summarize=False,
        previous_prompt=[*SYSTEM, messages[0]],
        price=(1.0, 0.1),
    )
    assert p.cached_tokens == 1152  # 1,210 rounded down to 128-token blocks
    assert p.estimated_cost == pytest.approx(((p.tokens.total - 1152) * 1.0 + 1152 * 0.1) / 1e6)
