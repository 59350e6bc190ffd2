"""A durable store stays readable while another process is in the middle of a write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from langchain_core.messages import HumanMessage

from langchain_holysheep.stores import SQLiteMessageStore


def test_new_sqlite_store_reads_while_another_writer_holds_the_lock(tmp_path: Path) -> None:
    """WAL readers never wait on the writer, so a process that starts (or restarts) while
    another one is inside a long write transaction must still read at once. Today the first
    use of a store runs ``setup()``, which takes the write lock even when the schema is
    current, so the reader waits for the whole busy timeout and then fails."""
    path = tmp_path / "c.db"
    with SQLiteMessageStore(path) as writer:
        writer.append("s", [HumanMessage("hi")], [1])
    other = sqlite3.connect(path, isolation_level=None)  # another process's connection
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE holysheep_sessions SET updated_at = updated_at")
    try:
        with SQLiteMessageStore(path, timeout=0.2) as reader:
            assert [m.message.content for m in reader.read("s")] == ["hi"]
            assert reader.get_session("s").message_count == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
