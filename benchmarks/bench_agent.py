"""ContextWindowMiddleware vs LangChain's SummarizationMiddleware on one scripted agent run.

Both agents are ``create_agent`` agents with the same scripted chat model, the same tools, the
same summarizer stand-in, an InMemorySaver checkpointer and a comparable budget. Every prompt
the model receives is captured and measured alike.

    .venv/bin/python benchmarks/bench_agent.py [--turns 120] [--budget 6000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import AgentMiddleware, SummarizationMiddleware  # noqa: E402
from langchain_core.messages import BaseMessage  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402

from langchain_holysheep.memory import ContextWindow  # noqa: E402
from langchain_holysheep.middleware import (  # noqa: E402
    ContextWindowMiddleware,
    tool_schema_tokens,
)
from langchain_holysheep.pricing import cost  # noqa: E402
from langchain_holysheep.prompt_cache import cacheable_tokens, shared_prefix_tokens  # noqa: E402
from langchain_holysheep.prompt_check import find_prompt_problems  # noqa: E402
from langchain_holysheep.tokens import TokenCounter  # noqa: E402
from tests.unit_tests.middleware_harness import (  # noqa: E402
    SYSTEM_PROMPT,
    TOOLS,
    AgentScript,
    RecapModel,
    ScriptedChatModel,
    build_script,
    run_turns,
    thread,
)


def _price_function(model: str) -> Callable[[int, int, int], float]:
    """Return ``cost(input, cached, output)`` in dollars at the package's prices for ``model``."""

    def priced(inp: int, cached: int, out: int) -> float:
        usage = {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
            "input_token_details": {"cache_read": cached},
        }
        return cost(usage, model)

    return priced


@dataclass
class Result:
    name: str
    seconds: float
    model_calls: int
    state_messages: int
    transcript_messages: int
    invalid_prompts: int
    request_missing: int
    over_budget: int
    prompt_tokens: int
    max_prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    summarizer_calls: int
    summarizer_input_tokens: int
    summarizer_output_tokens: int
    cost: float


def measure(
    name: str,
    script: AgentScript,
    middleware: Sequence[AgentMiddleware[Any, Any, Any]],
    summarizer: RecapModel,
    counter: TokenCounter,
    prompt_limit: int,
    price: Callable[[int, int, int], float],
) -> Result:
    model = ScriptedChatModel(responses=script.responses())
    agent = create_agent(
        model,
        TOOLS,
        system_prompt=SYSTEM_PROMPT,
        middleware=list(middleware),
        checkpointer=InMemorySaver(),
    )
    started = time.perf_counter()
    run_turns(agent, script, name)
    seconds = time.perf_counter() - started
    state: list[BaseMessage] = agent.get_state(thread(name)).values["messages"]

    owners = [t.index for t in script.turns for _ in range(len(t.rounds) + 1)]
    transcript = sum(1 + len(t.rounds) + sum(len(c) for c in t.rounds) + 1 for t in script.turns)
    invalid = missing = over = total = worst = cached = out_tokens = 0
    previous: list[BaseMessage] = []
    for call, turn_index in zip(model.calls, owners, strict=True):
        sent = call.messages
        if find_prompt_problems(sent):
            invalid += 1
        user = script.turns[turn_index].user
        if not any(m.type == "human" and m.content == user.content for m in sent):
            missing += 1
        counts = [counter.count_message(m) for m in sent]
        tools = tool_schema_tokens(call.tools, counter)
        used = sum(counts) + counter.REPLY_PRIMING + tools
        over += used > prompt_limit
        total += used
        worst = max(worst, used)
        prefix = shared_prefix_tokens(previous, sent, counts)
        cached += cacheable_tokens(tools + prefix) if prefix else 0
        previous = sent
    responses = script.responses()
    out_tokens = sum(counter.count_message(r) for r in responses)
    s_in = sum(counter.count_messages(p) for p in summarizer.calls)
    s_out = sum(counter.count_text(summarizer.recap_text(p)) for p in summarizer.calls)
    dollars = price(total, cached, out_tokens) + price(s_in, 0, s_out)
    return Result(
        name=name,
        seconds=seconds,
        model_calls=len(model.calls),
        state_messages=len(state),
        transcript_messages=transcript,
        invalid_prompts=invalid,
        request_missing=missing,
        over_budget=over,
        prompt_tokens=total,
        max_prompt_tokens=worst,
        cached_tokens=cached,
        output_tokens=out_tokens,
        summarizer_calls=len(summarizer.calls),
        summarizer_input_tokens=s_in,
        summarizer_output_tokens=s_out,
        cost=dollars,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=120)
    parser.add_argument("--budget", type=int, default=6000, help="prompt + response tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="deepseek-v3.2")
    args = parser.parse_args(argv)

    script = build_script(args.turns, seed=args.seed)
    counter = TokenCounter(args.model)
    price = _price_function(args.model)

    # The prompt limit of the budget (budget minus response reserve and margin): every run's
    # prompts are measured against it.
    probe = ContextWindow(model=args.model, max_tokens=args.budget)
    prompt_limit = probe.plan([script.turns[0].user]).tokens.prompt_limit

    def ours() -> tuple[list[AgentMiddleware[Any, Any, Any]], RecapModel]:
        summarizer = RecapModel()
        window = ContextWindow(model=args.model, max_tokens=args.budget, summarizer=summarizer)
        return [ContextWindowMiddleware(window=window)], summarizer

    def theirs() -> tuple[list[AgentMiddleware[Any, Any, Any]], RecapModel]:
        summarizer = RecapModel()
        middleware = SummarizationMiddleware(
            model=summarizer,
            # Comparable budget: summarize when the messages reach the prompt limit, keep the
            # newest 60% of it (the window's low-water mark). It counts only the messages.
            trigger=("tokens", prompt_limit),
            keep=("tokens", int(prompt_limit * 0.6)),
            token_counter=counter,
        )
        return [middleware], summarizer

    def none() -> tuple[list[AgentMiddleware[Any, Any, Any]], RecapModel]:
        return [], RecapModel()

    configs = [
        ("ContextWindowMiddleware", ours),
        ("SummarizationMiddleware", theirs),
        ("no middleware (full history)", none),
    ]
    # Warm-up (imports, schema building, tokenizer caches) so run order does not bias times.
    warm = build_script(12, seed=args.seed + 1)
    for name, make in configs:
        middleware, summarizer = make()
        measure(name, warm, middleware, summarizer, counter, prompt_limit, price)
    results = []
    for name, make in configs:
        middleware, summarizer = make()
        results.append(measure(name, script, middleware, summarizer, counter, prompt_limit, price))

    print(
        f"Scripted create_agent run: {args.turns} turns, {script.model_calls} model calls, "
        f"{len(TOOLS)} tools, model {args.model}, budget {args.budget:,} tokens "
        f"(prompt limit {prompt_limit:,}); tokens counted with {counter.encoding_name}; "
        f"prices from langchain_holysheep.pricing (summarizer calls priced as the same model)."
    )
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("messages kept in state", lambda r: f"{r.state_messages}/{r.transcript_messages}"),
        ("invalid prompts", lambda r: f"{r.invalid_prompts}/{r.model_calls}"),
        ("user request not sent", lambda r: f"{r.request_missing}/{r.model_calls}"),
        ("prompts over the limit", lambda r: f"{r.over_budget}/{r.model_calls}"),
        ("prompt tokens (sum)", lambda r: f"{r.prompt_tokens:,}"),
        ("largest prompt", lambda r: f"{r.max_prompt_tokens:,}"),
        ("cacheable prompt tokens", lambda r: f"{r.cached_tokens:,}"),
        ("summarizer calls", lambda r: f"{r.summarizer_calls}"),
        ("summarizer input tokens", lambda r: f"{r.summarizer_input_tokens:,}"),
        ("estimated cost", lambda r: f"${r.cost:.4f}"),
        ("agent run time (s)", lambda r: f"{r.seconds:.2f}"),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(r.name), 12) for r in results]
    print()
    print(
        " " * width
        + " | "
        + " | ".join(r.name.rjust(c) for r, c in zip(results, cols, strict=True))
    )
    print("-" * width + "-+-" + "-+-".join("-" * c for c in cols))
    for label, cell in rows:
        print(
            label.ljust(width)
            + " | "
            + " | ".join(cell(r).rjust(c) for r, c in zip(results, cols, strict=True))
        )
    print(
        "\nRun time includes checkpointing the agent state after every step; a run that keeps "
        "the whole transcript in state pays for it (compare the full-history row)."
    )
    ours_r, theirs_r = results[0], results[1]
    if ours_r.cost and theirs_r.cost:
        print(
            f"\ncost ratio SummarizationMiddleware / ContextWindowMiddleware: "
            f"{theirs_r.cost / ours_r.cost:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
