"""Per-turn preparation time at 10,000 messages: ContextWindow vs SummarizationMiddleware.

Run: python benchmarks/bench_prepare.py [--messages 10000] [--turns 200]

Both get the same synthetic support conversation (answers carry ChatHolySheep-like
usage_metadata) and the same instant fake summarizer, so only the memory layer's own work is
timed. The conversation starts at 10,000 messages; then each turn adds the user message (and,
on tool turns, the call and its result), the memory layer prepares the prompt (timed), and the
answer is appended.

* ContextWindow(model="deepseek-v3.2", max_tokens=8000) gets the whole conversation every turn
  and keeps every message; it counts exactly (cl100k) with cached counts, and answers are
  counted from their provider usage (``use_provider_counts``), or tokenized for comparison.
  ``plan`` is the planner itself; ``invoke`` adds LangChain's Runnable config and callback
  machinery (what ``prompt | window | llm`` runs). By default a sync summarizer call runs on a
  pool thread so that ``summary_timeout`` (60 s) can be enforced; ``summary_timeout=None``
  calls it inline, as the middleware does (it has no deadline).
* SummarizationMiddleware runs its ``before_model`` on the agent state, which it shrinks by
  deleting summarized history, and counts approximately (count_tokens_approximately). Two
  configurations: trigger and keep at the window's own marks (compact at 5,040 tokens down to
  1,680: the fair match), and its default ``keep=("messages", 20)`` with a trigger at the
  window's 5,600-token prompt allowance. On this conversation 20 messages already count more
  than 5,600 tokens, so the default keep summarizes on every turn: an LLM call per turn.

* ContextWindowMiddleware.wrap_model_call (the agent path) on an agent state that keeps every
  message, with a handler that answers at once; the window's state update is applied to the
  agent state, as the agent would.
* Floor: only the exact counting that any layer counting exactly must do each turn, the new
  messages (the user's message, tool results; answers from their provider usage), with
  nothing planned. A layer that counts exactly cannot be faster than this.

The layers take turns: each turn is timed for every layer before the next one, so a noisy
moment on the machine hits them all alike, in a new random order every turn (a layer that
runs right after another one's work finds the CPU caches cold). Printed: time of the first
call at 10,000 messages (cold), then p50 / p95 / max per turn, the messages the layer still
holds, the turns on which it called the summarizer, and the ratios to the matched
middleware.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain.agents.middleware import SummarizationMiddleware
from langchain.agents.middleware.types import (
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
)
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, RemoveMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langgraph.graph.message import REMOVE_ALL_MESSAGES

from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.middleware import ContextWindowMiddleware
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.workload import synthetic_conversation

MODEL = "deepseek-v3.2"
SUMMARY = "Summary: the customer asked about orders, refunds and deliveries; all answered."


def conversation(n_messages: int, turns: int) -> tuple[list[BaseMessage], list[int]]:
    """Messages with provider usage on answers, and the call points from ~n_messages on."""
    convo = synthetic_conversation(n_messages // 2 + turns + 10, seed=0)
    exact = TokenCounter(MODEL, use_provider_counts=False, cache_size=0)
    messages: list[BaseMessage] = []
    for m in convo.messages:
        if isinstance(m, AIMessage):
            out = (
                exact.count_text(m.text)
                if not m.tool_calls
                else sum(
                    exact.count_text(c["name"]) + exact.count_text(str(c["args"]))
                    for c in m.tool_calls
                )
            )
            # No input count: this replay does not know the prompt each answer came from,
            # and a made-up one would calibrate the window's budget (an answer's reported
            # input tokens teach the counter the provider's tokenizer).
            m = m.model_copy(
                update={
                    "usage_metadata": {
                        "input_tokens": 0,
                        "output_tokens": out,
                        "total_tokens": out,
                    },
                    "response_metadata": {"model_provider": "holysheep", "model_name": MODEL},
                }
            )
        messages.append(m)
    points = [p for p in convo.call_points if p >= n_messages][: turns + 1]
    return messages, points


class CountingFake(GenericFakeChatModel):
    """The instant fake summarizer, counting its calls."""

    calls: int = 0

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super()._generate(*args, **kwargs)


def fake_summarizer() -> CountingFake:
    return CountingFake(messages=itertools.cycle([AIMessage(SUMMARY)]))


def percentiles(xs: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    return s[len(s) // 2], s[max(0, int(len(s) * 0.95) - 1)], s[-1]


class Layer:
    """One memory layer under test: a cold first call, then one timed call per turn."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.summarizer = fake_summarizer()
        self.cold = 0.0
        self.times: list[float] = []
        self.summarizing_turns = 0

    def timed(self, call: Callable[[], object]) -> float:
        before = self.summarizer.calls
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        self.summarizing_turns += self.summarizer.calls > before
        return elapsed

    def start(self, messages: list[BaseMessage]) -> None:
        raise NotImplementedError

    def turn(self, messages: list[BaseMessage]) -> None:
        raise NotImplementedError

    def kept(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the layer holds."""


class WindowLayer(Layer):
    """ContextWindow, given the whole conversation every turn."""

    def __init__(self, name: str, counter: TokenCounter, method: str, **kw: Any) -> None:
        super().__init__(name)
        self.window = ContextWindow(
            model=MODEL, max_tokens=8000, summarizer=self.summarizer, counter=counter, **kw
        )
        self.prepare = getattr(self.window, method)
        self.length = 0

    def start(self, messages: list[BaseMessage]) -> None:
        self.cold = self.timed(lambda: self.prepare(messages))
        self.summarizing_turns = 0
        self.length = len(messages)

    def turn(self, messages: list[BaseMessage]) -> None:
        self.times.append(self.timed(lambda: self.prepare(messages)))
        self.length = len(messages)

    def kept(self) -> int:
        return self.length

    def close(self) -> None:
        self.window.close()


class WindowMiddlewareLayer(Layer):
    """ContextWindowMiddleware.wrap_model_call on an agent state that keeps every message."""

    def __init__(self, name: str, counter: TokenCounter) -> None:
        super().__init__(name)
        window = ContextWindow(
            model=MODEL, max_tokens=8000, summarizer=self.summarizer, counter=counter
        )
        self.middleware = ContextWindowMiddleware(window)
        self.model = GenericFakeChatModel(messages=iter([]))
        self.state: dict[str, Any] = {"messages": []}
        self.answer = ModelResponse(result=[AIMessage("ok")])
        self.config: RunnableConfig = {"configurable": {"thread_id": "bench"}}

    def prepare(self) -> None:
        # Inside an agent the node's config names the thread; the middleware keys its last
        # plan by it (the plan's cached-token estimate and its index, extended each call).
        token = var_child_runnable_config.set(self.config)
        try:
            self._prepare()
        finally:
            var_child_runnable_config.reset(token)

    def _prepare(self) -> None:
        request = ModelRequest(
            model=self.model,
            messages=self.state["messages"],
            state=self.state,  # type: ignore[arg-type]
        )
        response = self.middleware.wrap_model_call(request, lambda _: self.answer)
        if isinstance(response, ExtendedModelResponse):  # the window moved: store its state
            assert response.command is not None
            update = response.command.update
            assert isinstance(update, dict)
            self.state.update(update)

    def start(self, messages: list[BaseMessage]) -> None:
        self.state["messages"] = list(messages)
        self.cold = self.timed(self.prepare)
        self.summarizing_turns = 0

    def turn(self, messages: list[BaseMessage]) -> None:
        self.state["messages"].extend(messages[len(self.state["messages"]) :])
        self.times.append(self.timed(self.prepare))

    def kept(self) -> int:
        return len(self.state["messages"])

    def close(self) -> None:
        self.middleware.window.close()


class FloorLayer(Layer):
    """Only the exact counting any exact layer must do: the new messages of each turn."""

    def __init__(self, name: str, counter: TokenCounter) -> None:
        super().__init__(name)
        self.counter = counter
        self.seen = 0

    def start(self, messages: list[BaseMessage]) -> None:
        self.cold = self.timed(lambda: self.counter.message_counts(messages))
        self.seen = len(messages)

    def turn(self, messages: list[BaseMessage]) -> None:
        new = messages[self.seen :]
        self.seen = len(messages)
        self.times.append(self.timed(lambda: self.counter.message_counts(new)))

    def kept(self) -> int:
        return self.seen


class MiddlewareLayer(Layer):
    """SummarizationMiddleware.before_model on an agent state it shrinks."""

    def __init__(self, name: str, trigger: tuple[str, int], keep: tuple[str, int]) -> None:
        super().__init__(name)
        self.middleware = SummarizationMiddleware(
            model=self.summarizer,
            trigger=trigger,  # type: ignore[arg-type]
            keep=keep,  # type: ignore[arg-type]
        )
        self.state: dict[str, Any] = {"messages": []}
        self.seen = 0

    def prepare(self) -> None:
        update = self.middleware.before_model(self.state, None)  # type: ignore[arg-type]
        if update:
            new = update["messages"]
            if isinstance(new[0], RemoveMessage) and new[0].id == REMOVE_ALL_MESSAGES:
                self.state["messages"] = list(new[1:])

    def start(self, messages: list[BaseMessage]) -> None:
        self.state["messages"] = list(messages)
        self.seen = len(messages)
        self.cold = self.timed(self.prepare)
        self.summarizing_turns = 0

    def turn(self, messages: list[BaseMessage]) -> None:
        self.state["messages"].extend(messages[self.seen :])
        self.seen = len(messages)
        self.times.append(self.timed(self.prepare))

    def kept(self) -> int:
        return len(self.state["messages"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    messages, points = conversation(args.messages, args.turns)
    TokenCounter(MODEL)  # load the encoding outside the timings

    limits = ContextWindow(model=MODEL, max_tokens=8000).limits(args.messages)
    layers: list[Layer] = [
        WindowLayer("ContextWindow.plan, provider counts", TokenCounter(MODEL), "plan"),
        WindowLayer("ContextWindow.invoke, provider counts", TokenCounter(MODEL), "invoke"),
        WindowLayer(
            "ContextWindow.plan, no summary deadline",
            TokenCounter(MODEL),
            "plan",
            summary_timeout=None,
        ),
        WindowLayer(
            "ContextWindow.plan, tokenize answers",
            TokenCounter(MODEL, use_provider_counts=False),
            "plan",
        ),
        WindowMiddlewareLayer("ContextWindowMiddleware (agents)", TokenCounter(MODEL)),
        FloorLayer("Floor: count the new messages exactly", TokenCounter(MODEL)),
        MiddlewareLayer(
            f"Middleware, marks {limits.high_mark:,}/{limits.low_mark:,} tok",
            ("tokens", limits.high_mark),
            ("tokens", limits.low_mark),
        ),
        MiddlewareLayer(
            f"Middleware, {limits.prompt:,} tok/keep 20 msgs",
            ("tokens", limits.prompt),
            ("messages", 20),
        ),
    ]
    print(
        f"Per-turn preparation from {points[0]:,} to {points[-1]:,} messages "
        f"({len(points) - 1} model calls; the layers take turns, so a noisy moment hits all)"
    )
    for layer in layers:
        gc.collect()
        layer.start(messages[: points[0]])
    gc.collect()
    order = random.Random(0)
    for p in points[1:]:
        # A new order every turn: a layer that runs right after another one's work finds the
        # CPU caches cold (tens of microseconds here), so no layer may always follow the same.
        turn_order = list(layers)
        order.shuffle(turn_order)
        for layer in turn_order:
            layer.turn(messages[:p])
    for layer in layers:
        layer.close()
    print(
        f"{'memory layer':<42}{'cold 1st call':>14}{'p50':>11}{'p95':>11}{'max':>11}"
        f"{'kept':>9}{'summarizing turns':>19}"
    )
    for layer in layers:
        p50, p95, mx = percentiles(layer.times)
        print(
            f"{layer.name:<42}{layer.cold * 1000:>11.1f} ms{p50 * 1000:>8.3f} ms"
            f"{p95 * 1000:>8.3f} ms{mx * 1000:>8.3f} ms{layer.kept():>9,}"
            f"{layer.summarizing_turns:>12}/{len(layer.times)}"
        )
    base = percentiles(layers[-2].times)
    for layer in [*layers[:3], *layers[-4:-2]]:
        p50, p95, _ = percentiles(layer.times)
        print(
            f"{layer.name} / matched middleware: p50 {p50 / base[0]:.2f}x, p95 {p95 / base[1]:.2f}x"
        )
    print(
        "kept = messages the layer still holds (ContextWindow: the whole conversation; the "
        "middleware deletes what it summarized). summarizing turns = turns during which the "
        "summarizer was called (each an LLM call in production). Background summaries are "
        "measured by bench_background.py: their worker threads would disturb the other layers "
        "here."
    )


if __name__ == "__main__":
    main()
