"""The public names, and what importing the package pulls in (nothing optional)."""

from __future__ import annotations

import json
import subprocess
import sys

import langchain_holysheep

EXPECTED_ALL = [
    "ChatHolySheep",
    "ContextBudget",
    "ContextPlan",
    "ContextWindow",
    "InMemoryMessageStore",
    "ManagedChatMessageHistory",
    "PostgresMessageStore",
    "SQLiteMessageStore",
    "SpendLimitExceeded",
    "TokenCounter",
    "__version__",
    "get_usage_callback",
]


def test_all_is_the_documented_public_api() -> None:
    assert langchain_holysheep.__all__ == EXPECTED_ALL


def test_chat_model_and_testing_exports() -> None:
    from langchain_holysheep import ChatHolySheep, chat_models, errors, testing

    assert chat_models.__all__ == ["DEFAULT_API_BASE", "PROVIDER", "ChatHolySheep"]
    assert ChatHolySheep is chat_models.ChatHolySheep
    assert sorted(testing.__all__) == sorted(
        [
            "DEFAULT_TEST_API_KEY",
            "Fault",
            "HolySheepTestServer",
            "RecordedRequest",
            "Reply",
            "ToolCallReply",
            "count_text_tokens",
            "default_reply",
        ]
    )
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.HolySheepError)


def _modules_after(code: str) -> set[str]:
    """The modules loaded by a fresh interpreter after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def _optional(modules: set[str]) -> set[str]:
    return {
        m
        for m in modules
        if m.split(".")[0] in {"psycopg", "psycopg_pool", "langgraph", "rich", "matplotlib"}
        or m == "langchain.agents"
        or m.startswith("langchain.agents.")
    }


def test_importing_the_package_loads_no_optional_extra() -> None:
    modules = _modules_after("import langchain_holysheep")
    assert _optional(modules) == set()
    assert "langchain_holysheep.chat_models" not in modules  # exports are lazy


def test_using_the_chat_model_and_test_server_loads_no_optional_extra() -> None:
    modules = _modules_after(
        "from langchain_holysheep import ChatHolySheep\n"
        "from langchain_holysheep.testing import HolySheepTestServer\n"
        "ChatHolySheep(model='deepseek-v3.2', api_key='k')"
    )
    assert "langchain_holysheep.chat_models" in modules
    assert _optional(modules) == set()
