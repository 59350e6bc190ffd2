"""Per-turn latency of the memory layer: summaries inline versus in the background.

Run: python benchmarks/bench_background.py [--turns 200] [--summary-seconds 1.5]
     [--model-seconds 0.3] [--max-tokens 16000]

One synthetic 200-turn support conversation (langchain_holysheep.workload), the same
ContextWindow settings, and a fake summarizer that takes ``--summary-seconds`` per call (a
sleep, or an asyncio sleep for async). Each model call of the conversation is one turn: the
window plans the prompt (timed: this is the memory layer's latency), then a fake model call
takes ``--model-seconds`` (not timed; without it a background summary has no time to finish
between turns, which no real chatbot sees). Four runs of about a minute, side by side:

* inline, sync (``window.plan``) and async (``await window.aplan``): the compacting turn
  waits for the summarizer;
* background (``background_summary=True``), sync (worker threads) and async (tasks): the
  summary starts at the pre-compaction mark and is used when ready.

Printed per run: p50 / p95 / max turn latency, the number of turns slower than 100 ms (a turn
that waited for the summarizer), the waits the budget forced on background runs (the pending
messages no longer fit and the summary was not ready), compactions, summarizer calls, and the
share of prompt tokens expected to be served from the provider's prompt cache. Target: no
background turn waits for the summarizer while the budget allows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_holysheep import ContextWindow
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.workload import SyntheticConversation, synthetic_conversation

MODEL = "deepseek-v3.2"
SLOW_TURN = 0.1  # seconds: a turn this slow waited for the summarizer


class SlowSummarizer(BaseChatModel):
    """Answers a fixed summary after ``seconds`` (the cost of a real summarizer call)."""

    seconds: float = 1.5
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "slow-fake-summarizer"

    def _result(self) -> ChatResult:
        self.calls += 1
        text = f"Summary {self.calls}: the customer asked about orders, refunds and deliveries."
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        time.sleep(self.seconds)
        return self._result()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(self.seconds)
        return self._result()


@dataclass
class Run:
    """What one run measured."""

    name: str
    latencies: list[float] = field(default_factory=list)
    compactions: int = 0
    calls: int = 0
    forced: str = "-"  # budget-forced waits (background runs): count / seconds
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def row(self) -> list[str]:
        lat = sorted(self.latencies)
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        slow = sum(x >= SLOW_TURN for x in lat)
        return [
            self.name,
            f"{statistics.median(lat) * 1000:.2f}",
            f"{p95 * 1000:.2f}",
            f"{lat[-1] * 1000:.1f}",
            f"{slow}",
            self.forced,
            f"{self.compactions}",
            f"{self.calls}",
            f"{self.cached_tokens / max(1, self.prompt_tokens):.1%}",
        ]


def make_window(args: argparse.Namespace, background: bool) -> tuple[ContextWindow, SlowSummarizer]:
    summarizer = SlowSummarizer(seconds=args.summary_seconds)
    window = ContextWindow(
        model=MODEL,
        max_tokens=args.max_tokens,
        summarizer=summarizer,
        background_summary=background,
    )
    return window, summarizer


def record(run: Run, plan: Any, elapsed: float) -> None:
    problems = find_prompt_problems(plan.messages)
    if problems or plan.tokens.total > plan.tokens.prompt_limit or plan.dropped_ids:
        raise SystemExit(f"{run.name}: invalid plan: {problems or plan.dropped_reasons}")
    run.latencies.append(elapsed)
    run.compactions += plan.compacted
    run.prompt_tokens += plan.tokens.total
    run.cached_tokens += plan.cached_tokens


def run_sync(conv: SyntheticConversation, args: argparse.Namespace, background: bool) -> Run:
    run = Run(f"{'background' if background else 'inline'} sync")
    window, summarizer = make_window(args, background)
    with window:
        for cp in conv.call_points:
            history = conv.messages[:cp]
            start = time.perf_counter()
            plan = window.plan(history)
            record(run, plan, time.perf_counter() - start)
            time.sleep(args.model_seconds)  # the model call
    run.calls = summarizer.calls
    finish(run, window)
    return run


def finish(run: Run, window: ContextWindow) -> None:
    if window.background is not None:
        b = window.background
        run.forced = f"{b.waits} / {b.waited_seconds:.2f} s"


async def run_async(conv: SyntheticConversation, args: argparse.Namespace, background: bool) -> Run:
    run = Run(f"{'background' if background else 'inline'} async")
    window, summarizer = make_window(args, background)
    async with window:
        for cp in conv.call_points:
            history = conv.messages[:cp]
            start = time.perf_counter()
            plan = await window.aplan(history)
            record(run, plan, time.perf_counter() - start)
            await asyncio.sleep(args.model_seconds)  # the model call
    run.calls = summarizer.calls
    finish(run, window)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--summary-seconds", type=float, default=1.5)
    parser.add_argument("--model-seconds", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=16000)
    args = parser.parse_args()
    conv = synthetic_conversation(args.turns, seed=0)
    print(
        f"{args.turns} turns ({len(conv.call_points)} model calls), max_tokens="
        f"{args.max_tokens:,}, summarizer {args.summary_seconds:g} s per call, model call "
        f"{args.model_seconds:g} s between turns (not timed)"
    )
    runs = [
        run_sync(conv, args, background=False),
        run_sync(conv, args, background=True),
        asyncio.run(run_async(conv, args, background=False)),
        asyncio.run(run_async(conv, args, background=True)),
    ]
    header = [
        "run",
        "p50 ms",
        "p95 ms",
        "max ms",
        f"turns>={SLOW_TURN * 1000:.0f}ms",
        "forced waits",
        "compactions",
        "summaries",
        "cached",
    ]
    table = [header] + [r.row() for r in runs]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for mode in ("sync", "async"):
        inline = next(r for r in runs if r.name == f"inline {mode}")
        bg = next(r for r in runs if r.name == f"background {mode}")
        print(
            f"{mode}: max turn latency inline / background = "
            f"{max(inline.latencies) / max(bg.latencies):,.0f}x"
        )


if __name__ == "__main__":
    main()
