"""Cost and fidelity of ContextWindow against send-everything and LangChain's own tools.

Replays the deterministic 200-turn synthetic support conversation (tool calls every 10th turn,
a fact planted every 10th turn) model call by model call at a 6,000-token budget, through:

* send everything (the baseline);
* the tutorial sliding window (drop the oldest message until it fits; the same prompt cap);
* ``langchain_core.messages.trim_messages`` (strategy="last", start_on="human", tiktoken
  counter; the same prompt cap);
* langchain's ``SummarizationMiddleware`` (``before_model`` driven directly; trigger at the
  prompt cap, keep half of it; the same fake summarizer);
* ``ContextWindow`` (max_tokens=budget, the same fake summarizer, default settings: the
  fake stands in for the chat model, so ``summary_mode="auto"`` asks for summaries
  cache-aligned, resending the last prompt plus a request);
* ``ContextWindow`` with ``summary_mode="isolated"`` (summaries asked in a prompt of their
  own), for comparison; not an anchor.

Cost: every prompt priced with cached input at 10 % of the input price (the prefix repeated
from the same policy's previous prompt, >= 1,024 tokens, 128-token steps), the recorded answer
as output, plus the summarizer's own calls at the same prices (the summarizer is the chat
model), its input priced the same way (the prefix it repeats from the policy's previous prompt
at the cached price). The target ratio is on this total, answers included; the ratio without
the answers' output (the same dollars for every policy) is printed beside it.

Fidelity: with the ideal summarizer (copies every planted fact in its input, previous summary
included, to its output and nothing else), the share of facts planted so far that appear
verbatim in the prompt at turns 50, 100, 150 and 200.

Run: .venv/bin/python benchmarks/bench_cost.py [--turns 200] [--budget 6000] [--seed 0] [--check]
"""

from __future__ import annotations

import argparse
import sys
import time

from langchain_holysheep.pricing import ModelPrice, get_price
from langchain_holysheep.simulate import (
    ContextWindowPolicy,
    FakeSummarizer,
    Policy,
    PolicyResult,
    Replay,
    SendEverything,
    SlidingWindow,
    SummarizationMiddlewarePolicy,
    TrimMessagesPolicy,
    prompt_limit,
    simulate,
)
from langchain_holysheep.summarize import is_cache_aligned_request
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.workload import synthetic_conversation

FIDELITY_TURNS = (50, 100, 150, 200)
CW = "ContextWindow"
CW_ISOLATED = "ContextWindow, isolated"


def policies(
    model: str, budget: int, counter: TokenCounter, summarizer: FakeSummarizer
) -> list[Policy]:
    limit = prompt_limit(budget, model)
    return [
        SendEverything(),
        SlidingWindow(limit, counter),
        TrimMessagesPolicy(limit, counter),
        SummarizationMiddlewarePolicy(limit, limit // 2, counter, summarizer),
        ContextWindowPolicy.from_settings(
            model=model, max_tokens=budget, counter=counter, summarizer=summarizer
        ),
        ContextWindowPolicy.from_settings(
            model=model,
            max_tokens=budget,
            counter=counter,
            summarizer=summarizer,
            summary_mode="isolated",
            name=CW_ISOLATED,
        ),
    ]


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--budget", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="deepseek-v3.2")
    parser.add_argument(
        "--summary-words",
        type=int,
        default=300,
        help="words of notes the cost run's fake summarizer writes besides the facts",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a target is missed (for CI)"
    )
    args = parser.parse_args()

    base_price = get_price(args.model)
    if base_price is None:
        print(f"no price for {args.model}", file=sys.stderr)
        return 2
    price = ModelPrice(
        input=base_price.input, cached_input=base_price.input * 0.10, output=base_price.output
    )
    counter = TokenCounter(args.model)
    replay = Replay.from_synthetic(synthetic_conversation(args.turns, seed=args.seed))
    n_calls = len(replay.call_points)
    print(
        f"{replay.source}: {len(replay.messages)} messages, {n_calls} model calls, "
        f"{counter.count_messages(replay.messages):,} tokens in all (counted with "
        f"{counter.encoding_name}); model {args.model}; budget {args.budget:,} "
        f"(prompt cap {prompt_limit(args.budget, args.model):,}); prices per 1M tokens: "
        f"input ${price.input:g}, cached ${price.cached_input:g} (10 %), output ${price.output:g}"
    )

    started = time.perf_counter()
    # The fake stands in for the chat model (it is priced as it), so it carries its name.
    cost_run = simulate(
        replay,
        policies(
            args.model,
            args.budget,
            counter,
            FakeSummarizer(max_words=args.summary_words, model_name=args.model),
        ),
        model=args.model,
        counter=counter,
        price=price,
    )
    fidelity_run = simulate(
        replay,
        policies(
            args.model, args.budget, counter, FakeSummarizer(max_words=0, model_name=args.model)
        ),
        model=args.model,
        counter=counter,
        price=price,
    )
    elapsed = time.perf_counter() - started

    base = cost_run["send everything"]
    base_cost = base.total_cost or 0.0
    output_cost = base.output_tokens * price.output / 1_000_000
    header = (
        f"{'policy':<24} {'input tok':>10} {'vs all':>7} {'repeat':>7} {'cached':>7} "
        f"{'invalid':>7} {'peak':>6} {'summ calls':>10} {'summ $':>8} {'total $':>8} "
        f"{'vs all':>7} | " + " ".join(f"{'@' + str(t):>5}" for t in FIDELITY_TURNS)
    )
    print()
    print(f"Cost: fake summarizer with up to {args.summary_words} words of notes besides facts")
    print("Fidelity (@turn): ideal summarizer, planted facts present in the prompt")
    print(header)
    print("-" * len(header))
    for result in cost_run.policies:
        fid = fidelity_run[result.name]
        total = result.total_cost or 0.0
        print(
            f"{result.name:<24} {result.input_tokens:>10,} "
            f"{result.input_tokens / base.input_tokens:>6.2f}x "
            f"{result.mean_repeated_share:>7.0%} {result.cached_share:>7.0%} "
            f"{result.invalid_prompts:>7} {result.peak_prompt_tokens:>6,} "
            f"{result.summarizer_calls:>10} {result.summarizer_cost or 0.0:>8.4f} "
            f"{total:>8.4f} {total / base_cost:>6.3f}x | "
            + " ".join(f"{fmt_share(fid.fact_share_at(t)):>5}" for t in FIDELITY_TURNS)
        )
    print(
        f"\nCost breakdown (output ${output_cost:.4f} is the same for every policy: the "
        "recorded answers):"
    )
    for result in cost_run.policies:
        input_cost = (result.model_cost or 0.0) - output_cost
        summarizer_in = sum(s.input_tokens for c in result.calls for s in c.summarizer_calls)
        summarizer_out = sum(s.output_tokens for c in result.calls for s in c.summarizer_calls)
        summarizer_cost = result.summarizer_cost or 0.0
        aligned = sum(
            is_cache_aligned_request(s.messages) for c in result.calls for s in c.summarizer_calls
        )
        modes = f"; {aligned} of {result.summarizer_calls} cache-aligned" if aligned else ""
        print(
            f"  {result.name:<24} input ${input_cost:.4f}  summarizer ${summarizer_cost:.4f}"
            f" ({summarizer_in:,} in, {result.summarizer_cached_tokens:,} of them cached / "
            f"{summarizer_out:,} out tokens{modes})"
        )
    print(f"\nRatio to send everything, with and without the answers' output (${output_cost:.4f}):")
    for result in cost_run.policies:
        total = result.total_cost or 0.0
        print(
            f"  {result.name:<24} {total / base_cost:.3f}x with output, "
            f"{(total - output_cost) / (base_cost - output_cost):.3f}x without"
        )
    print(f"\n(both runs: {elapsed:.1f} s)")
    met = report_targets(
        [r for r in cost_run.policies if r.name != CW_ISOLATED], fidelity_run[CW], base_cost
    )
    return 1 if args.check and not met else 0


def report_targets(results: list[PolicyResult], fidelity: PolicyResult, base_cost: float) -> bool:
    by_name = {r.name: r for r in results}
    cw = by_name[CW]
    cw_cost = cw.total_cost or 0.0
    checks = [
        (
            f"ContextWindow cost <= 0.25x send-all, answers included ({cw_cost / base_cost:.4f}x)",
            cw_cost <= 0.25 * base_cost,
        ),
        (f"ContextWindow invalid prompts == 0 ({cw.invalid_prompts})", cw.invalid_prompts == 0),
    ]
    for name, result in by_name.items():
        if name == CW:
            continue
        other = result.total_cost or 0.0
        checks.append(
            (f"ContextWindow cheaper than {name} (${cw_cost:.4f} vs ${other:.4f})", cw_cost < other)
        )
    for turn in FIDELITY_TURNS:
        share = fidelity.fact_share_at(turn)
        checks.append((f"fidelity at turn {turn} == 100 % ({fmt_share(share)})", share == 1.0))
    print("\nTargets:")
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'MISS'}] {text}")
    return all(ok for _, ok in checks)


if __name__ == "__main__":
    sys.exit(main())
