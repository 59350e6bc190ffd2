"""Every error ChatHolySheep reports, produced by real faults at the loopback server.

Retries are counted at the server; the key must never show in messages, logs, repr or dumps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import openai
import pytest
from langchain_core.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelRateLimitError,
    ModelTimeoutError,
)
from langchain_core.load import dumps
from langchain_core.messages import AIMessageChunk
from pydantic import ValidationError

from langchain_holysheep import ChatHolySheep, chat_models
from langchain_holysheep.errors import (
    HolySheepAuthenticationError,
    HolySheepConnectionError,
    HolySheepError,
    HolySheepIncompleteStreamError,
    HolySheepRateLimitError,
    HolySheepResponseError,
    HolySheepServerError,
    HolySheepTimeoutError,
)
from langchain_holysheep.testing import Fault, HolySheepTestServer, Reply

SECRET = "hs-live-SECRET-7f3a9c21e4"


@pytest.fixture(scope="module")
def _shared_server() -> Iterator[HolySheepTestServer]:
    # One server per module: models built for the same URL share their HTTP clients, which
    # makes them cheap to build. Each test starts from a clean slate (see below).
    with HolySheepTestServer(api_key=SECRET) as srv:
        yield srv


@pytest.fixture
def server(_shared_server: HolySheepTestServer) -> HolySheepTestServer:
    _shared_server.reset()
    return _shared_server


@pytest.fixture(autouse=True)
def _fast_stream_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the pause between stream retries is shortened; what is retried is unchanged.
    monkeypatch.setattr(chat_models, "_STREAM_RETRY_BASE_DELAY", 0.01)


def _attempts(server: HolySheepTestServer) -> list[int]:
    """The SDK's retry counter of each request the server saw."""
    return [r.retry_count for r in server.chat_requests]


# Construction -------------------------------------------------------------------------------
# ChatHolySheep(model=...) is the documented constructor; the pydantic mypy plugin types the
# __init__ of a populate_by_name model with field names only (model_name), hence ignore[call-arg].


def test_missing_key_fails_at_construction_naming_the_variable() -> None:
    with pytest.raises(ValidationError, match="HOLYSHEEP_API_KEY"):
        ChatHolySheep(model="deepseek-v3.2")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="HOLYSHEEP_API_KEY"):
        ChatHolySheep(model="deepseek-v3.2", api_key="")  # type: ignore[call-arg]


def test_missing_key_fails_even_with_a_custom_base_url() -> None:
    with pytest.raises(ValueError, match="api_key='unused'"):
        ChatHolySheep(model="deepseek-v3.2", base_url="http://127.0.0.1:1/v1")  # type: ignore[call-arg]


# HTTP errors ---------------------------------------------------------------------------------


def test_rejected_key_is_an_authentication_error_without_retries(
    server: HolySheepTestServer,
) -> None:
    llm = ChatHolySheep(model="deepseek-v3.2", base_url=server.base_url, api_key="hs-wrong-key")  # type: ignore[call-arg]
    with pytest.raises(HolySheepAuthenticationError) as info:
        llm.invoke("hi")
    error = info.value
    assert isinstance(error, openai.AuthenticationError)
    assert isinstance(error, ModelAuthenticationError)
    assert isinstance(error, HolySheepError)
    assert error.status_code == 401
    assert "rejected the API key (HTTP 401)" in str(error)
    assert "HOLYSHEEP_API_KEY" in str(error)
    assert "hs-wrong-key" not in str(error)
    assert _attempts(server) == [0]


async def test_rejected_key_async(server: HolySheepTestServer) -> None:
    llm = ChatHolySheep(model="deepseek-v3.2", base_url=server.base_url, api_key="hs-wrong-key")  # type: ignore[call-arg]
    with pytest.raises(HolySheepAuthenticationError):
        await llm.ainvoke("hi")
    with pytest.raises(HolySheepAuthenticationError):
        async for _ in llm.astream("hi"):
            pass


def test_429_is_retried_honouring_retry_after_then_succeeds(server: HolySheepTestServer) -> None:
    server.script("finally")
    server.inject(Fault.rate_limited(retry_after=1.0))
    llm = server.chat_model(max_retries=2)
    assert llm.invoke("hi").content == "finally"
    first, second = server.chat_requests
    assert _attempts(server) == [0, 1]
    # The SDK's own backoff would wait at most 0.5 s; Retry-After asked for 1 s.
    # (A lower bound only: a slow machine cannot make this fail.)
    assert second.received_at - first.received_at >= 1.0


def test_429_every_time_gives_a_rate_limit_error_after_max_retries(
    server: HolySheepTestServer,
) -> None:
    server.inject(*[Fault.rate_limited(retry_after=0.05)] * 4)
    llm = server.chat_model(max_retries=3)
    with pytest.raises(HolySheepRateLimitError) as info:
        llm.invoke("hi")
    error = info.value
    assert isinstance(error, openai.RateLimitError)
    assert isinstance(error, ModelRateLimitError)
    assert error.status_code == 429
    message = str(error)
    assert "HTTP 429" in message
    assert "after 3 retries (max_retries=3)" in message
    assert "Retry-After" in message
    assert "0.05s" in message
    assert _attempts(server) == [0, 1, 2, 3]
    assert server.pending_faults == 0


def test_max_retries_zero_means_one_request(server: HolySheepTestServer) -> None:
    server.inject(Fault.rate_limited(retry_after=0.05))
    with pytest.raises(HolySheepRateLimitError, match=r"after 0 retries \(max_retries=0\)"):
        server.chat_model(max_retries=0).invoke("hi")
    assert _attempts(server) == [0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_every_time_gives_a_server_error(server: HolySheepTestServer, status: int) -> None:
    server.inject(*[Fault.server_error(status, retry_after=0.01)] * 2)
    with pytest.raises(HolySheepServerError) as info:
        server.chat_model(max_retries=1).invoke("hi")
    assert isinstance(info.value, openai.InternalServerError)
    assert isinstance(info.value, ModelAPIError)
    assert f"(HTTP {status}) after 1 retry (max_retries=1)" in str(info.value)
    assert _attempts(server) == [0, 1]


def test_503_then_success(server: HolySheepTestServer) -> None:
    server.inject(Fault.unavailable(retry_after=0.01), Fault.server_error(500, retry_after=0.01))
    assert server.chat_model(max_retries=2).invoke("hi").content == "You said: hi"
    assert [r.status for r in server.chat_requests] == [503, 500, 200]


async def test_async_retries_are_the_same(server: HolySheepTestServer) -> None:
    server.inject(*[Fault.rate_limited(retry_after=0.01)] * 3)
    with pytest.raises(HolySheepRateLimitError):
        await server.chat_model(max_retries=2).ainvoke("hi")
    assert _attempts(server) == [0, 1, 2]


def test_timeout_names_the_timeout(server: HolySheepTestServer) -> None:
    server.inject(*[Fault.slow(5.0)] * 2)
    llm = server.chat_model(timeout=0.25, max_retries=1)
    with pytest.raises(HolySheepTimeoutError) as info:
        llm.invoke("hi")
    assert isinstance(info.value, openai.APITimeoutError)
    assert isinstance(info.value, ModelTimeoutError)
    assert "timeout of 0.25s" in str(info.value)
    assert "after 1 retry (max_retries=1)" in str(info.value)
    assert _attempts(server) == [0, 1]


def test_lost_connection_is_a_connection_error(server: HolySheepTestServer) -> None:
    server.inject(*[Fault.disconnect()] * 2)
    with pytest.raises(HolySheepConnectionError) as info:
        server.chat_model(max_retries=1).invoke("hi")
    assert isinstance(info.value, openai.APIConnectionError)
    assert isinstance(info.value, ModelConnectionError)
    assert "Could not connect" in str(info.value)
    assert "HOLYSHEEP_API_BASE" in str(info.value)
    assert _attempts(server) == [0, 1]


# Malformed bodies ------------------------------------------------------------------------------


def test_body_that_is_not_json(server: HolySheepTestServer) -> None:
    server.inject(Fault.malformed_body())
    with pytest.raises(HolySheepResponseError, match="not JSON") as info:
        server.chat_model().invoke("hi")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ModelAPIError)
    assert len(server.chat_requests) == 1


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"object": "list", "data": []}', "no 'choices'"),
        (b'{"choices": null}', "no 'choices'"),
        (b'{"error": {"message": "upstream exploded"}}', "an error object"),
        (b'{"choices": [{"index": 0}]}', "without a 'message'"),
    ],
)
def test_json_that_is_not_a_completion(
    server: HolySheepTestServer, body: bytes, problem: str
) -> None:
    server.inject(Fault.malformed_body(body))
    with pytest.raises(HolySheepResponseError, match=problem):
        server.chat_model().invoke("hi")


async def test_body_that_is_not_json_async(server: HolySheepTestServer) -> None:
    server.inject(Fault.malformed_body())
    with pytest.raises(HolySheepResponseError):
        await server.chat_model().ainvoke("hi")


# Broken streams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "what"),
    [
        (Fault.stream_truncated(after_chunks=3), "was truncated"),
        (Fault.stream_cut(after_chunks=3), "was cut"),
        (Fault.stream_malformed(after_chunks=3), "not JSON"),
    ],
)
def test_stream_broken_after_content_raises_not_a_shorter_answer(
    server: HolySheepTestServer, fault: Fault, what: str
) -> None:
    server.script("one two three four five six")
    server.inject(fault)
    received: list[AIMessageChunk] = []

    def consume() -> None:
        received.extend(server.chat_model(max_retries=2).stream("hi"))

    with pytest.raises(HolySheepIncompleteStreamError, match=what) as info:
        consume()
    assert "".join(c.text for c in received) == "one two"  # what arrived, nothing invented
    assert "not retried" in str(info.value)
    assert info.value.chunks_received == 3
    assert len(server.chat_requests) == 1  # content was out: retrying would repeat it


def test_invoke_over_a_truncated_stream_raises(server: HolySheepTestServer) -> None:
    server.inject(Fault.stream_truncated(after_chunks=3))
    with pytest.raises(HolySheepIncompleteStreamError):
        server.chat_model(streaming=True).invoke("a long question")


@pytest.mark.parametrize(
    "fault",
    [
        Fault.stream_cut(after_chunks=0),
        Fault.stream_cut(after_chunks=1),
        Fault.stream_truncated(after_chunks=1),
        Fault.stream_malformed(after_chunks=0),
    ],
)
def test_stream_broken_before_content_is_retried(
    server: HolySheepTestServer, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    server.script("complete answer")
    server.inject(fault)
    chunks = list(server.chat_model(max_retries=1).stream("hi"))
    assert "".join(c.text for c in chunks) == "complete answer"  # once, not twice
    assert len([c for c in chunks if c.usage_metadata]) == 1
    assert len(server.chat_requests) == 2
    assert "retrying (1 of max_retries=1)" in caplog.text


def test_stream_broken_before_content_every_time_gives_up(server: HolySheepTestServer) -> None:
    server.inject(*[Fault.stream_truncated(after_chunks=1)] * 2)
    with pytest.raises(
        HolySheepIncompleteStreamError, match=r"Gave up after 1 retry \(max_retries=1\)"
    ):
        list(server.chat_model(max_retries=1).stream("hi"))
    assert len(server.chat_requests) == 2


async def test_astream_broken_after_content_raises(server: HolySheepTestServer) -> None:
    server.script("alpha beta gamma delta")
    server.inject(Fault.stream_cut(after_chunks=2))
    with pytest.raises(HolySheepIncompleteStreamError):
        async for _ in server.chat_model().astream("hi"):
            pass


async def test_astream_broken_before_content_is_retried(server: HolySheepTestServer) -> None:
    server.inject(Fault.stream_truncated(after_chunks=1))
    text = "".join([c.text async for c in server.chat_model(max_retries=1).astream("hi")])
    assert text == "You said: hi"
    assert len(server.chat_requests) == 2


def test_stream_status_errors_are_translated_and_retried_by_the_sdk(
    server: HolySheepTestServer,
) -> None:
    server.inject(*[Fault.server_error(503, retry_after=0.01)] * 2)
    with pytest.raises(HolySheepServerError):
        list(server.chat_model(max_retries=1).stream("hi"))
    assert _attempts(server) == [0, 1]


# The key never shows -------------------------------------------------------------------------


def test_key_never_in_repr_str_dumps_errors_or_logs(
    server: HolySheepTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    llm = server.chat_model(max_retries=1)
    assert SECRET not in repr(llm)
    assert SECRET not in str(llm)
    assert SECRET not in dumps(llm)
    assert SECRET not in llm.model_dump_json()
    assert SECRET not in json.dumps(llm._get_ls_params())

    errors: list[BaseException] = []
    # A relay that echoes the key in its error message is redacted too.
    echo = json.dumps({"error": {"message": f"Key {SECRET} is over quota"}}).encode()
    faults = [
        Fault.http_error(429, retry_after=0.01, body=echo),
        Fault.http_error(429, retry_after=0.01, body=echo),
        Fault.server_error(500, retry_after=0.01),
        Fault.server_error(500, retry_after=0.01),
        Fault.malformed_body(SECRET.encode()),
    ]
    for fault in faults:
        server.inject(fault)
    for _ in range(3):
        try:
            llm.invoke("hi")
        except Exception as e:
            errors.append(e)
    server.inject(Fault.stream_truncated(after_chunks=3))
    try:
        list(llm.stream("hi"))
    except Exception as e:
        errors.append(e)
    llm.invoke("fine")
    list(llm.stream("fine"))
    assert [type(e) for e in errors] == [
        HolySheepRateLimitError,
        HolySheepServerError,
        HolySheepResponseError,
        HolySheepIncompleteStreamError,
    ]
    assert "[REDACTED]" in str(errors[0])
    for error in errors:
        assert SECRET not in str(error)
        assert SECRET not in repr(error)
    assert caplog.records, "nothing was logged at DEBUG: the check would be vacuous"
    assert SECRET not in caplog.text
    # The key did go over the wire, in the header only.
    assert server.chat_requests[-1].authorization == f"Bearer {SECRET}"


def test_scripted_reply_consumed_only_once_across_retries(server: HolySheepTestServer) -> None:
    server.script(Reply("the one reply"), "the next reply")
    server.inject(Fault.rate_limited(retry_after=0.01))
    llm = server.chat_model(max_retries=1)
    assert llm.invoke("a").content == "the one reply"
    assert llm.invoke("b").content == "the next reply"
