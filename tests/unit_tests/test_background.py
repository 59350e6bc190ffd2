"""Background summaries: no waiting while the budget allows, nothing lost, clean shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from langchain_holysheep import ContextPlan, ContextWindow
from langchain_holysheep.background import BackgroundSummaries
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.summarize import SummaryFailureWarning
from langchain_holysheep.window import WindowState, is_recap, recap_message
from langchain_holysheep.workload import synthetic_conversation
from tests.unit_tests.test_background_support import (
    FailingSummarizer,
    GatedSummarizer,
    background_threads,
    make_window,
)

TURNS = 80


@pytest.fixture
def conv() -> Any:
    return synthetic_conversation(TURNS, seed=1)


@pytest.fixture
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SummaryFailureWarning)
        yield


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every wait a sync turn makes for a background summary (then really wait)."""
    seen: list[int] = []
    real = BackgroundSummaries.wait

    def wait(self: BackgroundSummaries, job: Any, timeout: float | None) -> bool:
        seen.append(job.through)
        return real(self, job, timeout)

    monkeypatch.setattr(BackgroundSummaries, "wait", wait)
    return seen


def check(plan: ContextPlan, history: list[BaseMessage]) -> None:
    """The invariants of every plan, background or not."""
    assert find_prompt_problems(plan.messages) == []
    assert plan.tokens.total <= plan.tokens.prompt_limit
    assert isinstance(plan.messages[0], SystemMessage)
    newest = max(i for i, m in enumerate(history) if isinstance(m, HumanMessage))
    assert plan.messages[-(len(history) - newest) :] == history[newest:]
    # Nothing is lost: every message is sent, summarized or pending.
    assert not plan.dropped_ids, plan.dropped_reasons


def ids(messages: list[BaseMessage]) -> list[str | None]:
    return [m.id for m in messages]


def test_no_turn_waits_while_the_budget_allows(conv: Any, waits: list[int], quiet: None) -> None:
    # The background summarizer never finishes; the prompts must then be exactly those of an
    # inline window whose summarizer always fails (pending messages sent verbatim), and a turn
    # may wait only where that window could not send every pending message.
    gated = GatedSummarizer()
    # A budget with room for a few turns between the high-water mark and the prompt limit.
    window = make_window(gated, summary_wait=0, max_tokens=8000)
    reference = make_window(FailingSummarizer(), background_summary=False, max_tokens=8000)
    compacted_without_wait = 0
    forced = 0
    try:
        for cp in conv.call_points:
            history = conv.messages[:cp]
            before = len(waits)
            plan = window.plan(history)
            expected = reference.plan(history)
            check(plan, history)
            assert ids(plan.messages) == ids(expected.messages)
            assert plan.state.summarized_through == expected.state.summarized_through == 0
            budget_forced = bool(expected.pending_ids)  # pending messages that did not fit
            assert (len(waits) > before) == budget_forced
            forced += budget_forced
            if expected.compacted and not budget_forced:  # a compaction was due
                compacted_without_wait += 1
        assert compacted_without_wait > 0, "no compaction happened before the budget ran out"
        assert forced > 0, "the budget never forced a wait: the test proves nothing"
        assert window.background is not None
        assert window.background.started > 0
    finally:
        gated.gate.set()
        window.close()


def test_a_summary_ready_before_the_compaction_is_used(conv: Any, waits: list[int]) -> None:
    gated = GatedSummarizer()
    gated.gate.set()
    window = make_window(gated)
    assert window.background is not None
    previous: ContextPlan | None = None
    started_at = compacted_at = None
    for turn, cp in enumerate(conv.call_points):
        history = conv.messages[:cp]
        plan = window.plan(history)
        check(plan, history)
        if started_at is None and window.background.started:
            started_at = turn
            assert not plan.compacted
            assert plan.state.summary is None
        window.background.drain()
        if plan.compacted:
            compacted_at = turn
            break
        if previous is not None:  # append-only between compactions: the prefix repeats
            assert ids(plan.messages[: len(previous.messages)]) == ids(previous.messages)
        previous = plan
    assert started_at is not None
    assert compacted_at is not None
    assert started_at < compacted_at
    assert waits == []
    assert gated.calls == 1
    assert plan.state.summary is not None
    assert plan.state.summary.startswith("Recap 1:")
    assert any(is_recap(m) for m in plan.messages)
    # The summary covers exactly what the summarizer read, and nothing before it is lost.
    summarized = set(plan.summarized_ids)
    assert summarized == {m.id for m in conv.messages[1 : plan.state.summarized_through + 1]}
    for m in conv.messages[1 : plan.state.summarized_through + 1]:
        if m.type == "human":
            assert str(m.content)[:40] in gated.transcripts[0]
    window.close()


def test_a_failing_background_summary_loses_nothing_and_is_retried(
    conv: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gated = GatedSummarizer(fail_calls=1)
    gated.gate.set()
    window = make_window(gated)
    assert window.background is not None
    failed_turns: list[int] = []
    plan = None
    with (
        caplog.at_level(logging.WARNING, logger="langchain_holysheep.background"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        for turn, cp in enumerate(conv.call_points):
            history = conv.messages[:cp]
            plan = window.plan(history)
            check(plan, history)
            if plan.summary_failed:
                failed_turns.append(turn)
            window.background.drain()
    assert plan is not None
    assert failed_turns, "the failure was never reported on a plan"
    assert any(issubclass(w.category, SummaryFailureWarning) for w in caught)
    assert "background summary of messages" in caplog.text
    assert gated.calls >= 3  # the failed call, its retry, and later compactions
    assert plan.state.summary is not None
    assert not plan.state.summary.startswith("Recap 1:")
    # Every message is sent, summarized or pending, and none was summarized twice.
    partition = set(plan.kept_ids) | set(plan.summarized_ids) | set(plan.pending_ids)
    assert partition == {m.id for m in conv.messages[1 : conv.call_points[-1]]}
    for m in conv.messages[1 : plan.state.summarized_through]:
        if m.type == "human":
            hits = [t for t in gated.transcripts if str(m.content)[:60] in t]
            assert len(hits) == 1, f"message {m.id} summarized {len(hits)} times"
    window.close()


def test_close_cancels_queued_summaries_and_leaves_no_thread(conv: Any, quiet: None) -> None:
    gated = GatedSummarizer()
    window = make_window(gated, background_workers=1, summary_wait=0)
    background = window.background
    assert background is not None
    # Two conversations past the pre-compaction mark: one job runs, the other queues.
    a, b = {"configurable": {"thread_id": "a"}}, {"configurable": {"thread_id": "b"}}
    for cp in conv.call_points:
        window.plan(conv.messages[:cp], a)  # type: ignore[arg-type]
        if background.started:
            break
    assert gated.started.wait(5)
    other = synthetic_conversation(TURNS, seed=2)
    for cp in other.call_points:
        window.plan(other.messages[:cp], b)  # type: ignore[arg-type]
        if background.started == 2:
            break
    assert background.started == 2
    jobs = list(background._jobs.values())
    queued = [j for j in jobs if not j.future.running() and not j.future.done()]
    assert len(queued) == 1
    background.close(timeout=0)  # stop taking jobs; the queued one is cancelled
    assert concurrent.futures.wait([queued[0].future], 5).done
    assert queued[0].future.cancelled()
    gated.gate.set()
    window.close()  # the running one finishes
    assert background_threads() == []
    assert background.active == 0
    # A closed window keeps working, with inline summaries.
    calls = gated.calls
    for cp in conv.call_points:
        check(window.plan(conv.messages[:cp], a), conv.messages[:cp])  # type: ignore[arg-type]
    assert gated.calls > calls
    assert background_threads() == []


def test_context_manager_closes(conv: Any) -> None:
    gated = GatedSummarizer()
    gated.gate.set()
    with make_window(gated) as window:
        for cp in conv.call_points[:40]:
            window.plan(conv.messages[:cp])
        background = window.background
        assert background is not None
        assert background.started
    assert background.closed
    assert background.active == 0
    assert background_threads() == []


def test_a_stale_background_result_is_discarded(conv: Any, quiet: None) -> None:
    gated = GatedSummarizer()
    window = make_window(gated)
    background = window.background
    assert background is not None
    system, tail = conv.messages[:1], conv.messages[1:]
    state = WindowState()
    cp = 0
    for cp in conv.call_points:
        plan = window.step(system, tail[: cp - 1], offset=0, state=state)
        state = plan.state
        if background.started:
            break
    assert background.started == 1
    # Meanwhile another worker compacted the conversation with a newer summary.
    newer_through = next(
        i for i, m in enumerate(tail) if i > 0 and m.type == "human" and i < cp - 1
    )
    text = "newer summary from another worker"
    state = WindowState(
        summary=text,
        summary_tokens=window.counter.count_message(recap_message(text, newer_through)),
        summarized_through=newer_through,
        window_start=newer_through,
    )
    (job,) = background._jobs.values()
    gated.gate.set()
    assert background.drain(5)
    stale, _ = job.future.result()  # the stale job did finish...
    summaries = set()
    for later in [c for c in conv.call_points if c >= cp]:
        plan = window.step(system, tail[: later - 1], offset=0, state=state)
        check(plan, conv.messages[:later])
        state = plan.state
        summaries.add(state.summary)
        background.drain(5)
    # ...but its result never replaced the newer summary; later ones extend the newer one.
    assert stale not in summaries
    assert gated.calls > 1
    assert all(text in t for t in gated.transcripts[1:2])
    window.close()


async def test_async_turns_run_summaries_as_tasks_and_aclose_cancels_them(conv: Any) -> None:
    gated = GatedSummarizer()
    window = make_window(gated)
    background = window.background
    assert background is not None
    for cp in conv.call_points:
        await window.aplan(conv.messages[:cp])  # returns while the summary is blocked
        if background.started:
            break
    assert background.started == 1
    for _ in range(1000):  # let the task reach the summarizer
        if gated.started.is_set():
            break
        await asyncio.sleep(0)
    assert gated.async_calls == 1
    assert background.active == 1
    await window.aclose()
    assert background.active == 0
    assert not [t for t in asyncio.all_tasks() if "holysheep" in t.get_name()]
    assert gated.calls == 0  # cancelled before it answered


async def test_async_summary_is_used_when_ready(conv: Any) -> None:
    gated = GatedSummarizer()
    gated.gate.set()
    async with make_window(gated) as window:
        background = window.background
        assert background is not None
        plan = None
        for cp in conv.call_points:
            history = conv.messages[:cp]
            plan = await window.aplan(history)
            check(plan, history)
            await asyncio.to_thread(background.drain, 5)
        assert plan is not None
        assert plan.state.summary is not None
        assert gated.async_calls == gated.calls > 0
    assert background.active == 0


def test_inline_mode_is_the_default() -> None:
    window = ContextWindow(model="deepseek-v3.2", max_tokens=3000, summarizer=GatedSummarizer())
    assert window.background is None
    window.close()  # a no-op without background work


@pytest.mark.parametrize(
    ("field", "value"), [("precompact", 0.0), ("precompact", 1.5), ("summary_wait", -1.0)]
)
def test_bad_background_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        make_window(GatedSummarizer(), **{field: value})


@pytest.mark.parametrize(("max_tokens", "seed"), [(3000, 1), (6000, 2), (8000, 3)])
def test_invariants_hold_whatever_the_timing(max_tokens: int, seed: int, quiet: None) -> None:
    # Summaries finish at arbitrary points (a seeded choice of turns waits for them, the rest
    # race the next turn) and the first one fails: every prompt is still valid and within the
    # limit, every message is sent, summarized or pending, and none is summarized twice.
    rng = random.Random(seed)
    conversation = synthetic_conversation(TURNS, seed=seed)
    gated = GatedSummarizer(fail_calls=1)
    gated.gate.set()
    window = make_window(gated, max_tokens=max_tokens)
    background = window.background
    assert background is not None
    plan = None
    for cp in conversation.call_points:
        history = conversation.messages[:cp]
        plan = window.plan(history)
        check(plan, history)
        partition = set(plan.kept_ids) | set(plan.summarized_ids) | set(plan.pending_ids)
        assert partition == {m.id for m in history[1:]}
        if rng.random() < 0.5:
            background.drain(5)
    window.close()
    assert plan is not None
    assert plan.state.summary is not None
    for m in conversation.messages[1 : plan.state.summarized_through]:
        if m.type == "human":
            hits = [t for t in gated.transcripts if str(m.content)[:60] in t]
            assert len(hits) == 1, f"message {m.id} summarized {len(hits)} times"


EXIT_SCRIPT = """
import atexit, logging, sys
from langchain_holysheep import background
from langchain_holysheep.workload import synthetic_conversation
from tests.unit_tests.test_background_support import GatedSummarizer, make_window

background.EXIT_GRACE = 0.2
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
jobs = []


def report():  # registered first, so it runs after the window's exit hook
    print("states", sorted(j.future._state for j in jobs), flush=True)


atexit.register(report)
gated = GatedSummarizer()  # never released: its job is still running at exit
window = make_window(gated, background_workers=1, summary_wait=0)
for n in (1, 2):  # the second conversation's job queues behind the first
    conv = synthetic_conversation(80, seed=n)
    for cp in conv.call_points:
        window.plan(conv.messages[:cp], {"configurable": {"thread_id": str(n)}})
        if window.background.started == n:
            break
assert gated.started.wait(5)
jobs.extend(window.background._jobs.values())
print("jobs", len(jobs), flush=True)
"""


def test_interpreter_exit_winds_background_threads_down(tmp_path: Any) -> None:
    # The summarizer blocks for 30 s; the interpreter must still exit (after the short grace),
    # cleanly, without waiting for it and without a traceback.
    script = tmp_path / "exit_with_running_summary.py"
    script.write_text(EXIT_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "jobs 2" in done.stdout
    # At exit the queued job was cancelled; the running one was left to the daemon thread.
    assert "states ['CANCELLED_AND_NOTIFIED', 'RUNNING']" in done.stdout
    assert "Traceback" not in done.stderr
