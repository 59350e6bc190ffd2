"""Fixtures of the reliability suite: the loopback relay, throwaway databases, soak gating.

Tests marked ``soak`` run the full-size load and fault runs; they are skipped unless
``HOLYSHEEP_SOAK=1`` (``make soak``), so ``make test`` only runs the small versions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from langchain_holysheep.testing import HolySheepTestServer
from tests.postgres_server import (
    PostgresServer,
)
from tests.reliability.support import StoreSpec

SOAK_ENV = "HOLYSHEEP_SOAK"


def soak_enabled() -> bool:
    """Whether the full-size soak runs are requested (``HOLYSHEEP_SOAK=1``)."""
    return os.environ.get(SOAK_ENV, "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the soak tests out unless HOLYSHEEP_SOAK=1 (``make soak`` sets it).

    They are deselected rather than skipped: under CI a skipped PostgreSQL test is a failure,
    and these are left out by design, not because PostgreSQL is missing.
    """
    if soak_enabled():
        return
    kept = [item for item in items if item.get_closest_marker("soak") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(
            items=[item for item in items if item.get_closest_marker("soak") is not None]
        )
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> str | None:
    if soak_enabled():
        return None
    return f"soak tests deselected; run them with {SOAK_ENV}=1 (make soak)"


@pytest.fixture
def server() -> Iterator[HolySheepTestServer]:
    """A loopback OpenAI-compatible relay with per-request fault injection."""
    with HolySheepTestServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def reliability_postgres(postgres_server: PostgresServer) -> PostgresServer:
    """The run's throwaway PostgreSQL server (see tests/conftest.py)."""
    return postgres_server


def _params() -> list[object]:
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=[pytest.mark.postgres]),
    ]


@pytest.fixture(params=_params())
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    """How to open a durable store (SQLite file or PostgreSQL), with a fresh namespace."""
    namespace = f"rel-{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        return StoreSpec("sqlite", str(tmp_path / "conversations.db"), namespace)
    pg: PostgresServer = request.getfixturevalue("reliability_postgres")
    return StoreSpec("postgres", pg.url, namespace)
