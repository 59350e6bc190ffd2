"""Summarizer calls run in the caller's context, so context-variable callbacks see them.

A sync summarizer call under ``summary_timeout`` runs on a pool thread, and a background
summary on a thread of its own; ``get_usage_callback`` (and its spend limit) and tracing
parents are found through context variables, which a new thread does not inherit by itself.
"""

from __future__ import annotations

import itertools
import time
import warnings

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from langchain_holysheep import ContextWindow, get_usage_callback

MODEL = "deepseek-v3.2"


def summarizer() -> GenericFakeChatModel:
    answer = AIMessage(
        "recap of the conversation",
        usage_metadata={"input_tokens": 400, "output_tokens": 20, "total_tokens": 420},
        response_metadata={"model_name": MODEL},
    )
    return GenericFakeChatModel(messages=itertools.cycle([answer]))


def history(turns: int) -> list[BaseMessage]:
    messages: list[BaseMessage] = []
    for i in range(turns):
        messages.append(HumanMessage(f"question {i} " + "words " * 60, id=f"h{i}"))
        messages.append(AIMessage(f"answer {i} " + "words " * 60, id=f"a{i}"))
    messages.append(HumanMessage("and now?", id="last"))
    return messages


@pytest.mark.parametrize("timeout", [60.0, None], ids=["pool-thread", "inline"])
def test_sync_summaries_are_seen_by_the_usage_callback(timeout: float | None) -> None:
    window = ContextWindow(
        model=MODEL, max_tokens=1500, summarizer=summarizer(), summary_timeout=timeout
    )
    with get_usage_callback() as usage:
        window.invoke(history(30))
    assert usage.calls >= 1
    assert usage.input_tokens == 400 * usage.calls
    assert usage.total_cost > 0


def test_a_spend_limit_stops_summaries_on_the_pool_thread() -> None:
    window = ContextWindow(model=MODEL, max_tokens=1500, summarizer=summarizer())
    with (
        get_usage_callback(spend_limit=1e-9) as usage,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        window.invoke(history(30))
        window.invoke(history(60))
    # The first summary is let through (nothing spent yet); the limit then refuses the next.
    assert usage.calls == 1
    assert any("SpendLimitExceeded" in str(w.message) for w in caught)


def test_background_summaries_are_seen_by_the_usage_callback() -> None:
    window = ContextWindow(
        model=MODEL,
        max_tokens=1500,
        summarizer=summarizer(),
        background_summary=True,
        summary_wait=5.0,
    )
    try:
        with get_usage_callback() as usage:
            for turns in range(10, 60, 2):
                window.invoke(history(turns))
            deadline = time.monotonic() + 5
            while usage.calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert usage.calls >= 1
        assert usage.input_tokens == 400 * usage.calls
    finally:
        window.close()
