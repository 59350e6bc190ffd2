"""The ``holysheep`` command: ``simulate`` the cost of context policies, ``chat``, ``inspect``.

Needs the ``cli`` extra (rich, matplotlib). Exit codes: 0 ok, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage
    from rich.console import Console

    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.pricing import ModelPrice
    from langchain_holysheep.simulate import SimulationResult, TokenCounting
    from langchain_holysheep.stores.base import MessageStore, SessionRecord
    from langchain_holysheep.stores.sqlite import SQLiteMessageStore
    from langchain_holysheep.window import ContextPlan

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_MODEL = "deepseek-v3.2"
DEFAULT_BUDGET = 6000
KEY_ENV = "HOLYSHEEP_API_KEY"
_INSTALL_CLI = 'pip install "langchain-holysheep[cli]"'


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _rich_console(*, stderr: bool = False, file: TextIO | None = None) -> Console:
    try:
        from rich.console import Console
    except ImportError as exc:
        raise ImportError(f"the holysheep command needs rich: {_INSTALL_CLI}") from exc
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    # Wide enough for the tables when the output is piped or captured.
    width = None if stream.isatty() else 120
    # Error messages are not hard-wrapped, so they stay greppable; tables are laid out.
    return Console(file=stream, width=width, highlight=False, soft_wrap=stderr)


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``holysheep`` command."""
    parser = argparse.ArgumentParser(
        prog="holysheep",
        description="Bounded-cost long conversations on the HolySheep relay.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sim = commands.add_parser(
        "simulate",
        help="replay a conversation through three context policies and compare their cost",
        description=(
            "Replay a conversation model call by model call through three context policies "
            "(send everything, a naive sliding window, ContextWindow) and compare input "
            "tokens, dollars with prompt-cache pricing, invalid prompts and peak prompt size. "
            "Needs no API key."
        ),
    )
    sim.add_argument(
        "--transcript",
        type=Path,
        metavar="FILE.jsonl",
        help="replay your own conversation: one message per line, LangChain "
        "message dicts or OpenAI chat format (default: a built-in synthetic "
        "support conversation with tool calls)",
    )
    sim.add_argument(
        "--turns",
        type=_positive_int,
        default=200,
        help="turns of the synthetic conversation (default: 200)",
    )
    sim.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic conversation (default: 0)"
    )
    sim.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model the prompts are sent to and priced for (default: {DEFAULT_MODEL})",
    )
    sim.add_argument(
        "--budget",
        type=_positive_int,
        default=DEFAULT_BUDGET,
        help="ContextWindow's max_tokens (prompt + response reserve); the sliding "
        f"window gets the same prompt cap (default: {DEFAULT_BUDGET})",
    )
    sim.add_argument(
        "--window-size",
        type=_positive_int,
        default=None,
        help="cap on recent messages ContextWindow keeps verbatim",
    )
    sim.add_argument(
        "--price",
        type=_price,
        default=None,
        metavar="IN,CACHED,OUT",
        help="prices in dollars per 1M tokens (input, cached input, output); "
        "needed for a model without a built-in price",
    )
    sim.add_argument(
        "--summarize",
        action="store_true",
        help=f"real summaries through ChatHolySheep (needs {KEY_ENV}); without it "
        "an offline fake summarizer is used",
    )
    sim.add_argument(
        "--summarizer-model",
        default=None,
        help="model that writes the summaries (default: --model)",
    )
    sim.add_argument(
        "--no-summaries",
        action="store_true",
        help="run ContextWindow without a summarizer (window only)",
    )
    sim.add_argument(
        "--anchors",
        action="store_true",
        help="also run LangChain's trim_messages and SummarizationMiddleware",
    )
    sim.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw prompt tokens and cumulative cost per turn to FILE.png",
    )
    sim.set_defaults(handler=cmd_simulate)

    chat = commands.add_parser(
        "chat",
        help="chat through ChatHolySheep with ContextWindow memory stored in SQLite",
        description=(
            "Interactive multi-turn chat. Reads one message per line from stdin. Commands: "
            "/plan (what the next prompt contains), /summary, /reset, /quit. "
            f"Needs {KEY_ENV}."
        ),
    )
    chat.add_argument("--session", default="default", help="session id (default: default)")
    chat.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    chat.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite file holding the sessions (default: $HOLYSHEEP_DB, else "
        "~/.local/share/holysheep/conversations.db)",
    )
    chat.add_argument(
        "--system",
        default="You are a helpful assistant.",
        help="system prompt (not stored; default: a short helpful-assistant line)",
    )
    chat.add_argument(
        "--base-url",
        default=None,
        help="relay endpoint (default: HOLYSHEEP_API_BASE or the public relay)",
    )
    chat.add_argument(
        "--budget",
        type=_positive_int,
        default=None,
        help="context budget in tokens (default: adaptive from the model)",
    )
    chat.add_argument(
        "--window-size",
        type=_positive_int,
        default=None,
        help="cap on recent messages kept verbatim",
    )
    chat.add_argument(
        "--summarizer-model",
        default=None,
        help="model that writes the running summary (default: --model)",
    )
    chat.set_defaults(handler=cmd_chat)

    inspect = commands.add_parser(
        "inspect",
        help="show what a stored session holds",
        description="Messages, tokens, the summary and what it covers, the next prompt's plan "
        "and the cost so far of a stored session.",
    )
    inspect.add_argument("session", metavar="SESSION", help="session id")
    inspect.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite file holding the sessions (default: $HOLYSHEEP_DB, else "
        "~/.local/share/holysheep/conversations.db)",
    )
    inspect.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model the next prompt is planned for (default: {DEFAULT_MODEL})",
    )
    inspect.add_argument(
        "--budget",
        type=_positive_int,
        default=None,
        help="context budget in tokens (default: adaptive from the model)",
    )
    inspect.add_argument(
        "--messages",
        type=int,
        default=20,
        metavar="N",
        help="show the last N messages (default: 20; 0 for all)",
    )
    inspect.set_defaults(handler=cmd_inspect)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _price(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected three non-negative numbers INPUT,CACHED,OUTPUT in dollars per 1M "
            f"tokens (e.g. 0.28,0.028,0.42), got {text!r}"
        )
    return (values[0], values[1], values[2])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``holysheep`` command; return its exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        err = _rich_console(stderr=True)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        code: int = args.handler(args)
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    return code


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _check_model(model: str, *, has_size: bool, has_price: bool = True) -> None:
    from langchain_holysheep.profiles import known_models

    if model.lower() in known_models():
        return
    if has_size and has_price:
        return
    needs = []
    if not has_size:
        needs.append("its context size with --budget TOKENS")
    if not has_price:
        needs.append("its prices with --price INPUT,CACHED,OUTPUT (dollars per 1M tokens)")
    raise UsageError(
        f"unknown model {model!r}. Known models: {', '.join(known_models())}. "
        f"To use another model, give {' and '.join(needs)}."
    )


def _counter(model: str) -> TokenCounting:
    from langchain_holysheep.tokens import TokenCounter

    return TokenCounter(model)


def _model_price(model: str, override: tuple[float, float, float] | None) -> ModelPrice | None:
    from langchain_holysheep.pricing import ModelPrice, get_price

    if override is not None:
        return ModelPrice(input=override[0], cached_input=override[1], output=override[2])
    return get_price(model)


def _dollars(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"${value:,.4f}" if value < 10 else f"${value:,.2f}"


# --------------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``holysheep simulate``."""
    from langchain_holysheep import simulate as sim
    from langchain_holysheep.workload import synthetic_conversation

    out = _rich_console()
    _check_model(args.model, has_size=True, has_price=args.price is not None)
    if args.summarize and args.no_summaries:
        raise UsageError("--summarize and --no-summaries contradict each other; give one")
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot {args.plot}: give a file ending in .png (or .svg, .pdf)")

    if args.transcript is not None:
        try:
            messages = sim.load_transcript(args.transcript)
            replay = sim.Replay.from_messages(messages, source=str(args.transcript))
        except sim.TranscriptError as exc:
            raise UsageError(str(exc)) from exc
    else:
        convo = synthetic_conversation(args.turns, seed=args.seed)
        replay = sim.Replay.from_synthetic(
            convo,
            source=f"built-in synthetic support conversation ({args.turns} turns, seed "
            f"{args.seed}, tool calls every 10th turn)",
        )

    counter = _counter(args.model)
    price = _model_price(args.model, args.price)
    summarizer_model = args.summarizer_model or args.model
    summarizer, summary_mode = _simulation_summarizer(args, summarizer_model)
    summarizer_price = (
        price if summarizer_model == args.model else _model_price(summarizer_model, None)
    )
    try:
        limit = sim.prompt_limit(args.budget, args.model)
        window_policy = sim.ContextWindowPolicy.from_settings(
            model=args.model,
            max_tokens=args.budget,
            counter=counter,
            window_size=args.window_size,
            summarizer=summarizer,
        )
    except ValueError as exc:  # a budget too small for any prompt, or beyond the model
        raise UsageError(f"--budget {args.budget:,}: {exc}") from exc

    policies: list[sim.Policy] = [
        sim.SendEverything(),
        sim.SlidingWindow(limit, counter),
        window_policy,
    ]
    if args.anchors:
        policies.append(sim.TrimMessagesPolicy(limit, counter))
        if summarizer is not None:
            policies.append(
                sim.SummarizationMiddlewarePolicy(limit, limit // 2, counter, summarizer)
            )

    out.print(
        f"[bold]Conversation:[/] {replay.source}: {len(replay.messages)} messages, "
        f"{len(replay.call_points)} model calls"
    )
    out.print(
        f"[bold]Model:[/] {args.model}; budget {args.budget:,} tokens "
        f"(prompt cap {limit:,}); {_price_text(price)}"
    )
    out.print(f"[bold]Summaries:[/] {summary_mode}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run_with_progress(
            out,
            replay,
            policies,
            args.model,
            counter,
            price,
            summarizer_price,
            # A summarizer of another model cannot reuse the chat model's prompt cache.
            summarizer_cache=summarizer_model == args.model,
        )
    _print_simulation(out, result)
    _print_warnings(out, caught)
    if args.plot is not None:
        path = _write_plot(result, args.plot)
        out.print(f"Plot written to [bold]{path}[/]")
    return EXIT_OK


def _print_warnings(out: Console, caught: Sequence[warnings.WarningMessage]) -> None:
    """Print each distinct warning of the run once, with how often it came."""
    from rich.markup import escape

    groups: dict[str, list[str]] = {}
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        # Counts inside a warning differ from turn to turn; group warnings without them.
        groups.setdefault(re.sub(r"\d[\d,]*", "N", text), []).append(text)
    for texts in groups.values():
        times = f" ({len(texts)} times; the first)" if len(texts) > 1 else ""
        out.print(f"[yellow]warning{times}:[/] {escape(texts[0])}")


def _price_text(price: ModelPrice | None) -> str:
    if price is None:
        return "no price known: dollars are n/a (give --price)"
    return (
        f"${price.input:g} input / ${price.cached_input:g} cached input / "
        f"${price.output:g} output per 1M tokens"
    )


def _simulation_summarizer(
    args: argparse.Namespace, summarizer_model: str
) -> tuple[BaseChatModel | None, str]:
    from langchain_holysheep.simulate import FakeSummarizer

    if args.no_summaries:
        return None, "off (--no-summaries): ContextWindow keeps a window only"
    if args.summarize:
        if os.environ.get(KEY_ENV):
            from langchain_holysheep.chat_models import ChatHolySheep

            return (
                ChatHolySheep(model_name=summarizer_model, temperature=0),
                f"real, written by {summarizer_model} through ChatHolySheep",
            )
        return FakeSummarizer(model_name=summarizer_model), (
            f"{KEY_ENV} is not set, so --summarize cannot call a model: using the OFFLINE "
            "FAKE summarizer (keeps planted facts and first sentences; not a model)"
        )
    # Named after the model it stands in for, so cache-aligned summaries are simulated as such.
    return FakeSummarizer(model_name=summarizer_model), (
        "OFFLINE FAKE summarizer (deterministic; keeps planted facts and first sentences; not a "
        f"model). Real summaries: set {KEY_ENV} and pass --summarize"
    )


def _run_with_progress(
    out: Console,
    replay: Any,
    policies: Sequence[Any],
    model: str,
    counter: TokenCounting,
    price: ModelPrice | None,
    summarizer_price: ModelPrice | None,
    summarizer_cache: bool,
) -> SimulationResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from langchain_holysheep.simulate import simulate

    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=out,
        transient=True,
        disable=not out.is_terminal,
    ) as progress:
        tasks = {p.name: progress.add_task(p.name, total=len(replay.call_points)) for p in policies}

        def on_call(name: str, done: int, total: int) -> None:
            progress.update(tasks[name], completed=done)

        return simulate(
            replay,
            policies,
            model=model,
            counter=counter,
            price=price,
            summarizer_price=summarizer_price,
            summarizer_cache=summarizer_cache,
            on_call=on_call,
        )


def _print_simulation(out: Console, result: SimulationResult) -> None:
    from rich import box
    from rich.table import Table

    base = result.policies[0]
    table = Table(
        title=f"{len(result.replay.call_points)} model calls on {result.model}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("policy", no_wrap=True)
    table.add_column("input tokens", justify="right", no_wrap=True)
    table.add_column("x all", justify="right", no_wrap=True)
    table.add_column("est. cost", justify="right", no_wrap=True)
    table.add_column("x all", justify="right", no_wrap=True)
    table.add_column("cached", justify="right", no_wrap=True)
    table.add_column("invalid", justify="right", no_wrap=True)
    table.add_column("peak prompt", justify="right", no_wrap=True)
    table.add_column("summaries", justify="right", no_wrap=True)
    base_cost = base.total_cost
    for p in result.policies:
        cost = p.total_cost
        ratio = f"{cost / base_cost:.2f}x" if cost is not None and base_cost else "n/a"
        n_invalid = f"[red]{p.invalid_prompts}[/]" if p.invalid_prompts else "0"
        table.add_row(
            p.name,
            f"{p.input_tokens:,}",
            f"{p.input_tokens / base.input_tokens:.2f}x" if base.input_tokens else "n/a",
            _dollars(cost),
            ratio,
            f"{p.cached_share:.0%}",
            n_invalid,
            f"{p.peak_prompt_tokens:,}",
            f"{p.summarizer_calls}, {_dollars(p.summarizer_cost)}" if p.summarizer_calls else "0",
        )
    out.print(table)
    out.print(
        "est. cost: input at the input price, except the prefix repeated from the policy's "
        "previous prompt (>=1,024 tokens, in 128-token steps) at the cached price; the "
        "recorded answers as output; plus the summarizer's own calls. cached: share of input "
        "tokens billed at the cached price. invalid: prompts a chat API would reject."
    )
    if result.replay.facts:
        last_turn = max(c.turn for c in base.calls)
        shares = []
        for p in result.policies:
            share = p.fact_share_at(last_turn)
            if share is not None:
                shares.append(f"{p.name} {share:.0%}")
        if shares:
            out.print(
                f"Planted facts present in the prompt at turn {last_turn}: " + ", ".join(shares)
            )
    for bad in result.policies:
        if not bad.invalid_prompts:
            continue
        first = next(c for c in bad.calls if not c.valid)
        out.print(
            f"[red]{bad.name}[/]: {bad.invalid_prompts} invalid prompts; first at call "
            f"{first.call} (turn {first.turn}): {first.problems[0]}"
        )


def _write_plot(result: SimulationResult, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, no display
    except ImportError as exc:
        raise ImportError(f"--plot needs matplotlib: {_INSTALL_CLI}") from exc
    from langchain_holysheep.simulate import plot_simulation

    path.parent.mkdir(parents=True, exist_ok=True)
    plot_simulation(result, path)
    return path


# --------------------------------------------------------------------------------------------
# chat and inspect
# --------------------------------------------------------------------------------------------


_CHAT_HELP = (
    "Commands: /plan (what the next prompt contains), /summary (the running summary), "
    "/reset (delete this session), /quit. Anything else is sent as your message."
)
_NEXT_MESSAGE = "(your next message)"


def _message_cost(message: BaseMessage, model: str) -> float | None:
    """Dollars of one stored answer: the relay's own figure, else its usage at list prices."""
    from langchain_core.messages import AIMessage

    from langchain_holysheep.pricing import cost

    if not isinstance(message, AIMessage) or not message.usage_metadata:
        return None
    reported = message.response_metadata.get("cost_usd")
    if isinstance(reported, (int, float)) and not isinstance(reported, bool):
        return float(reported)
    name = message.response_metadata.get("model_name") or model
    for candidate in (str(name), model):
        try:
            return cost(message.usage_metadata, candidate)
        except KeyError:
            continue
    return None


def _conversation_cost(messages: Sequence[BaseMessage], model: str) -> tuple[float, int]:
    """Summed cost of the answers that carry usage, and how many answers had none priced."""
    total = 0.0
    unpriced = 0
    for message in messages:
        if message.type != "ai":
            continue
        value = _message_cost(message, model)
        if value is None:
            unpriced += 1
        else:
            total += value
    return total, unpriced


def _make_window(
    model: str,
    budget: int | None,
    window_size: int | None,
    summarizer: BaseChatModel | None,
) -> ContextWindow:
    from langchain_holysheep.memory import ContextWindow

    try:
        return ContextWindow(
            model=model, max_tokens=budget, window_size=window_size, summarizer=summarizer
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _next_plan(
    window: ContextWindow,
    store: MessageStore,
    session: str,
    system: Sequence[BaseMessage],
    previous: ContextPlan | None = None,
) -> ContextPlan | None:
    """Plan the next prompt (the stored conversation plus a next message) without side effects.

    Planned by a twin of ``window`` without a summarizer, so no model is called and nothing is
    persisted; messages that would be folded into the summary show as leaving the window.
    """
    from langchain_core.messages import HumanMessage

    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.window import WindowState

    record = store.get_session(session)
    if record.message_count == 0:
        return None
    state = WindowState(
        summary=record.summary,
        summary_tokens=record.summary_tokens,
        summarized_through=record.summarized_through,
        window_start=record.window_start,
        version=record.version,
    )
    stored = store.read(session, state.load_from)
    dry = ContextWindow(
        model=window.model,
        max_tokens=window.max_tokens,
        window_size=window.window_size,
        counter=window.counter,
        budget=window.budget,
        high_water=window.high_water,
        low_water=window.low_water,
    )
    nxt = HumanMessage(_NEXT_MESSAGE, id="holysheep-next-message")
    return dry.step(
        system,
        [*(m.message for m in stored), nxt],
        offset=state.load_from,
        state=state,
        counts=[*(m.tokens for m in stored), window.counter.count_message(nxt)],
        previous=previous,
    )


def _print_plan(out: Console, plan: ContextPlan | None, *, summarizer: bool) -> None:
    if plan is None:
        out.print("The session is empty: the next prompt holds the system prompt and your message.")
        return
    out.print(str(plan), markup=False, highlight=False)
    if plan.compacted and summarizer:
        out.print(
            "The window compacts on the next turn: the messages leaving it will be folded into "
            "the running summary."
        )


def _print_summary(out: Console, record: SessionRecord) -> None:
    if not record.summary:
        out.print(
            f"No summary yet: all {record.message_count} messages are still in the window "
            "(the window folds old messages into a summary when the prompt reaches its "
            "high-water mark)."
            if record.summarized_through == 0
            else f"No summary: messages 0-{record.summarized_through - 1} left the window "
            "without a summarizer."
        )
        return
    out.print(
        f"Summary of messages 0-{record.summarized_through - 1} "
        f"({record.summarized_through} of {record.message_count}; {record.summary_tokens:,} "
        "tokens as sent):"
    )
    out.print(record.summary, markup=False, highlight=False)
    pending = record.window_start - record.summarized_through
    if pending:
        out.print(
            f"{pending} message(s) left the window but are not summarized yet (a summary "
            "failed); they are retried on a later turn."
        )


def cmd_chat(args: argparse.Namespace) -> int:
    """Run ``holysheep chat``: read messages from stdin, answer each, print a status line."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_holysheep.chat_models import ChatHolySheep
    from langchain_holysheep.errors import HolySheepAuthenticationError, HolySheepError
    from langchain_holysheep.history import ManagedChatMessageHistory
    from langchain_holysheep.simulate import SummarizerMeter

    if not os.environ.get(KEY_ENV):
        raise UsageError(
            f"{KEY_ENV} is not set, and holysheep chat needs it to call the relay. Set it in "
            f"your shell (export {KEY_ENV}=sk-...), then run the command again. "
            "To try the package without a key, run: holysheep simulate"
        )
    _check_model(args.model, has_size=args.budget is not None)
    out = _rich_console()
    store = _open_store(args.db, must_exist=False)
    endpoint: dict[str, Any] = {"base_url": args.base_url} if args.base_url else {}
    llm = ChatHolySheep(model_name=args.model, **endpoint)
    counter = _counter(args.model)
    meter = SummarizerMeter(counter)
    summarizer_model = args.summarizer_model or args.model
    summarizer = meter.attach(ChatHolySheep(model_name=summarizer_model, temperature=0, **endpoint))
    window = _make_window(args.model, args.budget, args.window_size, summarizer)
    system = [SystemMessage(args.system)] if args.system else []
    system_tokens = sum(window.counter.count_message(m) for m in system)
    history = ManagedChatMessageHistory(args.session, store, window, reserved_tokens=system_tokens)
    stored = store.read(args.session)
    transcript_tokens = system_tokens + sum(m.tokens for m in stored)
    session_cost, _ = _conversation_cost([m.message for m in stored], args.model)
    summarizer_cost = 0.0
    interactive = sys.stdin.isatty()
    out.print(
        f"holysheep chat: session [bold]{args.session}[/] ({len(stored)} stored messages) in "
        f"{store.path}; model {args.model}; budget "
        f"{window.budget.total_tokens:,} tokens. {_CHAT_HELP}"
    )
    failures = 0
    while True:
        if interactive:
            out.print("[bold green]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit"):
                break
            if command == "/plan":
                _print_plan(
                    out,
                    _next_plan(window, store, args.session, system, history.last_plan),
                    summarizer=True,
                )
            elif command == "/summary":
                _print_summary(out, store.get_session(args.session))
            elif command == "/reset":
                history.clear()
                transcript_tokens = system_tokens
                session_cost = summarizer_cost = 0.0
                out.print(f"Session {args.session} deleted: messages and summary are gone.")
            else:
                out.print(f"Unknown command {command}. {_CHAT_HELP}")
            continue
        human = HumanMessage(text)
        history.add_messages([human])
        transcript_tokens += window.counter.count_message(human)
        calls_before = len(meter.calls)
        try:
            prompt = [*system, *history.messages]
            answer = llm.invoke(prompt)
        except HolySheepAuthenticationError:
            raise
        except HolySheepError as exc:
            failures += 1
            out.print(
                f"[bold red]error:[/] {exc}. Your message is kept in the session; send "
                "another, or /quit."
            )
            continue
        history.add_messages([answer])
        transcript_tokens += window.counter.count_message(answer)
        out.print(answer.text, markup=False, highlight=False)
        turn_cost = _message_cost(answer, args.model)
        summ_calls = meter.calls[calls_before:]
        summ_cost = 0.0
        if summ_calls:
            summ_price = _model_price(summarizer_model, None)
            summ_cost = sum(
                sim_call_cost(summ_price, c.input_tokens, 0, c.output_tokens) for c in summ_calls
            )
        summarizer_cost += summ_cost
        session_cost += (turn_cost or 0.0) + summ_cost
        usage: Mapping[str, Any] = answer.usage_metadata or {}
        sent = int(usage.get("input_tokens", 0)) or counter.count_messages(prompt)
        cached = int((usage.get("input_token_details") or {}).get("cache_read", 0) or 0)
        summ_note = f" + summary {_dollars(summ_cost)}" if summ_calls else ""
        out.print(
            f"[dim]prompt {sent:,} tokens sent of {transcript_tokens:,} in the transcript"
            f" ({cached:,} cached) · turn {_dollars(turn_cost)}{summ_note} · session "
            f"{_dollars(session_cost)}[/]"
        )
    return EXIT_FAILURE if failures else EXIT_OK


def sim_call_cost(
    price: ModelPrice | None, input_tokens: int, cached: int, output_tokens: int
) -> float:
    """Dollars of one call at ``price`` (0 when unpriced)."""
    from langchain_holysheep.simulate import call_cost

    return call_cost(price, input_tokens, cached, output_tokens) or 0.0


def _open_store(db: Path | None, *, must_exist: bool) -> SQLiteMessageStore:
    from langchain_holysheep.stores.sqlite import SQLiteMessageStore, default_db_path

    path = db if db is not None else default_db_path()
    if must_exist and not path.exists():
        raise UsageError(
            f"no session database at {path}; holysheep chat creates it. Pass --db FILE "
            "(or set HOLYSHEEP_DB) to read another one"
        )
    return SQLiteMessageStore(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run ``holysheep inspect SESSION``."""
    from rich import box
    from rich.table import Table

    _check_model(args.model, has_size=args.budget is not None)
    out = _rich_console()
    store = _open_store(args.db, must_exist=True)
    record = store.get_session(args.session)
    if record.message_count == 0:
        sessions = store.list_sessions()
        raise UsageError(
            f"session {args.session!r} has no messages in {store.path}; sessions there: "
            f"{', '.join(sessions) if sessions else 'none'}"
        )
    stored = store.read(args.session)
    window = _make_window(args.model, args.budget, None, None)
    total_tokens = sum(m.tokens for m in stored)
    out.print(
        f"[bold]Session {args.session}[/] in {store.path}: {record.message_count} messages, "
        f"{total_tokens:,} tokens in the transcript (counted when stored)"
    )
    plan = _next_plan(window, store, args.session, [])
    kept = set(plan.kept_ids) if plan is not None else set()
    shown = stored if args.messages <= 0 else stored[-args.messages :]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("next prompt", no_wrap=True)
    table.add_column("text", overflow="ellipsis", no_wrap=True, max_width=70)
    for item in shown:
        message = item.message
        label = message.id if message.id else f"#{item.seq}"
        if item.seq < record.summarized_through and record.summary:
            where = "summarized"
        elif label in kept:
            where = "sent"
        elif item.seq < record.window_start:
            where = "pending" if record.summary is not None else "left"
        else:
            where = "left"
        text = " ".join(message.text.split()) or _describe_calls(message)
        table.add_row(str(item.seq), message.type, f"{item.tokens:,}", where, text)
    if len(shown) < len(stored):
        out.print(f"Last {len(shown)} of {len(stored)} messages (--messages 0 for all):")
    out.print(table)
    _print_summary(out, record)
    out.print(f"[bold]Next prompt[/] (with a next message, as planned for {args.model}):")
    _print_plan(out, plan, summarizer=True)
    spent, unpriced = _conversation_cost([m.message for m in stored], args.model)
    note = f"; {unpriced} answer(s) carry no usage or price" if unpriced else ""
    out.print(
        f"[bold]Cost so far:[/] {_dollars(spent)} for the model calls recorded in the "
        f"transcript{note} (summarizer calls are not recorded)"
    )
    return EXIT_OK


def _describe_calls(message: BaseMessage) -> str:
    calls = getattr(message, "tool_calls", None) or []
    if calls:
        return "[calls " + ", ".join(str(c.get("name")) for c in calls) + "]"
    return "(empty)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
