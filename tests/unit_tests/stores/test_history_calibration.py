"""ManagedChatMessageHistory learns the model's real tokenizer from the provider's reports.

The loopback server stands in for a provider whose tokenizer makes about 25 % more tokens
than cl100k (the package's estimate for DeepSeek, Claude and Gemini): the calibration factor
converges, the window's limits shrink by it so the prompts the server counts stay within the
real budget, and the factor survives a restart through the SQLite store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from langchain_holysheep.history import CALIBRATION_TOLERANCE, ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.stores import InMemoryMessageStore, SQLiteMessageStore, StoreError
from langchain_holysheep.testing import HolySheepTestServer, count_text_tokens

MODEL = "deepseek-v3.2"
RATIO = 1.25  # the stand-in provider's tokens per cl100k token
BUDGET = 3000
TURNS = 20


def real_tokens(text: str) -> int:
    """The stand-in provider's tokenizer: 25 % more tokens than cl100k."""
    return math.ceil(RATIO * count_text_tokens(text))


@pytest.fixture
def server() -> Iterator[HolySheepTestServer]:
    with HolySheepTestServer(count_tokens=real_tokens) as srv:
        yield srv


def _window() -> ContextWindow:
    # high_water=1.0: the window fills right up to its limit before it compacts, the worst
    # case for a prompt limit that the estimate gets wrong.
    return ContextWindow(model=MODEL, max_tokens=BUDGET, high_water=1.0)


def _question(turn: int) -> str:
    return f"turn {turn}: where is parcel {turn}? " + "It was due last week, please check. " * 8


def _real_prompt_limit(window: ContextWindow) -> int:
    """What the provider may count for a prompt: the budget minus the response reserve."""
    allocation = window.budget.allocate(calibration=1.0)
    return allocation.total - allocation.response


def _chat(
    history: ManagedChatMessageHistory, server: HolySheepTestServer, turns: range
) -> tuple[list[int], list[float]]:
    """Run turns the way the CLI does.

    Returns:
        The prompt tokens the server counted, and their ratios to the plans' totals.
    """
    llm = server.chat_model(MODEL, max_retries=0)
    reported: list[int] = []
    ratios: list[float] = []
    for turn in turns:
        history.add_messages([HumanMessage(_question(turn))])
        answer = llm.invoke(history.messages)
        assert answer.usage_metadata is not None
        assert history.last_plan is not None
        reported.append(answer.usage_metadata["input_tokens"])
        ratios.append(reported[-1] / history.last_plan.tokens.total)
        history.add_messages([answer])
    return reported, ratios


def test_uncalibrated_window_overshoots_the_real_budget(server: HolySheepTestServer) -> None:
    """The control: without calibration the cl100k estimate lets real prompts grow too big."""
    window = _window()
    llm = server.chat_model(MODEL, max_retries=0)
    conversation: list[BaseMessage] = []
    reported = []
    for turn in range(TURNS):
        conversation.append(HumanMessage(_question(turn)))
        answer = llm.invoke(window.invoke(conversation))
        assert answer.usage_metadata is not None
        reported.append(answer.usage_metadata["input_tokens"])
        # Without its usage the answer teaches the window nothing (the invoke path would
        # otherwise calibrate from it): this is the uncalibrated control.
        conversation.append(AIMessage(answer.content))
    assert window.counter.calibration == 1.0
    assert max(reported) > _real_prompt_limit(window)


def test_factor_converges_and_prompts_stay_within_the_real_budget(
    server: HolySheepTestServer, tmp_path: Path
) -> None:
    store = SQLiteMessageStore(tmp_path / "c.db")
    window = _window()
    uncalibrated_limit = window.limits().prompt
    history = ManagedChatMessageHistory("s", store, window)
    reported, ratios = _chat(history, server, range(TURNS))

    counter = window.counter
    assert counter.calibration_samples == TURNS
    assert 1.2 < counter.calibration < 1.4
    assert min(ratios) <= counter.calibration <= max(ratios)
    # The limits shrink by the factor, and what the provider counted stayed within the budget.
    assert window.limits().prompt == math.floor(uncalibrated_limit / counter.calibration) or (
        window.limits().prompt == pytest.approx(uncalibrated_limit / counter.calibration, abs=1)
    )
    assert max(reported) <= _real_prompt_limit(window)
    assert len(history.transcript) == 2 * TURNS  # nothing lost
    stored = store.get_session("s").calibration
    assert stored is not None
    assert stored == pytest.approx(counter.calibration, rel=CALIBRATION_TOLERANCE)


def test_factor_survives_a_restart_through_sqlite(
    server: HolySheepTestServer, tmp_path: Path
) -> None:
    path = tmp_path / "c.db"
    first = _window()
    _chat(ManagedChatMessageHistory("s", SQLiteMessageStore(path), first), server, range(12))
    learned = first.counter.calibration
    assert learned > 1.2

    # A new process: a fresh window (factor 1.0) and a fresh store on the same file.
    restarted = _window()
    assert restarted.counter.calibration == 1.0
    before = restarted.limits().prompt
    history = ManagedChatMessageHistory("s", SQLiteMessageStore(path), restarted)
    assert history.messages  # the first read restores the stored factor
    assert restarted.counter.calibration == pytest.approx(learned, rel=CALIBRATION_TOLERANCE)
    assert restarted.limits().prompt < before
    # ... and the first turn after the restart already fits the real budget.
    reported, _ = _chat(history, server, range(12, 24))
    assert max(reported) <= _real_prompt_limit(restarted)


async def test_async_history_calibrates_and_persists(
    server: HolySheepTestServer, tmp_path: Path
) -> None:
    store = SQLiteMessageStore(tmp_path / "c.db")
    window = _window()
    history = ManagedChatMessageHistory("s", store, window)
    llm = server.chat_model(MODEL, max_retries=0)
    for turn in range(4):
        await history.aadd_messages([HumanMessage(_question(turn))])
        answer = await llm.ainvoke(await history.aget_messages())
        await history.aadd_messages([answer])
    assert window.counter.calibration_samples == 4
    record = await store.aget_session("s")
    assert record.calibration == pytest.approx(window.counter.calibration, rel=0.01)
    assert record.message_count == 8


# -- the estimate is like for like -------------------------------------------------------


def _answer(input_tokens: int, **kwargs: Any) -> AIMessage:
    usage = {"input_tokens": input_tokens, "output_tokens": 9, "total_tokens": input_tokens + 9}
    return AIMessage(usage_metadata=usage, response_metadata={"model_name": MODEL}, **kwargs)  # type: ignore[arg-type]


def _seeded(store: InMemoryMessageStore, window: ContextWindow) -> ManagedChatMessageHistory:
    history = ManagedChatMessageHistory("s", store, window, reserved_tokens=25)
    history.add_messages(
        [HumanMessage("Where is order 7? " * 10), AIMessage("It shipped on Monday. " * 10)]
    )
    return history


def test_tool_loop_answers_are_matched_with_their_own_prompt() -> None:
    window = _window()
    history = _seeded(InMemoryMessageStore(), window)
    assert history.messages
    plan = history.last_plan
    assert plan is not None
    counter = window.counter
    first = round(plan.tokens.total * 1.2)
    call = _answer(
        first, content="", tool_calls=[{"name": "lookup", "args": {"id": 7}, "id": "c1"}]
    )
    result = ToolMessage(
        "order 7: delivered to the neighbour, signed by J. Smith", tool_call_id="c1"
    )
    # The second call sent the first prompt plus the tool call and its result.
    second_prompt = plan.tokens.total + counter.count_message(call) + counter.count_message(result)
    history.add_messages(
        [
            HumanMessage("And order 8?"),
            call,
            result,
            _answer(round(second_prompt * 1.2), content="ok"),
        ]
    )
    assert counter.calibration_samples == 2
    assert counter.calibration == pytest.approx(1.2, abs=0.002)


def test_answers_without_a_plan_or_a_report_teach_nothing() -> None:
    window = _window()
    history = _seeded(InMemoryMessageStore(), window)  # no read yet: no plan to compare with
    history.add_messages([HumanMessage("hi"), _answer(5000, content="ok")])
    assert history.messages
    history.add_messages([HumanMessage("hi again"), AIMessage("no usage reported")])
    assert window.counter.calibration_samples == 0
    assert history.store.get_session("s").calibration is None


# -- persistence: per model in memory, latest value in the store -------------------------


class CountingStore(InMemoryMessageStore):
    """Counts calibration writes; can inject a competing writer, refuse or fail updates."""

    def __init__(self) -> None:
        super().__init__()
        self.calibration_writes = 0
        self.before_update: list[Any] = []
        self.refuse = False
        self.fail = False

    def update_session(self, session_id: str, *, expected_version: int, **fields: Any) -> bool:
        if "calibration" in fields:
            self.calibration_writes += 1
            if self.fail:
                raise StoreError("database is locked")
            if self.refuse:
                return False
        if self.before_update:
            self.before_update.pop(0)()
        return super().update_session(session_id, expected_version=expected_version, **fields)


def _turn(history: ManagedChatMessageHistory, ratio: float, text: str = "Any news?") -> None:
    history.add_messages([HumanMessage(text * 5)])
    assert history.messages
    assert history.last_plan is not None
    history.add_messages([_answer(round(history.last_plan.tokens.total * ratio), content="ok")])


def test_a_converged_factor_is_not_rewritten_every_turn() -> None:
    store = CountingStore()
    history = _seeded(store, _window())
    for _ in range(10):
        _turn(history, 1.2)
    assert store.calibration_writes == 1
    assert store.get_session("s").calibration == pytest.approx(1.2, abs=0.01)
    _turn(history, 1.5)  # the factor moves by alpha * 0.3 = 6 %: written
    assert store.calibration_writes == 2


def test_a_competing_writer_is_retried_and_not_overwritten() -> None:
    store = CountingStore()
    history = _seeded(store, _window())
    assert history.messages
    other = ManagedChatMessageHistory("s", store, _window())
    # Another worker writes its summary state between our read and our write.
    store.before_update.append(
        lambda: store.update_session("s", expected_version=0, summary="their summary")
    )
    _turn(history, 1.2)
    record = store.get_session("s")
    assert record.summary == "their summary"  # kept
    assert record.calibration == pytest.approx(1.2, abs=0.01)
    assert store.calibration_writes == 2  # one conflict, one retry
    assert len(other.transcript) == 4


def test_failed_calibration_writes_never_lose_messages(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore()
    history = _seeded(store, _window())
    store.refuse = True
    with caplog.at_level(logging.WARNING, logger="langchain_holysheep.history"):
        _turn(history, 1.2)
    assert store.calibration_writes == history.max_retries + 1
    assert "the token calibration factor 1.19" in caplog.text
    assert "changed under 6 attempts" in caplog.text
    store.refuse, store.fail = False, True
    _turn(history, 1.2)  # a store error is logged, not raised: the answer is stored
    assert "StoreError: database is locked" in caplog.text
    assert len(history.transcript) == 6
    store.fail = False
    _turn(history, 1.2)  # the factor is written with a later answer
    assert store.get_session("s").calibration == pytest.approx(1.2, abs=0.01)


def test_the_factor_is_per_model_and_the_store_keeps_the_latest() -> None:
    store = InMemoryMessageStore()
    store.append("old", [HumanMessage("hi")], [5])
    assert store.update_session("old", expected_version=0, calibration=1.4)
    window = _window()
    live = ManagedChatMessageHistory("live", store, window)
    _seeded(store, window)  # session "s"
    live.add_messages([HumanMessage("Where is order 9? " * 10)])
    _turn(live, 1.1)
    # The window's counter (one model) has learned 1.1; reading another session whose record
    # holds an older factor does not override it.
    assert ManagedChatMessageHistory("old", store, window).messages
    assert window.counter.calibration == pytest.approx(1.1, abs=0.01)
    # A restarted process seeds its counter from the first session it reads.
    fresh = _window()
    assert ManagedChatMessageHistory("old", store, fresh).messages
    assert fresh.counter.calibration == 1.4
