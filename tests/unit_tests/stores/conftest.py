"""Fixtures of the store tests: a throwaway PostgreSQL server and one harness per store kind."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from langchain_holysheep.stores import InMemoryMessageStore, MessageStore, SQLiteMessageStore
from tests.postgres_server import (
    PostgresServer,
)

STORE_KINDS = ("memory", "sqlite", "postgres")


@dataclass
class StoreHarness:
    """A store under test plus what the contract tests need to poke at it from outside.

    Attributes:
        kind: ``"memory"``, ``"sqlite"`` or ``"postgres"``.
        store: The store, bound to a namespace no other test uses.
        spec: How another process opens the same database (``None``: in-process only).
        corrupt: Overwrites the raw stored text of one message, bypassing the store.
    """

    kind: str
    store: MessageStore
    spec: tuple[str, str] | None
    corrupt: Callable[[str, int, str], None]


def open_store(spec: tuple[str, str], namespace: str) -> MessageStore:
    """Open the store described by a harness ``spec`` (used in worker processes)."""
    kind, target = spec
    if kind == "sqlite":
        return SQLiteMessageStore(target, namespace=namespace)
    from langchain_holysheep.stores import PostgresMessageStore

    return PostgresMessageStore(target, namespace=namespace)


def _memory_harness() -> StoreHarness:
    store = InMemoryMessageStore(namespace=f"ns-{uuid.uuid4().hex[:8]}")

    def corrupt(session_id: str, seq: int, raw: str) -> None:
        session = store._backend.sessions[(store.namespace, session_id)]
        session.messages[seq] = (raw, session.messages[seq][1])

    return StoreHarness("memory", store, None, corrupt)


def _sqlite_harness(path: Path) -> StoreHarness:
    store = SQLiteMessageStore(path, namespace=f"ns-{uuid.uuid4().hex[:8]}")

    def corrupt(session_id: str, seq: int, raw: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(
                "UPDATE holysheep_messages SET message = ? "
                "WHERE namespace = ? AND session_id = ? AND seq = ?",
                (raw, store.namespace, session_id, seq),
            )

    return StoreHarness("sqlite", store, ("sqlite", str(path)), corrupt)


def _postgres_harness(server: PostgresServer) -> StoreHarness:
    import psycopg

    from langchain_holysheep.stores import PostgresMessageStore

    store = PostgresMessageStore(server.url, namespace=f"ns-{uuid.uuid4().hex[:8]}")

    def corrupt(session_id: str, seq: int, raw: str) -> None:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(
                "UPDATE holysheep_messages SET message = %s "
                "WHERE namespace = %s AND session_id = %s AND seq = %s",
                (raw, store.namespace, session_id, seq),
            )

    return StoreHarness("postgres", store, ("postgres", server.url), corrupt)


def make_harness(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> StoreHarness:
    if kind == "memory":
        return _memory_harness()
    if kind == "sqlite":
        return _sqlite_harness(tmp_path / "conversations.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return _postgres_harness(server)


def _params(kinds: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(kind, marks=[pytest.mark.postgres] if kind == "postgres" else [], id=kind)
        for kind in kinds
    ]


@pytest.fixture(params=_params(STORE_KINDS))
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreHarness]:
    """Every store kind, each with a fresh namespace (and a fresh file for SQLite)."""
    h = make_harness(request, request.param, tmp_path)
    try:
        yield h
    finally:
        await h.store.aclose()


@pytest.fixture(params=_params(("sqlite", "postgres")))
async def durable_harness(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreHarness]:
    """The stores several OS processes can share."""
    h = make_harness(request, request.param, tmp_path)
    try:
        yield h
    finally:
        await h.store.aclose()
