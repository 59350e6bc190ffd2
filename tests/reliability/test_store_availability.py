"""A durable store stays readable while another process is in the middle of a write."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage

from langchain_holysheep.stores import SQLiteMessageStore, StoreError


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


def test_sqlite_writer_threads_of_one_process_do_not_starve(tmp_path: Path) -> None:
    """100 threads of one process append at once (one connection each). The writes take well
    under a millisecond, so in a fair queue no writer waits more than a few tens of ms; but
    SQLite's busy handler polls with growing sleeps, so while the others commit thousands of
    writes an unlucky writer keeps missing the lock until its busy timeout runs out and its
    append fails with StoreError. In the 200 x 50 soak with the default 30 s timeout this
    failed three sessions. Writers of one process should queue on a lock of their own and
    leave the busy timeout to other processes."""
    store = SQLiteMessageStore(tmp_path / "c.db", timeout=0.5)
    store.setup()
    errors: list[str] = []
    start = threading.Barrier(100)

    def writer(i: int) -> None:
        start.wait()
        for _ in range(40):
            try:
                store.append(f"s{i}", [HumanMessage("q" * 200), AIMessage("a" * 200)], [50, 50])
            except StoreError as exc:
                errors.append(str(exc))
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert errors == [], f"{len(errors)} of 4,000 appends starved: {errors[0]}"
