"""Durable conversations: the MessageStore contract and its in-memory, SQLite and PostgreSQL stores.

``PostgresMessageStore`` is loaded on first use, so importing this package never needs the
``postgres`` extra (psycopg); using it without the extra raises an ImportError naming it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from langchain_holysheep.stores.base import (
    MAX_SESSION_ID_LENGTH,
    CorruptMessageError,
    MessageStore,
    SchemaVersionError,
    SessionRecord,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
)
from langchain_holysheep.stores.memory import InMemoryMessageStore
from langchain_holysheep.stores.sqlite import SQLiteMessageStore, default_db_path

if TYPE_CHECKING:
    from langchain_holysheep.stores.postgres import PostgresMessageStore

__all__ = [
    "MAX_SESSION_ID_LENGTH",
    "CorruptMessageError",
    "InMemoryMessageStore",
    "MessageStore",
    "PostgresMessageStore",
    "SQLiteMessageStore",
    "SchemaVersionError",
    "SessionRecord",
    "StoreError",
    "StoreUnavailableError",
    "StoredMessage",
    "default_db_path",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresMessageStore":
        value = import_module("langchain_holysheep.stores.postgres").PostgresMessageStore
        globals()[name] = value
        return value
    raise AttributeError(f"module 'langchain_holysheep.stores' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
