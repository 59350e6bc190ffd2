"""Per-turn preparation time of ContextWindow against LangChain's tools, and the marks sweep.

Timing (default): a deterministic synthetic support conversation is grown turn by turn past
100, 1,000 and 10,000 messages; on each new model call every contender prepares the prompt
from the whole conversation, and its time is measured side by side in the same run:

* floor: tokenizing only the messages new since the previous call (cl100k, no cache);
* ContextWindow.plan and ContextWindow.invoke (model deepseek-v3.2, max_tokens=6000, a fake
  instant summarizer; invoke adds LangChain's runnable config/callback machinery);
* trim_messages(strategy="last", start_on="human", include_system=True) with a tiktoken
  counter (cl100k, no cache: what the LangChain docs show) and with
  count_tokens_approximately, at the same prompt cap;
* langchain's SummarizationMiddleware, its before_model driven directly on an agent state
  that gets the new messages appended (it deletes what it summarizes), with the same fake
  summarizer, its trigger and keep at the window's own marks (compact at the high-water mark
  down to the low-water mark, in tokens). Its default keep=("messages", 20) would summarize on
  almost every call here: 20 of these messages count more than the prompt cap.

Sweep (--sweep): ContextWindow's high/low water marks over the 200-turn conversation at a
6,000-token budget, replayed by langchain_holysheep.simulate: cost of every call with cached
input at 10 % of the input price, plus the summarizer's calls (fake summarizer writing the
planted facts and up to 300 words of notes), and the number of compactions.

Run: .venv/bin/python benchmarks/bench_window.py [--sizes 100 1000 10000] [--calls 40]
     .venv/bin/python benchmarks/bench_window.py --sweep
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, RemoveMessage, trim_messages
from langchain_core.messages.utils import count_tokens_approximately

from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.workload import synthetic_conversation

if TYPE_CHECKING:
    from langchain.agents.middleware import AgentState

MODEL = "deepseek-v3.2"
BUDGET = 6000


def percentile(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fake_summarizer() -> FakeListChatModel:
    return FakeListChatModel(responses=["Summary: orders, refunds and deliveries discussed."])


class Contender:
    """Prepares a prompt from the conversation prefix it is given; keeps its own state."""

    name = ""

    def prepare(self, messages: list[BaseMessage], new_from: int) -> Any:
        raise NotImplementedError


class Floor(Contender):
    name = "floor (tokenize new only)"

    def __init__(self) -> None:
        self.counter = TokenCounter(MODEL, cache_size=0, use_provider_counts=False)

    def prepare(self, messages: list[BaseMessage], new_from: int) -> Any:
        return [self.counter.count_message(m) for m in messages[new_from:]]


class WindowPlan(Contender):
    name = "ContextWindow.plan"

    def __init__(self) -> None:
        self.window = ContextWindow(model=MODEL, max_tokens=BUDGET, summarizer=fake_summarizer())

    def prepare(self, messages: list[BaseMessage], new_from: int) -> Any:
        return self.window.plan(messages)


class WindowInvoke(WindowPlan):
    name = "ContextWindow.invoke"

    def prepare(self, messages: list[BaseMessage], new_from: int) -> Any:
        return self.window.invoke(messages)


class FloorUsage(Floor):
    name = "floor, answers with usage"

    def __init__(self) -> None:
        self.counter = TokenCounter(MODEL, cache_size=0, use_provider_counts=True)


class WindowPlanUsage(WindowPlan):
    """The same window fed ChatHolySheep-like answers: they carry the provider's usage, so
    only user input and tool results are tokenized (issue 9)."""

    name = "ContextWindow.plan, answers w/ usage"


USAGE_CONTENDERS = (FloorUsage.name, WindowPlanUsage.name)


def with_usage(messages: list[BaseMessage], counter: TokenCounter) -> list[BaseMessage]:
    """Copy the conversation, giving each plain AI answer the usage ChatHolySheep reports."""
    out: list[BaseMessage] = []
    for m in messages:
        if isinstance(m, AIMessage) and not m.tool_calls and isinstance(m.content, str):
            n = counter.count_text(m.content)
            m = m.model_copy(
                update={
                    "usage_metadata": {
                        "input_tokens": 0,
                        "output_tokens": n,
                        "total_tokens": n,
                    },
                    "response_metadata": {"model_name": MODEL},
                }
            )
        out.append(m)
    return out


class Trim(Contender):
    def __init__(self, name: str, counter: Callable[..., int], limit: int) -> None:
        self.name = name
        self.counter = counter
        self.limit = limit

    def prepare(self, messages: list[BaseMessage], new_from: int) -> Any:
        return trim_messages(
            messages,
            max_tokens=self.limit,
            token_counter=self.counter,
            strategy="last",
            start_on="human",
            include_system=True,
        )


class Middleware(Contender):
    name = "SummarizationMiddleware"

    def __init__(self, high_mark: int, low_mark: int) -> None:
        from langchain.agents.middleware import SummarizationMiddleware

        self.middleware = SummarizationMiddleware(
            model=fake_summarizer(), trigger=("tokens", high_mark), keep=("tokens", low_mark)
        )
        self.state: list[BaseMessage] = []
        self.seen = 0

    def prepare(self, messages: list[BaseMessage], new_from: int) -> Any:
        if not self.state:
            self.state = list(messages[1:])  # the agent passes the system prompt separately
        else:
            self.state.extend(messages[max(new_from, 1) :])
        # The state's messages are BaseMessages (AgentState narrows them to the AnyMessage union);
        # no runtime is passed on purpose: before_model does not use it.
        state = cast("AgentState[Any]", {"messages": self.state})
        update = self.middleware.before_model(state, None)  # type: ignore[arg-type]
        if update is not None:
            new = update["messages"]
            assert isinstance(new[0], RemoveMessage)
            self.state = list(new[1:])
        return self.state


def timing(sizes: Sequence[int], calls: int, slow_calls: int) -> None:
    longest = max(sizes)
    turns = longest // 2 + calls + 20
    convo = synthetic_conversation(turns, seed=0)
    messages = convo.messages
    usage_messages = with_usage(messages, TokenCounter(MODEL, use_provider_counts=False))
    points = convo.call_points
    limits = ContextWindow(model=MODEL, max_tokens=BUDGET).limits()
    limit = limits.prompt
    tiktoken_counter = TokenCounter(MODEL, cache_size=0, use_provider_counts=False)
    print(
        f"synthetic conversation: {len(messages):,} messages; model {MODEL}, budget "
        f"{BUDGET:,} (prompt cap {limit:,}); per-call preparation time in microseconds"
    )
    header = (
        f"{'history':>8}  {'contender':<34}{'calls':>6}{'median':>11}{'p95':>11}"
        f"{'x floor':>9}{'plan faster by':>16}{'invoke faster by':>18}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        start = next(i for i, p in enumerate(points) if p >= size)
        window_points = points[start : start + calls]
        contenders: list[Contender] = [
            Floor(),
            WindowPlan(),
            WindowInvoke(),
            Trim("trim_messages (tiktoken)", tiktoken_counter, limit),
            Trim("trim_messages (approximate)", count_tokens_approximately, limit),
            Middleware(limits.high_mark, limits.low_mark),
            FloorUsage(),
            WindowPlanUsage(),
        ]
        results: dict[str, list[float]] = {c.name: [] for c in contenders}
        # Warm every contender on the history up to the first timed call (not timed).
        for c in contenders:
            source = usage_messages if c.name in USAGE_CONTENDERS else messages
            c.prepare(source[: points[start - 1]], 0)
        previous = points[start - 1]
        gc.disable()
        try:
            for k, point in enumerate(window_points):
                prefix = messages[:point]
                usage_prefix = usage_messages[:point]
                for c in contenders:
                    slow = c.name == "trim_messages (tiktoken)"
                    if slow and k >= slow_calls:
                        continue
                    source = usage_prefix if c.name in USAGE_CONTENDERS else prefix
                    t0 = time.perf_counter()
                    c.prepare(source, previous)
                    results[c.name].append(time.perf_counter() - t0)
                previous = point
        finally:
            gc.enable()
        floor = statistics.median(results[Floor.name])
        plan = statistics.median(results[WindowPlan.name])
        invoke = statistics.median(results[WindowInvoke.name])
        ours = (Floor.name, WindowPlan.name, WindowInvoke.name, *USAGE_CONTENDERS)
        floor_usage = statistics.median(results[FloorUsage.name])
        plan_usage = statistics.median(results[WindowPlanUsage.name])
        for c in contenders:
            xs = results[c.name]
            med = statistics.median(xs)
            vs_plan = "" if c.name in ours else f"{med / plan:.1f}x"
            vs_invoke = "" if c.name in ours else f"{med / invoke:.1f}x"
            own_floor = floor_usage if c.name in USAGE_CONTENDERS else floor
            print(
                f"{size:>8,}  {c.name:<34}{len(xs):>6}{med * 1e6:>11,.0f}"
                f"{percentile(xs, 0.95) * 1e6:>11,.0f}{med / own_floor:>8.2f}x{vs_plan:>16}"
                f"{vs_invoke:>18}"
            )
        approx = statistics.median(results["trim_messages (approximate)"])
        tik = statistics.median(results["trim_messages (tiktoken)"])
        print(
            f"{'':>10}with answers carrying usage: plan {plan_usage * 1e6:,.0f} us = "
            f"{plan_usage / floor_usage:.2f}x its floor; {approx / plan_usage:.0f}x faster than "
            f"trim_messages (approximate), {tik / plan_usage:,.0f}x than trim_messages (tiktoken)"
        )
        print()


def sweep(turns: int, highs: Sequence[float], lows: Sequence[float]) -> None:
    from langchain_holysheep.pricing import ModelPrice, get_price
    from langchain_holysheep.simulate import (
        ContextWindowPolicy,
        FakeSummarizer,
        Replay,
        SendEverything,
        simulate,
    )

    base = get_price(MODEL)
    assert base is not None, f"no price for {MODEL}"
    price = ModelPrice(input=base.input, cached_input=base.input * 0.10, output=base.output)
    counter = TokenCounter(MODEL)
    replay = Replay.from_synthetic(synthetic_conversation(turns, seed=0))
    everything = simulate(replay, [SendEverything()], model=MODEL, counter=counter, price=price)
    base_cost = everything.policies[0].total_cost or 0.0
    print(
        f"marks sweep: {turns}-turn synthetic conversation, budget {BUDGET:,}, cached input "
        f"at 10 % of ${price.input:g}/M; cost relative to sending everything (${base_cost:.4f})"
    )
    header = (
        f"{'high':>5}{'low':>6}{'input tok':>11}{'cached':>8}{'compactions':>12}"
        f"{'summ $':>9}{'total $':>9}{'vs all':>8}{'invalid':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for high in highs:
        for low in lows:
            if low >= high:
                continue
            policy = ContextWindowPolicy.from_settings(
                model=MODEL,
                max_tokens=BUDGET,
                counter=counter,
                summarizer=FakeSummarizer(max_words=300),
                high_water=high,
                low_water=low,
            )
            result = simulate(replay, [policy], model=MODEL, counter=counter, price=price)
            r = result.policies[0]
            total = r.total_cost or 0.0
            rows.append((total, high, low))
            print(
                f"{high:>5.2f}{low:>6.2f}{r.input_tokens:>11,}{r.cached_share:>8.0%}"
                f"{r.summarizer_calls:>12}{r.summarizer_cost or 0.0:>9.4f}{total:>9.4f}"
                f"{total / base_cost:>7.3f}x{r.invalid_prompts:>8}"
            )
    best = min(rows)
    print(f"\ncheapest: high_water={best[1]:.2f}, low_water={best[2]:.2f} ({best[0]:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--calls", type=int, default=40, help="timed calls per history size")
    parser.add_argument(
        "--slow-calls", type=int, default=8, help="timed calls for trim_messages with tiktoken"
    )
    parser.add_argument("--sweep", action="store_true", help="sweep the high/low water marks")
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    if args.sweep:
        sweep(
            args.turns,
            highs=(0.7, 0.8, 0.9, 1.0),
            lows=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
        )
    else:
        timing(args.sizes, args.calls, args.slow_calls)


if __name__ == "__main__":
    main()
