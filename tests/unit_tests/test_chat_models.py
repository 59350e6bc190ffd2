"""ChatHolySheep through real HTTP against the loopback server: results, streams, tools, usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from langchain_core.language_models import LanguageModelInput
from langchain_core.load import dumpd, dumps, load
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages import SystemMessage as System
from pydantic import BaseModel, Field

from langchain_holysheep import ChatHolySheep
from langchain_holysheep.chat_models import DEFAULT_API_BASE, PROVIDER
from langchain_holysheep.testing import DEFAULT_TEST_API_KEY, HolySheepTestServer, Reply


@pytest.fixture(scope="module")
def _shared_server() -> Iterator[HolySheepTestServer]:
    # One server per module: models built for the same URL share their HTTP clients, which
    # makes them cheap to build. Each test starts from a clean slate (see below).
    with HolySheepTestServer() as srv:
        yield srv


@pytest.fixture
def server(_shared_server: HolySheepTestServer) -> HolySheepTestServer:
    _shared_server.reset()
    return _shared_server


@pytest.fixture
def model(server: HolySheepTestServer) -> ChatHolySheep:
    return server.chat_model(max_retries=1, timeout=10)


def _join(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


def _chunks(messages: Iterable[BaseMessage]) -> list[AIMessageChunk]:
    out: list[AIMessageChunk] = []
    for message in messages:
        assert isinstance(message, AIMessageChunk), type(message)
        out.append(message)
    return out


def _long_history(turns: int = 12) -> list[BaseMessage]:
    messages: list[BaseMessage] = [System("You are a support agent. " * 50)]
    for k in range(turns):
        messages.append(HumanMessage(f"question {k} " + "detail " * 60))
        messages.append(AIMessage(f"answer {k} " + "reply " * 60))
    return messages


class GetWeather(BaseModel):
    """Get the current weather in a given location."""

    location: str = Field(description="The city, e.g. Paris")


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str
    punchline: str
    rating: int | None = None


# Construction -----------------------------------------------------------------------------
# ChatHolySheep(model=...) is the documented constructor; the pydantic mypy plugin types the
# __init__ of a populate_by_name model with field names only (model_name), hence ignore[call-arg].


def test_reads_key_and_base_from_env(
    server: HolySheepTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    llm = ChatHolySheep(model="deepseek-v3.2")  # type: ignore[call-arg]
    assert llm.api_base == server.base_url
    assert llm.api_key is not None
    assert llm.api_key.get_secret_value() == DEFAULT_TEST_API_KEY
    assert llm.invoke("hello").content == "You said: hello"
    assert server.chat_requests[0].authorization == f"Bearer {DEFAULT_TEST_API_KEY}"


def test_default_base_url_is_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = ChatHolySheep(model="deepseek-v3.2", api_key="k-123")  # type: ignore[call-arg]
    assert llm.api_base == DEFAULT_API_BASE == "https://api.holysheep.ai/v1"
    assert str(llm.root_client.base_url) == "https://api.holysheep.ai/v1/"
    assert llm.stream_usage is True


def test_explicit_arguments_win_over_env(
    server: HolySheepTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOLYSHEEP_API_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("HOLYSHEEP_API_KEY", "wrong-key-from-env")
    llm = ChatHolySheep(model="gpt-4.1-mini", base_url=server.base_url, api_key=server.api_key)  # type: ignore[call-arg]
    assert llm.invoke("hi").content == "You said: hi"


def test_profiles_and_unknown_models() -> None:
    llm = ChatHolySheep(model="gpt-4.1", api_key="k")  # type: ignore[call-arg]
    assert llm.profile is not None
    assert llm.profile["max_input_tokens"] == 1047576
    assert llm.profile["tool_calling"] is True
    names = ("deepseek-v3.2", "gpt-4.1-mini", "claude-sonnet-4.5", "gemini-2.5-flash")
    for name in (*names, "gemini-2.5-pro"):
        profile = ChatHolySheep(model=name, api_key="k").profile  # type: ignore[call-arg]
        assert profile is not None, name
        assert profile["max_input_tokens"], name
    assert ChatHolySheep(model="my-private-finetune", api_key="k").profile is None  # type: ignore[call-arg]


def test_unknown_model_still_works(server: HolySheepTestServer) -> None:
    llm = server.chat_model("my-private-finetune")
    result = llm.invoke("ping")
    assert result.content == "You said: ping"
    assert server.chat_requests[0].body["model"] == "my-private-finetune"


def test_ls_params_provider_matches_model_provider(model: ChatHolySheep) -> None:
    params = model._get_ls_params(stop=["x"])
    assert params["ls_provider"] == PROVIDER == "holysheep"
    assert params["ls_model_name"] == "deepseek-v3.2"
    assert model._llm_type == "chat-holysheep"


# Invoke -----------------------------------------------------------------------------------


def test_invoke_returns_text_usage_and_provider(
    model: ChatHolySheep, server: HolySheepTestServer
) -> None:
    result = model.invoke([System("Be brief."), HumanMessage("Where is my parcel?")])
    assert isinstance(result, AIMessage)
    assert result.content == "You said: Where is my parcel?"
    assert result.response_metadata["model_provider"] == "holysheep"
    assert result.response_metadata["finish_reason"] == "stop"
    usage = server_usage = result.response_metadata["token_usage"]
    assert result.usage_metadata is not None
    assert result.usage_metadata["input_tokens"] == server_usage["prompt_tokens"] > 0
    assert result.usage_metadata["output_tokens"] == usage["completion_tokens"] > 0
    assert result.usage_metadata["input_token_details"]["cache_read"] == 0
    body = server.chat_requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my parcel?"},
    ]
    assert "stream" not in body or body["stream"] is False


async def test_ainvoke(model: ChatHolySheep, server: HolySheepTestServer) -> None:
    server.script("Async answer.")
    result = await model.ainvoke("hi")
    assert result.content == "Async answer."
    assert result.response_metadata["model_provider"] == "holysheep"
    assert result.usage_metadata is not None
    assert result.usage_metadata["total_tokens"] > 0


def test_batch_keeps_inputs_and_answers_paired(model: ChatHolySheep) -> None:
    questions: list[LanguageModelInput] = [f"question number {k}" for k in range(6)]
    answers = model.batch(questions, config={"max_concurrency": 3})
    assert [a.content for a in answers] == [f"You said: {q}" for q in questions]


async def test_abatch(model: ChatHolySheep) -> None:
    answers = await model.abatch(["a", "b", "c"])
    assert [a.content for a in answers] == ["You said: a", "You said: b", "You said: c"]


def test_cached_tokens_become_cache_read(model: ChatHolySheep) -> None:
    history = _long_history()
    first = model.invoke([*history, HumanMessage("new question")])
    second = model.invoke([*history, HumanMessage("another question")])
    assert first.usage_metadata is not None
    assert second.usage_metadata is not None
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    cached = second.usage_metadata["input_token_details"]["cache_read"]
    assert cached >= 1024
    assert cached % 128 == 0
    assert (
        cached == second.response_metadata["token_usage"]["prompt_tokens_details"]["cached_tokens"]
    )


def test_deepseek_cache_hit_tokens_become_cache_read_and_cost_is_kept() -> None:
    with HolySheepTestServer(usage_style="deepseek", prices=(0.28, 0.028, 0.42)) as srv:
        llm = srv.chat_model()
        history = _long_history()
        llm.invoke(history)
        result = llm.invoke(history)
        streamed = _join(list(llm.stream(history)))
    for message in (result, streamed):
        assert message.usage_metadata is not None
        usage = message.response_metadata["token_usage"]
        assert message.usage_metadata["input_token_details"]["cache_read"] == usage[
            "prompt_cache_hit_tokens"
        ] > 0  # fmt: skip
        assert message.response_metadata["cost_usd"] == usage["cost_usd"] > 0


def test_nested_cached_tokens_win_over_deepseek_field() -> None:
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 5,
        "total_tokens": 2005,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "prompt_cache_hit_tokens": 1900,
    }
    with HolySheepTestServer() as srv:
        srv.script(Reply("ok", usage=usage))
        result = srv.chat_model().invoke("x")
    assert result.usage_metadata is not None
    assert result.usage_metadata["input_token_details"]["cache_read"] == 1024


def test_relay_cost_extra_is_kept() -> None:
    with HolySheepTestServer(prices=(1.0, 0.1, 2.0)) as srv:
        result = srv.chat_model().invoke("what does it cost?")
    usage = result.response_metadata["token_usage"]
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert result.response_metadata["cost_usd"] == pytest.approx(expected)


# Streams ----------------------------------------------------------------------------------


def test_stream_every_chunk_has_provider_and_usage_arrives(
    model: ChatHolySheep, server: HolySheepTestServer
) -> None:
    server.script("Your parcel ships today from the Lyon warehouse.")
    chunks = list(model.stream("Where is my parcel?"))
    assert len(chunks) > 5
    assert all(c.response_metadata.get("model_provider") == "holysheep" for c in chunks)
    full = _join(chunks)
    assert full.content == "Your parcel ships today from the Lyon warehouse."
    assert full.response_metadata["model_provider"] == "holysheep"
    assert full.response_metadata["finish_reason"] == "stop"
    assert full.usage_metadata is not None
    assert full.usage_metadata["output_tokens"] > 0
    # The usage chunk closes the stream: LangChain adds no empty chunk of its own.
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata is not None
    body = server.chat_requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_stream_usage_can_be_turned_off(server: HolySheepTestServer) -> None:
    llm = server.chat_model(stream_usage=False)
    chunks = list(llm.stream("hi"))
    assert all(c.usage_metadata is None for c in chunks)
    assert all(c.response_metadata.get("model_provider") == "holysheep" for c in chunks)
    assert chunks[-1].chunk_position == "last"
    assert "stream_options" not in server.chat_requests[0].body


def test_stream_cache_read_in_usage(model: ChatHolySheep) -> None:
    history = _long_history()
    list(model.stream(history))
    full = _join(list(model.stream(history)))
    assert full.usage_metadata is not None
    assert full.usage_metadata["input_token_details"]["cache_read"] >= 1024


async def test_astream(model: ChatHolySheep, server: HolySheepTestServer) -> None:
    server.script("Streaming asynchronously works.")
    chunks = [c async for c in model.astream("go")]
    assert all(c.response_metadata.get("model_provider") == "holysheep" for c in chunks)
    full = _join(chunks)
    assert full.content == "Streaming asynchronously works."
    assert full.usage_metadata is not None
    assert full.usage_metadata["total_tokens"] > 0


def test_invoke_with_streaming_true_uses_the_stream(server: HolySheepTestServer) -> None:
    llm = server.chat_model(streaming=True)
    result = llm.invoke("via stream")
    assert result.content == "You said: via stream"
    assert server.chat_requests[0].stream is True
    assert result.usage_metadata is not None


# Tools and structured output ---------------------------------------------------------------


def test_bind_tools_tool_calls(model: ChatHolySheep, server: HolySheepTestServer) -> None:
    server.script(Reply.tool_call("GetWeather", {"location": "Paris"}, id="call_1"))
    result = model.bind_tools([GetWeather]).invoke("Weather in Paris?")
    assert result.tool_calls == [
        {"name": "GetWeather", "args": {"location": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    assert result.response_metadata["finish_reason"] == "tool_calls"
    tools = server.chat_requests[0].body["tools"]
    assert tools[0]["function"]["name"] == "GetWeather"


def test_streamed_tool_calls(model: ChatHolySheep, server: HolySheepTestServer) -> None:
    server.script(
        Reply(
            tool_calls=[
                {"name": "GetWeather", "args": {"location": "Oslo"}},
                {"name": "GetWeather", "args": {"location": "Rome"}},
            ]
        )
    )
    full = _join(_chunks(model.bind_tools([GetWeather]).stream("two cities")))
    assert [c["args"] for c in full.tool_calls] == [{"location": "Oslo"}, {"location": "Rome"}]


def test_tool_results_are_sent_back(model: ChatHolySheep, server: HolySheepTestServer) -> None:
    server.script(Reply.tool_call("GetWeather", {"location": "Paris"}, id="call_9"), "Sunny.")
    bound = model.bind_tools([GetWeather])
    messages: list[BaseMessage] = [HumanMessage("Weather in Paris?")]
    ai = bound.invoke(messages)
    from langchain_core.messages import ToolMessage

    messages += [ai, ToolMessage("22 C, sunny", tool_call_id="call_9")]
    assert bound.invoke(messages).content == "Sunny."
    sent = server.chat_requests[1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_9"
    assert sent[2] == {"role": "tool", "content": "22 C, sunny", "tool_call_id": "call_9"}


def test_structured_output_defaults_to_function_calling(
    model: ChatHolySheep, server: HolySheepTestServer
) -> None:
    server.script(Reply.tool_call("Joke", {"setup": "Why?", "punchline": "Because.", "rating": 7}))
    joke = model.with_structured_output(Joke).invoke("Tell me a joke")
    assert joke == Joke(setup="Why?", punchline="Because.", rating=7)
    body = server.chat_requests[0].body
    assert body["tool_choice"]["function"]["name"] == "Joke"
    assert "response_format" not in body


def test_structured_output_json_schema_and_include_raw(model: ChatHolySheep) -> None:
    out = model.with_structured_output(Joke, method="json_schema", include_raw=True).invoke(
        "Tell me a joke"
    )
    assert isinstance(out, dict)
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Joke)
    assert out["raw"].response_metadata["model_provider"] == "holysheep"


def test_structured_output_from_default_reply(model: ChatHolySheep) -> None:
    # Nothing scripted: the server calls the forced tool with schema-valid example arguments.
    joke = model.with_structured_output(Joke).invoke("Tell me a joke")
    assert isinstance(joke, Joke)


# Token counting ---------------------------------------------------------------------------


def test_get_num_tokens_uses_the_package_token_counter(model: ChatHolySheep) -> None:
    tokens = pytest.importorskip("langchain_holysheep.tokens")
    messages = [System("Be brief."), HumanMessage("Where is my parcel?")]
    expected = tokens.TokenCounter("deepseek-v3.2").count_messages(messages)
    assert model.get_num_tokens_from_messages(messages) == expected
    with_tools = model.get_num_tokens_from_messages(messages, tools=[GetWeather])
    assert with_tools > expected
    assert model.get_num_tokens("Where is my parcel?") == tokens.TokenCounter(
        "deepseek-v3.2"
    ).count_text("Where is my parcel?")


# Serialisation ------------------------------------------------------------------------------


def test_serialisation_round_trip_without_the_key(
    server: HolySheepTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = server.chat_model(temperature=0.2, max_tokens=50)
    text = dumps(llm)
    assert DEFAULT_TEST_API_KEY not in text
    data = dumpd(llm)
    assert data["id"] == ["langchain_holysheep", "chat_models", "ChatHolySheep"]
    assert data["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["HOLYSHEEP_API_KEY"]}
    monkeypatch.setenv("HOLYSHEEP_API_KEY", DEFAULT_TEST_API_KEY)
    restored = load(
        json.loads(text),
        valid_namespaces=["langchain_holysheep"],
        # "all" means LangChain's own registry; a partner class is allowed by name.
        allowed_objects=[ChatHolySheep],
        secrets_from_env=True,
    )
    assert isinstance(restored, ChatHolySheep)
    assert restored.api_base == server.base_url
    assert restored.temperature == 0.2
    assert restored.invoke("round trip").content == "You said: round trip"


# The README quickstart ----------------------------------------------------------------------

README_QUICKSTART = """
from langchain_holysheep import ChatHolySheep

llm = ChatHolySheep(model="deepseek-v3.2")  # key and URL from HOLYSHEEP_API_KEY / _BASE
reply = llm.invoke("In one sentence: what is a prompt cache?")
print(reply.content)
print(reply.usage_metadata)
"""


def test_readme_quickstart_runs_as_written_against_the_loopback_server(
    server: HolySheepTestServer,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOLYSHEEP_", "OPENAI_"))}
    env.update(server.env())
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(README_QUICKSTART)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "You said: In one sentence: what is a prompt cache?"
    usage: dict[str, Any] = eval(lines[1])
    assert usage["input_tokens"] > 0


def test_one_model_serves_several_event_loops(model: ChatHolySheep) -> None:
    # Pooled async connections belong to the loop that opened them; asyncio.run twice (a CLI,
    # a notebook cell, a test per loop) must not reuse a connection of a closed loop.
    import asyncio

    answers = [asyncio.run(model.ainvoke(f"run {k}")).content for k in range(3)]
    assert answers == ["You said: run 0", "You said: run 1", "You said: run 2"]


def test_the_test_server_docstring_example_runs() -> None:
    doc = HolySheepTestServer.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\n\n    What", 1)[0]
    code = textwrap.dedent(block)
    assert "server.inject(Fault.rate_limited" in code  # the example still shows retries
    exec(compile(code, "HolySheepTestServer.__doc__", "exec"), {})


def test_proxy_from_the_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a corporate proxy (HTTPS_PROXY) the sync client must route through it."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    # A base URL no other test uses, so no cached client built without the proxy is reused.
    llm = ChatHolySheep(  # type: ignore[call-arg]
        model="deepseek-v3.2", api_key="k", base_url="https://relay.proxy-test.invalid/v1"
    )
    http = llm.root_client._client
    proxied = [pattern for pattern, transport in http._mounts.items() if transport is not None]
    assert proxied, "HTTPS_PROXY was ignored by the sync HTTP client"
