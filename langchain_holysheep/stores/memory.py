"""A message store in process memory: for tests, notebooks and single-process demos.

Messages are kept encoded exactly as the database stores encode them, so a message read back
is a fresh copy and the in-memory store checks the same inputs the durable ones do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from langchain_core.messages import BaseMessage

from langchain_holysheep.stores.base import (
    DEFAULT_NAMESPACE,
    MessageStore,
    SessionRecord,
    StoredMessage,
    check_expected_version,
    check_session_update,
    deserialize_message,
    prepare_append,
    validate_key,
    validate_lease,
    validate_read_range,
    validate_session_fields,
)


@dataclass
class _Session:
    record: SessionRecord
    messages: list[tuple[str, int]] = field(default_factory=list)


class _MemoryBackend:
    """The shared data of every namespace of one in-memory store."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sessions: dict[tuple[str, str], _Session] = {}


class InMemoryMessageStore(MessageStore):
    """A :class:`MessageStore` held in a dict; lost when the process exits.

    Thread-safe (one lock). Its async methods run inline: there is no I/O to wait for.

    Example:
        .. code-block:: python

            store = InMemoryMessageStore(namespace="tenant-a")
            store.append("s1", [HumanMessage("hi")], [4])
            store.read("s1")  # [StoredMessage(seq=0, message=HumanMessage("hi"), tokens=4)]
    """

    def __init__(
        self, namespace: str = DEFAULT_NAMESPACE, *, _backend: _MemoryBackend | None = None
    ) -> None:
        """Create an empty store.

        Args:
            namespace: The tenant or user this store instance reads and writes.
        """
        self.namespace = validate_key(namespace, "namespace")
        self._backend = _backend if _backend is not None else _MemoryBackend()

    def __repr__(self) -> str:
        return f"InMemoryMessageStore(namespace={self.namespace!r})"

    def with_namespace(self, namespace: str) -> InMemoryMessageStore:
        """Return a store bound to ``namespace`` over the same data."""
        return InMemoryMessageStore(namespace, _backend=self._backend)

    def _key(self, session_id: str) -> tuple[str, str]:
        return (self.namespace, validate_key(session_id))

    def append(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Append messages atomically; return their sequence numbers."""
        key = self._key(session_id)
        encoded, counts = prepare_append(messages, token_counts)
        if not encoded:
            return []
        with self._backend.lock:
            session = self._backend.sessions.get(key)
            if session is None:
                session = _Session(SessionRecord(session_id))
                self._backend.sessions[key] = session
            first = len(session.messages)
            session.messages.extend(zip(encoded, counts, strict=True))
            session.record = replace(session.record, message_count=len(session.messages))
        return list(range(first, first + len(encoded)))

    def read(self, session_id: str, start: int = 0, end: int | None = None) -> list[StoredMessage]:
        """Return the messages with ``start <= seq < end``, in order."""
        key = self._key(session_id)
        validate_read_range(start, end)
        with self._backend.lock:
            session = self._backend.sessions.get(key)
            rows = [] if session is None else list(session.messages[start:end])
        return [
            StoredMessage(
                seq,
                deserialize_message(text, namespace=self.namespace, session_id=session_id, seq=seq),
                tokens,
            )
            for seq, (text, tokens) in enumerate(rows, start)
        ]

    def get_session(self, session_id: str) -> SessionRecord:
        """Return the session record (version 0 when absent)."""
        key = self._key(session_id)
        with self._backend.lock:
            session = self._backend.sessions.get(key)
            return SessionRecord(session_id) if session is None else session.record

    def update_session(self, session_id: str, *, expected_version: int, **fields: Any) -> bool:
        """Compare-and-swap the session record on ``version``."""
        key = self._key(session_id)
        check_expected_version(expected_version)
        fields = validate_session_fields(fields)
        with self._backend.lock:
            session = self._backend.sessions.get(key)
            current = SessionRecord(session_id) if session is None else session.record
            if current.version != expected_version:
                return False
            check_session_update(current, fields)
            record = replace(current, version=current.version + 1, **fields)
            if session is None:
                self._backend.sessions[key] = _Session(record)
            else:
                session.record = record
        return True

    def delete_session(self, session_id: str) -> None:
        """Remove the session's messages and record."""
        key = self._key(session_id)
        with self._backend.lock:
            self._backend.sessions.pop(key, None)

    def list_sessions(self) -> list[str]:
        """Return the ids of this namespace's sessions, sorted."""
        with self._backend.lock:
            return sorted(sid for ns, sid in self._backend.sessions if ns == self.namespace)

    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the session's lease for ``ttl`` seconds."""
        key = self._key(session_id)
        validate_lease(owner, ttl)
        now = time.time()
        with self._backend.lock:
            session = self._backend.sessions.get(key)
            if session is None:
                session = _Session(SessionRecord(session_id))
                self._backend.sessions[key] = session
            held = session.record
            free = (
                held.lease_owner is None
                or held.lease_owner == owner
                or (held.lease_expires_at is not None and held.lease_expires_at <= now)
            )
            if free:
                session.record = replace(held, lease_owner=owner, lease_expires_at=now + ttl)
            return free

    def release_lease(self, session_id: str, owner: str) -> bool:
        """Release the lease if ``owner`` holds it."""
        key = self._key(session_id)
        validate_key(owner, "owner")
        with self._backend.lock:
            session = self._backend.sessions.get(key)
            if session is None or session.record.lease_owner != owner:
                return False
            session.record = replace(session.record, lease_owner=None, lease_expires_at=None)
            return True

    # Inline async twins: nothing here blocks on I/O, so a thread hop would only cost time.

    async def aappend(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Async :meth:`append`."""
        return self.append(session_id, messages, token_counts)

    async def aread(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[StoredMessage]:
        """Async :meth:`read`."""
        return self.read(session_id, start, end)

    async def aget_session(self, session_id: str) -> SessionRecord:
        """Async :meth:`get_session`."""
        return self.get_session(session_id)

    async def aupdate_session(
        self, session_id: str, *, expected_version: int, **fields: Any
    ) -> bool:
        """Async :meth:`update_session`."""
        return self.update_session(session_id, expected_version=expected_version, **fields)

    async def adelete_session(self, session_id: str) -> None:
        """Async :meth:`delete_session`."""
        self.delete_session(session_id)

    async def alist_sessions(self) -> list[str]:
        """Async :meth:`list_sessions`."""
        return self.list_sessions()

    async def aacquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Async :meth:`acquire_lease`."""
        return self.acquire_lease(session_id, owner, ttl)

    async def arelease_lease(self, session_id: str, owner: str) -> bool:
        """Async :meth:`release_lease`."""
        return self.release_lease(session_id, owner)
