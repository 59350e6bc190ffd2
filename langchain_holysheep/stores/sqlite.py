"""The embedded default store: one SQLite file in WAL mode, shared by threads and processes.

The SQL is written once, here; the sync methods do the I/O and the async ones run them in a
worker thread (``sqlite3`` releases the GIL while it waits on the database).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal

from langchain_core.messages import BaseMessage

from langchain_holysheep.stores._fair_lock import FairLock
from langchain_holysheep.stores.base import (
    DEFAULT_NAMESPACE,
    MessageStore,
    SchemaVersionError,
    SessionRecord,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
    check_expected_version,
    check_session_update,
    deserialize_message,
    prepare_append,
    validate_key,
    validate_lease,
    validate_read_range,
    validate_session_fields,
)

ENV_DB_PATH: Final = "HOLYSHEEP_DB"
"""Environment variable naming the default database file."""

# Times are seconds since the epoch: (julianday('now') - 2440587.5) * 86400.0, which works in
# every SQLite version (unixepoch() needs 3.38).

# Each migration takes the schema from version i to i + 1; statements run in one transaction.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE holysheep_sessions (
            namespace          TEXT    NOT NULL,
            session_id         TEXT    NOT NULL,
            summary            TEXT,
            summary_tokens     INTEGER NOT NULL DEFAULT 0,
            summarized_through INTEGER NOT NULL DEFAULT 0,
            window_start       INTEGER NOT NULL DEFAULT 0,
            version            INTEGER NOT NULL DEFAULT 0,
            calibration        REAL,
            message_count      INTEGER NOT NULL DEFAULT 0,
            lease_owner        TEXT,
            lease_expires_at   REAL,
            created_at         REAL    NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
            updated_at         REAL    NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
            PRIMARY KEY (namespace, session_id)
        )
        """,
        """
        CREATE TABLE holysheep_messages (
            namespace  TEXT    NOT NULL,
            session_id TEXT    NOT NULL,
            seq        INTEGER NOT NULL,
            message    TEXT    NOT NULL,
            tokens     INTEGER NOT NULL,
            created_at REAL    NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
            PRIMARY KEY (namespace, session_id, seq)
        )
        """,
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_CREATE_VERSION_TABLE: Final = """
CREATE TABLE IF NOT EXISTS holysheep_schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
)"""
_SELECT_VERSION: Final = "SELECT coalesce(max(version), 0) FROM holysheep_schema_version"
_INSERT_VERSION: Final = "INSERT INTO holysheep_schema_version (version) VALUES (?)"

# RETURNING needs SQLite 3.35; a SELECT inside the same write transaction works everywhere.
_RESERVE_SEQS: Final = """
INSERT INTO holysheep_sessions (namespace, session_id, message_count) VALUES (?, ?, ?)
ON CONFLICT (namespace, session_id) DO UPDATE SET
    message_count = message_count + excluded.message_count,
    updated_at = (julianday('now') - 2440587.5) * 86400.0"""
_SELECT_COUNT: Final = (
    "SELECT message_count FROM holysheep_sessions WHERE namespace = ? AND session_id = ?"
)
_INSERT_MESSAGE: Final = (
    "INSERT INTO holysheep_messages (namespace, session_id, seq, message, tokens) "
    "VALUES (?, ?, ?, ?, ?)"
)
_SELECT_MESSAGES: Final = (
    "SELECT seq, message, tokens FROM holysheep_messages "
    "WHERE namespace = ? AND session_id = ? AND seq >= ? AND seq < ? ORDER BY seq"
)
_SELECT_SESSION: Final = """
SELECT summary, summary_tokens, summarized_through, window_start, version, calibration,
    message_count, lease_owner, lease_expires_at
FROM holysheep_sessions WHERE namespace = ? AND session_id = ?"""
_INSERT_EMPTY_SESSION: Final = (
    "INSERT INTO holysheep_sessions (namespace, session_id) VALUES (?, ?) "
    "ON CONFLICT (namespace, session_id) DO NOTHING"
)
_UPDATE_SESSION: Final = """
UPDATE holysheep_sessions SET summary = ?, summary_tokens = ?, summarized_through = ?,
    window_start = ?, calibration = ?, version = version + 1,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE namespace = ? AND session_id = ? AND version = ?"""
_DELETE_MESSAGES: Final = "DELETE FROM holysheep_messages WHERE namespace = ? AND session_id = ?"
_DELETE_SESSION: Final = "DELETE FROM holysheep_sessions WHERE namespace = ? AND session_id = ?"
_LIST_SESSIONS: Final = (
    "SELECT session_id FROM holysheep_sessions WHERE namespace = ? ORDER BY session_id"
)
_ACQUIRE_LEASE: Final = """
INSERT INTO holysheep_sessions (namespace, session_id, lease_owner, lease_expires_at)
VALUES (?1, ?2, ?3, ?4 + ?5)
ON CONFLICT (namespace, session_id) DO UPDATE SET
    lease_owner = excluded.lease_owner, lease_expires_at = excluded.lease_expires_at
WHERE lease_owner IS NULL OR lease_owner = excluded.lease_owner OR lease_expires_at <= ?4"""
_RELEASE_LEASE: Final = (
    "UPDATE holysheep_sessions SET lease_owner = NULL, lease_expires_at = NULL "
    "WHERE namespace = ? AND session_id = ? AND lease_owner = ?"
)

# SQLite binds at most 999 parameters per statement in old builds; executemany has no limit.
_NO_END: Final = 2**62


def default_db_path() -> Path:
    """Return the database file used when none is given.

    ``$HOLYSHEEP_DB`` if set, else ``$XDG_DATA_HOME/holysheep/conversations.db``, else
    ``~/.local/share/holysheep/conversations.db``. The file and its directory are created on
    first use, not here.
    """
    env = os.environ.get(ENV_DB_PATH)
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "holysheep" / "conversations.db"


def _record(session_id: str, row: tuple[Any, ...] | None) -> SessionRecord:
    if row is None:
        return SessionRecord(session_id)
    return SessionRecord(session_id, *row)


_WRITE_GATES: dict[str, FairLock] = {}
_WRITE_GATES_LOCK = threading.Lock()


def _write_gate(path: Path) -> FairLock:
    """The process-wide lock that orders this process's writers to one database file."""
    key = os.path.realpath(path)
    with _WRITE_GATES_LOCK:
        gate = _WRITE_GATES.get(key)
        if gate is None:
            gate = _WRITE_GATES[key] = FairLock()
        return gate


def _reset_write_gates() -> None:
    # A child process must not inherit a gate some thread of its parent held at fork time.
    global _WRITE_GATES_LOCK
    _WRITE_GATES.clear()
    _WRITE_GATES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_write_gates)


class _SQLiteBackend:
    """Connections to one database file: one per thread, shared by every namespace."""

    def __init__(self, path: Path, timeout: float, synchronous: str) -> None:
        self.path = path
        self.timeout = timeout
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._pid = os.getpid()
        self._is_setup = False
        self._closed = False

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailableError(
                f"cannot open the SQLite database {str(self.path)!r}: {exc}. Check that the "
                f"directory is writable, or set {ENV_DB_PATH} to another file."
            ) from exc
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    def connection(self) -> sqlite3.Connection:
        """Return this thread's connection, opening it (and the schema) on first use."""
        if self._closed:
            raise StoreError(f"the SQLite store on {str(self.path)!r} is closed")
        if os.getpid() != self._pid:
            # A forked child must not use its parent's SQLite handles: start afresh.
            self._local = threading.local()
            self._connections = {}
            self._pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not self._is_setup:
                self.setup()
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                for thread in [t for t in self._connections if not t.is_alive()]:
                    self._connections.pop(thread).close()
                self._connections[threading.current_thread()] = conn
        return conn

    def setup(self) -> None:
        """Create the file, switch it to WAL and apply missing migrations (idempotent)."""
        with self._lock:
            if self._is_setup:
                return
            conn = self._open()
            try:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    if self._schema_is_current(conn):
                        # A read, so a new store opens while another process holds the
                        # write lock; the write transaction below is for migrations only.
                        self._is_setup = True
                        return
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        conn.execute(_CREATE_VERSION_TABLE)
                        current = int(conn.execute(_SELECT_VERSION).fetchone()[0])
                        if current > SCHEMA_VERSION:
                            raise SchemaVersionError(
                                f"the database {str(self.path)!r} has schema version {current}; "
                                f"this langchain-holysheep understands up to {SCHEMA_VERSION}. "
                                "Upgrade langchain-holysheep."
                            )
                        for version in range(current, SCHEMA_VERSION):
                            for statement in MIGRATIONS[version]:
                                conn.execute(statement)
                            conn.execute(_INSERT_VERSION, (version + 1,))
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise StoreUnavailableError(
                        f"cannot set up the SQLite database {str(self.path)!r}: {exc}"
                    ) from exc
            finally:
                conn.close()
            self._is_setup = True

    @staticmethod
    def _schema_is_current(conn: sqlite3.Connection) -> bool:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'holysheep_schema_version'"
        ).fetchone()
        return bool(exists) and int(conn.execute(_SELECT_VERSION).fetchone()[0]) == SCHEMA_VERSION

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """Run the block in a write transaction taken up front (``BEGIN IMMEDIATE``).

        Taking the write lock at BEGIN makes concurrent writers queue on the busy timeout
        instead of failing on a read-to-write upgrade; it is what totally orders appends.
        """
        conn = self.connection()
        # Threads of this process queue first come, first served on a lock of their own.
        # SQLite's busy handler alone lets whichever thread retries first win, and so would a
        # threading.Lock: under many writer threads an unlucky one starves until its timeout.
        gate = _write_gate(self.path)
        if not gate.acquire(timeout=self.timeout):
            raise StoreError(
                f"could not start a write on {str(self.path)!r} within {self.timeout} s: other "
                "threads of this process kept writing; raise timeout= or retry."
            )
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(
                    f"could not start a write on {str(self.path)!r} within {self.timeout} s: "
                    f"{exc}. Another process holds the database; raise timeout= or retry."
                ) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed: no open transaction
                    conn.execute("ROLLBACK")
                raise
        finally:
            gate.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()


class SQLiteMessageStore(MessageStore):
    """A :class:`MessageStore` in one SQLite file: the embedded default, no server needed.

    * Path: ``path`` if given, else ``$HOLYSHEEP_DB``, else
      ``~/.local/share/holysheep/conversations.db`` (see :func:`default_db_path`). The file,
      its directory and the tables are created on first use.
    * WAL mode: readers never block the writer; many threads and OS processes can share the
      file. Each thread uses its own connection.
    * Appends take the write lock up front (``BEGIN IMMEDIATE``) and number messages from the
      session's counter inside the transaction, under a ``PRIMARY KEY (namespace, session_id,
      seq)``: concurrent appends are totally ordered, gap-free and duplicate-free.
    * ``synchronous="NORMAL"`` (default) keeps every acknowledged append through a process
      crash (``kill -9``); on power loss the last commits may roll back. Pass
      ``synchronous="FULL"`` to survive that too, at a cost per append.
    * A schema version table records applied migrations; a newer schema than this package
      knows raises :class:`SchemaVersionError`.

    Example:
        .. code-block:: python

            store = SQLiteMessageStore("conversations.db", namespace="tenant-a")
            store.append("s1", [HumanMessage("hi")], [4])
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = 30.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        _backend: _SQLiteBackend | None = None,
    ) -> None:
        """Bind a store to a database file; nothing is opened until first use.

        Args:
            path: The database file. ``None`` uses :func:`default_db_path`.
            namespace: The tenant or user this store instance reads and writes.
            timeout: Seconds a write waits for another writer (SQLite busy timeout).
            synchronous: SQLite ``synchronous`` setting: ``"NORMAL"`` or ``"FULL"``.

        Raises:
            ValueError: ``path`` is ``":memory:"`` (each thread would see its own database;
                use :class:`InMemoryMessageStore`), or ``synchronous`` is unknown.
        """
        self.namespace = validate_key(namespace, "namespace")
        if _backend is None:
            if str(path) == ":memory:" or (isinstance(path, str) and path.startswith("file:")):
                raise ValueError(
                    f"path={path!r} is not supported: each thread would open its own database. "
                    "Use InMemoryMessageStore, or a temporary file."
                )
            if synchronous not in ("NORMAL", "FULL"):
                raise ValueError(f"synchronous is {synchronous!r}; use 'NORMAL' or 'FULL'")
            if not timeout >= 0:
                raise ValueError(f"timeout is {timeout!r}; it must be >= 0 seconds")
            resolved = Path(path).expanduser() if path is not None else default_db_path()
            _backend = _SQLiteBackend(resolved, float(timeout), synchronous)
        self._backend = _backend

    @classmethod
    @contextmanager
    def from_conn_string(
        cls, path: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> Iterator[SQLiteMessageStore]:
        """Open a store for the duration of a ``with`` block, closing it afterwards.

        Args:
            path: The database file (``None``: the default path).
            **kwargs: Passed to :class:`SQLiteMessageStore`.
        """
        store = cls(path, **kwargs)
        try:
            yield store
        finally:
            store.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._backend.path

    def __repr__(self) -> str:
        return f"SQLiteMessageStore({str(self.path)!r}, namespace={self.namespace!r})"

    def setup(self) -> None:
        """Create the database and apply migrations now instead of on first use (idempotent)."""
        self._backend.setup()

    def with_namespace(self, namespace: str) -> SQLiteMessageStore:
        """Return a store bound to ``namespace`` sharing this store's connections."""
        return SQLiteMessageStore(namespace=namespace, _backend=self._backend)

    def close(self) -> None:
        """Close every connection of this store (and of its ``with_namespace`` siblings)."""
        self._backend.close()

    def append(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Append messages atomically; return their sequence numbers."""
        validate_key(session_id)
        encoded, counts = prepare_append(messages, token_counts)
        if not encoded:
            return []
        ns = self.namespace
        with self._backend.write() as conn:
            conn.execute(_RESERVE_SEQS, (ns, session_id, len(encoded)))
            (count,) = conn.execute(_SELECT_COUNT, (ns, session_id)).fetchone()
            first = int(count) - len(encoded)
            conn.executemany(
                _INSERT_MESSAGE,
                [
                    (ns, session_id, first + i, text, tokens)
                    for i, (text, tokens) in enumerate(zip(encoded, counts, strict=True))
                ],
            )
        return list(range(first, first + len(encoded)))

    def read(self, session_id: str, start: int = 0, end: int | None = None) -> list[StoredMessage]:
        """Return the messages with ``start <= seq < end``, in order."""
        validate_key(session_id)
        validate_read_range(start, end)
        conn = self._backend.connection()
        rows = conn.execute(
            _SELECT_MESSAGES,
            (self.namespace, session_id, start, _NO_END if end is None else end),
        ).fetchall()
        return [
            StoredMessage(
                seq,
                deserialize_message(text, namespace=self.namespace, session_id=session_id, seq=seq),
                tokens,
            )
            for seq, text, tokens in rows
        ]

    def get_session(self, session_id: str) -> SessionRecord:
        """Return the session record (version 0 when absent)."""
        validate_key(session_id)
        conn = self._backend.connection()
        row = conn.execute(_SELECT_SESSION, (self.namespace, session_id)).fetchone()
        return _record(session_id, row)

    def update_session(self, session_id: str, *, expected_version: int, **fields: Any) -> bool:
        """Compare-and-swap the session record on ``version``."""
        validate_key(session_id)
        check_expected_version(expected_version)
        fields = validate_session_fields(fields)
        ns = self.namespace
        with self._backend.write() as conn:
            current = _record(
                session_id, conn.execute(_SELECT_SESSION, (ns, session_id)).fetchone()
            )
            if current.version != expected_version:
                return False
            check_session_update(current, fields)
            if expected_version == 0:
                conn.execute(_INSERT_EMPTY_SESSION, (ns, session_id))
            new = {
                "summary": current.summary,
                "summary_tokens": current.summary_tokens,
                "summarized_through": current.summarized_through,
                "window_start": current.window_start,
                "calibration": current.calibration,
                **fields,
            }
            cursor = conn.execute(
                _UPDATE_SESSION,
                (
                    new["summary"],
                    new["summary_tokens"],
                    new["summarized_through"],
                    new["window_start"],
                    new["calibration"],
                    ns,
                    session_id,
                    expected_version,
                ),
            )
            return cursor.rowcount == 1

    def delete_session(self, session_id: str) -> None:
        """Remove the session's messages and record."""
        validate_key(session_id)
        with self._backend.write() as conn:
            conn.execute(_DELETE_MESSAGES, (self.namespace, session_id))
            conn.execute(_DELETE_SESSION, (self.namespace, session_id))

    def list_sessions(self) -> list[str]:
        """Return the ids of this namespace's sessions, sorted."""
        conn = self._backend.connection()
        return [row[0] for row in conn.execute(_LIST_SESSIONS, (self.namespace,))]

    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the session's lease for ``ttl`` seconds (clock of this host)."""
        validate_key(session_id)
        validate_lease(owner, ttl)
        with self._backend.write() as conn:
            cursor = conn.execute(
                _ACQUIRE_LEASE, (self.namespace, session_id, owner, time.time(), float(ttl))
            )
            return cursor.rowcount == 1

    def release_lease(self, session_id: str, owner: str) -> bool:
        """Release the lease if ``owner`` holds it."""
        validate_key(session_id)
        validate_key(owner, "owner")
        with self._backend.write() as conn:
            cursor = conn.execute(_RELEASE_LEASE, (self.namespace, session_id, owner))
            return cursor.rowcount == 1
