"""The scale-out store: PostgreSQL through psycopg 3 connection pools, sync and async.

Each operation is written once as a generator of SQL statements (the httpx ``auth_flow``
idea); a sync driver runs it on a ``ConnectionPool`` and an async driver on an
``AsyncConnectionPool``. Needs the ``postgres`` extra.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

try:
    import psycopg
    from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "PostgresMessageStore needs psycopg 3 and psycopg-pool, which are not installed. "
        'Install them with: pip install "langchain-holysheep[postgres]"'
    ) from exc

from langchain_core.messages import BaseMessage

from langchain_holysheep.stores.base import (
    DEFAULT_NAMESPACE,
    MessageStore,
    SchemaVersionError,
    SessionRecord,
    StoredMessage,
    StoreUnavailableError,
    check_expected_version,
    check_session_update,
    deserialize_message,
    mask_password,
    prepare_append,
    validate_key,
    validate_lease,
    validate_read_range,
    validate_session_fields,
)

_T = TypeVar("_T")

# -- SQL, written once ---------------------------------------------------------------------------

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE holysheep_sessions (
            namespace          TEXT             NOT NULL,
            session_id         TEXT             NOT NULL,
            summary            TEXT,
            summary_tokens     INTEGER          NOT NULL DEFAULT 0,
            summarized_through BIGINT           NOT NULL DEFAULT 0,
            window_start       BIGINT           NOT NULL DEFAULT 0,
            version            BIGINT           NOT NULL DEFAULT 0,
            calibration        DOUBLE PRECISION,
            message_count      BIGINT           NOT NULL DEFAULT 0,
            lease_owner        TEXT,
            lease_expires_at   DOUBLE PRECISION,
            created_at         TIMESTAMPTZ      NOT NULL DEFAULT now(),
            updated_at         TIMESTAMPTZ      NOT NULL DEFAULT now(),
            PRIMARY KEY (namespace, session_id)
        )
        """,
        # Messages are JSON *text*, not jsonb: jsonb rejects \u0000 and lone surrogates,
        # which user text may hold and which must round-trip.
        """
        CREATE TABLE holysheep_messages (
            namespace  TEXT        NOT NULL,
            session_id TEXT        NOT NULL,
            seq        BIGINT      NOT NULL,
            message    TEXT        NOT NULL,
            tokens     INTEGER     NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (namespace, session_id, seq)
        )
        """,
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# Concurrent setup() from many processes: serialised by a transaction-scoped advisory lock.
_SETUP_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext('langchain_holysheep.schema'))"
_CREATE_VERSION_TABLE: Final = """
CREATE TABLE IF NOT EXISTS holysheep_schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""
_SELECT_VERSION: Final = "SELECT coalesce(max(version), 0) FROM holysheep_schema_version"
_INSERT_VERSION: Final = "INSERT INTO holysheep_schema_version (version) VALUES (%(version)s)"

# One statement: the upsert takes the session row's lock until commit, so concurrent appends
# to a session queue on it and each reserves the next block of sequence numbers.
_APPEND: Final = """
WITH head AS (
    INSERT INTO holysheep_sessions AS s (namespace, session_id, message_count)
    VALUES (%(ns)s, %(sid)s, %(n)s)
    ON CONFLICT (namespace, session_id) DO UPDATE
        SET message_count = s.message_count + EXCLUDED.message_count, updated_at = now()
    RETURNING s.message_count - %(n)s AS first_seq
)
INSERT INTO holysheep_messages (namespace, session_id, seq, message, tokens)
SELECT %(ns)s, %(sid)s, head.first_seq + m.ord - 1, m.message, m.tokens
FROM head, unnest(%(messages)s::text[], %(tokens)s::integer[]) WITH ORDINALITY
    AS m(message, tokens, ord)
RETURNING seq"""
_SELECT_MESSAGES: Final = """
SELECT seq, message, tokens FROM holysheep_messages
WHERE namespace = %(ns)s AND session_id = %(sid)s AND seq >= %(start)s
    AND (%(end)s::bigint IS NULL OR seq < %(end)s::bigint)
ORDER BY seq"""
_SELECT_SESSION: Final = """
SELECT summary, summary_tokens, summarized_through, window_start, version, calibration,
    message_count, lease_owner, lease_expires_at
FROM holysheep_sessions WHERE namespace = %(ns)s AND session_id = %(sid)s"""
_LOCK_SESSION: Final = _SELECT_SESSION + " FOR UPDATE"
_INSERT_EMPTY_SESSION: Final = (
    "INSERT INTO holysheep_sessions (namespace, session_id) VALUES (%(ns)s, %(sid)s) "
    "ON CONFLICT (namespace, session_id) DO NOTHING"
)
_UPDATE_SESSION: Final = """
UPDATE holysheep_sessions SET summary = %(summary)s, summary_tokens = %(summary_tokens)s,
    summarized_through = %(summarized_through)s, window_start = %(window_start)s,
    calibration = %(calibration)s, version = version + 1, updated_at = now()
WHERE namespace = %(ns)s AND session_id = %(sid)s AND version = %(expected)s"""
# The session row goes first: deleting it waits for an append in flight (which holds its
# lock), so the message delete that follows sees that append's messages too.
_DELETE_SESSION: Final = (
    "DELETE FROM holysheep_sessions WHERE namespace = %(ns)s AND session_id = %(sid)s"
)
_DELETE_MESSAGES: Final = (
    "DELETE FROM holysheep_messages WHERE namespace = %(ns)s AND session_id = %(sid)s"
)
_LIST_SESSIONS: Final = (
    "SELECT session_id FROM holysheep_sessions WHERE namespace = %(ns)s ORDER BY session_id"
)
# Lease times come from the database clock, the one clock every host shares.
_ACQUIRE_LEASE: Final = """
INSERT INTO holysheep_sessions AS s (namespace, session_id, lease_owner, lease_expires_at)
VALUES (%(ns)s, %(sid)s, %(owner)s,
    extract(epoch FROM clock_timestamp())::double precision + %(ttl)s::double precision)
ON CONFLICT (namespace, session_id) DO UPDATE
    SET lease_owner = EXCLUDED.lease_owner, lease_expires_at = EXCLUDED.lease_expires_at
    WHERE s.lease_owner IS NULL OR s.lease_owner = EXCLUDED.lease_owner
        OR s.lease_expires_at <= extract(epoch FROM clock_timestamp())::double precision
RETURNING 1"""
_RELEASE_LEASE: Final = """
UPDATE holysheep_sessions SET lease_owner = NULL, lease_expires_at = NULL
WHERE namespace = %(ns)s AND session_id = %(sid)s AND lease_owner = %(owner)s"""


# -- operations: the logic, once, as generators of statements ------------------------------------


@dataclass(frozen=True)
class _Query:
    sql: str
    params: Mapping[str, Any]
    fetch: Literal["one", "all", "rowcount", "none"] = "none"


# An operation yields queries, is sent each query's result, and returns its own result.
_Op = Generator[_Query, Any, _T]


def _setup_op() -> _Op[None]:
    yield _Query(_SETUP_LOCK, {})
    yield _Query(_CREATE_VERSION_TABLE, {})
    (current,) = yield _Query(_SELECT_VERSION, {}, "one")
    if current > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database has schema version {current}; this langchain-holysheep understands "
            f"up to {SCHEMA_VERSION}. Upgrade langchain-holysheep."
        )
    for version in range(current, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            yield _Query(statement, {})
        yield _Query(_INSERT_VERSION, {"version": version + 1})


def _append_op(ns: str, sid: str, encoded: list[str], counts: list[int]) -> _Op[list[int]]:
    rows = yield _Query(
        _APPEND,
        {"ns": ns, "sid": sid, "n": len(encoded), "messages": encoded, "tokens": counts},
        "all",
    )
    return sorted(int(row[0]) for row in rows)


def _read_op(ns: str, sid: str, start: int, end: int | None) -> _Op[list[StoredMessage]]:
    rows = yield _Query(_SELECT_MESSAGES, {"ns": ns, "sid": sid, "start": start, "end": end}, "all")
    return [
        StoredMessage(
            int(seq), deserialize_message(text, namespace=ns, session_id=sid, seq=int(seq)), tokens
        )
        for seq, text, tokens in rows
    ]


def _record(sid: str, row: Sequence[Any] | None) -> SessionRecord:
    if row is None:
        return SessionRecord(sid)
    (summary, summary_tokens, through, start, version, calibration, count, owner, expires) = row
    return SessionRecord(
        sid, summary, summary_tokens, int(through), int(start), int(version), calibration,
        int(count), owner, expires,
    )  # fmt: skip


def _get_session_op(ns: str, sid: str) -> _Op[SessionRecord]:
    row = yield _Query(_SELECT_SESSION, {"ns": ns, "sid": sid}, "one")
    return _record(sid, row)


def _update_session_op(
    ns: str, sid: str, expected: int, fields: dict[str, Any]
) -> _Op[bool]:  # runs in a transaction
    if expected == 0:
        yield _Query(_INSERT_EMPTY_SESSION, {"ns": ns, "sid": sid})
    row = yield _Query(_LOCK_SESSION, {"ns": ns, "sid": sid}, "one")
    if row is None:
        return False
    current = _record(sid, row)
    if current.version != expected:
        return False
    check_session_update(current, fields)
    params = {
        "summary": current.summary,
        "summary_tokens": current.summary_tokens,
        "summarized_through": current.summarized_through,
        "window_start": current.window_start,
        "calibration": current.calibration,
        **fields,
        "ns": ns,
        "sid": sid,
        "expected": expected,
    }
    applied = yield _Query(_UPDATE_SESSION, params, "rowcount")
    return bool(applied == 1)


def _delete_session_op(ns: str, sid: str) -> _Op[None]:  # runs in a transaction
    yield _Query(_DELETE_SESSION, {"ns": ns, "sid": sid})
    yield _Query(_DELETE_MESSAGES, {"ns": ns, "sid": sid})


def _list_sessions_op(ns: str) -> _Op[list[str]]:
    rows = yield _Query(_LIST_SESSIONS, {"ns": ns}, "all")
    return [str(row[0]) for row in rows]


def _acquire_lease_op(ns: str, sid: str, owner: str, ttl: float) -> _Op[bool]:
    row = yield _Query(_ACQUIRE_LEASE, {"ns": ns, "sid": sid, "owner": owner, "ttl": ttl}, "one")
    return row is not None


def _release_lease_op(ns: str, sid: str, owner: str) -> _Op[bool]:
    count = yield _Query(_RELEASE_LEASE, {"ns": ns, "sid": sid, "owner": owner}, "rowcount")
    return bool(count == 1)


# -- I/O: the two drivers ------------------------------------------------------------------------


@dataclass
class _LoopPool:
    lock: asyncio.Lock
    pool: AsyncConnectionPool | None = None


class _PostgresBackend:
    """The pools of one database, shared by every namespace of a store."""

    def __init__(
        self,
        conninfo: str | None,
        pool: ConnectionPool | None,
        async_pool: AsyncConnectionPool | None,
        *,
        min_size: int,
        max_size: int,
        connect_timeout: float,
        pool_timeout: float,
    ) -> None:
        if conninfo is None:
            given = pool if pool is not None else async_pool
            if given is None:
                raise ValueError("pass a connection string, a ConnectionPool or both pools")
            conninfo = str(given.conninfo)
        self.conninfo = conninfo
        self.display = mask_password(conninfo)
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self._pool = pool
        self._owns_pool = pool is None
        self._given_async_pool = async_pool
        self._loop_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPool] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._is_setup = False

    def _connect_kwargs(self) -> dict[str, Any]:
        # libpq rounds connect_timeout up to 2 s; below that it means "wait forever".
        return {"autocommit": True, "connect_timeout": max(2, round(self.connect_timeout))}

    def unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailableError(
            f"cannot reach PostgreSQL at {self.display}: {detail}. Check that the server is "
            "running and the connection string is right; nothing was written."
        )

    # sync

    def setup(self) -> None:
        with self._lock:
            if self._is_setup:
                return
            try:
                if self._owns_pool:
                    with psycopg.connect(self.conninfo, **self._connect_kwargs()) as conn:
                        _run_sync(conn, _setup_op(), transaction=True)
                else:
                    assert self._pool is not None
                    with self._pool.connection(timeout=self.pool_timeout) as conn:
                        _run_sync(conn, _setup_op(), transaction=True)
            except (psycopg.OperationalError, PoolTimeout) as exc:
                raise self.unavailable(exc) from exc
            self._is_setup = True

    def pool(self) -> ConnectionPool:
        if not self._is_setup:
            self.setup()
        if self._pool is not None:
            return self._pool
        with self._lock:
            if self._pool is None:
                pool = ConnectionPool(
                    self.conninfo,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    kwargs=self._connect_kwargs(),
                    timeout=self.pool_timeout,
                    open=False,
                    name="langchain-holysheep",
                )
                try:
                    pool.open(wait=True, timeout=max(2.0, self.connect_timeout))
                except PoolTimeout as exc:
                    pool.close()
                    raise self.unavailable(exc) from exc
                self._pool = pool
            return self._pool

    def run(self, op: _Op[_T], *, transaction: bool = False) -> _T:
        pool = self.pool()
        try:
            with pool.connection() as conn:
                return _run_sync(conn, op, transaction=transaction)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self.unavailable(exc) from exc

    # async

    async def asetup(self) -> None:
        if self._is_setup:
            return
        try:
            if self._given_async_pool is not None:
                async with self._given_async_pool.connection(timeout=self.pool_timeout) as conn:
                    await _run_async(conn, _setup_op(), transaction=True)
            else:
                aconn = await psycopg.AsyncConnection.connect(
                    self.conninfo, **self._connect_kwargs()
                )
                async with aconn:
                    await _run_async(aconn, _setup_op(), transaction=True)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self.unavailable(exc) from exc
        self._is_setup = True

    async def apool(self) -> AsyncConnectionPool:
        if self._given_async_pool is not None:
            await self.asetup()
            return self._given_async_pool
        # An asyncio pool belongs to the loop that opened it: keep one per running loop.
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._loop_pools.get(loop)
            if entry is None:
                entry = self._loop_pools[loop] = _LoopPool(asyncio.Lock())
        if entry.pool is not None:
            return entry.pool
        async with entry.lock:
            if entry.pool is None:
                await self.asetup()
                pool = AsyncConnectionPool(
                    self.conninfo,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    kwargs=self._connect_kwargs(),
                    timeout=self.pool_timeout,
                    open=False,
                    name="langchain-holysheep-async",
                )
                try:
                    await pool.open(wait=True, timeout=max(2.0, self.connect_timeout))
                except PoolTimeout as exc:
                    await pool.close()
                    raise self.unavailable(exc) from exc
                entry.pool = pool
            return entry.pool

    async def arun(self, op: _Op[_T], *, transaction: bool = False) -> _T:
        pool = await self.apool()
        try:
            async with pool.connection() as conn:
                return await _run_async(conn, op, transaction=transaction)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self.unavailable(exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._owns_pool and self._pool is not None:
                self._pool.close()
                self._pool = None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._loop_pools.pop(loop, None)
        if entry is not None and entry.pool is not None:
            await entry.pool.close()
        await asyncio.to_thread(self.close)


def _run_sync(conn: psycopg.Connection[Any], op: _Op[_T], *, transaction: bool) -> _T:
    if transaction:
        with conn.transaction(), conn.cursor() as cursor:
            return _drive_sync(cursor, op)
    with conn.cursor() as cursor:
        return _drive_sync(cursor, op)


def _drive_sync(cursor: psycopg.Cursor[Any], op: _Op[_T]) -> _T:
    try:
        query = next(op)
        while True:
            cursor.execute(query.sql, query.params)
            if query.fetch == "one":
                result: Any = cursor.fetchone()
            elif query.fetch == "all":
                result = cursor.fetchall()
            else:
                result = cursor.rowcount if query.fetch == "rowcount" else None
            query = op.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _run_async(conn: psycopg.AsyncConnection[Any], op: _Op[_T], *, transaction: bool) -> _T:
    if transaction:
        async with conn.transaction(), conn.cursor() as cursor:
            return await _drive_async(cursor, op)
    async with conn.cursor() as cursor:
        return await _drive_async(cursor, op)


async def _drive_async(cursor: psycopg.AsyncCursor[Any], op: _Op[_T]) -> _T:
    try:
        query = next(op)
        while True:
            await cursor.execute(query.sql, query.params)
            if query.fetch == "one":
                result: Any = await cursor.fetchone()
            elif query.fetch == "all":
                result = await cursor.fetchall()
            else:
                result = cursor.rowcount if query.fetch == "rowcount" else None
            query = op.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


# -- the store -----------------------------------------------------------------------------------


class PostgresMessageStore(MessageStore):
    """A :class:`MessageStore` in PostgreSQL, for many processes and hosts sharing sessions.

    Sync methods use a ``psycopg_pool.ConnectionPool``, async ones an ``AsyncConnectionPool``
    (one per event loop); both are created from the connection string on first use unless
    you pass your own. The tables are created on first use too; :meth:`setup` does it
    explicitly and is idempotent (concurrent calls from many processes are serialised by an
    advisory lock; a schema version table records applied migrations).

    Appends are one statement: the upsert of the session row holds its lock until commit,
    so concurrent appends to one session are totally ordered, gap-free and duplicate-free
    (and a ``PRIMARY KEY (namespace, session_id, seq)`` makes a duplicate impossible).
    ``update_session`` locks the row (``SELECT ... FOR UPDATE``) and compares versions.

    An unreachable server raises :class:`StoreUnavailableError` after at most
    ``connect_timeout`` seconds (``pool_timeout`` once the pool is open), naming the URL with
    its password masked; nothing is half-written because every operation is one transaction.

    Example:
        .. code-block:: python

            with PostgresMessageStore.from_conn_string(
                "postgresql://app:secret@db/app", namespace="tenant-a"
            ) as store:
                store.append("s1", [HumanMessage("hi")], [4])
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        pool: ConnectionPool | None = None,
        async_pool: AsyncConnectionPool | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        pool_timeout: float = 30.0,
        _backend: _PostgresBackend | None = None,
    ) -> None:
        """Bind a store to a database; nothing connects until first use.

        Args:
            conninfo: A libpq connection string or ``postgresql://`` URL.
            namespace: The tenant or user this store instance reads and writes.
            pool: A sync pool to use instead of creating one (not closed by :meth:`close`).
                Its connections must be in autocommit mode.
            async_pool: An async pool to use instead of creating one per event loop (not
                closed by :meth:`aclose`). Its connections must be in autocommit mode.
            min_size: Connections each pool keeps open.
            max_size: Most connections each pool opens.
            connect_timeout: Seconds to wait for the server before failing (at least 2).
            pool_timeout: Seconds to wait for a free pooled connection before failing.
        """
        self.namespace = validate_key(namespace, "namespace")
        if _backend is None:
            _backend = _PostgresBackend(
                conninfo,
                pool,
                async_pool,
                min_size=min_size,
                max_size=max_size,
                connect_timeout=connect_timeout,
                pool_timeout=pool_timeout,
            )
        self._backend = _backend

    @classmethod
    @contextmanager
    def from_conn_string(cls, conninfo: str, **kwargs: Any) -> Iterator[PostgresMessageStore]:
        """Open a store for the duration of a ``with`` block, closing its pools afterwards.

        Args:
            conninfo: A libpq connection string or ``postgresql://`` URL.
            **kwargs: Passed to :class:`PostgresMessageStore`.
        """
        store = cls(conninfo, **kwargs)
        try:
            yield store
        finally:
            store.close()

    @classmethod
    @asynccontextmanager
    async def afrom_conn_string(
        cls, conninfo: str, **kwargs: Any
    ) -> AsyncIterator[PostgresMessageStore]:
        """Async :meth:`from_conn_string`: closes the pools with :meth:`aclose` on exit."""
        store = cls(conninfo, **kwargs)
        try:
            yield store
        finally:
            await store.aclose()

    def __repr__(self) -> str:
        return f"PostgresMessageStore({self._backend.display!r}, namespace={self.namespace!r})"

    def setup(self) -> None:
        """Create the tables and apply migrations (idempotent; also done on first use)."""
        self._backend.setup()

    async def asetup(self) -> None:
        """Async :meth:`setup`."""
        await self._backend.asetup()

    def with_namespace(self, namespace: str) -> PostgresMessageStore:
        """Return a store bound to ``namespace`` sharing this store's pools."""
        return PostgresMessageStore(namespace=namespace, _backend=self._backend)

    def close(self) -> None:
        """Close the sync pool this store created (shared with ``with_namespace`` siblings)."""
        self._backend.close()

    async def aclose(self) -> None:
        """Close the pools this store created for the running loop and for sync use."""
        await self._backend.aclose()

    # sync

    def append(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Append messages atomically; return their sequence numbers."""
        validate_key(session_id)
        encoded, counts = prepare_append(messages, token_counts)
        if not encoded:
            return []
        return self._backend.run(_append_op(self.namespace, session_id, encoded, counts))

    def read(self, session_id: str, start: int = 0, end: int | None = None) -> list[StoredMessage]:
        """Return the messages with ``start <= seq < end``, in order."""
        validate_key(session_id)
        validate_read_range(start, end)
        return self._backend.run(_read_op(self.namespace, session_id, start, end))

    def get_session(self, session_id: str) -> SessionRecord:
        """Return the session record (version 0 when absent)."""
        validate_key(session_id)
        return self._backend.run(_get_session_op(self.namespace, session_id))

    def update_session(self, session_id: str, *, expected_version: int, **fields: Any) -> bool:
        """Compare-and-swap the session record on ``version``."""
        validate_key(session_id)
        check_expected_version(expected_version)
        fields = validate_session_fields(fields)
        op = _update_session_op(self.namespace, session_id, expected_version, fields)
        return self._backend.run(op, transaction=True)

    def delete_session(self, session_id: str) -> None:
        """Remove the session's messages and record."""
        validate_key(session_id)
        self._backend.run(_delete_session_op(self.namespace, session_id), transaction=True)

    def list_sessions(self) -> list[str]:
        """Return the ids of this namespace's sessions, sorted."""
        return self._backend.run(_list_sessions_op(self.namespace))

    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the session's lease for ``ttl`` seconds (database clock)."""
        validate_key(session_id)
        validate_lease(owner, ttl)
        return self._backend.run(_acquire_lease_op(self.namespace, session_id, owner, ttl))

    def release_lease(self, session_id: str, owner: str) -> bool:
        """Release the lease if ``owner`` holds it."""
        validate_key(session_id)
        validate_key(owner, "owner")
        return self._backend.run(_release_lease_op(self.namespace, session_id, owner))

    # async

    async def aappend(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Async :meth:`append`."""
        validate_key(session_id)
        encoded, counts = prepare_append(messages, token_counts)
        if not encoded:
            return []
        return await self._backend.arun(_append_op(self.namespace, session_id, encoded, counts))

    async def aread(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[StoredMessage]:
        """Async :meth:`read`."""
        validate_key(session_id)
        validate_read_range(start, end)
        return await self._backend.arun(_read_op(self.namespace, session_id, start, end))

    async def aget_session(self, session_id: str) -> SessionRecord:
        """Async :meth:`get_session`."""
        validate_key(session_id)
        return await self._backend.arun(_get_session_op(self.namespace, session_id))

    async def aupdate_session(
        self, session_id: str, *, expected_version: int, **fields: Any
    ) -> bool:
        """Async :meth:`update_session`."""
        validate_key(session_id)
        check_expected_version(expected_version)
        fields = validate_session_fields(fields)
        op = _update_session_op(self.namespace, session_id, expected_version, fields)
        return await self._backend.arun(op, transaction=True)

    async def adelete_session(self, session_id: str) -> None:
        """Async :meth:`delete_session`."""
        validate_key(session_id)
        await self._backend.arun(_delete_session_op(self.namespace, session_id), transaction=True)

    async def alist_sessions(self) -> list[str]:
        """Async :meth:`list_sessions`."""
        return await self._backend.arun(_list_sessions_op(self.namespace))

    async def aacquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Async :meth:`acquire_lease`."""
        validate_key(session_id)
        validate_lease(owner, ttl)
        return await self._backend.arun(_acquire_lease_op(self.namespace, session_id, owner, ttl))

    async def arelease_lease(self, session_id: str, owner: str) -> bool:
        """Async :meth:`release_lease`."""
        validate_key(session_id)
        validate_key(owner, "owner")
        return await self._backend.arun(_release_lease_op(self.namespace, session_id, owner))
