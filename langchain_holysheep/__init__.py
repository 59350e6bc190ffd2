"""LangChain integration for the HolySheep relay: chat model, bounded-cost memory, storage.

Every public name is loaded on first use, so importing the package never needs an optional
extra (PostgreSQL, agents, CLI) and stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_holysheep.budget import ContextBudget
    from langchain_holysheep.callbacks import SpendLimitExceeded, get_usage_callback
    from langchain_holysheep.chat_models import ChatHolySheep
    from langchain_holysheep.history import ManagedChatMessageHistory
    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.stores import (
        InMemoryMessageStore,
        PostgresMessageStore,
        SQLiteMessageStore,
    )
    from langchain_holysheep.tokens import TokenCounter
    from langchain_holysheep.window import ContextPlan

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ChatHolySheep": "langchain_holysheep.chat_models",
    "TokenCounter": "langchain_holysheep.tokens",
    "ContextBudget": "langchain_holysheep.budget",
    "ContextWindow": "langchain_holysheep.memory",
    "ContextPlan": "langchain_holysheep.window",
    "ManagedChatMessageHistory": "langchain_holysheep.history",
    "InMemoryMessageStore": "langchain_holysheep.stores",
    "SQLiteMessageStore": "langchain_holysheep.stores",
    "PostgresMessageStore": "langchain_holysheep.stores",
    "get_usage_callback": "langchain_holysheep.callbacks",
    "SpendLimitExceeded": "langchain_holysheep.callbacks",
}

__all__ = [
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'langchain_holysheep' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
