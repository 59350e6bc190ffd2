"""The loopback OpenAI-compatible server of ``langchain_holysheep.testing``, over raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from langchain_holysheep.testing import (
    DEFAULT_TEST_API_KEY,
    Fault,
    HolySheepTestServer,
    Reply,
    count_text_tokens,
    default_reply,
)


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


def _request(
    server: HolySheepTestServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = DEFAULT_TEST_API_KEY,
    timeout: float = 5,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)  # fmt: skip
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _chat(server: HolySheepTestServer, **body: Any) -> tuple[int, dict[str, str], bytes]:
    body.setdefault("model", "deepseek-v3.2")
    body.setdefault("messages", [{"role": "user", "content": "Where is my parcel?"}])
    return _request(server, "POST", "/v1/chat/completions", body)


def _sse_events(raw: bytes) -> list[Any]:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_base_url_env_and_models(server: HolySheepTestServer) -> None:
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.env() == {
        "HOLYSHEEP_API_BASE": server.base_url,
        "HOLYSHEEP_API_KEY": DEFAULT_TEST_API_KEY,
    }
    status, _, raw = _request(server, "GET", "/v1/models")
    assert status == 200
    ids = [m["id"] for m in json.loads(raw)["data"]]
    assert "deepseek-v3.2" in ids
    assert "gemini-2.5-pro" in ids


def test_wrong_or_missing_key_gets_401_without_echoing_it(server: HolySheepTestServer) -> None:
    for key in ("sk-not-the-right-key", None):
        status, _, raw = _request(server, "GET", "/v1/models", key=key)
        assert status == 401
        assert json.loads(raw)["error"]["code"] == "invalid_api_key"
        assert b"sk-not-the-right-key" not in raw
    assert [r.status for r in server.requests] == [401, 401]
    assert server.requests[0].authorization == "Bearer sk-not-the-right-key"
    assert server.requests[1].authorization is None


def test_api_key_none_accepts_anything() -> None:
    with HolySheepTestServer(api_key=None) as srv:
        status, _, _ = _request(srv, "GET", "/v1/models", key=None)
        assert status == 200
        assert "HOLYSHEEP_API_KEY" not in srv.env()


def test_unknown_route_and_bad_body(server: HolySheepTestServer) -> None:
    assert _request(server, "GET", "/v1/nothing")[0] == 404
    assert _request(server, "POST", "/v1/chat/completions", {"model": "x"})[0] == 400


def test_default_reply_quotes_last_user_message_with_usage(server: HolySheepTestServer) -> None:
    status, headers, raw = _chat(server)
    assert status == 200
    completion = json.loads(raw)
    assert headers["x-request-id"] == completion["id"]
    choice = completion["choices"][0]
    assert choice["message"]["content"] == "You said: Where is my parcel?"
    assert choice["finish_reason"] == "stop"
    usage = completion["usage"]
    # 3 per message + role + content, plus 3 priming; completion = the reply's content.
    expected_prompt = 3 + count_text_tokens("user") + count_text_tokens("Where is my parcel?") + 3
    assert usage["prompt_tokens"] == expected_prompt
    assert usage["completion_tokens"] == count_text_tokens("You said: Where is my parcel?")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert "cost_usd" not in usage


def test_scripted_replies_are_served_in_order_then_default(server: HolySheepTestServer) -> None:
    server.script("first", Reply.tool_call("lookup_order", {"order_id": "A1"}, id="call_x"))
    assert server.pending_replies == 2
    first = json.loads(_chat(server)[2])["choices"][0]
    second = json.loads(_chat(server)[2])["choices"][0]
    third = json.loads(_chat(server)[2])["choices"][0]
    assert first["message"]["content"] == "first"
    assert second["finish_reason"] == "tool_calls"
    call = second["message"]["tool_calls"][0]
    assert call["id"] == "call_x"
    assert call["function"] == {"name": "lookup_order", "arguments": '{"order_id": "A1"}'}
    assert third["message"]["content"].startswith("You said:")
    assert server.pending_replies == 0


def test_responder_sees_the_request_and_may_return_faults() -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> Reply | Fault | str | None:
        seen.append(body)
        text = body["messages"][-1]["content"]
        if text == "fail":
            return Fault.server_error(502)
        return None if text == "default" else text.upper()

    with HolySheepTestServer(responder=responder) as srv:
        assert (
            json.loads(_chat(srv, messages=[{"role": "user", "content": "hey"}])[2])["choices"][0][
                "message"
            ]["content"]
            == "HEY"
        )
        status, _, _ = _chat(srv, messages=[{"role": "user", "content": "fail"}])
        assert status == 502
        default = json.loads(_chat(srv, messages=[{"role": "user", "content": "default"}])[2])
        assert default["choices"][0]["message"]["content"] == "You said: default"
    assert [b["messages"][-1]["content"] for b in seen] == ["hey", "fail", "default"]


def test_default_reply_calls_a_forced_tool_with_schema_valid_args() -> None:
    tool: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": "Joke",
            "parameters": {
                "type": "object",
                "properties": {
                    "setup": {"type": "string"},
                    "rating": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "mood": {"enum": ["happy", "sad"]},
                },
            },
        },
    }
    body = {"messages": [], "tools": [tool], "tool_choice": {"type": "function",
            "function": {"name": "Joke"}}}  # fmt: skip
    reply = default_reply(body)
    assert reply.tool_calls[0].name == "Joke"  # type: ignore[union-attr]
    assert reply.tool_calls[0].args == {  # type: ignore[union-attr]
        "setup": "example",
        "rating": 1,
        "tags": [],
        "mood": "happy",
    }
    schema_format = {
        "type": "json_schema",
        "json_schema": {"schema": tool["function"]["parameters"]},
    }
    assert (
        json.loads(default_reply({"messages": [], "response_format": schema_format}).content)[
            "mood"
        ]
        == "happy"
    )


def test_default_reply_runs_one_agent_round_when_tools_are_offered() -> None:
    tool = {"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}}}}  # fmt: skip
    asked: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Where is A-17?"}],
        "tools": [tool],
    }
    call = default_reply(asked).tool_calls[0]
    assert call.name == "lookup_order"  # type: ignore[union-attr]
    assert call.args == {"order_id": "Where is A-17?"}  # type: ignore[union-attr]
    answered = {
        "messages": [
            *asked["messages"],
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "shipped on Monday", "tool_call_id": "c1"},
        ],
        "tools": [tool],
    }
    assert default_reply(answered).content == "The tool returned: shipped on Monday"
    assert default_reply(answered).tool_calls == ()
    no_tools = {**asked, "tool_choice": "none"}
    assert default_reply(no_tools).content == "You said: Where is A-17?"


def test_stream_has_role_content_finish_usage_and_done(server: HolySheepTestServer) -> None:
    server.script("Your parcel ships today.")
    status, headers, raw = _chat(server, stream=True, stream_options={"include_usage": True})
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    events = _sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Your parcel ships today."
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop"
    assert set(finish[:-1]) == {None}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == count_text_tokens(text)
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(server: HolySheepTestServer) -> None:
    events = _sse_events(_chat(server, stream=True)[2])
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_tool_call_arguments_reassemble(server: HolySheepTestServer) -> None:
    server.script(Reply.tool_call("refund_status", {"order_id": "B-17", "verbose": True}))
    events = _sse_events(_chat(server, stream=True)[2])[:-1]
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == "refund_status"
    assert len(deltas) > 2  # arguments arrive in pieces
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"order_id": "B-17", "verbose": True}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _long_conversation(turns: int) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": "You are a support agent. " * 50}]
    for k in range(turns):
        messages.append({"role": "user", "content": f"question {k} " + "detail " * 60})
        messages.append({"role": "assistant", "content": f"answer {k} " + "reply " * 60})
    return messages


def test_prompt_cache_counts_the_repeated_prefix_in_blocks(server: HolySheepTestServer) -> None:
    history = _long_conversation(12)
    first = json.loads(_chat(server, messages=[*history, {"role": "user", "content": "q"}])[2])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = json.loads(_chat(server, messages=[*history, {"role": "user", "content": "r"}])[2])
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # The whole history repeats; only the new last message (and priming) does not.
    last = 3 + count_text_tokens("user") + count_text_tokens("r")
    prefix = second["usage"]["prompt_tokens"] - 3 - last
    assert prefix >= 1024
    assert cached == prefix // 128 * 128
    # A changed first message breaks the prefix: nothing cached.
    changed = [{"role": "system", "content": "Different."}, *history[1:]]
    third = json.loads(_chat(server, messages=changed)[2])
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_short_repeated_prefix_is_not_cached(server: HolySheepTestServer) -> None:
    messages = [{"role": "user", "content": "short"}]
    _chat(server, messages=messages)
    again = json.loads(_chat(server, messages=messages)[2])
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_deepseek_usage_style_and_cost() -> None:
    with HolySheepTestServer(usage_style="deepseek", prices=(1.0, 0.1, 2.0)) as srv:
        history = _long_conversation(12)
        _chat(srv, messages=history)
        usage = json.loads(_chat(srv, messages=history)[2])["usage"]
    assert "prompt_tokens_details" not in usage
    hit, miss = usage["prompt_cache_hit_tokens"], usage["prompt_cache_miss_tokens"]
    assert hit > 0
    assert hit + miss == usage["prompt_tokens"]
    expected = (miss * 1.0 + hit * 0.1 + usage["completion_tokens"] * 2.0) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected)


def test_reply_usage_overrides(server: HolySheepTestServer) -> None:
    server.script(Reply("hi", extra_usage={"cost_usd": 0.5}), Reply("hi", usage={"total": 1}))
    assert json.loads(_chat(server)[2])["usage"]["cost_usd"] == 0.5
    assert json.loads(_chat(server)[2])["usage"] == {"total": 1}


@pytest.mark.parametrize(
    ("fault", "status", "retry_after"),
    [
        (Fault.unauthorized(), 401, None),
        (Fault.rate_limited(retry_after=2), 429, "2"),
        (Fault.rate_limited(retry_after=0.25), 429, "0.25"),
        (Fault.server_error(), 500, None),
        (Fault.unavailable(retry_after=1), 503, "1"),
    ],
)
def test_status_faults(
    server: HolySheepTestServer, fault: Fault, status: int, retry_after: str | None
) -> None:
    server.script("kept for the next request")
    server.inject(fault)
    got, headers, raw = _chat(server)
    assert got == status
    assert headers.get("retry-after") == retry_after
    assert "error" in json.loads(raw)
    # A fault does not consume the scripted reply.
    assert json.loads(_chat(server)[2])["choices"][0]["message"]["content"] == (
        "kept for the next request"
    )
    assert [r.fault for r in server.chat_requests] == ["status", None]


def test_faults_are_taken_in_order_one_per_request(server: HolySheepTestServer) -> None:
    server.inject(Fault.server_error(500), Fault.server_error(503))
    assert server.pending_faults == 2
    assert [_chat(server)[0] for _ in range(3)] == [500, 503, 200]
    assert server.pending_faults == 0


def test_fault_policy_is_consulted_when_no_fault_is_queued() -> None:
    calls = iter(range(100))

    def every_other(body: dict[str, Any]) -> Fault | None:
        return Fault.server_error(500) if next(calls) % 2 == 0 else None

    with HolySheepTestServer(fault_policy=every_other) as srv:
        assert [_chat(srv)[0] for _ in range(4)] == [500, 200, 500, 200]


def test_malformed_body_fault(server: HolySheepTestServer) -> None:
    server.inject(Fault.malformed_body())
    status, headers, raw = _chat(server)
    assert status == 200
    assert headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        json.loads(raw)


def test_slow_fault_delays_the_answer_and_client_timeout_fires(
    server: HolySheepTestServer,
) -> None:
    server.inject(Fault.slow(2.0))
    with pytest.raises(TimeoutError):
        _request(server, "POST", "/v1/chat/completions",
                 {"model": "m", "messages": []}, timeout=0.2)  # fmt: skip
    assert server.chat_requests[0].fault == "slow"


def test_disconnect_fault_closes_without_answer(server: HolySheepTestServer) -> None:
    server.inject(Fault.disconnect())
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        _chat(server)


def test_stream_cut_leaves_the_chunked_body_unterminated(server: HolySheepTestServer) -> None:
    server.inject(Fault.stream_cut(after_chunks=2))
    with pytest.raises(http.client.IncompleteRead) as info:
        _chat(server, stream=True)
    assert len(_sse_events(info.value.partial)) == 2


def test_stream_truncated_ends_cleanly_without_finish_or_done(
    server: HolySheepTestServer,
) -> None:
    server.inject(Fault.stream_truncated(after_chunks=3))
    status, _, raw = _chat(server, stream=True)
    assert status == 200
    events = _sse_events(raw)
    assert len(events) == 3
    assert "[DONE]" not in events
    assert all(e["choices"][0]["finish_reason"] is None for e in events)


def test_stream_malformed_sends_a_chunk_that_is_not_json(server: HolySheepTestServer) -> None:
    server.inject(Fault.stream_malformed(after_chunks=1))
    raw = _chat(server, stream=True)[2]
    blocks = [b for b in raw.decode().split("\n\n") if b]
    assert len(blocks) == 2
    with pytest.raises(ValueError):
        json.loads(blocks[1][len("data: ") :])


def test_request_log_records_headers_bodies_and_retry_counts(server: HolySheepTestServer) -> None:
    _chat(server, temperature=0.5)
    record = server.chat_requests[0]
    assert record.method == "POST"
    assert record.path == "/v1/chat/completions"
    assert record.authorization == f"Bearer {DEFAULT_TEST_API_KEY}"
    assert record.body["temperature"] == 0.5
    assert record.messages == [{"role": "user", "content": "Where is my parcel?"}]
    assert record.stream is False
    assert record.retry_count == 0
    server.reset()
    assert server.requests == []
    assert server.total_requests == 0


def test_request_log_is_bounded_but_total_counts_everything() -> None:
    with HolySheepTestServer(max_logged_requests=3) as srv:
        for _ in range(5):
            _chat(srv)
        assert srv.total_requests == 5
        assert [r.index for r in srv.requests] == [2, 3, 4]


def test_many_concurrent_connections_each_get_their_own_answer(
    server: HolySheepTestServer,
) -> None:
    n = 200
    barrier = threading.Barrier(n)

    def one(k: int) -> str:
        barrier.wait()
        raw = _chat(server, messages=[{"role": "user", "content": f"session {k}"}])[2]
        return str(json.loads(raw)["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(one, range(n)))
    assert answers == [f"You said: session {k}" for k in range(n)]
    assert server.total_requests == n
    assert sorted(r.index for r in server.requests) == list(range(n))


def test_stop_wakes_slow_handlers_and_frees_the_port() -> None:
    srv = HolySheepTestServer().start()
    port = srv.port
    srv.inject(Fault.slow(30))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            _chat(srv)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    while not srv.requests:
        time.sleep(0.01)
    srv.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()  # the 30 s sleep was interrupted
    assert len(errors) == 1
    srv.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    with pytest.raises(RuntimeError, match="not running"):
        _ = srv.base_url


def test_cannot_start_twice(server: HolySheepTestServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_command_line_server_prints_its_env_and_serves() -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "langchain_holysheep.testing", "--port", "0", "--api-key", "k-1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        env = {}
        for line in proc.stdout:
            if line.startswith("#"):
                break
            name, value = line.strip().removeprefix("export ").split("=", 1)
            env[name] = value
        assert env["HOLYSHEEP_API_KEY"] == "k-1"
        port = int(env["HOLYSHEEP_API_BASE"].rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer k-1"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # a clean exit, not death by signal
