"""ContextWindow: the runnable that decides what to send each turn within a token budget.

It ties the token counter, the budget, the pure planner (``window.py``) and the running
summarizer together; the planning core is written once and driven from sync and async code.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    MessageLikeRepresentation,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, PrivateAttr

from langchain_holysheep.budget import ContextBudget
from langchain_holysheep.prompt_cache import same_message
from langchain_holysheep.summarize import (
    RunningSummarizer,
    SummaryError,
    SummaryFailureWarning,
    shorten_text,
)
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.window import (
    ContextPlan,
    ConversationIndex,
    WindowLimits,
    WindowState,
    finish_turn,
    layout_turn,
    recap_message,
)

__all__ = ["DEFAULT_HIGH_WATER", "DEFAULT_LOW_WATER", "ContextWindow", "WindowInput"]

DEFAULT_HIGH_WATER = 0.9
"""Default compaction trigger, as a fraction of the prompt limit (chosen by the cost sweep)."""
DEFAULT_LOW_WATER = 0.3
"""Default compaction target, as a fraction of the prompt limit (chosen by the cost sweep)."""

WindowInput = Sequence[MessageLikeRepresentation] | PromptValue

_SAMPLES = 4  # positions checked, besides the last, to recognise a grown conversation
_BUCKET = 8  # conversations kept under one derived key


@dataclass(frozen=True)
class FoldRequest:
    """What the planning core asks the summarizer to do on a compaction turn.

    Attributes:
        previous: The summary so far, or ``None``.
        messages: The messages leaving the window, never summarized before, oldest first.
        counts: Their token counts.
        max_tokens: The most the new summary may count.
        through: The new summary covers messages ``[0, through)``.
    """

    previous: str | None
    messages: list[BaseMessage]
    counts: list[int]
    max_tokens: int
    through: int


_Outcome = str | SummaryError


@dataclass
class _Conversation:
    """What the invoke path remembers about one conversation between calls."""

    index: ConversationIndex
    state: WindowState = field(default_factory=WindowState)
    length: int = 0
    samples: list[tuple[int, Any]] = field(default_factory=list)
    system: list[BaseMessage] = field(default_factory=list)
    system_counts: list[int] = field(default_factory=list)
    previous_prompt: list[BaseMessage] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Tail(Sequence[Any]):
    """``raw[lead:]`` without copying it (a long history is not copied every turn)."""

    __slots__ = ("lead", "raw")

    def __init__(self, raw: Sequence[Any], lead: int) -> None:
        self.raw = raw
        self.lead = lead

    def __len__(self) -> int:
        return len(self.raw) - self.lead

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            return self.raw[self.lead + start : self.lead + stop : step]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.raw[self.lead + i]


class _Runtime:
    """Mutable state of a ContextWindow, kept in one plain object (cheap attribute access)."""

    def __init__(self) -> None:
        self.summary: RunningSummarizer | None = None
        # key -> conversations under that key (several when a derived key collides)
        self.conversations: OrderedDict[str, list[_Conversation]] = OrderedDict()
        self.lock = threading.Lock()
        self.frame_tokens = 0
        self.shortened: OrderedDict[tuple[Any, ...], BaseMessage] = OrderedDict()
        self.price: tuple[float, float] | None = None
        self.model_name: str | None = None
        self.message_cap: int | None = None


def _same_item(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, BaseMessage) and isinstance(b, BaseMessage):
        return a.id == b.id and same_message(a, b)
    try:
        return bool(a == b)
    except Exception:
        return False


def _content_key(message: BaseMessage) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(message.type.encode())
    digest.update(repr(message.content).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class ContextWindow(RunnableSerializable[WindowInput, list[BaseMessage]]):
    """Decides what to send each turn: system messages, a running summary, recent messages.

    The prompt stays within a token budget (``max_tokens``, or the model's context window),
    grows append-only between compactions so providers can serve its prefix from their prompt
    cache, and compacts in one step from a high-water to a low-water mark, folding the messages
    that leave into a running summary when a ``summarizer`` is set.

    Setup:
        ```bash
        pip install langchain-holysheep
        ```

    Use it as a runnable:
        ```python
        from langchain_holysheep import ChatHolySheep, ContextWindow

        window = ContextWindow(
            model="deepseek-v3.2",
            max_tokens=6000,
            summarizer=ChatHolySheep(model="deepseek-v3.2", temperature=0),
        )
        chain = window | ChatHolySheep(model="deepseek-v3.2")
        chain.invoke(messages, config={"configurable": {"thread_id": "customer-42"}})
        print(window.plan(messages))  # what was sent and why
        ```

    The invoke path remembers each conversation (keyed by ``thread_id``/``session_id`` in the
    config, else by its first message) in a bounded LRU, so a conversation called again with a
    few more messages costs time proportional to the new messages. Store-backed callers use
    :meth:`step` / :meth:`astep` and persist the returned state themselves.

    Attributes:
        model: Model name or chat model: picks the tokenizer and the context window.
        max_tokens: The whole budget (prompt plus response reserve); ``None`` = the model's
            context window.
        window_size: Optional cap on messages kept verbatim.
        summarizer: Chat model that writes the running summary, or ``None`` (window only).
        high_water: Fraction of the prompt limit at which the window compacts.
        low_water: Fraction of the prompt limit the window compacts down to.
        truncate_long_messages: Shorten long AI messages and tool results (at sentence
            boundaries, with a visible marker) instead of letting them crowd out the window;
            the newest human message is never shortened.
        max_message_tokens: With ``truncate_long_messages``, the most one AI message or tool
            result may count; default a quarter of the prompt limit.
        summary_timeout: Seconds a summarizer call may take before it counts as failed.
        max_conversations: Conversations the invoke path remembers (least recently used
            are forgotten first).
        counter: The token counter (default: one for ``model``).
        budget: The budget (default: ``ContextBudget.for_model(model, max_tokens)``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str | BaseChatModel | None = None
    max_tokens: int | None = None
    window_size: int | None = None
    summarizer: BaseChatModel | None = None
    high_water: float = DEFAULT_HIGH_WATER
    low_water: float = DEFAULT_LOW_WATER
    truncate_long_messages: bool = False
    max_message_tokens: int | None = None
    summary_timeout: float | None = 60.0
    max_conversations: int = 1024
    # None until model_post_init builds them from `model` and `max_tokens`.
    counter: TokenCounter = Field(default=None)  # type: ignore[assignment]
    budget: ContextBudget = Field(default=None)  # type: ignore[assignment]

    _rt: _Runtime = PrivateAttr(default_factory=lambda: _Runtime())

    def model_post_init(self, context: Any, /) -> None:
        """Build the counter, budget and summarizer the fields leave to defaults."""
        if self.model is None and self.max_tokens is None and self.budget is None:
            raise ValueError(
                "ContextWindow needs a model (for its context window) or max_tokens; e.g. "
                "ContextWindow(model='deepseek-v3.2') or ContextWindow(max_tokens=6000)"
            )
        if not 0.0 < self.low_water <= self.high_water <= 1.0:
            raise ValueError(
                f"need 0 < low_water <= high_water <= 1, got low_water={self.low_water} and "
                f"high_water={self.high_water}"
            )
        if self.window_size is not None and self.window_size < 1:
            raise ValueError(f"window_size must be at least 1, got {self.window_size}")
        if self.counter is None:
            self.counter = TokenCounter(self.model)
        if self.budget is None:
            self.budget = ContextBudget.for_model(self.model, self.max_tokens)
        self._rt.model_name = self.counter.model or self.budget.model
        if self.summarizer is not None:
            self._rt.summary = RunningSummarizer(
                self.summarizer, count_text=self.counter.count_text, timeout=self.summary_timeout
            )
        self._rt.frame_tokens = self.counter.count_message(recap_message("", 0))
        if self.summarizer is not None:
            room = self.budget.allocate(1 << 30).summary - self._rt.frame_tokens
            if room < 32:
                warnings.warn(
                    f"the summary allowance of this {self.budget.total_tokens:,}-token budget "
                    f"leaves {room} tokens for the summary text; summaries will fail and the "
                    "messages leaving the window stay pending. Raise max_tokens",
                    SummaryFailureWarning,
                    stacklevel=2,
                )
        self._rt.price = _lookup_price(self._rt.model_name)
        if self.truncate_long_messages:
            prompt = self.budget.allocate(0).prompt
            self._rt.message_cap = self.max_message_tokens or max(64, prompt // 4)

    # -- budget ------------------------------------------------------------------------------

    def limits(self, n_messages: int = 0, reserved_tokens: int = 0) -> WindowLimits:
        """Return the budget numbers a plan of a conversation of ``n_messages`` respects."""
        allocation = self.budget.allocate(n_messages, calibration=self.counter.calibration)
        prompt = allocation.prompt
        cap = self._rt.message_cap
        return WindowLimits(
            budget=allocation.total,
            response=allocation.response,
            prompt=prompt,
            summary=allocation.summary,
            fixed=TokenCounter.REPLY_PRIMING + reserved_tokens,
            high_water=self.high_water,
            low_water=self.low_water,
            window_size=self.window_size,
            message_cap=cap,
            truncate=self.truncate_long_messages,
            truncation_floor=min(64, cap) if cap else 64,
        )

    # -- the planning core (one generator, two drivers) ----------------------------------------

    def _turn(
        self,
        index: ConversationIndex,
        system: Sequence[BaseMessage],
        system_counts: Sequence[int],
        state: WindowState,
        limits: WindowLimits,
        previous_prompt: Sequence[BaseMessage] | None,
    ) -> Generator[FoldRequest, _Outcome, ContextPlan]:
        rt = self._rt
        summarize = rt.summary is not None
        layout = layout_turn(
            index, state, limits, system_tokens=sum(system_counts), summarize=summarize
        )
        new_summary: tuple[str, int, int] | None = None
        failed = False
        if summarize and layout.fold_positions:
            request = FoldRequest(
                previous=state.summary,
                messages=[index.message(p) for p in layout.fold_positions],
                counts=[index.count(p) for p in layout.fold_positions],
                max_tokens=limits.summary - rt.frame_tokens,
                through=layout.new_start,
            )
            outcome = yield request
            if isinstance(outcome, str):
                new_summary = self._bounded_summary(outcome, limits.summary, request.through)
            else:
                failed = True
                pending = layout.new_start - state.summarized_through
                warnings.warn(
                    f"the running summary failed ({outcome}); the previous summary is kept and "
                    f"{pending} message(s) stay pending, sent verbatim while the budget allows "
                    "and summarized on a later turn",
                    SummaryFailureWarning,
                    stacklevel=4,
                )
        return finish_turn(
            layout,
            index,
            state,
            limits,
            system=system,
            system_counts=system_counts,
            summarize=summarize,
            new_summary=new_summary,
            summary_failed=failed,
            shorten=self._shorten,
            previous_prompt=previous_prompt,
            price=rt.price,
            model=rt.model_name,
        )

    def _bounded_summary(self, text: str, allowance: int, through: int) -> tuple[str, int, int]:
        tokens = self.counter.count_message(recap_message(text, through))
        budget = allowance - self._rt.frame_tokens
        while tokens > allowance and budget > 0 and text:
            budget -= max(1, tokens - allowance)
            text = shorten_text(text, budget, self.counter.count_text)
            tokens = self.counter.count_message(recap_message(text, through))
        return text, tokens, through

    def _fold(self, request: FoldRequest) -> _Outcome:
        """Run the summarizer for a compaction (sync); a background summarizer overrides this."""
        assert self._rt.summary is not None
        try:
            return self._rt.summary.summarize(
                request.previous,
                request.messages,
                max_tokens=request.max_tokens,
                counts=request.counts,
            )
        except SummaryError as exc:
            return exc

    async def _afold(self, request: FoldRequest) -> _Outcome:
        """Async twin of :meth:`_fold`: awaits the summarizer."""
        assert self._rt.summary is not None
        try:
            return await self._rt.summary.asummarize(
                request.previous,
                request.messages,
                max_tokens=request.max_tokens,
                counts=request.counts,
            )
        except SummaryError as exc:
            return exc

    def _drive(self, turn: Generator[FoldRequest, _Outcome, ContextPlan]) -> ContextPlan:
        try:
            request = next(turn)
            while True:
                request = turn.send(self._fold(request))
        except StopIteration as done:
            return cast("ContextPlan", done.value)

    async def _adrive(self, turn: Generator[FoldRequest, _Outcome, ContextPlan]) -> ContextPlan:
        try:
            request = next(turn)
            while True:
                request = turn.send(await self._afold(request))
        except StopIteration as done:
            return cast("ContextPlan", done.value)

    # -- step: the store-backed API --------------------------------------------------------------

    def _step_turn(
        self,
        system: Sequence[BaseMessage],
        tail: Sequence[BaseMessage],
        offset: int,
        state: WindowState,
        counts: Sequence[int] | None,
        reserved_tokens: int,
        previous: ContextPlan | None,
    ) -> Generator[FoldRequest, _Outcome, ContextPlan]:
        if offset > state.load_from:
            raise ValueError(
                f"tail starts at offset {offset} but the window state needs messages from "
                f"{state.load_from}; pass conversation[state.load_from:]"
            )
        messages = convert_to_messages(tail)
        if counts is None:
            counts = [self.counter.count_message(m) for m in messages]
        index = ConversationIndex(offset, message_cap=self._rt.message_cap)
        index.extend(messages, counts)
        system_list = convert_to_messages(system)
        system_counts = [self.counter.count_message(m) for m in system_list]
        limits = self.limits(offset + len(messages), reserved_tokens)
        prev = list(previous.messages) if previous is not None else None
        return (yield from self._turn(index, system_list, system_counts, state, limits, prev))

    def step(
        self,
        system: Sequence[BaseMessage],
        tail: Sequence[BaseMessage],
        *,
        offset: int,
        state: WindowState,
        counts: Sequence[int] | None = None,
        reserved_tokens: int = 0,
        previous: ContextPlan | None = None,
    ) -> ContextPlan:
        """Plan one model call from persisted state; run the summarizer if the window compacts.

        Args:
            system: The original system messages.
            tail: ``conversation[offset:]`` (the conversation without leading system messages).
            offset: Position of ``tail[0]``; at most ``state.load_from``.
            state: The window state after the previous call.
            counts: Stored token counts of ``tail`` (counted when ``None``).
            reserved_tokens: Tokens sent besides the messages (tool schemas).
            previous: The previous call's plan, for an exact cached-token estimate.

        Returns:
            The plan; persist ``plan.state`` (compare-and-swap on ``state.version``) when it
            differs from ``state``.

        Raises:
            ContextOverflowError: The current turn cannot fit the budget.
        """
        return self._drive(
            self._step_turn(system, tail, offset, state, counts, reserved_tokens, previous)
        )

    async def astep(
        self,
        system: Sequence[BaseMessage],
        tail: Sequence[BaseMessage],
        *,
        offset: int,
        state: WindowState,
        counts: Sequence[int] | None = None,
        reserved_tokens: int = 0,
        previous: ContextPlan | None = None,
    ) -> ContextPlan:
        """Async twin of :meth:`step`: the summarizer is awaited, never blocking the loop."""
        return await self._adrive(
            self._step_turn(system, tail, offset, state, counts, reserved_tokens, previous)
        )

    # -- the invoke path: per-conversation memory -------------------------------------------------

    def _split(self, value: WindowInput) -> tuple[list[BaseMessage], Sequence[Any]]:
        raw: Sequence[Any]
        if isinstance(value, PromptValue):
            raw = value.to_messages()
        elif isinstance(value, (BaseMessage, str)):
            raise TypeError(
                "ContextWindow takes a list of messages (or a PromptValue), not a single "
                f"{type(value).__name__}; wrap it in a list"
            )
        else:
            raw = value if isinstance(value, (list, tuple, Sequence)) else list(value)
        system: list[BaseMessage] = []
        for item in raw:
            message = item if isinstance(item, BaseMessage) else convert_to_messages([item])[0]
            if not isinstance(message, SystemMessage):
                break
            system.append(message)
        return system, _Tail(raw, len(system))

    def _key(self, conversation: Sequence[Any], config: RunnableConfig | None) -> str:
        configurable = (config or {}).get("configurable") or {}
        for name in ("thread_id", "session_id"):
            value = configurable.get(name)
            if value is not None:
                return f"{name}:{value}"
        if not conversation:
            raise ValueError(
                "the conversation has no message after its system messages; a prompt needs a "
                "human message"
            )
        first = conversation[0]
        message = first if isinstance(first, BaseMessage) else convert_to_messages([first])[0]
        if message.id:
            return f"id:{message.id}"
        return f"hash:{_content_key(message)}"

    def _entry(self, key: str, conversation: Sequence[Any]) -> _Conversation:
        """Return the remembered conversation this one grew from, or a new entry.

        A key from the config names one conversation. A key derived from the first message
        can be shared by different conversations (two chats that both open with "hi"), so
        up to ``_BUCKET`` of them are kept under it and told apart by their sampled messages.
        """
        rt = self._rt
        named = not key.startswith(("id:", "hash:"))
        with rt.lock:
            conversations = rt.conversations
            bucket = conversations.get(key)
            if bucket is None:
                bucket = conversations[key] = []
                while len(conversations) > self.max_conversations:
                    conversations.popitem(last=False)
            else:
                conversations.move_to_end(key)
            for i, entry in enumerate(bucket):
                if named or self._grown(entry, conversation):
                    bucket.append(bucket.pop(i))  # most recently used last
                    return entry
            entry = _Conversation(ConversationIndex(0, message_cap=rt.message_cap))
            bucket.append(entry)
            if len(bucket) > _BUCKET:
                bucket.pop(0)
            return entry

    def _grown(self, entry: _Conversation, conversation: Sequence[Any]) -> bool:
        if len(conversation) < entry.length:
            return False
        return all(_same_item(conversation[i], item) for i, item in entry.samples)

    def _sync_entry(
        self, entry: _Conversation, system: list[BaseMessage], conversation: Sequence[Any]
    ) -> None:
        """Bring the entry up to date with the conversation, converting only new messages."""
        cap = self._rt.message_cap
        if not self._grown(entry, conversation) or entry.index.message_cap != cap:
            entry.index = ConversationIndex(0, message_cap=cap)
            entry.state = WindowState()
            entry.length = 0
            entry.previous_prompt = None
        new = convert_to_messages(conversation[entry.length :])
        if new:
            entry.index.extend(new, [self.counter.count_message(m) for m in new])
        n = len(conversation)
        entry.length = n
        positions = {n - 1, *(n * k // _SAMPLES for k in range(_SAMPLES))}
        entry.samples = [(i, conversation[i]) for i in sorted(positions) if 0 <= i < n]
        if len(system) != len(entry.system) or not all(
            a is b or same_message(a, b) for a, b in zip(system, entry.system, strict=False)
        ):
            entry.system = list(system)
            entry.system_counts = [self.counter.count_message(m) for m in system]

    def _invoke_turn(
        self, entry: _Conversation, system: list[BaseMessage], conversation: Sequence[Any]
    ) -> Generator[FoldRequest, _Outcome, ContextPlan]:
        self._sync_entry(entry, system, conversation)
        limits = self.limits(entry.length)
        plan = yield from self._turn(
            entry.index,
            entry.system,
            entry.system_counts,
            entry.state,
            limits,
            entry.previous_prompt,
        )
        entry.state = plan.state
        entry.previous_prompt = plan.messages
        return plan

    def plan(self, messages: WindowInput, config: RunnableConfig | None = None) -> ContextPlan:
        """Plan this turn of a conversation and remember it (as :meth:`invoke` does).

        Args:
            messages: The whole conversation: a list of messages (or message-like tuples and
                dicts), or a PromptValue.
            config: Optional; ``configurable.thread_id`` or ``session_id`` names the
                conversation.

        Returns:
            The plan: what to send, what was kept, summarized, pending or dropped, and why.

        Raises:
            ContextOverflowError: The current turn cannot fit the budget.
        """
        system, conversation = self._split(messages)
        entry = self._entry(self._key(conversation, config), conversation)
        with entry.lock:
            return self._drive(self._invoke_turn(entry, system, conversation))

    async def aplan(
        self, messages: WindowInput, config: RunnableConfig | None = None
    ) -> ContextPlan:
        """Async twin of :meth:`plan`: the summarizer is awaited, never blocking the loop."""
        system, conversation = self._split(messages)
        entry = self._entry(self._key(conversation, config), conversation)
        # The lock is shared with sync callers, so poll it rather than block the event loop.
        while not entry.lock.acquire(blocking=False):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        try:
            return await self._adrive(self._invoke_turn(entry, system, conversation))
        finally:
            entry.lock.release()

    def invoke(
        self, input: WindowInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[BaseMessage]:
        """Return the messages to send this turn (see :meth:`plan`)."""
        return self._call_with_config(self._invoke_messages, input, config, **kwargs)

    def _invoke_messages(
        self, value: WindowInput, run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> list[BaseMessage]:
        return list(self.plan(value, config).messages)

    async def ainvoke(
        self, input: WindowInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[BaseMessage]:
        """Async twin of :meth:`invoke`."""
        return await self._acall_with_config(self._ainvoke_messages, input, config, **kwargs)

    async def _ainvoke_messages(
        self,
        value: WindowInput,
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> list[BaseMessage]:
        return list((await self.aplan(value, config)).messages)

    def forget(self, config: RunnableConfig | None = None, messages: WindowInput = ()) -> None:
        """Forget what the invoke path remembers about a conversation (or all, given nothing)."""
        with self._rt.lock:
            if config is None and not messages:
                self._rt.conversations.clear()
                return
            _, conversation = self._split(messages)
            self._rt.conversations.pop(self._key(conversation, config), None)

    # -- shortening ------------------------------------------------------------------------------

    def _shorten(self, message: BaseMessage, max_tokens: int) -> BaseMessage:
        key = (message.type, message.id, _content_key(message), max_tokens)
        hit = self._rt.shortened.get(key)
        if hit is not None:
            self._rt.shortened.move_to_end(key)
            return hit
        shortened = _shorten_message(message, max_tokens, self.counter)
        self._rt.shortened[key] = shortened
        if len(self._rt.shortened) > 4096:
            self._rt.shortened.popitem(last=False)
        return shortened


def _text_of(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "\n".join(parts)


def _shorten_message(message: BaseMessage, max_tokens: int, counter: TokenCounter) -> BaseMessage:
    """Return a copy of ``message`` cut at a sentence boundary, with a visible marker."""
    original = counter.count_message(message)
    text = _text_of(message.content)
    overhead = max(0, original - counter.count_text(text))
    if isinstance(message, (AIMessage, ToolMessage)) and not isinstance(message.content, str):
        overhead = counter.count_message(message.model_copy(update={"content": ""}))

    def marker(removed: int) -> str:
        return (
            f"\n[… shortened by the memory system to fit the context window: about "
            f"{removed:,} of {original:,} tokens removed …]"
        )

    room = max_tokens - overhead - counter.count_text(marker(original))
    for _ in range(4):
        kept = shorten_text(text, max(0, room), counter.count_text) if room > 0 else ""
        removed = original - overhead - counter.count_text(kept)
        candidate = message.model_copy(update={"content": kept + marker(max(removed, 0))})
        if counter.count_message(candidate) <= max_tokens:
            return candidate
        room -= max(1, counter.count_message(candidate) - max_tokens)
    bare = message.model_copy(update={"content": "[content removed to fit the context window]"})
    return bare


def _lookup_price(model: str | None) -> tuple[float, float] | None:
    if model is None:
        return None
    try:
        from langchain_holysheep import pricing
    except ImportError:
        return None
    price = pricing.get_price(model)
    if price is None:
        return None
    return float(price.input), float(price.cached_input)
