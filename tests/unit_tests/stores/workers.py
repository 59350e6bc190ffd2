"""The worker run in spawned OS processes by the store concurrency test."""

from __future__ import annotations

from typing import Any


def race_worker(
    spec: tuple[str, str], namespace: str, worker: int, batches: int, wins: int, barrier: Any,
    queue: Any,
) -> None:  # fmt: skip
    """Race the other workers twice on session ``"shared"``.

    First append ``batches`` two-message batches tagged with the worker and batch number; then
    advance the summary state by one, ``wins`` times, through compare-and-swap. Reports the
    number of compare-and-swap attempts on ``queue``.
    """
    from langchain_core.messages import AIMessage, HumanMessage

    from tests.unit_tests.stores.conftest import open_store

    store = open_store(spec, namespace)
    tries = 0
    try:
        store.get_session("shared")  # connect (and set up) before the race starts
        barrier.wait()
        for b in range(batches):
            store.append(
                "shared",
                [HumanMessage(f"w{worker}-b{b}-q"), AIMessage(f"w{worker}-b{b}-a")],
                [1, 2],
            )
        barrier.wait()
        won = 0
        while won < wins:
            record = store.get_session("shared")
            tries += 1
            through = record.summarized_through + 1
            if store.update_session(
                "shared",
                expected_version=record.version,
                summary=f"covers {through}",
                summarized_through=through,
                window_start=through,
            ):
                won += 1
    finally:
        store.close()
        queue.put(tries)
