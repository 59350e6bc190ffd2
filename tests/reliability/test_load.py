"""Many concurrent conversations on one store: nothing lost, duplicated or reordered.

``make test`` runs small sizes (20 sessions x 10 turns); the full sizes (200 x 50, and four
processes sharing one PostgreSQL database) run with ``HOLYSHEEP_SOAK=1`` (``make soak``).
Timing figures are printed by ``benchmarks/soak.py``, never asserted here.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import TypedDict

import pytest

from langchain_holysheep.testing import HolySheepTestServer
from tests.postgres_server import PostgresServer
from tests.reliability.load import (
    LoadReport,
    Relay,
    process_worker,
    run_asyncio,
    run_threads,
    shared_problems,
)
from tests.reliability.support import StoreSpec, open_store, tag_responder


class _Size(TypedDict):
    sessions: int
    turns: int


class _SmallSize(_Size):
    max_tokens: int


SMALL: _SmallSize = {"sessions": 20, "turns": 10, "max_tokens": 700}
FULL: _Size = {"sessions": 200, "turns": 50}


@pytest.fixture
def relay() -> Iterator[Relay]:
    # The summarizer shares the relay; its answers say which turns they cover.
    with HolySheepTestServer(responder=tag_responder, max_logged_requests=100) as srv:
        yield Relay(srv.base_url, srv.api_key or "")


def _assert_clean(report: LoadReport) -> None:
    assert report.errors == [], report.errors[:3]
    assert report.problems == [], report.problems[:5]
    assert len(report.overheads) == report.sessions * report.turns
    assert report.compactions > 0, "the window never compacted: the run exercised too little"


def test_threads_lose_nothing(store_spec: StoreSpec, relay: Relay) -> None:
    _assert_clean(run_threads(store_spec, relay, **SMALL))


async def test_asyncio_loses_nothing(store_spec: StoreSpec, relay: Relay) -> None:
    _assert_clean(await run_asyncio(store_spec, relay, **SMALL))


def _run_processes(
    spec: StoreSpec, relay: Relay, processes: int, sessions: int, turns: int, shared: int
) -> list[LoadReport]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.reliability.load"])
    start, results = ctx.Barrier(processes), ctx.Queue()
    names = [f"shared-{j}" for j in range(shared)]
    procs = [
        ctx.Process(
            target=process_worker,
            args=(spec, relay, p, sessions, turns, names, start, results),
        )
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * processes
    store = open_store(spec)
    try:
        for name in names:
            writers = [f"{name}/p{p}" for p in range(processes)]
            assert shared_problems(store, name, writers, turns) == []
    finally:
        store.close()
    return reports


@pytest.mark.postgres
@pytest.mark.slow
def test_processes_share_one_postgres_database(
    reliability_postgres: PostgresServer, relay: Relay
) -> None:
    spec = StoreSpec("postgres", reliability_postgres.url, "procs-small")
    for report in _run_processes(spec, relay, processes=3, sessions=3, turns=8, shared=2):
        assert report.errors == [], report.errors[:3]
        assert report.problems == [], report.problems[:5]


# -- full sizes (make soak) ------------------------------------------------------------------


@pytest.mark.soak
def test_soak_threads(store_spec: StoreSpec, relay: Relay) -> None:
    _assert_clean(run_threads(store_spec, relay, **FULL))


@pytest.mark.soak
async def test_soak_asyncio(store_spec: StoreSpec, relay: Relay) -> None:
    _assert_clean(await run_asyncio(store_spec, relay, **FULL))


@pytest.mark.soak
@pytest.mark.postgres
def test_soak_processes_share_one_postgres_database(
    reliability_postgres: PostgresServer, relay: Relay
) -> None:
    spec = StoreSpec("postgres", reliability_postgres.url, "procs-soak")
    for report in _run_processes(spec, relay, processes=4, sessions=25, turns=50, shared=4):
        assert report.errors == [], report.errors[:3]
        assert report.problems == [], report.problems[:5]
