"""SQLiteMessageStore specifics: default path, WAL, schema versions, busy and broken files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from langchain_holysheep.stores import (
    SchemaVersionError,
    SQLiteMessageStore,
    StoreError,
    StoreUnavailableError,
    default_db_path,
)
from langchain_holysheep.stores.sqlite import SCHEMA_VERSION


def test_default_path_comes_from_env_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOLYSHEEP_DB", str(tmp_path / "env.db"))
    assert default_db_path() == tmp_path / "env.db"
    monkeypatch.delenv("HOLYSHEEP_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "holysheep" / "conversations.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home/.local/share/holysheep/conversations.db"
    assert SQLiteMessageStore().path == default_db_path()


def test_file_is_created_on_first_use_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "c.db"
    store = SQLiteMessageStore(path)
    assert not path.exists()  # nothing happens at construction
    store.append("s", [HumanMessage("hi")], [1])
    assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        versions = conn.execute("SELECT version FROM holysheep_schema_version").fetchall()
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    store.close()


def test_setup_is_idempotent_and_leaves_other_tables_alone(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE app_users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO app_users (name) VALUES ('ada')")
    first = SQLiteMessageStore(path)
    first.setup()
    first.append("s", [HumanMessage("kept")], [1])
    second = SQLiteMessageStore(path)
    second.setup()
    second.setup()
    assert [m.message.content for m in second.read("s")] == ["kept"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM app_users").fetchall() == [("ada",)]
        assert conn.execute("SELECT count(*) FROM holysheep_schema_version").fetchone() == (
            SCHEMA_VERSION,
        )
    first.close()
    second.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SQLiteMessageStore(path).setup()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO holysheep_schema_version (version) VALUES (99)")
    with pytest.raises(SchemaVersionError, match="schema version 99; this langchain-holysheep"):
        SQLiteMessageStore(path).get_session("s")


def test_memory_path_is_refused() -> None:
    with pytest.raises(ValueError, match="InMemoryMessageStore"):
        SQLiteMessageStore(":memory:")


def test_unopenable_path_fails_with_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = SQLiteMessageStore(blocker / "sub" / "c.db")
    with pytest.raises(StoreUnavailableError, match=r"a-file/sub/c\.db"):
        store.append("s", [HumanMessage("x")], [1])


def test_busy_database_fails_with_advice_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = SQLiteMessageStore(path, timeout=0.05)
    store.append("s", [HumanMessage("first")], [1])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StoreError, match=r"within 0\.05 s.*raise timeout= or retry"):
            store.append("s", [HumanMessage("second")], [1])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [m.message.content for m in store.read("s")] == ["first"]
    assert store.append("s", [HumanMessage("third")], [1]) == [1]


def test_closed_store_says_so(tmp_path: Path) -> None:
    with SQLiteMessageStore.from_conn_string(tmp_path / "c.db") as store:
        store.append("s", [HumanMessage("x")], [1])
        sibling = store.with_namespace("other")
    with pytest.raises(StoreError, match="is closed"):
        store.read("s")
    with pytest.raises(StoreError, match="is closed"):
        sibling.read("s")
    assert repr(store) == f"SQLiteMessageStore({str(tmp_path / 'c.db')!r}, namespace='default')"


def _append_in_child(store: SQLiteMessageStore) -> None:
    store.append("s", [HumanMessage("from the child")], [1])


def test_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    import multiprocessing

    store = SQLiteMessageStore(tmp_path / "c.db")
    store.append("s", [HumanMessage("from the parent")], [1])  # the parent's connection is open
    child = multiprocessing.get_context("fork").Process(target=_append_in_child, args=(store,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert store.append("s", [HumanMessage("parent again")], [1]) == [2]
    assert [m.message.content for m in store.read("s")] == [
        "from the parent",
        "from the child",
        "parent again",
    ]
