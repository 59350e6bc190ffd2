from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    messages_to_dict,
)

from langchain_holysheep.prompt_cache import cacheable_tokens
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.simulate import (
    ContextWindowPolicy,
    FakeSummarizer,
    Policy,
    PolicyStep,
    Replay,
    SendEverything,
    SlidingWindow,
    SummarizationMiddlewarePolicy,
    SummarizerMeter,
    TranscriptError,
    TrimMessagesPolicy,
    call_cost,
    load_transcript,
    plot_simulation,
    prompt_limit,
    simulate,
)
from langchain_holysheep.summarize import build_cache_aligned_prompt, build_summary_prompt
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.window import ContextPlan, recap_message
from langchain_holysheep.workload import synthetic_conversation


class WordCounter:
    """Deterministic stand-in for TokenCounter: one token per word, 3 per message, 3 priming."""

    def count_text(self, text: str) -> int:
        return len(text.split())

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str | None, str], int] = {}

    def count_message(self, message: BaseMessage) -> int:
        key = (message.type, message.id, message.text)
        if key not in self.cache:
            calls = getattr(message, "tool_calls", None) or []
            args = sum(len(json.dumps(c["args"])) for c in calls)
            self.cache[key] = 3 + self.count_text(message.text) + args
        return self.cache[key]

    def count_messages(self, messages: Iterable[BaseMessage]) -> int:
        return sum(self.count_message(m) for m in messages) + 3

    def __call__(self, messages: Sequence[BaseMessage]) -> int:
        return self.count_messages(messages)


@dataclass(frozen=True)
class Price:
    input: float
    cached_input: float
    output: float


PRICE = Price(input=1.0, cached_input=0.1, output=2.0)
COUNTER = WordCounter()


@pytest.fixture(scope="module")
def replay() -> Replay:
    return Replay.from_synthetic(synthetic_conversation(40, seed=3))


def run(replay: Replay, *policies: Policy) -> dict[str, object]:
    result = simulate(replay, policies, model="m", counter=COUNTER, price=PRICE)  # type: ignore[arg-type]
    return {p.name: p for p in result.policies}


# ------------------------------------------------------------------ engine


def test_send_everything_counts_cache_and_cost_per_call(replay: Replay) -> None:
    result = simulate(replay, [SendEverything()], model="m", counter=COUNTER, price=PRICE)  # type: ignore[arg-type]
    calls = result["send everything"].calls
    assert len(calls) == len(replay.call_points)
    for k, (call, point) in enumerate(zip(calls, replay.call_points, strict=True)):
        assert call.prompt_messages == point
        assert call.prompt_tokens == COUNTER.count_messages(replay.messages[:point])
        assert call.output_tokens == COUNTER.count_message(replay.messages[point])
        if k:
            # The whole previous prompt (less its reply priming) is repeated.
            assert call.repeated_prefix_tokens == calls[k - 1].prompt_tokens - 3
            expected = (
                0
                if call.repeated_prefix_tokens < 1024
                else (call.repeated_prefix_tokens // 128 * 128)
            )
            assert call.cached_tokens == expected
        else:
            assert call.cached_tokens == 0
        assert call.cost == pytest.approx(
            (
                (call.prompt_tokens - call.cached_tokens) * 1.0
                + call.cached_tokens * 0.1
                + call.output_tokens * 2.0
            )
            / 1e6
        )
        assert call.valid
    totals = result["send everything"]
    assert totals.invalid_prompts == 0
    assert totals.peak_prompt_tokens == calls[-1].prompt_tokens
    assert 0.5 < totals.cached_share < 1.0
    assert totals.total_cost == pytest.approx(sum(c.cost or 0 for c in calls))


def test_turns_and_facts_of_calls(replay: Replay) -> None:
    result = run(replay, SendEverything())
    calls = result["send everything"].calls  # type: ignore[attr-defined]
    assert calls[0].turn == 1
    assert calls[-1].turn == 40
    # Facts are planted every 10th turn from turn index 0: 4 by turn 40, all present.
    assert calls[-1].facts_planted == 4
    assert calls[-1].facts_present == 4
    assert result["send everything"].fact_share_at(40) == 1.0  # type: ignore[attr-defined]


def test_naive_sliding_window_fits_but_sends_invalid_prompts(replay: Replay) -> None:
    result = run(replay, SlidingWindow(1500, COUNTER))["sliding window"]
    assert result.peak_prompt_tokens <= 1500  # type: ignore[attr-defined]
    # Dropping one message at a time starts prompts on AI messages and orphans tool results.
    assert result.invalid_prompts > 0  # type: ignore[attr-defined]
    # Every prompt changes its first message, so nothing is served from the cache.
    assert result.cached_share < 0.2  # type: ignore[attr-defined]
    assert result.fact_share_at(40) < 1.0  # type: ignore[attr-defined]


def test_trim_messages_anchor_fits_and_is_valid(replay: Replay) -> None:
    result = run(replay, TrimMessagesPolicy(1500, COUNTER))["trim_messages"]
    assert result.peak_prompt_tokens <= 1500  # type: ignore[attr-defined]
    assert result.invalid_prompts == 0  # type: ignore[attr-defined]


def test_summarization_middleware_anchor_meters_its_summarizer(replay: Replay) -> None:
    policy = SummarizationMiddlewarePolicy(1500, 700, COUNTER, FakeSummarizer())
    result = run(replay, policy)["SummarizationMiddleware"]
    assert result.summarizer_calls > 0  # type: ignore[attr-defined]
    assert result.summarizer_cost > 0  # type: ignore[attr-defined]
    calls = result.calls  # type: ignore[attr-defined]
    summarized = [c for c in calls if c.summarizer_calls]
    # The middleware's summary replaces the history in its state.
    assert all(c.prompt_tokens < 1500 + 1000 for c in summarized)
    assert result.peak_prompt_tokens < replay_total_tokens(replay)  # type: ignore[attr-defined]
    assert isinstance(policy._state[0], HumanMessage)
    assert policy._state[0].text.startswith("Here is a summary of the conversation to date")
    assert "[offline fake summary]" in policy._state[0].text


def replay_total_tokens(replay: Replay) -> int:
    return COUNTER.count_messages(replay.messages)


def test_policies_are_pluggable(replay: Replay) -> None:
    class LastTwo(Policy):
        name = "last two"

        def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
            return PolicyStep([conversation[0], *conversation[-2:]])

    result = run(replay, LastTwo(), SendEverything())
    assert list(result) == ["last two", "send everything"]
    assert all(c.prompt_messages == 3 for c in result["last two"].calls)  # type: ignore[attr-defined]


def test_policy_never_sees_a_mutable_view_it_could_corrupt(replay: Replay) -> None:
    before = [m.model_dump() for m in replay.messages]
    run(replay, SummarizationMiddlewarePolicy(1500, 700, COUNTER, FakeSummarizer()))
    assert [m.model_dump() for m in replay.messages] == before


def test_progress_callback_counts_calls(replay: Replay) -> None:
    seen: list[tuple[str, int, int]] = []
    simulate(
        replay,
        [SendEverything()],
        model="m",
        counter=COUNTER,
        price=None,  # type: ignore[arg-type]
        on_call=lambda *a: seen.append(a),
    )
    assert seen[-1] == ("send everything", len(replay.call_points), len(replay.call_points))
    assert len(seen) == len(replay.call_points)


def test_unknown_price_leaves_costs_unknown(replay: Replay) -> None:
    result = simulate(replay, [SendEverything()], model="m", counter=COUNTER, price=None)  # type: ignore[arg-type]
    assert result.policies[0].total_cost is None
    assert call_cost(None, 10, 0, 1) is None


def test_unknown_policy_name_lists_the_policies(replay: Replay) -> None:
    result = simulate(replay, [SendEverything()], model="m", counter=COUNTER, price=None)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="send everything"):
        result["nope"]


# ------------------------------------------------------------------ summarizers


def test_fake_summarizer_keeps_facts_from_previous_summary_and_new_messages() -> None:
    fake = FakeSummarizer()
    first = fake.invoke(
        "My order number is ORD-100000 and my code word is ABC12. The parcel is late.\n"
        "Sorry to hear that. I will check the carrier."
    ).text
    assert first.startswith("[offline fake summary]")
    assert "My order number is ORD-100000 and my code word is ABC12." in first
    assert "Sorry to hear that." in first
    second = fake.invoke(
        f"Previous summary:\n{first}\nNew:\nMy order number is ORD-100370 and my code word is "
        "XYZ99. Thanks."
    ).text
    assert "ORD-100000 and my code word is ABC12." in second
    assert "ORD-100370 and my code word is XYZ99." in second
    assert second.count("ABC12") == 1
    assert fake.invoke("same input").text == fake.invoke("same input").text


def test_ideal_fake_summarizer_keeps_only_facts_and_is_never_empty() -> None:
    ideal = FakeSummarizer(max_words=0)
    text = ideal.invoke("Hello there. My order number is ORD-1 and my code word is QQQ11.").text
    assert text == (
        "[offline fake summary]\nFacts: My order number is ORD-1 and my code word is QQQ11."
    )
    assert ideal.invoke("nothing here").text == "[offline fake summary]\nNothing to keep."


def test_fake_summarizer_bounds_its_notes() -> None:
    fake = FakeSummarizer(max_words=10)
    lines = "\n".join(f"Sentence number {i} has five words. More text." for i in range(50))
    notes = fake.invoke(lines).text.split("Notes: ")[1]
    assert len(notes.split()) <= 10


def test_meter_records_each_call_with_counted_tokens() -> None:
    meter = SummarizerMeter(COUNTER)
    model = meter.attach(FakeSummarizer(max_words=0))
    model.invoke([HumanMessage("one two three")])
    model.invoke([HumanMessage("four")])
    assert len(meter.calls) == 2
    assert meter.calls[0].input_tokens == COUNTER.count_messages([HumanMessage("one two three")])
    assert meter.calls[1].output_tokens == COUNTER.count_text(
        "[offline fake summary]\nNothing to keep."
    )


class AskEachCall(Policy):
    """Sends everything; before each call after the first, asks its summarizer about the last
    prompt, cache-aligned (the last prompt plus a request) or isolated (a prompt of its own)."""

    def __init__(self, name: str, *, aligned: bool) -> None:
        self.name = name
        self.aligned = aligned
        self.meter = SummarizerMeter(COUNTER)
        self.model = self.meter.attach(FakeSummarizer(max_words=0))
        self.last: list[BaseMessage] | None = None

    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        before = len(self.meter.calls)
        if self.last is not None:
            fold = self.last[1:3]
            request = (
                build_cache_aligned_prompt(self.last, None, fold, max_tokens=50)
                if self.aligned
                else build_summary_prompt(None, fold, max_tokens=50)
            )
            assert request is not None
            self.model.invoke(request)
        self.last = list(conversation)
        return PolicyStep(list(conversation), self.meter.calls[before:])


def test_summarizer_input_is_priced_with_the_prefix_it_repeats(replay: Replay) -> None:
    policies = [AskEachCall("aligned", aligned=True), AskEachCall("isolated", aligned=False)]
    result = simulate(replay, policies, model="m", counter=COUNTER, price=PRICE)  # type: ignore[arg-type]
    aligned, isolated = result["aligned"], result["isolated"]
    for k, record in enumerate(aligned.calls):
        if k == 0:
            assert record.summarizer_calls == ()
            continue
        (call,) = record.summarizer_calls
        last_prompt = replay.messages[: replay.call_points[k - 1]]
        expected = cacheable_tokens(sum(COUNTER.count_message(m) for m in last_prompt))
        assert call.cached_tokens == expected
        assert call.input_tokens > expected
        assert record.summarizer_cost == pytest.approx(
            ((call.input_tokens - expected) * 1.0 + expected * 0.1 + call.output_tokens * 2.0) / 1e6
        )
    assert aligned.summarizer_cached_tokens > 0.8 * sum(
        s.input_tokens for c in aligned.calls for s in c.summarizer_calls
    )
    # A summary prompt of its own repeats nothing the provider has seen.
    assert isolated.summarizer_cached_tokens == 0
    assert isolated.summarizer_calls == aligned.summarizer_calls
    # Without a shared cache (another model) everything is billed in full.
    unshared = simulate(
        replay,
        [AskEachCall("aligned", aligned=True)],
        model="m",
        counter=COUNTER,  # type: ignore[arg-type]
        price=PRICE,  # type: ignore[arg-type]
        summarizer_cache=False,
    )["aligned"]
    assert unshared.summarizer_cached_tokens == 0
    assert (unshared.summarizer_cost or 0) > (aligned.summarizer_cost or 0)


def test_fake_summarizer_answers_a_cache_aligned_request() -> None:
    old_fact = "My order number is ORD-1 and my code word is AAA11."
    new_fact = "My order number is ORD-2 and my code word is BBB22."
    kept_fact = "My order number is ORD-3 and my code word is CCC33."
    recap = recap_message(f"[offline fake summary]\nFacts: {old_fact}", 2)
    prompt: list[BaseMessage] = [
        SystemMessage("You are a support bot. Be brief."),
        recap,
        HumanMessage(f"{new_fact} Where is my parcel? It is late."),
        AIMessage("It shipped on Monday. More details follow."),
        HumanMessage(f"{kept_fact} Thanks."),
    ]
    request = build_cache_aligned_prompt(
        prompt, f"[offline fake summary]\nFacts: {old_fact}", prompt[2:4], max_tokens=100
    )
    assert request is not None
    text = FakeSummarizer(max_words=50).invoke(request).text
    facts, notes = text.split("\nNotes: ")
    # Facts from the previous recap and from the messages leaving (it may cover more).
    for fact in (old_fact, new_fact, kept_fact):
        assert fact in facts
    assert facts.count("ORD-1") == 1
    # Notes from the conversation's messages only: not the system prompt, the recap's frame or
    # the request.
    assert notes == "Where is my parcel? It shipped on Monday. Thanks."
    ideal = FakeSummarizer(max_words=0).invoke(request).text
    assert ideal == f"[offline fake summary]\nFacts: {old_fact} {new_fact} {kept_fact}"


# ------------------------------------------------------------------ transcripts


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_openai_format_with_tool_calls(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        [
            json.dumps({"role": "system", "content": "be brief"}),
            json.dumps({"role": "user", "content": "where is my order?"}),
            json.dumps(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": '{"id": 7}'},
                        }
                    ],
                }
            ),
            "",
            json.dumps({"role": "tool", "tool_call_id": "c1", "content": "shipped"}),
            json.dumps({"role": "assistant", "content": "It shipped."}),
        ],
    )
    messages = load_transcript(path)
    assert [type(m) for m in messages] == [
        SystemMessage,
        HumanMessage,
        AIMessage,
        ToolMessage,
        AIMessage,
    ]
    assert messages[2].tool_calls[0]["args"] == {"id": 7}  # type: ignore[attr-defined]
    assert find_prompt_problems(messages) == []
    replay = Replay.from_messages(messages)
    assert replay.call_points == [2, 4]
    assert [replay.turn_of(p) for p in replay.call_points] == [1, 1]


def test_load_langchain_dict_forms(tmp_path: Path) -> None:
    dumped = messages_to_dict([HumanMessage("hi", id="h1"), AIMessage("hello", id="a1")])
    path = write_lines(
        tmp_path,
        [
            *(json.dumps(d) for d in dumped),
            json.dumps({"type": "human", "content": "again"}),
            json.dumps(
                {"type": "ai", "content": "", "tool_calls": [{"name": "f", "args": {}, "id": "c9"}]}
            ),
            json.dumps({"type": "tool", "content": "ok", "tool_call_id": "c9"}),
        ],
    )
    messages = load_transcript(path)
    assert [m.text for m in messages] == ["hi", "hello", "again", "", "ok"]
    assert messages[0].id == "h1"
    assert isinstance(messages[4], ToolMessage)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"content": "x"}), "no 'role' or 'type'"),
        (json.dumps({"role": "robot", "content": "x"}), "unknown role 'robot'"),
        (json.dumps({"role": "user"}), "needs a 'content' key"),
        (json.dumps({"role": "tool", "content": "x"}), "needs the 'tool_call_id'"),
        (json.dumps({"role": "user", "content": None}), "null content"),
    ],
)
def test_malformed_line_names_its_number(tmp_path: Path, line: str, fragment: str) -> None:
    path = write_lines(tmp_path, [json.dumps({"role": "user", "content": "ok"}), "", line])
    with pytest.raises(TranscriptError, match=r"line 3: ") as info:
        load_transcript(path)
    assert fragment in str(info.value)


def test_empty_or_missing_transcript(tmp_path: Path) -> None:
    with pytest.raises(TranscriptError, match="no messages"):
        load_transcript(write_lines(tmp_path, [""]))
    with pytest.raises(TranscriptError, match="cannot read transcript"):
        load_transcript(tmp_path / "absent.jsonl")


def test_transcript_without_an_answer_has_no_call() -> None:
    with pytest.raises(TranscriptError, match="no model call"):
        Replay.from_messages([SystemMessage("s"), HumanMessage("q")])


# ------------------------------------------------------------------ ContextWindow


@pytest.fixture(scope="module")
def token_counter() -> TokenCounter:
    return TokenCounter("deepseek-v3.2")


def test_context_window_policy_valid_bounded_and_metered(
    replay: Replay, token_counter: TokenCounter
) -> None:
    policy = ContextWindowPolicy.from_settings(
        model="deepseek-v3.2",
        max_tokens=6000,
        counter=token_counter,
        summarizer=FakeSummarizer(max_words=0),
    )
    plans: list[ContextPlan] = []
    original = policy.prepare

    def prepare(conversation: Sequence[BaseMessage]) -> PolicyStep:
        step = original(conversation)
        plans.append(policy.last_plan)
        return step

    policy.prepare = prepare  # type: ignore[method-assign]
    price = Price(0.28, 0.028, 0.42)
    result = simulate(
        replay,
        [policy],
        model="deepseek-v3.2",
        counter=token_counter,
        price=price,  # type: ignore[arg-type]
    ).policies[0]
    assert result.invalid_prompts == 0
    assert result.peak_prompt_tokens <= prompt_limit(6000, "deepseek-v3.2")
    assert result.summarizer_calls > 0
    assert result.summarizer_cost is not None
    assert result.summarizer_cost > 0
    # The ideal summarizer carries every planted fact through repeated compactions.
    for turn in (20, 30, 40):
        assert result.fact_share_at(turn) == 1.0
    # The simulator prices what the window itself reports it sends.
    for record, plan in zip(result.calls, plans, strict=True):
        assert record.prompt_tokens == plan.tokens.total
        assert record.cached_tokens == plan.cached_tokens
    # Between compactions the prompt grows append-only, so most of it is served from cache.
    assert result.cached_share > 0.5


def test_context_window_summaries_served_from_the_cache_cost_less(
    replay: Replay, token_counter: TokenCounter
) -> None:
    def policy(mode: str) -> ContextWindowPolicy:
        return ContextWindowPolicy.from_settings(
            model="deepseek-v3.2",
            max_tokens=6000,
            counter=token_counter,
            summarizer=FakeSummarizer(max_words=0, model_name="deepseek-v3.2"),
            summary_mode=mode,
            name=mode,
        )

    price = Price(0.28, 0.028, 0.42)
    result = simulate(
        replay,
        [policy("auto"), policy("isolated")],
        model="deepseek-v3.2",
        counter=token_counter,
        price=price,  # type: ignore[arg-type]
    )
    aligned, isolated = result["auto"], result["isolated"]
    assert aligned.summarizer_calls > 0
    summarizer_input = sum(s.input_tokens for c in aligned.calls for s in c.summarizer_calls)
    assert aligned.summarizer_cached_tokens > 0.7 * summarizer_input
    assert isolated.summarizer_cached_tokens == 0
    assert (aligned.summarizer_cost or 0) < 0.6 * (isolated.summarizer_cost or 0)
    assert aligned.invalid_prompts == 0
    for turn in (20, 30, 40):
        assert aligned.fact_share_at(turn) == 1.0


def test_context_window_policy_without_summarizer(
    replay: Replay, token_counter: TokenCounter
) -> None:
    policy = ContextWindowPolicy.from_settings(
        model="deepseek-v3.2", max_tokens=6000, counter=token_counter
    )
    result = simulate(replay, [policy], model="m", counter=token_counter, price=None).policies[0]
    assert result.summarizer_calls == 0
    assert result.invalid_prompts == 0
    share = result.fact_share_at(40)
    assert share is not None
    assert share < 1.0  # what leaves the window is gone


def test_plot_simulation_returns_a_figure_with_a_line_per_policy(replay: Replay) -> None:
    import matplotlib

    matplotlib.use("Agg")
    result = simulate(
        replay,
        [SendEverything(), SlidingWindow(1500, COUNTER)],
        model="m",
        counter=COUNTER,  # type: ignore[arg-type]
        price=PRICE,  # type: ignore[arg-type]
    )
    fig = plot_simulation(result)
    top, bottom = fig.axes
    assert [line.get_label() for line in top.lines] == ["send everything", "sliding window"]
    cumulative = bottom.lines[0].get_ydata()
    assert cumulative[-1] == pytest.approx(result.policies[0].total_cost)
