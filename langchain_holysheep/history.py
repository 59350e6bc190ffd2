"""A durable ``BaseChatMessageHistory`` whose ``messages`` are the managed context of a session.

It keeps every message in a :class:`~langchain_holysheep.stores.MessageStore` and returns, each
turn, what a :class:`~langchain_holysheep.memory.ContextWindow` would send: bounded, valid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage

from langchain_holysheep.stores.base import MessageStore, SessionRecord, StoredMessage, validate_key
from langchain_holysheep.window import ContextPlan, WindowState, plan_matches

if TYPE_CHECKING:
    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.tokens import TokenCounter

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES: Final = 5
CALIBRATION_TOLERANCE: Final = 0.01
"""A learned factor is written to the session record when it differs from the stored one by
more than this (relative): a converged factor costs no writes (each bumps the version)."""


def _state_of(record: SessionRecord) -> WindowState:
    return WindowState(
        summary=record.summary,
        summary_tokens=record.summary_tokens,
        summarized_through=record.summarized_through,
        window_start=record.window_start,
        version=record.version,
    )


class ManagedChatMessageHistory(BaseChatMessageHistory):
    """Chat history in a durable store, read back as a bounded, managed context.

    ``messages`` / ``aget_messages()`` return what the ``window`` would send for the stored
    conversation: the running summary (framed as a recap) and the recent messages, within the
    token budget. They read the session record and only the messages from the window state's
    ``load_from`` onward, with their stored token counts, so a 10,000-message session costs
    the same per turn as a 100-message one. When the window compacts, the new state is
    written with compare-and-swap on the record's version; if another worker got there first
    the history re-reads and re-plans (at most ``max_retries`` times), so concurrent workers
    never overwrite a newer summary.

    ``add_messages`` appends atomically (one transaction) and stores each message's token
    count, counted once with ``window.counter``. ``transcript`` returns every stored message.
    ``clear()`` deletes the session.

    Calibration: when ``add_messages`` receives an ``AIMessage`` whose ``usage_metadata``
    reports ``input_tokens`` (as ``ChatHolySheep``'s answers do), the history compares that
    with what the plan it last returned counted for the prompt (``last_plan.tokens.total``,
    which includes ``reserved_tokens``; for a second answer in the same batch, as in a tool
    loop, plus the messages added after the first answer) and calibrates ``window.counter``
    (see ``TokenCounter.observe_response``), so budgets follow the model's real tokenizer.
    Messages added before the first answer are the new input that ``reserved_tokens`` stands
    for. The factor belongs to the counter, i.e. to the model, and is shared by every session
    whose history uses that window. It is also written to the session record's
    ``calibration`` (compare-and-swap, after the messages are stored, when it moved by more
    than ``CALIBRATION_TOLERANCE``) so that it survives a restart: the first read of a
    session seeds a counter that has not calibrated yet with the stored value.

    Keep the system prompt in the prompt template, not in the history: stored messages are
    the conversation the window manages.

    Note:
        LangChain marks ``BaseChatMessageHistory`` and ``RunnableWithMessageHistory``
        deprecated (removal in 2.0) in favour of LangGraph persistence and agent middleware;
        for agents use :class:`~langchain_holysheep.middleware.ContextWindowMiddleware`.

    Example:
        .. code-block:: python

            from langchain_core.runnables.history import RunnableWithMessageHistory
            from langchain_holysheep import (
                ChatHolySheep, ContextWindow, ManagedChatMessageHistory, SQLiteMessageStore,
            )

            store = SQLiteMessageStore()  # ~/.local/share/holysheep/conversations.db
            window = ContextWindow(model="deepseek-v3.2", max_tokens=6000)
            chain = RunnableWithMessageHistory(
                prompt | ChatHolySheep(model="deepseek-v3.2"),
                lambda session_id: ManagedChatMessageHistory(session_id, store, window),
                input_messages_key="question",
                history_messages_key="history",
            )
    """

    def __init__(
        self,
        session_id: str,
        store: MessageStore | None = None,
        window: ContextWindow | None = None,
        *,
        reserved_tokens: int = 0,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        """Bind a history to one session of a store.

        Args:
            session_id: The session (an opaque string; see the store's limits).
            store: Where messages live; default ``SQLiteMessageStore()`` at its default path.
            window: What to send each turn; ``None`` returns the whole transcript (a plain
                durable history, which then reads every message each turn).
            reserved_tokens: Tokens the caller sends besides these messages (system prompt,
                the new input, tool schemas), passed to the window. Count them with
                ``window.counter``: calibration compares the provider's report with the plan
                total, which includes them (an over-generous allowance is learned as a
                factor below 1, an omitted system prompt as one above 1, so the real prompt
                still lands within the budget).
            max_retries: Re-plans after a compare-and-swap conflict before giving up on
                persisting this turn's state (the prompt is still returned); also the
                retries of writing a new calibration factor.
        """
        self.session_id = validate_key(session_id)
        if store is None:
            from langchain_holysheep.stores.sqlite import SQLiteMessageStore

            store = SQLiteMessageStore()
        self.store = store
        self.window = window
        if reserved_tokens < 0:
            raise ValueError(f"reserved_tokens is {reserved_tokens}; it must be >= 0")
        if max_retries < 0:
            raise ValueError(f"max_retries is {max_retries}; it must be >= 0")
        self.reserved_tokens = reserved_tokens
        self.max_retries = max_retries
        self.last_plan: ContextPlan | None = None
        """The plan behind the last ``messages`` read, for inspection (``print(...)``)."""
        self._counter: TokenCounter | None = None
        self._cache: tuple[int, int, list[BaseMessage]] | None = None
        # Counted tokens of the prompt the last read returned, grown by the messages added
        # after its answer (tool loops), while that read is the newest; None: nothing to match.
        self._prompt_tokens: int | None = None
        self._answered = False
        self._stored_calibration: float | None = None

    def __repr__(self) -> str:
        return f"ManagedChatMessageHistory({self.session_id!r}, store={self.store!r})"

    # -- counting --------------------------------------------------------------------------------

    def _count(self, messages: Sequence[BaseMessage]) -> list[int]:
        for i, message in enumerate(messages):
            if not isinstance(message, BaseMessage):
                raise TypeError(
                    f"message {i} of the batch is a {type(message).__name__}, not a BaseMessage"
                )
        if self.window is not None:
            counter = self.window.counter
        else:
            if self._counter is None:
                from langchain_holysheep.tokens import TokenCounter

                self._counter = TokenCounter()
            counter = self._counter
        return [counter.count_message(m) for m in messages]

    # -- writes ----------------------------------------------------------------------------------

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages in one atomic write, with their token counts.

        Then, if an answer among them reports its prompt's tokens, calibrate the window's
        counter and store the factor (see the class docstring); a failure to store the
        factor is logged, never raised: the messages are already stored.
        """
        messages = list(messages)
        counts = self._count(messages)
        self.store.append(self.session_id, messages, counts)
        if self._observe(messages, counts):
            self._save_calibration()

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Async :meth:`add_messages`."""
        messages = list(messages)
        counts = self._count(messages)
        await self.store.aappend(self.session_id, messages, counts)
        if self._observe(messages, counts):
            await self._asave_calibration()

    def clear(self) -> None:
        """Delete the session: every message and the summary state."""
        self.store.delete_session(self.session_id)
        self._forget()

    async def aclear(self) -> None:
        """Async :meth:`clear`."""
        await self.store.adelete_session(self.session_id)
        self._forget()

    def _forget(self) -> None:
        self.last_plan = None
        if self.window is not None:
            self.window.forget_plan(self.store, self.session_id)
        self._cache = None
        self._prompt_tokens = None
        self._stored_calibration = None

    # -- reads -----------------------------------------------------------------------------------

    @property
    def transcript(self) -> list[BaseMessage]:
        """Every stored message of the session, in order (the full record, never trimmed)."""
        return [m.message for m in self.store.read(self.session_id)]

    async def aget_transcript(self) -> list[BaseMessage]:
        """Async :attr:`transcript`."""
        return [m.message for m in await self.store.aread(self.session_id)]

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The managed context: what the window sends for this session now."""
        for _ in range(self.max_retries + 1):
            record = self.store.get_session(self.session_id)
            self._restore_calibration(record)
            cached = self._cached(record)
            if cached is not None:
                return cached
            if self.window is None:
                return self.transcript
            state = _state_of(record)
            stored = self.store.read(self.session_id, state.load_from)
            if not stored:
                return []
            plan = self.window.step(**self._step_args(state, stored))
            if plan.state == state or self._persist(plan.state, record.version):
                return self._remember(plan, record, stored[-1].seq + 1)
        return self._give_up(plan)

    async def aget_messages(self) -> list[BaseMessage]:
        """Async :attr:`messages`: the summarizer, if it runs, is awaited."""
        for _ in range(self.max_retries + 1):
            record = await self.store.aget_session(self.session_id)
            self._restore_calibration(record)
            cached = self._cached(record)
            if cached is not None:
                return cached
            if self.window is None:
                return await self.aget_transcript()
            state = _state_of(record)
            stored = await self.store.aread(self.session_id, state.load_from)
            if not stored:
                return []
            plan = await self.window.astep(**self._step_args(state, stored))
            if plan.state == state or await self._apersist(plan.state, record.version):
                return self._remember(plan, record, stored[-1].seq + 1)
        return self._give_up(plan)

    # -- helpers ---------------------------------------------------------------------------------

    def _step_args(self, state: WindowState, stored: Sequence[StoredMessage]) -> dict[str, Any]:
        """What ``step`` and ``astep`` are called with, written once for both paths."""
        tail = [m.message for m in stored]
        return {
            "system": [],
            "tail": tail,
            "offset": state.load_from,
            "state": state,
            "counts": [m.tokens for m in stored],
            "reserved_tokens": self.reserved_tokens,
            "previous": self._previous(state, tail),
            "store": self.store,
            "session_id": self.session_id,
        }

    def _previous(self, state: WindowState, tail: Sequence[BaseMessage]) -> ContextPlan | None:
        """The plan sent last turn, if it was made from the conversation stored now.

        This object's own, else the one the window remembers for the session (a history
        built anew every call, as ``RunnableWithMessageHistory`` does). A plan of another
        conversation (the session was cleared and started again) or of another state (another
        process summarized since) is not used: a cache-aligned summary would resend its
        prompt.
        """
        assert self.window is not None
        plan = self.last_plan
        if plan is None:
            plan = self.window.recall_plan(self.store, self.session_id)
        if plan is None or not plan_matches(plan, state, tail, state.load_from):
            return None
        return plan

    def _cached(self, record: SessionRecord) -> list[BaseMessage] | None:
        # Unchanged record and message count since the last plan: the same plan again
        # (RunnableWithMessageHistory reads `messages` twice per turn).
        if self._cache is not None and self._cache[:2] == (record.version, record.message_count):
            if self.last_plan is not None:
                self._sending(self.last_plan)
            return list(self._cache[2])
        return None

    def _sending(self, plan: ContextPlan) -> None:
        """The caller is about to send ``plan``: its answer's report is matched with it."""
        self._prompt_tokens = plan.tokens.total
        self._answered = False

    def _remember(self, plan: ContextPlan, record: SessionRecord, end: int) -> list[BaseMessage]:
        self.last_plan = plan
        if self.window is not None:
            self.window.remember_plan(self.store, self.session_id, plan)
        self._sending(plan)
        version = record.version if plan.state == _state_of(record) else record.version + 1
        self._cache = (version, end, list(plan.messages)) if end == record.message_count else None
        return list(plan.messages)

    def _fields(self, state: WindowState) -> dict[str, object]:
        return {
            "summary": state.summary,
            "summary_tokens": state.summary_tokens,
            "summarized_through": state.summarized_through,
            "window_start": state.window_start,
        }

    def _persist(self, state: WindowState, version: int) -> bool:
        try:
            applied = self.store.update_session(
                self.session_id, expected_version=version, **self._fields(state)
            )
        except ValueError as exc:  # the session was cleared under us: re-read
            logger.debug("session %r changed during planning: %s", self.session_id, exc)
            return False
        if not applied:
            logger.debug(
                "session %r: state version %d moved on; re-planning", self.session_id, version
            )
        return applied

    async def _apersist(self, state: WindowState, version: int) -> bool:
        try:
            applied = await self.store.aupdate_session(
                self.session_id, expected_version=version, **self._fields(state)
            )
        except ValueError as exc:
            logger.debug("session %r changed during planning: %s", self.session_id, exc)
            return False
        if not applied:
            logger.debug(
                "session %r: state version %d moved on; re-planning", self.session_id, version
            )
        return applied

    def _give_up(self, plan: ContextPlan) -> list[BaseMessage]:
        logger.warning(
            "session %r: the window state changed under %d consecutive plans; sending this "
            "turn's plan without persisting it (the next turn will compact again)",
            self.session_id,
            self.max_retries + 1,
        )
        self.last_plan = plan
        self._sending(plan)
        self._cache = None
        return list(plan.messages)

    # -- calibration -----------------------------------------------------------------------------

    def _restore_calibration(self, record: SessionRecord) -> None:
        if record.calibration is None or self.window is None:
            return
        self._stored_calibration = record.calibration
        if self.window.counter.restore_calibration(record.calibration):
            logger.debug(
                "session %r: token calibration %.4f restored from the store",
                self.session_id,
                record.calibration,
            )

    def _observe(self, messages: Sequence[BaseMessage], counts: Sequence[int]) -> bool:
        """Calibrate from the answers among ``messages``; return whether the factor moved."""
        if self.window is None or self._prompt_tokens is None:
            return False
        counter = self.window.counter
        learned = False
        for message, count in zip(messages, counts, strict=True):
            if isinstance(message, AIMessage):
                if counter.observe_response(self._prompt_tokens, message) is not None:
                    learned = True
                self._answered = True
            if self._answered:
                # The next call of a tool loop sends this prompt plus what followed the answer.
                self._prompt_tokens += count
        return learned

    def _calibration_to_save(self, stored: float | None) -> float | None:
        assert self.window is not None
        factor = self.window.counter.calibration
        if stored is not None and abs(factor / stored - 1) <= CALIBRATION_TOLERANCE:
            return None
        return factor

    def _save_calibration(self) -> None:
        if self._calibration_to_save(self._stored_calibration) is None:
            return
        try:
            for _ in range(self.max_retries + 1):
                record = self.store.get_session(self.session_id)
                factor = self._calibration_to_save(record.calibration)
                if factor is None or self.store.update_session(
                    self.session_id, expected_version=record.version, calibration=factor
                ):
                    self._stored_calibration = record.calibration if factor is None else factor
                    return
            self._calibration_not_saved(None)
        except Exception as exc:  # the messages are stored; the factor is only an optimisation
            self._calibration_not_saved(exc)

    async def _asave_calibration(self) -> None:
        if self._calibration_to_save(self._stored_calibration) is None:
            return
        try:
            for _ in range(self.max_retries + 1):
                record = await self.store.aget_session(self.session_id)
                factor = self._calibration_to_save(record.calibration)
                if factor is None or await self.store.aupdate_session(
                    self.session_id, expected_version=record.version, calibration=factor
                ):
                    self._stored_calibration = record.calibration if factor is None else factor
                    return
            self._calibration_not_saved(None)
        except Exception as exc:  # the messages are stored; the factor is only an optimisation
            self._calibration_not_saved(exc)

    def _calibration_not_saved(self, exc: Exception | None) -> None:
        why = (
            f"{type(exc).__name__}: {exc}"
            if exc is not None
            else f"the session record changed under {self.max_retries + 1} attempts"
        )
        logger.warning(
            "session %r: the token calibration factor %.4f was not stored (%s); the messages "
            "are stored, and the factor is kept in memory and stored with a later answer",
            self.session_id,
            self.window.counter.calibration if self.window is not None else float("nan"),
            why,
            exc_info=exc is not None,
        )
