"""Concurrent conversations through a relay that fails at random, with the caller retrying.

Every kind of relay fault strikes a seeded random share of requests (the summarizer's too).
Each session asks its questions through ``RunnableWithMessageHistory`` over a
``ManagedChatMessageHistory``, half of them streamed, and simply asks again when a turn fails.
Afterwards each transcript must hold every question exactly once, each followed by its whole
answer: no half answer, no duplicate, no gap.
"""

from __future__ import annotations

import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig

from langchain_holysheep.errors import HolySheepError
from langchain_holysheep.testing import Fault, HolySheepTestServer
from tests.reliability.support import (
    StoreSpec,
    make_chain,
    make_model,
    make_window,
    open_store,
    question,
    tag_responder,
    transcript_problems,
)

TIMEOUT = 0.6
FAULTS = [
    Fault.rate_limited(retry_after=0),
    Fault.server_error(500),
    Fault.unavailable(retry_after=0),
    Fault.malformed_body(),
    Fault.disconnect(),
    Fault.stream_cut(after_chunks=3),
    Fault.stream_truncated(after_chunks=3),
    Fault.stream_malformed(after_chunks=3),
    Fault.slow(TIMEOUT + 0.4),
]


class RandomFaults:
    """A seeded fault policy: ``rate`` of the requests get a fault drawn from ``FAULTS``."""

    def __init__(self, rate: float, seed: int = 7) -> None:
        self.rate = rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = 0

    def __call__(self, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            self.injected += 1
            return self._rng.choice(FAULTS)


def _run(spec: StoreSpec, sessions: int, turns: int, rate: float) -> tuple[int, int]:
    policy = RandomFaults(rate)
    failures = 0
    lock = threading.Lock()
    with HolySheepTestServer(responder=tag_responder, fault_policy=policy) as server:
        key = server.api_key or ""
        store = open_store(spec)
        model = make_model(server.base_url, key, max_retries=1, timeout=TIMEOUT)
        window = make_window(make_model(server.base_url, key, max_retries=1, timeout=TIMEOUT))
        chain = make_chain(model, store, window)

        def conversation(i: int) -> None:
            nonlocal failures
            name = f"flaky-{i:03d}"
            config: RunnableConfig = {"configurable": {"session_id": name}}
            for turn in range(turns):
                for attempt in range(20):
                    try:
                        if (turn + attempt) % 2:
                            for _ in chain.stream({"question": question(name, turn)}, config):
                                pass
                        else:
                            chain.invoke({"question": question(name, turn)}, config)
                        break
                    except HolySheepError:
                        with lock:
                            failures += 1
                else:
                    raise AssertionError(f"{name} turn {turn} failed 20 times in a row")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # summary failures warn; they are expected here
            with ThreadPoolExecutor(max_workers=sessions) as pool:
                list(pool.map(conversation, range(sessions)))
        problems = [
            p for i in range(sessions) for p in transcript_problems(store, f"flaky-{i:03d}", turns)
        ]
        store.close()
    assert problems == [], problems[:5]
    return policy.injected, failures


def test_flaky_relay_with_caller_retries_stores_each_turn_once(store_spec: StoreSpec) -> None:
    injected, failures = _run(store_spec, sessions=6, turns=8, rate=0.15)
    assert injected > 0
    assert failures > 0, "no turn ever failed: the run proved nothing about failed turns"


@pytest.mark.soak
def test_soak_flaky_relay(store_spec: StoreSpec) -> None:
    injected, failures = _run(store_spec, sessions=40, turns=50, rate=0.10)
    assert injected > 100
    assert failures > 0
