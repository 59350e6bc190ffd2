from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.workload import synthetic_conversation


def test_same_seed_same_conversation() -> None:
    a = synthetic_conversation(30, seed=7)
    b = synthetic_conversation(30, seed=7)
    c = synthetic_conversation(30, seed=8)
    assert [m.content for m in a.messages] == [m.content for m in b.messages]
    assert [m.content for m in a.messages] != [m.content for m in c.messages]


def test_shape_of_the_conversation() -> None:
    convo = synthetic_conversation(40, tool_every=10, fact_every=10)
    assert isinstance(convo.messages[0], SystemMessage)
    assert len(convo.turn_starts) == 40
    assert all(isinstance(convo.messages[i], HumanMessage) for i in convo.turn_starts)
    assert sum(isinstance(m, ToolMessage) for m in convo.messages) == 4
    # 40 plain calls plus one extra call per tool turn.
    assert len(convo.call_points) == 44
    ids = [m.id for m in convo.messages]
    assert len(set(ids)) == len(ids)
    assert isinstance(convo.messages[-1], AIMessage)


def test_every_call_point_is_a_valid_prompt() -> None:
    convo = synthetic_conversation(25)
    for end in convo.call_points:
        assert find_prompt_problems(convo.messages[:end]) == []


def test_planted_facts_are_unique_and_where_they_say() -> None:
    convo = synthetic_conversation(100)
    assert [f.turn for f in convo.facts] == list(range(0, 100, 10))
    texts = [f.text for f in convo.facts]
    assert len(set(texts)) == len(texts)
    for fact in convo.facts:
        content = convo.messages[fact.message_index].content
        assert isinstance(content, str)
        assert content.startswith(fact.text)
        others = [m for i, m in enumerate(convo.messages) if i != fact.message_index]
        assert not any(fact.text in str(m.content) for m in others)


def test_rejects_zero_turns() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        synthetic_conversation(0)
