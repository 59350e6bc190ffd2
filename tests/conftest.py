"""Shared test set-up: no network but loopback, and no credentials leaking in from the shell."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    yield
