"""Token counting: throughput cold vs cached, and accuracy of the approximate counter.

Run: python benchmarks/bench_tokens.py [--messages 10000] [--repeat 5]

Prints three tables (figures measured side by side in one run, on this machine):
  1. counting a 10,000-message history (best of --repeat runs): cold (tokenize every
     message), cold with provider counts on the answers, cached (second count), one new turn
     on a warm counter, and LangChain's count_tokens_approximately for scale;
  2. per-turn counting at 10,000 messages over 50 new turns: TokenCounter (cached + provider
     counts) vs count_tokens_approximately over the whole history (what LangChain's
     SummarizationMiddleware runs before each model call), p50 / p95 / max;
  3. error of count_tokens_approximately against the exact cl100k count (OpenAI's message
     convention) on English, code, JSON and Chinese text, beside TokenCounter's.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import textwrap
import time
from collections.abc import Callable, Sequence
from functools import partial

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.messages.utils import count_tokens_approximately

from langchain_holysheep.tokens import TokenCounter, load_encoding
from langchain_holysheep.workload import synthetic_conversation

MODEL = "deepseek-v3.2"


def history(n_messages: int, offset: int = 0) -> list[BaseMessage]:
    turns = n_messages // 2 + 1
    msgs = synthetic_conversation(turns, seed=0).messages
    # Keep the system prompt and cut at n_messages; a turn is 2-4 messages.
    assert len(msgs) >= n_messages + offset, (len(msgs), n_messages)
    return msgs[: n_messages + offset]


def with_provider_counts(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """Give each answer the usage_metadata a ChatHolySheep reply carries (its exact count)."""
    counter = TokenCounter(MODEL, use_provider_counts=False, cache_size=0)
    out: list[BaseMessage] = []
    for m in messages:
        if isinstance(m, AIMessage) and not m.tool_calls:
            n = counter.count_text(m.text)
            usage = {"input_tokens": 1000, "output_tokens": n, "total_tokens": 1000 + n}
            m = m.model_copy(update={"usage_metadata": usage})
        out.append(m)
    return out


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall times of ``repeat`` runs, garbage collector paused (as timeit does)."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def throughput(n: int, repeat: int) -> None:
    msgs = history(n)
    provided = with_provider_counts(msgs)
    load_encoding("cl100k_base")  # loading the encoding once is not what we measure

    def cold() -> None:
        TokenCounter(MODEL, use_provider_counts=False).count_messages(msgs)

    def cold_provider() -> None:
        TokenCounter(MODEL).count_messages(provided)

    warm = TokenCounter(MODEL, use_provider_counts=False)
    total = warm.count_messages(msgs)
    turns = iter(range(10**9))

    def new_turn() -> None:
        k = next(turns)
        warm([*msgs, HumanMessage(f"Question {k} about my order?"), AIMessage(f"Answer {k}.")])

    # Best of ``repeat``: on a shared machine the minimum is the least disturbed run.
    rows = [
        ("cold: tokenize every message", min(timed(cold, repeat))),
        ("cold, answers with provider counts", min(timed(cold_provider, repeat))),
        ("cached: second count", min(timed(lambda: warm(msgs), repeat))),
        ("warm + one new turn (2 new messages)", min(timed(new_turn, repeat))),
        (
            "count_tokens_approximately",
            min(timed(lambda: count_tokens_approximately(msgs), repeat)),
        ),
    ]
    base = rows[0][1]
    print(f"\n1. Counting a {len(msgs):,}-message history ({total:,} tokens, cl100k_base)")
    print(f"{'case':<40}{'time':>12}{'messages/s':>14}{'vs cold':>10}")
    for name, seconds in rows:
        print(f"{name:<40}{fmt_s(seconds):>12}{len(msgs) / seconds:>14,.0f}{base / seconds:>9.1f}x")


def per_turn(n: int, turns: int) -> None:
    msgs = history(n, offset=turns * 4)
    provided = with_provider_counts(msgs)
    counter = TokenCounter(MODEL)
    counter.count_messages(provided[:n])  # the history so far was counted on earlier turns
    # SummarizationMiddleware's default counter for a non-Anthropic model.
    approx = partial(count_tokens_approximately, use_usage_metadata_scaling=True)
    ours: list[float] = []
    theirs: list[float] = []
    gc.collect()
    for t in range(turns):
        prompt = provided[: n + 4 * t]
        start = time.perf_counter()
        counter.count_messages(prompt)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        approx(prompt)
        theirs.append(time.perf_counter() - start)

    def stats(xs: list[float]) -> tuple[float, float, float]:
        xs = sorted(xs)
        return xs[len(xs) // 2], xs[int(len(xs) * 0.95) - 1], xs[-1]

    print(f"\n2. Counting the prompt each turn at {n:,}+ messages, {turns} turns")
    print(f"{'counter':<52}{'p50':>12}{'p95':>12}{'max':>12}")
    for name, xs in (
        ("TokenCounter (exact cl100k, cached, provider counts)", ours),
        ("count_tokens_approximately (SummarizationMiddleware)", theirs),
    ):
        p50, p95, mx = stats(xs)
        print(f"{name:<52}{fmt_s(p50):>12}{fmt_s(p95):>12}{fmt_s(mx):>12}")
    print(
        f"ratio p50 approx/ours: {stats(theirs)[0] / stats(ours)[0]:.1f}x "
        f"(ours counts exactly; the middleware estimates)"
    )


ENGLISH = (
    "Thanks for getting back to me so quickly. I ordered a pair of wireless headphones last "
    "Tuesday and the tracking page still says the parcel is waiting at the regional "
    "warehouse. Could you check whether it was actually handed to the carrier? If it is "
    "lost, I would prefer a replacement rather than a refund, because I need them for a "
    "trip next weekend. My order number is in the previous message; the delivery address "
    "has not changed since I placed the order. "
) * 4

CHINESE = (
    "您好，我上周二订购了一副无线耳机，但物流页面一直显示包裹还在区域仓库等待发出。"
    "能否帮我确认一下包裹是否已经交给快递公司？如果包裹丢失了，我更希望补发而不是退款，"
    "因为下周末出差需要用到。订单号在上一条消息里，收货地址下单后没有变更过。"
) * 4


def _code_sample() -> str:
    return textwrap.dedent(inspect.getsource(textwrap.TextWrapper._wrap_chunks))


def _json_sample() -> str:
    records = [
        {
            "order_id": f"ORD-{100000 + i * 37}",
            "status": ["shipped", "pending", "delivered"][i % 3],
            "items": [{"sku": f"SKU-{i}{j}", "qty": j + 1, "price": 19.99 + j} for j in range(2)],
            "address": {"city": "Lyon", "zip": f"690{i:02d}"},
        }
        for i in range(6)
    ]
    return json.dumps(records, indent=2)


def accuracy() -> None:
    encoding = load_encoding("cl100k_base")
    counter = TokenCounter(MODEL)
    samples = {
        "English": ENGLISH,
        "code (Python)": _code_sample(),
        "JSON": _json_sample(),
        "Chinese": CHINESE,
    }
    print("\n3. Error against the exact cl100k count of one user message (OpenAI convention)")
    print(
        f"{'text':<16}{'chars':>7}{'exact':>8}{'approx':>8}{'approx err':>12}"
        f"{'ours':>8}{'ours err':>10}"
    )
    for name, text in samples.items():
        message = HumanMessage(text)
        exact = len(encoding.encode_ordinary(text)) + 3 + 1 + 3  # + message, role, priming
        approx = count_tokens_approximately([message])
        ours = counter.count_messages([message])
        print(
            f"{name:<16}{len(text):>7,}{exact:>8,}{approx:>8,}{(approx - exact) / exact:>+12.1%}"
            f"{ours:>8,}{(ours - exact) / exact:>+10.1%}"
        )
    print(
        "exact = tiktoken cl100k_base encode + 3 per message + role + 3 reply priming. Ours is "
        "exact for cl100k models; for DeepSeek/Claude/Gemini both are estimates of another "
        "tokenizer, which TokenCounter.calibrate corrects from reported usage."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--turns", type=int, default=50)
    args = parser.parse_args()
    throughput(args.messages, args.repeat)
    per_turn(args.messages, args.turns)
    accuracy()


if __name__ == "__main__":
    main()
