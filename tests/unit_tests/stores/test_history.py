"""ManagedChatMessageHistory: the managed context over a store, compare-and-swap, transcript."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.stores import (
    InMemoryMessageStore,
    MessageStore,
    SQLiteMessageStore,
    StoredMessage,
)
from tests.unit_tests.stores.conftest import StoreHarness


class CountingSummarizer(BaseChatModel):
    """Answers every summary request with ``SUMMARY-<n>`` and counts the calls."""

    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "counting-summarizer"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls += 1
        return ChatResult(generations=[ChatGeneration(message=AIMessage(f"SUMMARY-{self.calls}"))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop, **kwargs)


class SpyStore(InMemoryMessageStore):
    """An in-memory store that records reads and can inject a competing writer."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []  # (start, messages returned)
        self.before_update: Any = None
        self.refuse_updates = False

    def read(self, session_id: str, start: int = 0, end: int | None = None) -> list[StoredMessage]:
        out = super().read(session_id, start, end)
        self.reads.append((start, len(out)))
        return out

    def update_session(self, session_id: str, *, expected_version: int, **fields: Any) -> bool:
        if self.refuse_updates:
            return False
        if self.before_update is not None:
            hook, self.before_update = self.before_update, None
            hook()
        return super().update_session(session_id, expected_version=expected_version, **fields)


def _turns(n: int, start: int = 0) -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for i in range(start, start + n):
        out.append(HumanMessage(f"question {i}: please check order {i} and the refund status"))
        out.append(AIMessage(f"answer {i}: order {i} shipped yesterday, refund is pending"))
    return out


def _window(summarizer: BaseChatModel | None = None, max_tokens: int = 1200) -> ContextWindow:
    return ContextWindow(model="deepseek-v3.2", max_tokens=max_tokens, summarizer=summarizer)


def _check_prompt(window: ContextWindow, prompt: Sequence[BaseMessage]) -> None:
    assert find_prompt_problems(prompt) == []
    assert window.counter.count_messages(prompt) <= window.limits().prompt


def test_empty_session_has_no_messages(tmp_path: Path) -> None:
    history = ManagedChatMessageHistory("s", SQLiteMessageStore(tmp_path / "c.db"), _window())
    assert history.messages == []
    assert history.transcript == []


def test_messages_are_the_bounded_managed_context(tmp_path: Path) -> None:
    store = SQLiteMessageStore(tmp_path / "c.db")
    window = _window()
    history = ManagedChatMessageHistory("s", store, window)
    for turn in range(60):
        history.add_messages(_turns(1, turn))
        prompt = history.messages
        _check_prompt(window, prompt)
        assert (
            prompt[-1].content
            == f"answer {turn}: order {turn} shipped yesterday, refund is pending"
        )
    assert len(history.transcript) == 120  # nothing deleted
    assert len(history.messages) < 120
    stored = store.read("s")
    assert [m.tokens for m in stored] == [window.counter.count_message(m.message) for m in stored]
    record = store.get_session("s")
    assert record.window_start > 0
    assert record.version >= 1


def test_reading_a_long_session_loads_only_the_window() -> None:
    store = SpyStore()
    window = _window(max_tokens=2000)
    history = ManagedChatMessageHistory("long", store, window)
    messages = _turns(5_000)
    store.append("long", messages, [20] * len(messages))  # 10,000 stored messages
    first = history.messages  # the first read ever compacts from the whole transcript
    _check_prompt(window, first)
    record = store.get_session("long")
    assert record.summarized_through > 9_000
    store.reads.clear()
    history.add_messages(_turns(1, 5_000))
    fresh = ManagedChatMessageHistory("long", store, window)  # no cached plan
    prompt = fresh.messages
    _check_prompt(window, prompt)
    last = prompt[-1].content
    assert isinstance(last, str)
    assert last.startswith("answer 5000")
    assert len(store.reads) == 1
    start, returned = store.reads[0]
    assert start == record.summarized_through
    assert returned < 200, f"read {returned} messages to plan one turn"


def test_summary_is_persisted_and_not_recomputed(tmp_path: Path) -> None:
    store = SQLiteMessageStore(tmp_path / "c.db")
    summarizer = CountingSummarizer()
    window = _window(summarizer)
    history = ManagedChatMessageHistory("s", store, window)
    for turn in range(40):
        history.add_messages(_turns(1, turn))
        _check_prompt(window, history.messages)
    assert summarizer.calls >= 1
    record = store.get_session("s")
    assert record.summary == f"SUMMARY-{summarizer.calls}"
    assert 0 < record.summarized_through <= record.window_start
    calls = summarizer.calls
    other_worker = ManagedChatMessageHistory("s", store, window)
    prompt = other_worker.messages
    assert summarizer.calls == calls  # the stored summary was used, not recomputed
    assert any(f"SUMMARY-{calls}" in str(m.content) for m in prompt)
    assert not any(isinstance(m, SystemMessage) and "SUMMARY" in str(m.content) for m in prompt)


def test_conflicting_writer_is_not_overwritten() -> None:
    store = SpyStore()
    window = _window()
    history = ManagedChatMessageHistory("s", store, window)
    store.append("s", _turns(40), [40] * 80)

    def competing_worker() -> None:
        # Another process compacts first, to a different window start.
        assert store.update_session("s", expected_version=0, summarized_through=70, window_start=70)

    store.before_update = competing_worker
    prompt = history.messages
    record = store.get_session("s")
    assert record.version >= 1
    assert record.window_start >= 70  # the newer state survived: never moved back
    _check_prompt(window, prompt)
    assert [m.content for m in prompt] == [
        m.message.content for m in store.read("s", record.window_start)
    ]


def test_persistent_conflicts_still_return_a_prompt(caplog: pytest.LogCaptureFixture) -> None:
    store = SpyStore()
    window = _window()
    history = ManagedChatMessageHistory("s", store, window, max_retries=2)
    store.append("s", _turns(40), [40] * 80)
    store.refuse_updates = True
    with caplog.at_level(logging.WARNING, logger="langchain_holysheep.history"):
        prompt = history.messages
    _check_prompt(window, prompt)
    assert "3 consecutive plans" in caplog.text
    assert store.get_session("s").version == 0


def test_add_messages_is_atomic_and_clear_removes_the_session(tmp_path: Path) -> None:
    store = SQLiteMessageStore(tmp_path / "c.db")
    history = ManagedChatMessageHistory("s", store, _window())
    history.add_messages(_turns(2))
    with pytest.raises(TypeError, match="message 1 of the batch is a str"):
        history.add_messages([HumanMessage("fine"), "not a message"])  # type: ignore[list-item]
    assert len(history.transcript) == 4
    history.clear()
    assert history.transcript == []
    assert history.messages == []
    assert store.list_sessions() == []


def test_without_a_window_messages_are_the_transcript() -> None:
    history = ManagedChatMessageHistory("s", InMemoryMessageStore())
    history.add_messages(_turns(3))
    assert history.messages == history.transcript == _turns(3)
    assert next(m.tokens for m in history.store.read("s")) > 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="257 characters"):
        ManagedChatMessageHistory("x" * 257, InMemoryMessageStore())
    with pytest.raises(ValueError, match="reserved_tokens is -1"):
        ManagedChatMessageHistory("s", InMemoryMessageStore(), reserved_tokens=-1)


def test_default_store_is_sqlite_at_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOLYSHEEP_DB", str(tmp_path / "default.db"))
    history = ManagedChatMessageHistory("s")
    assert isinstance(history.store, SQLiteMessageStore)
    history.add_messages(_turns(1))
    assert (tmp_path / "default.db").exists()
    history.store.close()


def test_concurrent_workers_on_one_session_lose_nothing(harness: StoreHarness) -> None:
    store = harness.store
    summarizer = CountingSummarizer()
    window = _window(summarizer)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        history = ManagedChatMessageHistory("shared", store, window)
        barrier.wait()
        try:
            for turn in range(10):
                history.add_messages(
                    [
                        HumanMessage(f"w{w} question {turn} " + "padding " * 20),
                        AIMessage(f"w{w} answer {turn}"),
                    ]
                )
                _check_prompt(window, history.messages)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    transcript = [str(m.content) for m in ManagedChatMessageHistory("shared", store).transcript]
    assert len(transcript) == 80
    assert sorted(
        t.split(" ")[0] + t.split(" ")[2] for t in transcript if "question" in t
    ) == sorted(f"w{w}{turn}" for w in range(4) for turn in range(10))
    record = store.get_session("shared")
    assert 0 <= record.summarized_through <= record.window_start <= record.message_count == 80
    assert record.summary is not None


async def test_async_history_on_every_store(harness: StoreHarness) -> None:
    store: MessageStore = harness.store
    summarizer = CountingSummarizer()
    window = _window(summarizer)
    history = ManagedChatMessageHistory("s", store, window)
    for turn in range(30):
        await history.aadd_messages(_turns(1, turn))
        prompt = await history.aget_messages()
        _check_prompt(window, prompt)
        assert prompt == history.messages  # sync and async agree
    assert len(await history.aget_transcript()) == 60
    record = await store.aget_session("s")
    assert record.summary is not None
    assert record.summary.startswith("SUMMARY-")
    await history.aclear()
    assert await history.aget_messages() == []
