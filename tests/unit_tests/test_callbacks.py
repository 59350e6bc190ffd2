from __future__ import annotations

import asyncio
import threading
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, LLMResult

from langchain_holysheep import SpendLimitExceeded, get_usage_callback
from langchain_holysheep.callbacks import UsageCallbackHandler
from langchain_holysheep.pricing import cost
from langchain_holysheep.testing import HolySheepTestServer


@pytest.fixture
def server() -> Iterator[HolySheepTestServer]:
    with HolySheepTestServer(cache_min_tokens=1, cache_block=1) as s:
        yield s


def _usage(inp: int, out: int, cached: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "total_tokens": inp + out,
        "input_token_details": {"cache_read": cached},
    }


def _usage_of(message: AIMessage) -> UsageMetadata:
    assert message.usage_metadata is not None
    return message.usage_metadata


def test_totals_and_dollars_match_the_responses(server: HolySheepTestServer) -> None:
    llm = server.chat_model("deepseek-v3.2")
    with get_usage_callback() as usage:
        replies = [llm.invoke("Where is my parcel?"), llm.invoke("And my refund, please?")]
    assert usage.calls == 2
    assert usage.input_tokens == sum(_usage_of(r)["input_tokens"] for r in replies)
    assert usage.output_tokens == sum(_usage_of(r)["output_tokens"] for r in replies)
    expected = sum(cost(_usage_of(r), "deepseek-v3.2") for r in replies)
    assert usage.total_cost == pytest.approx(expected)
    assert usage.total_cost > 0
    assert set(usage.by_model) == {"deepseek-v3.2"}
    assert usage.usage_metadata["deepseek-v3.2"]["input_tokens"] == usage.input_tokens
    assert "deepseek-v3.2" in str(usage)


def test_cached_input_is_tracked_and_priced_as_cached(server: HolySheepTestServer) -> None:
    llm = server.chat_model("gpt-4.1")
    prompt = [SystemMessage("You are a support agent. " * 50), HumanMessage("Status?")]
    with get_usage_callback() as usage:
        llm.invoke(prompt)
        second = llm.invoke(prompt)
    cached = second.usage_metadata["input_token_details"]["cache_read"]  # type: ignore[index]
    assert cached > 0
    assert usage.cached_input_tokens == cached
    model = usage.by_model["gpt-4.1"]
    full_price = (model.input_tokens * 2.0 + model.output_tokens * 8.0) / 1e6
    assert model.cost == pytest.approx(full_price - cached * (2.0 - 0.5) / 1e6)


def test_streaming_is_counted_once(server: HolySheepTestServer) -> None:
    llm = server.chat_model()
    with get_usage_callback() as usage:
        chunks = list(llm.stream("Tell me about shipping."))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert usage.calls == 1
    assert usage.output_tokens == total.usage_metadata["output_tokens"]  # type: ignore[index]


async def test_async_and_concurrent_calls(server: HolySheepTestServer) -> None:
    llm = server.chat_model()
    with get_usage_callback() as usage:
        replies = await asyncio.gather(*(llm.ainvoke(f"question {i}") for i in range(6)))
        async for _ in llm.astream("one more"):
            pass
    assert usage.calls == 7
    assert usage.input_tokens >= sum(_usage_of(r)["input_tokens"] for r in replies)


def test_threaded_batch(server: HolySheepTestServer) -> None:
    llm = server.chat_model()
    with get_usage_callback() as usage:
        replies = llm.batch([f"question {i}" for i in range(8)], config={"max_concurrency": 4})
    assert usage.calls == 8
    assert usage.output_tokens == sum(_usage_of(r)["output_tokens"] for r in replies)


def test_handler_is_thread_safe() -> None:
    handler = UsageCallbackHandler()
    message = AIMessage("ok", usage_metadata=_usage(100, 10, 40))  # type: ignore[arg-type]
    message.response_metadata["model_name"] = "deepseek-v3.2"
    result = LLMResult(generations=[[ChatGeneration(message=message)]])

    def work() -> None:
        for _ in range(500):
            handler.on_llm_end(result, run_id=uuid.uuid4())

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handler.calls == 4000
    assert handler.input_tokens == 400_000
    assert handler.cached_input_tokens == 160_000
    assert handler.total_cost == pytest.approx(4000 * cost(_usage(100, 10, 40), "deepseek-v3.2"))


def test_spend_limit_stops_the_next_call_before_it_is_sent(server: HolySheepTestServer) -> None:
    llm = server.chat_model()
    with get_usage_callback(spend_limit=1e-9) as usage:
        llm.invoke("first question")  # under the limit when it starts
        assert len(server.chat_requests) == 1
        with pytest.raises(SpendLimitExceeded, match=r"spend limit reached.*was not sent") as info:
            llm.invoke("second question")
        with pytest.raises(SpendLimitExceeded):
            list(llm.stream("third"))
    assert len(server.chat_requests) == 1  # the loopback server received nothing more
    assert info.value.spent == pytest.approx(usage.total_cost)
    assert info.value.limit == 1e-9


async def test_spend_limit_async(server: HolySheepTestServer) -> None:
    llm = server.chat_model()
    with get_usage_callback(spend_limit=0) as usage, pytest.raises(SpendLimitExceeded):
        await llm.ainvoke("hello")
    assert server.chat_requests == []
    assert usage.calls == 0


def test_spend_limit_with_a_fake_model() -> None:
    sent: list[str] = []

    class Recording(GenericFakeChatModel):
        def _generate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(str(messages[-1].content))
            return super()._generate(messages, *args, **kwargs)

    answer = AIMessage(
        "ok",
        usage_metadata=_usage(1_000_000, 0),  # type: ignore[arg-type]
        response_metadata={"model_name": "gpt-4.1"},
    )
    llm = Recording(messages=iter([answer, answer]))
    with get_usage_callback(spend_limit=1.0) as usage:
        llm.invoke("a")
        assert usage.total_cost == pytest.approx(2.0)
        with pytest.raises(SpendLimitExceeded):
            llm.invoke("b")
    assert sent == ["a"]


def test_nested_blocks_and_nothing_tracked_after_exit(server: HolySheepTestServer) -> None:
    llm = server.chat_model()
    with get_usage_callback() as outer:
        llm.invoke("one")
        with get_usage_callback() as inner:
            llm.invoke("two")
        llm.invoke("three")
    llm.invoke("after")
    assert (outer.calls, inner.calls) == (3, 1)


def test_requested_model_is_used_when_the_response_names_none() -> None:
    handler = UsageCallbackHandler()
    run_id = uuid.uuid4()
    handler.on_chat_model_start({}, [[]], run_id=run_id, invocation_params={"model": "gpt-4.1"})
    message = AIMessage("ok", usage_metadata=_usage(1000, 0))  # type: ignore[arg-type]
    handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message)]]), run_id=run_id)
    assert set(handler.by_model) == {"gpt-4.1"}
    assert handler.total_cost == pytest.approx(1000 * 2.0 / 1e6)


def test_unpriced_model_counts_tokens_and_warns_once() -> None:
    handler = UsageCallbackHandler()
    message = AIMessage(
        "ok",
        usage_metadata=_usage(10, 5),  # type: ignore[arg-type]
        response_metadata={"model_name": "mystery-1"},
    )
    result = LLMResult(generations=[[ChatGeneration(message=message)]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handler.on_llm_end(result, run_id=uuid.uuid4())
        handler.on_llm_end(result, run_id=uuid.uuid4())
    assert [str(w.message).split(":")[0] for w in caught] == ["no price for model 'mystery-1'"]
    assert handler.unpriced_models == {"mystery-1"}
    assert handler.total_tokens == 30
    assert handler.total_cost == 0
    assert handler.by_model["mystery-1"].priced is False


def test_negative_spend_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="spend_limit must be >= 0 dollars, got -1"):
        UsageCallbackHandler(spend_limit=-1)
