from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_holysheep.prompt_check import find_prompt_problems, is_valid_prompt


def _call(call_id: str, name: str = "lookup") -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": {}, "id": call_id}])


def test_plain_conversation_is_valid() -> None:
    prompt = [SystemMessage("s"), HumanMessage("hi"), AIMessage("hello"), HumanMessage("bye")]
    assert find_prompt_problems(prompt) == []
    assert is_valid_prompt(prompt)


def test_empty_and_system_only_prompts_are_invalid() -> None:
    assert find_prompt_problems([]) == ["the prompt is empty"]
    assert find_prompt_problems([SystemMessage("s")]) == ["the prompt has only system messages"]


def test_first_message_after_system_block_must_be_human() -> None:
    problems = find_prompt_problems([SystemMessage("s"), AIMessage("hello"), HumanMessage("x")])
    assert len(problems) == 1
    assert "message 1" in problems[0]
    assert "ai message" in problems[0]


def test_orphan_tool_result_is_reported() -> None:
    problems = find_prompt_problems(
        [HumanMessage("q"), ToolMessage("result", tool_call_id="c1"), AIMessage("a")]
    )
    assert len(problems) == 1
    assert "'c1'" in problems[0]
    assert "no matching tool call" in problems[0]


def test_tool_call_without_result_is_reported() -> None:
    problems = find_prompt_problems([HumanMessage("q"), _call("c1"), HumanMessage("next")])
    assert problems == ["tool call(s) 'c1' of AI message(s) [1] have no tool result"]
    # A call at the very end is also unanswered.
    assert find_prompt_problems([HumanMessage("q"), _call("c2")]) != []


def test_complete_tool_exchange_is_valid() -> None:
    two_calls = AIMessage(
        "",
        tool_calls=[
            {"name": "a", "args": {}, "id": "c1"},
            {"name": "b", "args": {}, "id": "c2"},
        ],
    )
    prompt = [
        HumanMessage("q"),
        two_calls,
        ToolMessage("r1", tool_call_id="c1"),
        ToolMessage("r2", tool_call_id="c2"),
        AIMessage("answer"),
    ]
    assert find_prompt_problems(prompt) == []


def test_partial_results_are_reported() -> None:
    two_calls = AIMessage(
        "",
        tool_calls=[
            {"name": "a", "args": {}, "id": "c1"},
            {"name": "b", "args": {}, "id": "c2"},
        ],
    )
    problems = find_prompt_problems(
        [HumanMessage("q"), two_calls, ToolMessage("r1", tool_call_id="c1"), AIMessage("x")]
    )
    assert problems == ["tool call(s) 'c2' of AI message(s) [1] have no tool result"]


def test_result_separated_from_its_call_is_reported() -> None:
    prompt = [
        HumanMessage("q"),
        _call("c1"),
        AIMessage("interjection"),
        ToolMessage("r1", tool_call_id="c1"),
    ]
    assert len(find_prompt_problems(prompt)) == 2
