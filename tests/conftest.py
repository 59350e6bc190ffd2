"""Shared test set-up: no network but loopback, and no credentials leaking in from the shell."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.postgres_server import (
    REQUIRE_ENV,
    PostgresServer,
    throwaway_postgres,
    unavailable_reason,
)

_SCRUBBED = (
    "HOLYSHEEP_API_KEY",
    "HOLYSHEEP_API_BASE",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_BASE",
    "LANGSMITH_API_KEY",
    "LANGCHAIN_API_KEY",
    "LANGSMITH_TRACING",
    "LANGCHAIN_TRACING_V2",
)


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)


def _postgres_required() -> bool:
    return os.environ.get("HOLYSHEEP_REQUIRE_POSTGRES", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI (HOLYSHEEP_REQUIRE_POSTGRES=1) a skipped PostgreSQL test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _postgres_required() and item.get_closest_marker("postgres"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = (
            f"{item.nodeid} needs PostgreSQL but was skipped ({reason}); "
            "HOLYSHEEP_REQUIRE_POSTGRES=1 forbids that skip"
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run; skip (or fail under CI) if impossible."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but PostgreSQL cannot be started: {reason}")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    with throwaway_postgres() as server:
        yield server
