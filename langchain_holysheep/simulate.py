"""Replays a conversation call by call through context policies and prices every prompt.

Used by ``holysheep simulate``, ``benchmarks/bench_cost.py`` and the cost notebook: the same
conversation goes through each policy, and each prompt is counted, checked and priced alike.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
    messages_from_dict,
)
from langchain_core.outputs import ChatGeneration, ChatResult, LLMResult

from langchain_holysheep.prompt_cache import cacheable_tokens, shared_prefix_tokens
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.summarize import is_cache_aligned_request
from langchain_holysheep.window import is_recap

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForLLMRun

    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.pricing import ModelPrice
    from langchain_holysheep.window import WindowState
    from langchain_holysheep.workload import SyntheticConversation

__all__ = [
    "CallRecord",
    "ContextWindowPolicy",
    "FakeSummarizer",
    "Policy",
    "PolicyResult",
    "PolicyStep",
    "Replay",
    "SendEverything",
    "SimulationResult",
    "SlidingWindow",
    "SummarizationMiddlewarePolicy",
    "SummarizerCall",
    "SummarizerMeter",
    "TranscriptError",
    "TrimMessagesPolicy",
    "call_cost",
    "load_transcript",
    "plot_simulation",
    "prompt_limit",
    "simulate",
]

# The planted facts of langchain_holysheep.workload ("My order number is ORD-100370 and my code
# word is QXT42."); the fake summarizer copies every match from its input to its output.
PLANTED_FACT_PATTERN = r"My order number is ORD-\d+ and my code word is [A-Z]{3}\d{2}\."


class TokenCounting(Protocol):
    """The part of :class:`langchain_holysheep.tokens.TokenCounter` the simulator uses."""

    def count_text(self, text: str) -> int:
        """Count the tokens of a text."""

    def count_message(self, message: BaseMessage) -> int:
        """Count one message, per-message overhead included."""

    def count_messages(self, messages: Iterable[BaseMessage]) -> int:
        """Count a prompt: messages plus reply priming."""

    def __call__(self, messages: Sequence[BaseMessage]) -> int:
        """Same as :meth:`count_messages` (the ``trim_messages`` counter signature)."""


# --------------------------------------------------------------------------------------------
# Conversations to replay
# --------------------------------------------------------------------------------------------


class TranscriptError(ValueError):
    """A transcript file that cannot be read as a conversation; names the line and the fault."""


@dataclass(frozen=True)
class Replay:
    """A conversation and the points where a model is called in it.

    Attributes:
        messages: The whole conversation, system messages first.
        call_points: For each model call, the length of the prefix of ``messages`` sent to it;
            ``messages[point]`` is the answer the model gave (its output).
        facts: ``(message_index, text)`` of facts planted in the conversation, for fidelity.
        source: What the conversation is, for display.
    """

    messages: list[BaseMessage]
    call_points: list[int]
    facts: list[tuple[int, str]] = field(default_factory=list)
    source: str = "conversation"

    @classmethod
    def from_synthetic(cls, conversation: SyntheticConversation, *, source: str = "") -> Replay:
        """Replay a :func:`langchain_holysheep.workload.synthetic_conversation`."""
        return cls(
            messages=list(conversation.messages),
            call_points=list(conversation.call_points),
            facts=[(f.message_index, f.text) for f in conversation.facts],
            source=source
            or f"synthetic support conversation, {len(conversation.turn_starts)} turns",
        )

    @classmethod
    def from_messages(
        cls, messages: Sequence[BaseMessage], *, source: str = "transcript"
    ) -> Replay:
        """Replay a recorded conversation: one model call before each AI message.

        Raises:
            TranscriptError: If no AI message follows a human message, so there is no call.
        """
        messages = list(messages)
        points: list[int] = []
        seen_human = False
        for i, message in enumerate(messages):
            if isinstance(message, HumanMessage):
                seen_human = True
            elif isinstance(message, AIMessage) and seen_human:
                points.append(i)
        if not points:
            raise TranscriptError(
                f"{source}: {len(messages)} messages but no AI message after a human message, "
                "so there is no model call to replay; a transcript needs at least one "
                "user message followed by an assistant answer"
            )
        return cls(messages=messages, call_points=points, source=source)

    def turn_of(self, point: int) -> int:
        """Return the 1-based turn of a call: the number of human messages before it."""
        return sum(isinstance(m, HumanMessage) for m in self.messages[:point])


_ROLES = {
    "human": "human",
    "user": "human",
    "ai": "ai",
    "assistant": "ai",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "function",
}


def load_transcript(path: str | Path) -> list[BaseMessage]:
    """Read a JSONL transcript: one message per line.

    Each line is a LangChain message dict (``messages_to_dict`` form, ``{"type": "human",
    "data": {...}}``, or ``{"type": "human", "content": ...}``) or an OpenAI chat message
    (``{"role": "user", "content": ...}``, with ``tool_calls`` / ``tool_call_id``). Blank lines
    are skipped.

    Args:
        path: The file to read.

    Returns:
        The messages, in file order.

    Raises:
        TranscriptError: For an unreadable file or a malformed line, naming the line number and
            what is wrong with it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TranscriptError(f"cannot read transcript {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    messages: list[BaseMessage] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        messages.append(_parse_line(line, f"{path}, line {number}"))
    if not messages:
        raise TranscriptError(
            f"{path}: no messages (the file is empty); expected one JSON message per line"
        )
    return messages


def _parse_line(line: str, where: str) -> BaseMessage:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TranscriptError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(raw, dict):
        raise TranscriptError(
            f"{where}: expected a JSON object with 'role' or 'type', got {type(raw).__name__}"
        )
    if "data" in raw and "type" in raw and isinstance(raw["data"], dict):
        try:
            return messages_from_dict([raw])[0]
        except Exception as exc:
            raise TranscriptError(f"{where}: not a LangChain message dict: {exc}") from exc
    kind = raw.get("role", raw.get("type"))
    if kind is None:
        raise TranscriptError(
            f"{where}: no 'role' or 'type' key (keys: {', '.join(sorted(raw)) or 'none'}); "
            'expected e.g. {"role": "user", "content": "..."}'
        )
    role = _ROLES.get(str(kind))
    if role is None:
        raise TranscriptError(
            f"{where}: unknown role {kind!r}; expected one of {', '.join(sorted(_ROLES))}"
        )
    if "content" not in raw and not (role == "ai" and raw.get("tool_calls")):
        raise TranscriptError(f"{where}: a {kind} message needs a 'content' key")
    if raw.get("content") is None and role != "ai":
        raise TranscriptError(f"{where}: a {kind} message has null content")
    if role == "tool" and not raw.get("tool_call_id"):
        raise TranscriptError(f"{where}: a tool message needs the 'tool_call_id' it answers")
    payload = {k: v for k, v in raw.items() if k not in ("role", "type")}
    payload["role"] = "assistant" if role == "ai" else kind
    if payload.get("content") is None:
        payload["content"] = ""
    try:
        return convert_to_messages([payload])[0]
    except Exception as exc:  # langchain's own coercion errors: keep their text, add the line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TranscriptError(f"{where}: cannot convert to a message: {first}") from exc


# --------------------------------------------------------------------------------------------
# Summarizers: metering any chat model, and an offline fake
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummarizerCall:
    """One call a policy made to its summarizer model.

    Attributes:
        input_tokens: Tokens sent to the summarizer (reported by the model when it reports
            usage, counted otherwise).
        output_tokens: Tokens of the summary it returned.
        failed: ``True`` when the call raised.
        cached_tokens: Of ``input_tokens``, those billed at the cached price: the prefix the
            call repeats from a prompt sent just before (set by :func:`simulate`, which knows
            the policy's previous prompt; 0 until then).
        messages: The prompt sent, for that estimate.
    """

    input_tokens: int
    output_tokens: int
    failed: bool = False
    cached_tokens: int = 0
    messages: tuple[BaseMessage, ...] = field(default=(), repr=False, compare=False)


class SummarizerMeter(BaseCallbackHandler):
    """Callback that records every call of the chat model it is attached to.

    Attach it with :meth:`attach`; the policy reads :attr:`calls` after each step.
    """

    def __init__(self, counter: TokenCounting) -> None:
        self.counter = counter
        self.calls: list[SummarizerCall] = []
        self._inputs: dict[UUID, tuple[int, tuple[BaseMessage, ...]]] = {}

    def attach(self, model: BaseChatModel) -> BaseChatModel:
        """Return a copy of ``model`` that reports its calls to this meter."""
        existing = model.callbacks if isinstance(model.callbacks, list) else []
        return model.model_copy(update={"callbacks": [*existing, self]})

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        """Count the summarizer's input and keep its prompt (for the cached-prefix estimate)."""
        counted = sum(self.counter.count_messages(batch) for batch in messages)
        self._inputs[run_id] = (counted, tuple(messages[0]) if messages else ())

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the call, with reported usage when the model gives it."""
        counted_in, prompt = self._inputs.pop(run_id, (0, ()))
        out = 0
        reported_in: int | None = None
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                usage = getattr(message, "usage_metadata", None)
                if usage:
                    reported_in = (reported_in or 0) + int(usage.get("input_tokens", 0))
                    out += int(usage.get("output_tokens", 0))
                else:
                    out += self.counter.count_text(generation.text)
        self.calls.append(SummarizerCall(reported_in or counted_in, out, messages=prompt))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed call (not billed)."""
        self._inputs.pop(run_id, None)
        self.calls.append(SummarizerCall(0, 0, failed=True))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_FAKE_LABELS = re.compile(r"\[offline fake summary\]|^\s*(?:Facts|Notes):", re.MULTILINE)
_SPEAKER_LINE = re.compile(r"^\[[^\]\n]+\]:[ \t]*(.+)$", re.MULTILINE)
_TAG_LINE = re.compile(r"^\s*</?[\w-]+>\s*$")
_XML_MESSAGE = re.compile(r"<message[^>]*>(.*?)</message>", re.DOTALL)


class FakeSummarizer(BaseChatModel):
    """An offline, deterministic stand-in for a summarizer: **not a model**.

    Its "summary" is every planted fact found in its input (the previous summary included, so
    facts survive repeated folding), followed by the first sentence of each message or line of
    the input until ``max_words`` words. With ``max_words=0`` it is the *ideal* summarizer of
    the fidelity benchmark: it keeps exactly the facts. Every summary starts with
    ``[offline fake summary]`` so it cannot be mistaken for a real one.

    It answers both summary requests of ``langchain_holysheep.summarize``: the isolated prompt
    (notes from the transcript lines) and the cache-aligned one (the chat prompt plus a final
    request; notes from the conversation messages, not from the system messages, the recap or
    the request). Set ``model_name`` to the chat model it stands in for, so that a
    ``ContextWindow`` in ``summary_mode="auto"`` treats it as that model (cache-aligned).
    """

    fact_pattern: str = PLANTED_FACT_PATTERN
    max_words: int = 120
    model_name: str | None = None

    @property
    def _llm_type(self) -> str:
        return "holysheep-fake-summarizer"

    def summarize_text(self, text: str, *, notes_from: str | Sequence[str] | None = None) -> str:
        """Return the fake summary of ``text`` (what :meth:`invoke` answers).

        Args:
            text: Everything the summarizer was sent; facts are copied from all of it.
            notes_from: The part to take first sentences from (default: ``text``), or the
                chunks (one per message) to take them from.
        """
        facts = list(dict.fromkeys(re.findall(self.fact_pattern, text)))
        notes: list[str] = []
        if self.max_words > 0:
            words = 0
            source = text if notes_from is None else notes_from
            chunks = _message_chunks(source) if isinstance(source, str) else list(source)
            for chunk in chunks:
                # Facts are listed once above; a previous fake summary's labels are not notes.
                chunk = _FAKE_LABELS.sub("", re.sub(self.fact_pattern, "", chunk)).strip()
                sentence = _SENTENCE_END.split(chunk, maxsplit=1)[0].strip()
                if not sentence or sentence in notes:
                    continue
                n = len(sentence.split())
                if words + n > self.max_words:
                    break
                notes.append(sentence)
                words += n
        parts = ["[offline fake summary]"]
        if facts:
            parts.append("Facts: " + " ".join(facts))
        if notes:
            parts.append("Notes: " + " ".join(notes))
        if len(parts) == 1:
            parts.append("Nothing to keep.")
        return "\n".join(parts)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text = "\n".join(m.text for m in messages)
        notes: str | list[str]
        if is_cache_aligned_request(messages):
            # The chat prompt plus the request: notes from the conversation's own messages.
            notes = [
                m.text
                for m in messages[:-1]
                if not isinstance(m, SystemMessage) and not is_recap(m) and m.text.strip()
            ]
        else:
            # Instructions come as system messages; notes are taken from the data only.
            notes = "\n".join(m.text for m in messages if not isinstance(m, SystemMessage))
        summary = self.summarize_text(text, notes_from=notes)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(summary))])


def _message_chunks(text: str) -> list[str]:
    """Split summarizer input into its messages.

    XML ``<message>`` blocks (SummarizationMiddleware's prompt), ``[speaker]: text`` lines
    (``langchain_holysheep.summarize``'s transcript), or else the non-empty lines.
    """
    blocks = _XML_MESSAGE.findall(text)
    if blocks:
        return [str(b) for b in blocks]
    labelled = [m.group(1) for m in _SPEAKER_LINE.finditer(text)]
    if labelled:
        return labelled
    return [line for line in text.splitlines() if line.strip() and not _TAG_LINE.match(line)]


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyStep:
    """What a policy sends for one model call.

    Attributes:
        messages: The prompt.
        summarizer_calls: Summarizer calls the policy made to prepare it.
    """

    messages: list[BaseMessage]
    summarizer_calls: list[SummarizerCall] = field(default_factory=list)


class Policy(ABC):
    """A way of choosing the prompt for each model call of a growing conversation.

    Policies may keep state between calls (a running summary), so an instance serves one
    replay: build a fresh one for each :func:`simulate` run. Subclass it to add a policy.
    """

    name: str = "policy"

    @abstractmethod
    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        """Return the prompt for the next model call.

        Args:
            conversation: The conversation so far, system messages first; the previous call's
                conversation plus the messages that arrived since. Never mutated.
        """


def _split_system(messages: Sequence[BaseMessage]) -> tuple[list[BaseMessage], list[BaseMessage]]:
    i = 0
    while i < len(messages) and isinstance(messages[i], SystemMessage):
        i += 1
    return list(messages[:i]), list(messages[i:])


class SendEverything(Policy):
    """Send the whole conversation every call: the baseline."""

    name = "send everything"

    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        """Return the conversation as it is."""
        return PolicyStep(list(conversation))


class SlidingWindow(Policy):
    """The tutorial sliding window: drop the oldest message until the prompt fits.

    One message at a time, ignoring tool-call pairing: this is the naive window many tutorials
    show, and it can send a tool result without its call or start on an AI message.
    """

    name = "sliding window"

    def __init__(self, max_prompt_tokens: int, counter: TokenCounting) -> None:
        self.max_prompt_tokens = max_prompt_tokens
        self.counter = counter

    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        """Keep the system messages and the longest suffix that fits."""
        system, rest = _split_system(conversation)
        total = self.counter.count_messages(conversation)
        start = 0
        while total > self.max_prompt_tokens and start < len(rest) - 1:
            total -= self.counter.count_message(rest[start])
            start += 1
        return PolicyStep([*system, *rest[start:]])


class TrimMessagesPolicy(Policy):
    """LangChain's ``trim_messages`` as its documentation shows it for chat history.

    ``strategy="last"``, ``include_system=True``, ``start_on="human"``,
    ``end_on=("human", "tool")``, with the simulator's tiktoken counter.
    """

    name = "trim_messages"

    def __init__(self, max_prompt_tokens: int, counter: TokenCounting) -> None:
        self.max_prompt_tokens = max_prompt_tokens
        self.counter = counter

    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        """Trim with ``langchain_core.messages.trim_messages``."""
        from langchain_core.messages import trim_messages

        kept = trim_messages(
            list(conversation),
            max_tokens=self.max_prompt_tokens,
            token_counter=self.counter,
            strategy="last",
            include_system=True,
            start_on="human",
            end_on=("human", "tool"),
        )
        return PolicyStep(list(kept))


class SummarizationMiddlewarePolicy(Policy):
    """langchain's ``SummarizationMiddleware``, its ``before_model`` driven directly.

    The agent state holds the conversation without the system prompt (``create_agent`` passes
    the system prompt separately); after each ``before_model`` the returned update replaces
    the state, exactly as the agent graph's reducer would. Summaries come from ``summarizer``,
    prompted with the middleware's own summary prompt, and are metered.

    Args:
        max_prompt_tokens: Trigger: summarize when the state reaches this many tokens.
        keep_tokens: Tokens of recent messages kept verbatim after summarizing.
        counter: Token counter, also given to the middleware.
        summarizer: The chat model that writes summaries.
    """

    name = "SummarizationMiddleware"

    def __init__(
        self,
        max_prompt_tokens: int,
        keep_tokens: int,
        counter: TokenCounting,
        summarizer: BaseChatModel,
    ) -> None:
        try:
            from langchain.agents.middleware import SummarizationMiddleware
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                "the SummarizationMiddleware anchor needs langchain: pip install "
                '"langchain-holysheep[agents]"'
            ) from exc
        self.meter = SummarizerMeter(counter)
        self.middleware: Any = SummarizationMiddleware(
            model=self.meter.attach(summarizer),
            trigger=("tokens", max_prompt_tokens),
            keep=("tokens", keep_tokens),
            token_counter=cast("Any", counter),  # takes lists of messages, as the middleware gives
        )
        self._state: list[BaseMessage] = []
        self._system: list[BaseMessage] = []
        self._seen = 0

    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        """Append the new messages to the agent state, run ``before_model``, send the state."""
        if self._seen == 0:
            self._system, _ = _split_system(conversation)
            self._seen = len(self._system)
        # Copies: the middleware assigns ids to id-less messages in place.
        self._state.extend(m.model_copy() for m in conversation[self._seen :])
        self._seen = len(conversation)
        before = len(self.meter.calls)
        update = self.middleware.before_model({"messages": self._state}, None)
        if update is not None:
            # [RemoveMessage(REMOVE_ALL_MESSAGES), summary, *preserved]
            self._state = [m for m in update["messages"][1:]]
        return PolicyStep([*self._system, *self._state], self.meter.calls[before:])


class ContextWindowPolicy(Policy):
    """:class:`~langchain_holysheep.memory.ContextWindow`, driven through its ``step``.

    The window state (running summary, window start) is carried from call to call as the
    history and the CLI carry it, and only the messages from ``state.load_from`` on are passed.

    Args:
        window: The ContextWindow. Its summarizer, if any, should be metered (see
            :meth:`from_settings`) for its calls to be priced.
        meter: The meter attached to the window's summarizer, if any.
        name: The policy's name in results (default ``"ContextWindow"``), to compare settings.
    """

    name = "ContextWindow"

    def __init__(
        self, window: ContextWindow, meter: SummarizerMeter | None = None, name: str | None = None
    ) -> None:
        from langchain_holysheep.window import WindowState

        if name is not None:
            self.name = name
        self.window = window
        self.meter = meter
        self.state: WindowState = WindowState()
        self.last_plan: Any = None

    @classmethod
    def from_settings(
        cls,
        *,
        model: str,
        max_tokens: int | None,
        counter: TokenCounting,
        window_size: int | None = None,
        summarizer: BaseChatModel | None = None,
        name: str | None = None,
        **window_kwargs: Any,
    ) -> ContextWindowPolicy:
        """Build a ContextWindow whose summarizer calls are metered.

        ``window_kwargs`` go to ``ContextWindow`` (e.g. ``summary_mode="isolated"``); ``name``
        names the policy in the results.
        """
        from langchain_holysheep.memory import ContextWindow
        from langchain_holysheep.tokens import TokenCounter

        meter = SummarizerMeter(counter) if summarizer is not None else None
        if isinstance(counter, TokenCounter):
            window_kwargs.setdefault("counter", counter)
        window = ContextWindow(
            model=model,
            max_tokens=max_tokens,
            window_size=window_size,
            summarizer=meter.attach(summarizer) if meter and summarizer else None,
            **window_kwargs,
        )
        return cls(window, meter, name)

    def prepare(self, conversation: Sequence[BaseMessage]) -> PolicyStep:
        """Plan the call with ``ContextWindow.step`` and keep the new state."""
        system, rest = _split_system(conversation)
        offset = self.state.load_from
        before = len(self.meter.calls) if self.meter else 0
        plan = self.window.step(
            system, rest[offset:], offset=offset, state=self.state, previous=self.last_plan
        )
        self.state = plan.state
        self.last_plan = plan
        calls = self.meter.calls[before:] if self.meter else []
        return PolicyStep(list(plan.messages), calls)


# --------------------------------------------------------------------------------------------
# The replay engine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallRecord:
    """One model call of one policy.

    Attributes:
        call: 0-based index of the model call.
        turn: 1-based turn (human messages so far).
        prompt_messages: Messages sent.
        prompt_tokens: Tokens sent.
        repeated_prefix_tokens: Tokens of the prompt's leading messages identical to the
            previous prompt's.
        cached_tokens: Tokens billed at the cached price (the repeated prefix, rounded to the
            provider's caching granularity).
        output_tokens: Tokens of the answer (the conversation's next AI message).
        cost: Dollars for the call, or ``None`` without a price.
        problems: Why the prompt is invalid (empty when valid).
        summarizer_calls: Summarizer calls made to prepare this prompt.
        summarizer_cost: Dollars for those, or ``None`` without a price.
        facts_planted: Planted facts stated before or in this call's conversation.
        facts_present: Of those, how many appear verbatim in the prompt.
    """

    call: int
    turn: int
    prompt_messages: int
    prompt_tokens: int
    repeated_prefix_tokens: int
    cached_tokens: int
    output_tokens: int
    cost: float | None
    problems: tuple[str, ...]
    summarizer_calls: tuple[SummarizerCall, ...]
    summarizer_cost: float | None
    facts_planted: int
    facts_present: int

    @property
    def valid(self) -> bool:
        """Whether the prompt is one a chat API accepts."""
        return not self.problems

    @property
    def repeated_share(self) -> float:
        """Share of the prompt that repeats the previous prompt's prefix."""
        return self.repeated_prefix_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class PolicyResult:
    """All calls of one policy over a replay, and their totals."""

    name: str
    calls: list[CallRecord]

    @property
    def input_tokens(self) -> int:
        """Prompt tokens over all calls."""
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens billed at the cached price."""
        return sum(c.cached_tokens for c in self.calls)

    @property
    def output_tokens(self) -> int:
        """Answer tokens over all calls (the same for every policy)."""
        return sum(c.output_tokens for c in self.calls)

    @property
    def cached_share(self) -> float:
        """Share of the input tokens billed at the cached price."""
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def mean_repeated_share(self) -> float:
        """Mean, over calls after the first, of the share repeating the previous prompt."""
        later = self.calls[1:]
        return sum(c.repeated_share for c in later) / len(later) if later else 0.0

    @property
    def invalid_prompts(self) -> int:
        """Calls whose prompt a chat API would reject."""
        return sum(not c.valid for c in self.calls)

    @property
    def peak_prompt_tokens(self) -> int:
        """The largest prompt."""
        return max((c.prompt_tokens for c in self.calls), default=0)

    @property
    def summarizer_calls(self) -> int:
        """Summarizer calls made, failed ones included."""
        return sum(len(c.summarizer_calls) for c in self.calls)

    @property
    def summarizer_cached_tokens(self) -> int:
        """Summarizer input tokens billed at the cached price."""
        return sum(s.cached_tokens for c in self.calls for s in c.summarizer_calls)

    @property
    def summarizer_tokens(self) -> int:
        """Summarizer input plus output tokens."""
        return sum(s.input_tokens + s.output_tokens for c in self.calls for s in c.summarizer_calls)

    @property
    def model_cost(self) -> float | None:
        """Dollars for the model calls (prompt-cache pricing), or ``None`` without a price."""
        costs = [c.cost for c in self.calls]
        return None if any(x is None for x in costs) else sum(x or 0.0 for x in costs)

    @property
    def summarizer_cost(self) -> float | None:
        """Dollars for the summarizer calls, or ``None`` without a price."""
        costs = [c.summarizer_cost for c in self.calls]
        return None if any(x is None for x in costs) else sum(x or 0.0 for x in costs)

    @property
    def total_cost(self) -> float | None:
        """Model plus summarizer dollars, or ``None`` without a price."""
        model, summ = self.model_cost, self.summarizer_cost
        return None if model is None or summ is None else model + summ

    def fact_share_at(self, turn: int) -> float | None:
        """Share of planted facts present in the prompt of the first call at ``turn``.

        Returns ``None`` when the replay has no call at that turn or no fact planted by then.
        """
        for c in self.calls:
            if c.turn == turn:
                return c.facts_present / c.facts_planted if c.facts_planted else None
        return None


@dataclass
class SimulationResult:
    """The outcome of :func:`simulate`: one :class:`PolicyResult` per policy."""

    replay: Replay
    model: str
    policies: list[PolicyResult]

    def __getitem__(self, name: str) -> PolicyResult:
        for result in self.policies:
            if result.name == name:
                return result
        raise KeyError(
            f"no policy named {name!r}; policies: {', '.join(p.name for p in self.policies)}"
        )


def call_cost(
    price: ModelPrice | None, input_tokens: int, cached_tokens: int, output_tokens: int
) -> float | None:
    """Dollars for one call: uncached input, cached input at the cached price, and output.

    Returns ``None`` when ``price`` is ``None``.
    """
    if price is None:
        return None
    uncached = input_tokens - cached_tokens
    return (
        uncached * price.input + cached_tokens * price.cached_input + output_tokens * price.output
    ) / 1_000_000


def prompt_limit(max_tokens: int, model: str | None = None) -> int:
    """The most a prompt may count under a ``max_tokens`` budget (the response reserved).

    The same cap ContextWindow plans against (``ContextBudget.for_model``), so the anchors get
    the budget it gets.
    """
    from langchain_holysheep.budget import ContextBudget

    return ContextBudget.for_model(model, max_tokens).allocate().prompt


ProgressCallback = Callable[[str, int, int], None]


def simulate(
    replay: Replay,
    policies: Sequence[Policy],
    *,
    model: str,
    counter: TokenCounting,
    price: ModelPrice | None,
    summarizer_price: ModelPrice | None = None,
    on_call: ProgressCallback | None = None,
    summarizer_cache: bool = True,
) -> SimulationResult:
    """Replay a conversation through each policy, one model call at a time.

    For every call and policy: the prompt's tokens, the tokens served from the prompt cache
    (the prefix repeated from the same policy's previous prompt, rounded as a provider
    rounds it), the cost with cached input at the cached price and the answer as output, the
    prompt's validity, the summarizer calls made for it, and how many planted facts it holds.
    A summarizer call is priced the same way: the prefix it repeats from the policy's previous
    prompt (or from a summarizer prompt sent just before it) at the cached price, the rest at
    the full price. A summary prompt of its own repeats nothing; a cache-aligned one
    (``langchain_holysheep.summarize``) repeats the whole previous prompt.

    Args:
        replay: The conversation and its call points.
        policies: Fresh policies (a policy may keep state; one instance per run).
        model: The model the prompts are sent to (for display).
        counter: Counts every prompt alike, whatever the policy counted internally.
        price: Prices of ``model``; ``None`` leaves costs unknown.
        summarizer_price: Prices of the summarizer model; defaults to ``price``.
        on_call: Called as ``on_call(policy_name, calls_done, calls_total)`` after each call.
        summarizer_cache: Whether the summarizer shares the chat model's prompt cache (it does
            when it is the same model); ``False`` bills all of its input at the full price.

    Returns:
        One result per policy, in the order given.
    """
    if summarizer_price is None:
        summarizer_price = price
    messages = replay.messages
    total = len(replay.call_points)
    results: list[PolicyResult] = []
    for policy in policies:
        records: list[CallRecord] = []
        previous: list[BaseMessage] = []
        for k, point in enumerate(replay.call_points):
            conversation = messages[:point]
            step = policy.prepare(conversation)
            prompt = step.messages
            summarizer_calls = (
                _cache_priced(step.summarizer_calls, previous, counter)
                if summarizer_cache
                else step.summarizer_calls
            )
            counts = [counter.count_message(m) for m in prompt]
            prompt_tokens = counter.count_messages(prompt)
            repeated = shared_prefix_tokens(previous, prompt, counts)
            cached = min(cacheable_tokens(repeated), prompt_tokens)
            output = counter.count_message(messages[point]) if point < len(messages) else 0
            planted = [text for index, text in replay.facts if index < point]
            present = _facts_in(prompt, planted) if planted else 0
            summ_cost = _summarizer_cost(summarizer_calls, summarizer_price)
            records.append(
                CallRecord(
                    call=k,
                    turn=replay.turn_of(point),
                    prompt_messages=len(prompt),
                    prompt_tokens=prompt_tokens,
                    repeated_prefix_tokens=repeated,
                    cached_tokens=cached,
                    output_tokens=output,
                    cost=call_cost(price, prompt_tokens, cached, output),
                    problems=tuple(find_prompt_problems(prompt)),
                    summarizer_calls=tuple(summarizer_calls),
                    summarizer_cost=summ_cost,
                    facts_planted=len(planted),
                    facts_present=present,
                )
            )
            previous = prompt
            if on_call is not None:
                on_call(policy.name, k + 1, total)
        results.append(PolicyResult(policy.name, records))
    return SimulationResult(replay=replay, model=model, policies=results)


def _cache_priced(
    calls: Sequence[SummarizerCall], previous: Sequence[BaseMessage], counter: TokenCounting
) -> list[SummarizerCall]:
    """Set each summarizer call's cached tokens: the prefix it repeats from a prompt just sent.

    The provider has just seen the policy's previous prompt and any summarizer prompt sent
    before this one in the same step; a call is credited with its longest repeated prefix,
    rounded as for the chat prompts. A summary prompt of its own repeats none of them.
    """
    sent: list[Sequence[BaseMessage]] = [previous]
    priced: list[SummarizerCall] = []
    for call in calls:
        if call.failed or not call.messages:
            priced.append(call)
            continue
        counts = [counter.count_message(m) for m in call.messages]
        repeated = max(shared_prefix_tokens(p, call.messages, counts) for p in sent)
        cached = min(cacheable_tokens(repeated), call.input_tokens)
        priced.append(replace(call, cached_tokens=cached))
        sent.append(call.messages)
    return priced


def _summarizer_cost(calls: Sequence[SummarizerCall], price: ModelPrice | None) -> float | None:
    if not calls:
        return 0.0
    if price is None:
        return None
    return sum(
        call_cost(price, c.input_tokens, c.cached_tokens, c.output_tokens) or 0.0 for c in calls
    )


def _facts_in(prompt: Sequence[BaseMessage], facts: Sequence[str]) -> int:
    text = "\n".join(m.text for m in prompt)
    return sum(fact in text for fact in facts)


def plot_simulation(result: SimulationResult, path: str | Path | None = None) -> Any:
    """Draw prompt tokens (log scale) and cumulative cost per turn of each policy.

    Args:
        result: What :func:`simulate` returned.
        path: Where to save the figure (PNG, SVG or PDF by its suffix); ``None`` only returns
            it (a notebook displays it).

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: Without matplotlib (``pip install "langchain-holysheep[cli]"``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            'plot_simulation needs matplotlib: pip install "langchain-holysheep[cli]"'
        ) from exc

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for p in result.policies:
        turns = [c.turn for c in p.calls]
        top.plot(turns, [c.prompt_tokens for c in p.calls], label=p.name, linewidth=1.2)
        running = 0.0
        cumulative = []
        for c in p.calls:
            running += (c.cost or 0.0) + (c.summarizer_cost or 0.0)
            cumulative.append(running)
        bottom.plot(turns, cumulative, label=p.name, linewidth=1.5)
    top.set_yscale("log")
    top.set_ylabel("prompt tokens (log scale)")
    top.set_title(f"{result.replay.source}\nmodel {result.model}", fontsize=9)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("cumulative cost ($)")
    bottom.set_xlabel("turn")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
