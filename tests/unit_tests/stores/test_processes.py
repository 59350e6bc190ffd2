"""Several OS processes (spawned) sharing one SQLite file or one PostgreSQL database."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.unit_tests.stores.conftest import StoreHarness
from tests.unit_tests.stores.test_contract import _check_total_order
from tests.unit_tests.stores.workers import race_worker

PROCESSES = 4


@pytest.mark.slow
def test_processes_append_in_total_order_and_lose_no_update(
    durable_harness: StoreHarness,
) -> None:
    assert durable_harness.spec is not None
    store = durable_harness.store
    batches, wins = 25, 10
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(
            target=race_worker,
            args=(durable_harness.spec, store.namespace, w, batches, wins, barrier, queue),
        )
        for w in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    tries = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    # Appends: gap-free, duplicate-free, each batch contiguous, each writer's order kept.
    stored = [(m.seq, str(m.message.content)) for m in store.read("shared")]
    _check_total_order(stored, PROCESSES, batches)
    # Compare-and-swap: every applied update built on the one before it; none lost.
    record = store.get_session("shared")
    assert record.message_count == PROCESSES * batches * 2
    assert record.version == PROCESSES * wins
    assert record.summarized_through == record.window_start == PROCESSES * wins
    assert record.summary == f"covers {PROCESSES * wins}"
    assert sum(tries) >= PROCESSES * wins
