from __future__ import annotations

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_holysheep.prompt_cache import cacheable_tokens, same_message, shared_prefix_tokens


def test_same_message_compares_prompt_content_not_identity() -> None:
    assert same_message(HumanMessage("a", id="1"), HumanMessage("a", id="2"))
    assert not same_message(HumanMessage("a"), HumanMessage("b"))
    assert not same_message(HumanMessage("a"), AIMessage("a"))
    call = {"name": "t", "args": {"x": 1}, "id": "c"}
    other = {"name": "t", "args": {"x": 2}, "id": "c"}
    assert not same_message(AIMessage("", tool_calls=[call]), AIMessage("", tool_calls=[other]))
    assert same_message(AIMessage("", tool_calls=[call]), AIMessage("", tool_calls=[dict(call)]))
    assert not same_message(AIMessage("", tool_calls=[call]), AIMessage(""))
    assert not same_message(HumanMessage("a", name="x"), HumanMessage("a", name="y"))
    assert same_message(ToolMessage("r", tool_call_id="c"), ToolMessage("r", tool_call_id="c"))
    assert not same_message(ToolMessage("r", tool_call_id="c"), ToolMessage("r", tool_call_id="d"))
    # A chunk is sent like the message it is a part of, but it is not the same kind of value.
    assert not same_message(AIMessageChunk(content="a"), AIMessage("a"))
    assert not same_message(ToolMessage("r", tool_call_id="c"), HumanMessage("r"))


def test_shared_prefix_stops_at_first_difference() -> None:
    prev = [SystemMessage("s"), HumanMessage("a"), AIMessage("b"), HumanMessage("c")]
    cur = [SystemMessage("s"), HumanMessage("a"), AIMessage("B!"), HumanMessage("c")]
    assert shared_prefix_tokens(prev, cur, [10, 20, 30, 40]) == 30
    assert shared_prefix_tokens([], cur, [10, 20, 30, 40]) == 0
    grown = [*prev, AIMessage("d")]
    assert shared_prefix_tokens(prev, grown, [1, 2, 3, 4, 5]) == 10


def test_shared_prefix_rejects_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="2 entries for 1 messages"):
        shared_prefix_tokens([], [HumanMessage("a")], [1, 2])


def test_cacheable_tokens_applies_minimum_and_blocks() -> None:
    assert cacheable_tokens(1023) == 0
    assert cacheable_tokens(1024) == 1024
    assert cacheable_tokens(1300) == 1280
    assert cacheable_tokens(100, minimum=64, block=64) == 64
