"""ContextWindow: the runnable that decides what to send each turn within a token budget.

It ties the token counter, the budget, the pure planner (``window.py``) and the running
summarizer together; the planning core is written once and driven from sync and async code.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

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

from langchain_holysheep.background import (
    DEFAULT_LEASE_TTL,
    BackgroundSummaries,
    SummaryChain,
    SummaryJob,
    SummaryLeaseHeldError,
    anchor_key,
    messages_digest,
)
from langchain_holysheep.budget import Allocation, ContextBudget
from langchain_holysheep.prompt_cache import same_message
from langchain_holysheep.summarize import (
    RunningSummarizer,
    SummaryError,
    SummaryFailureWarning,
    SummaryMode,
    shorten_text,
)
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.window import (
    ContextPlan,
    ConversationIndex,
    TurnLayout,
    WindowLimits,
    WindowState,
    finish_turn,
    layout_turn,
    recap_message,
)

if TYPE_CHECKING:
    from typing_extensions import Self

    from langchain_holysheep.stores.base import MessageStore

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "DEFAULT_PRECOMPACT",
    "ContextWindow",
    "WindowInput",
]

DEFAULT_HIGH_WATER = 0.9
"""Default compaction trigger, as a fraction of the prompt limit (chosen by the cost sweep)."""
DEFAULT_LOW_WATER = 0.3
"""Default compaction target, as a fraction of the prompt limit (chosen by the cost sweep)."""
DEFAULT_PRECOMPACT = 0.8
"""Default pre-compaction mark, as a fraction of the high-water mark (background summaries)."""

WindowInput = Sequence[MessageLikeRepresentation] | PromptValue

_SAMPLES = 4  # positions checked, besides the last, to recognise a grown conversation
_BUCKET = 8  # conversations kept under one derived key
_ADOPTION = threading.Lock()  # one step at a time takes a plan's index to extend it


@dataclass(frozen=True)
class FoldRequest:
    """What the planning core asks the summarizer to do on a compaction turn.

    Attributes:
        previous: The summary so far, or ``None``.
        messages: The messages leaving the window, never summarized before, oldest first.
        counts: Their token counts.
        max_tokens: The most the new summary may count.
        through: The new summary covers messages ``[0, through)``.
        prompt: The exact prompt last sent for the conversation, for a cache-aligned summary
            (``None``: the summary is asked for in isolation).
    """

    previous: str | None
    messages: list[BaseMessage]
    counts: list[int]
    max_tokens: int
    through: int
    prompt: Sequence[BaseMessage] | None = None


_Outcome = str | SummaryError


@dataclass(frozen=True)
class _StartJob:
    """Asks the driver to start a background summary (a thread when sync, a task when async)."""

    job: SummaryJob


@dataclass(frozen=True)
class _WaitJob:
    """Asks the driver to wait for a background summary, at most ``timeout`` seconds."""

    job: SummaryJob
    timeout: float | None


_Command = FoldRequest | _StartJob | _WaitJob
_Finish = Callable[[TurnLayout, "tuple[str, int, int] | None"], ContextPlan]


def _to_messages(items: Sequence[Any], first: int = 0) -> list[BaseMessage]:
    """``convert_to_messages`` with errors that name the bad item instead of a bare KeyError.

    ``first`` is the position of ``items[0]`` in the caller's list, for the error message.
    """
    if all(isinstance(item, BaseMessage) for item in items):
        return list(items)
    out: list[BaseMessage] = []
    for position, item in enumerate(items, start=first):
        if isinstance(item, BaseMessage):
            out.append(item)
            continue
        try:
            out.extend(convert_to_messages([item]))
        except KeyError as exc:  # e.g. a tool message dict without its tool_call_id
            raise ValueError(
                f"message {position} ({_preview(item)}) lacks the field {exc.args[0]!r}; a "
                "tool message needs the tool_call_id of the call it answers"
                if exc.args and exc.args[0] == "tool_call_id"
                else f"message {position} ({_preview(item)}) lacks the field {exc}"
            ) from None
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise ValueError(
                f"message {position} ({_preview(item)}) is not a message: {exc}"
            ) from None
    return out


def _preview(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.lru_cache(maxsize=1024)
def _sample_positions(n: int) -> tuple[int, ...]:
    """Positions sampled to recognise a conversation of ``n`` messages when it grows."""
    return tuple(
        sorted(i for i in {n - 1, *(n * k // _SAMPLES for k in range(_SAMPLES))} if 0 <= i < n)
    )


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
    previous_total: int | None = None  # tokens the last plan counted, for calibration
    lock: threading.Lock = field(default_factory=threading.Lock)
    syncs: int = 0  # times synced with a conversation (a match seen before one is stale)


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
        self.limits: tuple[tuple[Any, ...], WindowLimits] | None = None  # the last limits
        self.background: BackgroundSummaries | None = None
        # store object -> session id -> the plan a history returned last for it
        self.sent_plans: weakref.WeakKeyDictionary[Any, OrderedDict[str, ContextPlan]] = (
            weakref.WeakKeyDictionary()
        )


def _items_at(conversation: Sequence[Any], positions: Sequence[int]) -> list[Any]:
    """Return ``conversation[i]`` for each position (a tail is indexed through its list)."""
    if isinstance(conversation, _Tail):
        raw, lead = conversation.raw, conversation.lead
        return [raw[lead + i] for i in positions]
    return [conversation[i] for i in positions]


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

    Summaries off the critical path (``background_summary=True``, opt-in):
        By default the turn that compacts waits for the summarizer. With
        ``background_summary=True`` the window starts summarizing, in a worker thread (sync
        calls) or an asyncio task (async calls), once the prompt passes the pre-compaction
        mark (``precompact`` times the high-water mark), the messages the next compaction will
        drop. The compaction uses that summary if it is ready; if not, the messages that left
        stay pending and are sent verbatim while the budget allows, and a turn waits (at most
        ``summary_wait`` seconds) only when the budget leaves no other choice. A ready summary
        is applied when the prompt passes the high-water mark, so the prompt prefix still
        changes once per compaction. Nothing is lost: a failed background summary is logged
        and retried on a later turn. With ``step(..., store=, session_id=)`` only one worker
        summarizes a session at a time (the store's lease) and results are written back with
        compare-and-swap, so a slow summary never overwrites a newer one. Call
        :meth:`close` / :meth:`aclose` (or use the window as a context manager) to stop
        background work; threads are also wound down at interpreter exit.

        ```python
        with ContextWindow(model="deepseek-v3.2", max_tokens=6000, summarizer=cheap,
                           background_summary=True) as window:
            chain = window | llm
            ...
        ```

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
        summary_mode: ``"cache_aligned"``: ask for the summary by resending the prompt last
            sent plus a request (served from the provider's prompt cache); ``"isolated"``: a
            prompt of its own with the conversation as delimited data; ``"auto"`` (default):
            cache-aligned when the summarizer's model name equals the window's model. See
            ``langchain_holysheep.summarize``.
        max_conversations: Conversations the invoke path remembers (least recently used
            are forgotten first).
        background_summary: Summarize ahead of compactions in the background (see above);
            ``False`` (the default) runs the summarizer inline on the compacting turn.
        precompact: With ``background_summary``, the fraction of the high-water mark at which
            the background summary starts.
        summary_wait: With ``background_summary``, the most seconds a turn waits for a
            background summary when the budget cannot hold the pending messages;
            ``None`` = ``summary_timeout``.
        background_workers: With ``background_summary``, threads summarizing at once.
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
    summary_mode: SummaryMode = "auto"
    max_conversations: int = 1024
    background_summary: bool = False
    precompact: float = DEFAULT_PRECOMPACT
    summary_wait: float | None = None
    background_workers: int = 4
    # None until model_post_init builds them from `model` and `max_tokens`.
    counter: TokenCounter = Field(default=None)  # type: ignore[assignment]
    budget: ContextBudget = Field(default=None)  # type: ignore[assignment]

    _runtime: _Runtime = PrivateAttr(default_factory=lambda: _Runtime())

    @property
    def _rt(self) -> _Runtime:
        # Pydantic's own lookup of a private attribute costs microseconds (it probes the
        # attribute for ``__get__`` through an AttributeError); a turn reads this a dozen times.
        return cast("_Runtime", self.__pydantic_private__["_runtime"])  # type: ignore[index]

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
        if not 0.0 < self.precompact <= 1.0:
            raise ValueError(
                f"precompact is a fraction of the high-water mark: need 0 < precompact <= 1, "
                f"got {self.precompact}"
            )
        if self.summary_wait is not None and self.summary_wait < 0:
            raise ValueError(f"summary_wait must be >= 0 seconds, got {self.summary_wait}")
        if self.counter is None:
            self.counter = TokenCounter(self.model)
        if self.budget is None:
            self.budget = ContextBudget.for_model(self.model, self.max_tokens)
        self._rt.model_name = self.counter.model or self.budget.model
        if self.summarizer is not None:
            self._rt.summary = RunningSummarizer(
                self.summarizer,
                count_text=self.counter.count_text,
                timeout=self.summary_timeout,
                mode=self.summary_mode,
                chat_model=self._rt.model_name,
            )
            if self.background_summary:
                ttl = max(DEFAULT_LEASE_TTL, 2 * (self.summary_timeout or 0.0))
                self._rt.background = BackgroundSummaries(
                    self._fold,
                    self._afold,
                    self._bounded_summary,
                    max_workers=self.background_workers,
                    max_jobs=4 * self.max_conversations,
                    lease_ttl=ttl,
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
        cap = self._rt.message_cap
        key = (
            allocation,
            reserved_tokens,
            cap,
            self.high_water,
            self.low_water,
            self.window_size,
            self.truncate_long_messages,
        )
        memo = self._rt.limits
        if memo is not None and memo[0] == key:  # the budget memoizes its allocations
            return memo[1]
        limits = self._limits(allocation, cap, reserved_tokens)
        self._rt.limits = (key, limits)
        return limits

    def _limits(
        self, allocation: Allocation, cap: int | None, reserved_tokens: int
    ) -> WindowLimits:
        prompt = allocation.prompt
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
        store: MessageStore | None = None,
        session_id: str | None = None,
    ) -> Generator[_Command, Any, ContextPlan]:
        rt = self._rt
        summarize = rt.summary is not None
        layout = layout_turn(
            index, state, limits, system_tokens=sum(system_counts), summarize=summarize
        )
        if summarize and rt.background is not None and not rt.background.closed:
            return (
                yield from self._background_turn(
                    layout,
                    index,
                    system,
                    system_counts,
                    state,
                    limits,
                    previous_prompt,
                    store,
                    session_id,
                )
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
                prompt=previous_prompt,
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
                prompt=request.prompt,
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
                prompt=request.prompt,
            )
        except SummaryError as exc:
            return exc

    def _drive(self, turn: Generator[_Command, Any, ContextPlan]) -> ContextPlan:
        background = self._rt.background
        try:
            command = next(turn)
            while True:
                reply: _Outcome | None = None
                if isinstance(command, FoldRequest):
                    reply = self._fold(command)
                elif isinstance(command, _StartJob):
                    assert background is not None
                    background.start_thread(command.job)
                else:
                    background.wait(command.job, command.timeout)  # type: ignore[union-attr]
                command = turn.send(reply)
        except StopIteration as done:
            return cast("ContextPlan", done.value)

    async def _adrive(self, turn: Generator[_Command, Any, ContextPlan]) -> ContextPlan:
        background = self._rt.background
        try:
            command = next(turn)
            while True:
                reply: _Outcome | None = None
                if isinstance(command, FoldRequest):
                    reply = await self._afold(command)
                elif isinstance(command, _StartJob):
                    assert background is not None
                    background.start_task(command.job)
                else:
                    await background.await_job(command.job, command.timeout)  # type: ignore[union-attr]
                command = turn.send(reply)
        except StopIteration as done:
            return cast("ContextPlan", done.value)

    # -- background summaries ------------------------------------------------------------------

    def _background_turn(
        self,
        layout: TurnLayout,
        index: ConversationIndex,
        system: Sequence[BaseMessage],
        system_counts: Sequence[int],
        state: WindowState,
        limits: WindowLimits,
        previous_prompt: Sequence[BaseMessage] | None,
        store: MessageStore | None,
        session_id: str | None,
    ) -> Generator[_Command, Any, ContextPlan]:
        """Plan a turn with summaries written in the background (``background_summary``).

        A ready summary is applied when the prompt passes the high-water mark or the pending
        messages no longer fit; otherwise messages that left stay pending and go out verbatim,
        so no turn waits for the summarizer while the budget allows. A turn waits (at most
        ``summary_wait``) only when pending messages would not be sent.
        """
        rt = self._rt
        background = rt.background
        assert background is not None

        def finish(lay: TurnLayout, new_summary: tuple[str, int, int] | None = None) -> ContextPlan:
            return finish_turn(
                lay,
                index,
                state,
                limits,
                system=system,
                system_counts=system_counts,
                summarize=True,
                new_summary=new_summary,
                shorten=self._shorten,
                previous_prompt=previous_prompt,
                price=rt.price,
                model=rt.model_name,
            )

        premark = math.floor(limits.high_mark * self.precompact)
        plan = finish(layout)
        failure: BaseException | None = None
        if layout.fold_positions:
            if layout.new_start > state.window_start:
                # While every message still fits, keep the window where it is: the prompt is
                # the same, and the state (a store write) does not change every turn.
                frozen = finish(replace(layout, new_start=state.window_start))
                if not _unsent(frozen, index):
                    plan = frozen
            chain = background.chain(index, state.summary, state.summarized_through)
            failure = chain.failure
            if chain.text is not None and (
                plan.tokens.total > limits.high_mark or _unsent(plan, index)
            ):
                plan = self._adopt(layout, chain, state, limits, finish, premark) or plan
            if _unsent(plan, index):
                job = chain.running
                if job is None:
                    after = plan.state
                    job = self._new_job(
                        index,
                        after.summary,
                        after.summarized_through,
                        after.window_start,
                        limits,
                        store,
                        session_id,
                    )
                    if job is not None:
                        yield _StartJob(job)
                if job is not None:
                    yield _WaitJob(job, self._wait_seconds())
                    chain = background.chain(index, state.summary, state.summarized_through)
                    failure = chain.failure or failure
                    if chain.text is not None and chain.through > plan.state.summarized_through:
                        plan = self._adopt(layout, chain, state, limits, finish, premark) or plan
                if _unsent(plan, index):
                    plan = self._pending_unsent(plan, index, failure)
                    failure = None
            if plan.compacted and plan.state == state:
                plan = replace(plan, compacted=False)  # the window start did not move

        after = plan.state
        if plan.tokens.total >= premark and not background.closed:
            chain = background.chain(index, after.summary, after.summarized_through)
            failure = failure or chain.failure
            if chain.empty:
                target = self._preview(index, after, limits, sum(system_counts), plan)
                job = self._new_job(
                    index,
                    after.summary,
                    after.summarized_through,
                    target,
                    limits,
                    store,
                    session_id,
                )
                if job is not None:
                    yield _StartJob(job)
        if failure is not None and not isinstance(failure, SummaryLeaseHeldError):
            warnings.warn(
                f"a background summary failed ({failure}); the previous summary is kept, the "
                "messages it would have absorbed stay pending (sent verbatim while the budget "
                "allows) and it is retried",
                SummaryFailureWarning,
                stacklevel=5,
            )
            plan = replace(plan, summary_failed=True)
        return plan

    def _adopt(
        self,
        layout: TurnLayout,
        chain: SummaryChain,
        state: WindowState,
        limits: WindowLimits,
        finish: _Finish,
        premark: int,
    ) -> ContextPlan | None:
        """Return the plan that applies the chain's ready summary, or ``None`` if it cannot.

        The compaction moves the window start to where the summary ends when that leaves
        nothing pending and the prompt under the pre-compaction mark (or when the summary
        reaches past the layout's start); otherwise the rest stays pending.
        """
        assert chain.text is not None
        through = chain.through
        if through > layout.turn_start or through <= state.summarized_through:
            return None
        summary = self._bounded_summary(chain.text, limits.summary, through)
        if through >= layout.new_start:
            return finish(replace(layout, new_start=through), summary)
        if through >= state.window_start:
            candidate = finish(replace(layout, new_start=through), summary)
            if candidate.tokens.total <= premark:
                return candidate
        return finish(layout, summary)

    def _new_job(
        self,
        index: ConversationIndex,
        previous: str | None,
        start: int,
        target: int,
        limits: WindowLimits,
        store: MessageStore | None,
        session_id: str | None,
    ) -> SummaryJob | None:
        """File a job folding the sendable messages ``[start, target)`` into ``previous``."""
        background = self._rt.background
        assert background is not None
        if target <= start or start < index.offset or target > index.closed_end:
            return None
        skip = set(index.dropped_between(start, target))
        positions = tuple(p for p in range(start, target) if p not in skip)
        if not positions:
            return None
        messages = [index.message(p) for p in positions]
        request = FoldRequest(
            previous=previous,
            messages=messages,
            counts=[index.count(p) for p in positions],
            max_tokens=limits.summary - self._rt.frame_tokens,
            through=target,
        )
        job = SummaryJob(
            key=anchor_key(previous, start, index.message(start)),
            previous=previous,
            start=start,
            through=target,
            positions=positions,
            digest=messages_digest(messages),
            request=request,
            allowance=limits.summary,
            store=store if session_id is not None else None,
            session_id=session_id if store is not None else None,
        )
        return job if background.register(job) else None

    def _preview(
        self,
        index: ConversationIndex,
        state: WindowState,
        limits: WindowLimits,
        system_tokens: int,
        plan: ContextPlan,
    ) -> int:
        """Return where the next compaction will likely move the window start.

        The prompt still grows by about ``high_mark - total`` tokens before the compaction, so
        the low-water target is lowered by that much: the messages summarized now are then
        close to the ones the compaction lets go of.
        """
        gap = max(0, limits.high_mark - plan.tokens.total)
        low = limits.low_water - gap / limits.prompt
        low = min(max(low, 1 / limits.prompt), limits.high_water)
        preview = layout_turn(
            index,
            state,
            replace(limits, low_water=low),
            system_tokens=system_tokens,
            summarize=True,
            force=True,
        )
        return preview.new_start

    def _pending_unsent(
        self, plan: ContextPlan, index: ConversationIndex, failure: BaseException | None
    ) -> ContextPlan:
        """Mark a plan that could not send every pending message (no summary in time)."""
        state = plan.state
        lo = min(index.first_cut_at_or_after(state.summarized_through), plan.turn_start)
        unsent = index.sendable(lo, plan.start)
        why = f"it failed ({failure})" if failure is not None else "it was not ready in time"
        wait = self._wait_seconds()
        waited = "" if wait is None else f" after waiting up to {wait:g} s"
        note = (
            f"{unsent} pending message(s) were not sent this turn: the background summary that "
            f"absorbs them was needed{waited} and {why}; they stay pending and are summarized "
            "on a later turn"
        )
        warnings.warn(note, SummaryFailureWarning, stacklevel=5)
        return replace(plan, summary_failed=True, notes=(*plan.notes, note))

    def _wait_seconds(self) -> float | None:
        return self.summary_wait if self.summary_wait is not None else self.summary_timeout

    # -- plans of stored sessions, remembered across history objects ---------------------------

    def remember_plan(self, store: MessageStore, session_id: str, plan: ContextPlan) -> None:
        """Remember the plan a history of ``store`` just returned for ``session_id``.

        ``RunnableWithMessageHistory`` builds a new history object for every call, so the
        plan sent last turn cannot live in the history; the window keeps it (per store object
        and session, the ``max_conversations`` most recent per store, forgotten with the
        store object) and :meth:`recall_plan` hands it to the next history of the session.
        With it the next plan's cached-token estimate is exact and a cache-aligned summary
        can resend the prompt the provider has cached. ``ManagedChatMessageHistory`` calls
        this; a history of your own may too.

        Args:
            store: The store the session lives in.
            session_id: The session.
            plan: The plan returned (and about to be sent).
        """
        rt = self._rt
        with rt.lock:
            plans = rt.sent_plans.get(store)
            if plans is None:
                plans = rt.sent_plans[store] = OrderedDict()
            plans[session_id] = plan
            plans.move_to_end(session_id)
            while len(plans) > self.max_conversations:
                plans.popitem(last=False)

    def recall_plan(self, store: MessageStore, session_id: str) -> ContextPlan | None:
        """Return the plan remembered for ``session_id`` of ``store``, or ``None``.

        The plan may be stale (another process served the session since, or it was cleared):
        check it with :func:`langchain_holysheep.window.plan_matches` before using it.
        """
        with self._rt.lock:
            plans = self._rt.sent_plans.get(store)
            return None if plans is None else plans.get(session_id)

    def forget_plan(self, store: MessageStore, session_id: str) -> None:
        """Forget the plan remembered for ``session_id`` of ``store`` (the session was cleared)."""
        with self._rt.lock:
            plans = self._rt.sent_plans.get(store)
            if plans is not None:
                plans.pop(session_id, None)

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
        store: MessageStore | None = None,
        session_id: str | None = None,
    ) -> Generator[_Command, Any, ContextPlan]:
        if offset > state.load_from:
            raise ValueError(
                f"tail starts at offset {offset} but the window state needs messages from "
                f"{state.load_from}; pass conversation[state.load_from:]"
            )
        index = self._adopt_index(previous, tail, offset, counts)
        if index is None:
            messages = _to_messages(tail, offset)
            if counts is None:
                counts = self.counter.message_counts(messages)
            index = ConversationIndex(offset, message_cap=self._rt.message_cap)
            index.extend(messages, counts)
            index.owner = self._rt  # its counts are this window's counter's
        system_list = _to_messages(system)
        system_counts = self.counter.message_counts(system_list)
        limits = self.limits(offset + len(tail), reserved_tokens)
        prev = list(previous.messages) if previous is not None else None
        return (
            yield from self._turn(
                index, system_list, system_counts, state, limits, prev, store, session_id
            )
        )

    def _adopt_index(
        self,
        previous: ContextPlan | None,
        tail: Sequence[BaseMessage],
        offset: int,
        counts: Sequence[int] | None,
    ) -> ConversationIndex | None:
        """Extend the previous plan's index with the new messages instead of building one.

        Each call of :meth:`step` gets the window's tail again; rebuilding its index counts
        (a cache lookup each) and indexes every message of the window, every call. The
        previous plan's index already holds the messages it saw, so when they are still the
        start of ``tail`` (the same objects, or the same messages with the same ids and
        counts) only the new ones are converted, counted and indexed.

        Returns None (build afresh) when there is no previous index of this window (another
        window's counts may come from another counter), when it starts
        elsewhere (the window let go of messages: a compaction moved ``state.load_from``, so
        an index is rebuilt about once per compaction and holds no more than the window),
        when it does not match ``tail`` (as a remembered conversation is recognised:
        ``_same_item``), or when another step already took it from this plan
        (a retried or forked call: the index may hold another continuation).
        """
        ledger = previous._ledger if previous is not None else None
        if ledger is None:
            return None
        index = ledger.index
        known = len(index.messages)  # messages of `tail` the index holds already
        if (
            index.owner is not self._rt
            or index.offset != offset
            or index.message_cap != self._rt.message_cap
            or known > len(tail)
        ):
            return None
        pairs = zip(tail, index.messages, strict=False)  # the tail may be longer
        if not all(_same_item(theirs, mine) for theirs, mine in pairs):
            return None
        if counts is not None and list(counts[:known]) != index.counts:
            return None
        with _ADOPTION:
            if ledger.end != index.end or index.claimed == index.end:
                return None  # extended or taken since this plan: not ours to extend
            index.claimed = index.end
        new = _to_messages(tail[known:], offset + known)
        if new:
            index.extend(
                new, counts[known:] if counts is not None else self.counter.message_counts(new)
            )
        return index

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
        store: MessageStore | None = None,
        session_id: str | None = None,
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
            store: With ``session_id`` and ``background_summary``: the shared store the
                conversation lives in. Background summaries of the session then hold the
                store's summarization lease (one worker at a time) and write their result
                back with compare-and-swap when the window already let go of what they fold.
            session_id: The session in ``store``.

        Returns:
            The plan; persist ``plan.state`` (compare-and-swap on ``state.version``) when it
            differs from ``state``.

        Raises:
            ContextOverflowError: The current turn cannot fit the budget.
        """
        return self._drive(
            self._step_turn(
                system, tail, offset, state, counts, reserved_tokens, previous, store, session_id
            )
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
        store: MessageStore | None = None,
        session_id: str | None = None,
    ) -> ContextPlan:
        """Async twin of :meth:`step`: the summarizer is awaited, never blocking the loop."""
        return await self._adrive(
            self._step_turn(
                system, tail, offset, state, counts, reserved_tokens, previous, store, session_id
            )
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
        for position, item in enumerate(raw):
            message = item if isinstance(item, BaseMessage) else _to_messages([item], position)[0]
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
        message = first if isinstance(first, BaseMessage) else _to_messages([first])[0]
        if message.id:
            return f"id:{message.id}"
        return f"hash:{_content_key(message)}"

    def _entry(self, key: str, conversation: Sequence[Any]) -> tuple[_Conversation, int | None]:
        """Return the remembered conversation this one grew from, or a new entry.

        With it comes the entry's sync count when the entry was seen to match (a derived
        key's entry recognised by its samples, or a new one), else None (a named entry is
        checked when it is synced). If another turn syncs the entry in between, the count
        differs and the sync checks again.

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
                if named:
                    bucket.append(bucket.pop(i))  # most recently used last
                    return entry, None
                syncs = entry.syncs  # read first: a sync that ends after this changes it
                if self._grown(entry, conversation):
                    bucket.append(bucket.pop(i))
                    return entry, syncs
            entry = _Conversation(ConversationIndex(0, message_cap=rt.message_cap))
            bucket.append(entry)
            if len(bucket) > _BUCKET:
                bucket.pop(0)
            return entry, entry.syncs

    def _grown(self, entry: _Conversation, conversation: Sequence[Any]) -> bool:
        if len(conversation) < entry.length:
            return False
        samples = entry.samples
        current = _items_at(conversation, [i for i, _ in samples])
        return all(_same_item(now, then) for now, (_, then) in zip(current, samples, strict=True))

    def _sync_entry(
        self,
        entry: _Conversation,
        system: list[BaseMessage],
        conversation: Sequence[Any],
        matched: int | None = None,
    ) -> None:
        """Bring the entry up to date with the conversation, converting only new messages.

        ``matched`` is the entry's sync count when the caller saw it match the conversation;
        if no sync happened since, the match need not be checked again.
        """
        cap = self._rt.message_cap
        grown = matched == entry.syncs or self._grown(entry, conversation)
        try:
            if not grown or entry.index.message_cap != cap:
                entry.index = ConversationIndex(0, message_cap=cap)
                entry.state = WindowState()
                entry.length = 0
                entry.previous_prompt = None
                entry.previous_total = None
            new = _to_messages(conversation[entry.length :], len(system) + entry.length)
            if new:
                if entry.previous_total is not None:
                    # The first new message is the model's answer to the prompt planned last
                    # turn: its reported input tokens calibrate the counter (and so the budget).
                    self.counter.observe_response(entry.previous_total, new[0])
                    entry.previous_total = None
                entry.index.extend(new, self.counter.message_counts(new))
            n = len(conversation)
            entry.length = n
            positions = _sample_positions(n)
            entry.samples = list(zip(positions, _items_at(conversation, positions), strict=True))
            if len(system) != len(entry.system) or not all(
                a is b or same_message(a, b) for a, b in zip(system, entry.system, strict=False)
            ):
                entry.system = list(system)
                entry.system_counts = [self.counter.count_message(m) for m in system]
        finally:
            entry.syncs += 1  # at the end: a match seen during this sync is stale

    def _invoke_turn(
        self,
        entry: _Conversation,
        system: list[BaseMessage],
        conversation: Sequence[Any],
        matched: int | None,
    ) -> Generator[_Command, Any, ContextPlan]:
        self._sync_entry(entry, system, conversation, matched)
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
        entry.previous_total = plan.tokens.total
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
        entry, matched = self._entry(self._key(conversation, config), conversation)
        with entry.lock:
            return self._drive(self._invoke_turn(entry, system, conversation, matched))

    async def aplan(
        self, messages: WindowInput, config: RunnableConfig | None = None
    ) -> ContextPlan:
        """Async twin of :meth:`plan`: the summarizer is awaited, never blocking the loop."""
        system, conversation = self._split(messages)
        entry, matched = self._entry(self._key(conversation, config), conversation)
        # The lock is shared with sync callers, so poll it rather than block the event loop.
        while not entry.lock.acquire(blocking=False):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        try:
            return await self._adrive(self._invoke_turn(entry, system, conversation, matched))
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

    # -- shutdown --------------------------------------------------------------------------------

    @property
    def background(self) -> BackgroundSummaries | None:
        """The background summary jobs (``None`` unless ``background_summary`` and a summarizer)."""
        return self._rt.background

    def close(self, timeout: float | None = None) -> None:
        """Stop background summaries: cancel queued ones and wait for running ones.

        Afterwards the window keeps working with inline summaries. Does nothing without
        ``background_summary``.

        Args:
            timeout: Most seconds to wait for a running summary; ``None`` waits until it ends
                (at most about ``summary_timeout``).
        """
        if self._rt.background is not None:
            self._rt.background.close(timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """Async :meth:`close`: cancels background tasks of this loop and awaits them."""
        if self._rt.background is not None:
            await self._rt.background.aclose(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

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


def _unsent(plan: ContextPlan, index: ConversationIndex) -> bool:
    """Whether the plan leaves out messages that are not in its summary (pending ones)."""
    lo = min(index.first_cut_at_or_after(plan.state.summarized_through), plan.turn_start)
    return plan.start > lo and index.sendable(lo, plan.start) > 0


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
