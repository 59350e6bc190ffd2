"""The message-store contract, its records and errors, and the (de)serialisation every store uses.

The SQL of each backend lives in its own module; what is common to all of them (validation,
JSON encoding of messages, the checks of a session update) is written once here.
"""

from __future__ import annotations

import asyncio
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

MAX_SESSION_ID_LENGTH: Final = 256
"""Longest accepted session id or namespace, in characters."""

DEFAULT_NAMESPACE: Final = "default"
"""The namespace a store is bound to when none is given."""

SESSION_FIELDS: Final = frozenset(
    {"summary", "summary_tokens", "summarized_through", "window_start", "calibration"}
)
"""Fields of the session record that :meth:`MessageStore.update_session` may change."""

# Message types that messages_from_dict can rebuild; anything else (RemoveMessage, custom
# subclasses) would be written fine and then fail to read back, so it is refused at append.
_STORABLE_TYPES: Final = frozenset(
    {
        "human",
        "ai",
        "system",
        "tool",
        "function",
        "chat",
        "HumanMessageChunk",
        "AIMessageChunk",
        "SystemMessageChunk",
        "ToolMessageChunk",
        "FunctionMessageChunk",
        "ChatMessageChunk",
    }
)

_StoreT = TypeVar("_StoreT", bound="MessageStore")


class StoreError(RuntimeError):
    """A message store could not do what was asked."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or opened; nothing was written."""


class SchemaVersionError(StoreError):
    """The database schema is newer than this version of the package understands."""


class CorruptMessageError(StoreError):
    """A stored message cannot be decoded back into a message.

    Attributes:
        namespace: Namespace of the session.
        session_id: The session holding the message.
        seq: Sequence number of the unreadable message.
    """

    def __init__(self, namespace: str, session_id: str, seq: int, reason: str) -> None:
        self.namespace = namespace
        self.session_id = session_id
        self.seq = seq
        super().__init__(
            f"stored message seq={seq} of session {session_id!r} (namespace {namespace!r}) "
            f"cannot be decoded: {reason}. The row was left untouched; repair it in the "
            "database or remove the session with delete_session()."
        )


@dataclass(frozen=True)
class StoredMessage:
    """One message of a session's transcript, as stored.

    Attributes:
        seq: 0-based position in the session; gap-free.
        message: The message.
        tokens: Its token count, counted once when it was appended.
    """

    seq: int
    message: BaseMessage
    tokens: int


@dataclass(frozen=True)
class SessionRecord:
    """The per-session record: the running summary state and bookkeeping.

    A session that was never written reads as a record with ``version == 0`` and zeros.

    Attributes:
        session_id: The session.
        summary: Running summary of messages ``[0, summarized_through)``, or ``None``.
        summary_tokens: Token count of ``summary``.
        summarized_through: Messages before this sequence number are folded into the summary.
        window_start: First message the context window keeps verbatim.
        version: Compare-and-swap version; bumped by every applied ``update_session``.
            Appends do not change it: they never invalidate the summary state.
        calibration: Smoothed ratio of provider-reported to counted tokens, if known.
        message_count: Number of stored messages, i.e. the next sequence number.
        lease_owner: Holder of the summarization lease, if any (possibly expired).
        lease_expires_at: When that lease expires, in seconds since the epoch (database clock).
    """

    session_id: str
    summary: str | None = None
    summary_tokens: int = 0
    summarized_through: int = 0
    window_start: int = 0
    version: int = 0
    calibration: float | None = None
    message_count: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None


def validate_key(value: object, what: str = "session_id") -> str:
    """Check a session id or namespace: an opaque, non-empty string of bounded length.

    Args:
        value: The candidate id.
        what: Its name, for the error message.

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: ``value`` is not a string.
        ValueError: It is empty, too long, or cannot be stored as UTF-8 text.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} is empty; pass a non-empty opaque id such as a UUID")
    if len(value) > MAX_SESSION_ID_LENGTH:
        raise ValueError(
            f"{what} is {len(value):,} characters long; the limit is {MAX_SESSION_ID_LENGTH}. "
            "Use a shorter opaque id, for example a UUID or a hash of the long key."
        )
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character, which databases cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} contains a lone surrogate at position {exc.start} and is not valid "
            "Unicode text; pass a UTF-8-encodable string"
        ) from None
    return value


def serialize_message(message: BaseMessage, index: int = 0) -> str:
    """Encode a message as JSON text with ``message_to_dict`` (no pickle, nothing executable).

    Text is stored as UTF-8 where possible; a message holding lone surrogates (which no
    database accepts raw) is stored with ASCII escapes instead, so it still round-trips.

    Args:
        message: The message.
        index: Its position in the batch being appended, for the error message.

    Returns:
        The JSON text.

    Raises:
        TypeError: ``message`` is not a message.
        ValueError: Its type cannot be read back, or its content is not JSON-serialisable.
    """
    if not isinstance(message, BaseMessage):
        raise TypeError(
            f"message {index} of the batch is a {type(message).__name__}, not a BaseMessage"
        )
    data = message_to_dict(message)
    if data["type"] not in _STORABLE_TYPES:
        raise ValueError(
            f"message {index} of the batch has type {data['type']!r}, which a store cannot read "
            "back; store human, ai, system, tool, function or chat messages"
        )
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"message {index} of the batch ({message.type}) cannot be stored as JSON: {exc}. "
            "Keep content, additional_kwargs, response_metadata and artifacts JSON-compatible."
        ) from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text


def deserialize_message(text: object, *, namespace: str, session_id: str, seq: int) -> BaseMessage:
    """Decode a message stored by :func:`serialize_message`.

    Raises:
        CorruptMessageError: The stored text is not a valid encoded message; the error names
            the session and the sequence number.
    """
    try:
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            raise TypeError(f"stored value is a {type(text).__name__}, not text")
        data = json.loads(text)
        if not isinstance(data, dict) or "type" not in data or "data" not in data:
            raise ValueError("stored JSON is not a {'type': ..., 'data': ...} message object")
        return messages_from_dict([data])[0]
    except Exception as exc:  # every decoding failure means the same thing: a corrupt row
        reason = f"{type(exc).__name__}: {exc}"
        if len(reason) > 300:
            reason = reason[:300] + "..."
        raise CorruptMessageError(namespace, session_id, seq, reason) from exc


def prepare_append(
    messages: Sequence[BaseMessage], token_counts: Sequence[int]
) -> tuple[list[str], list[int]]:
    """Validate and serialise a batch before any database work, so a bad batch writes nothing.

    Returns:
        The encoded messages and the token counts, as lists of equal length.

    Raises:
        TypeError: An item is not a message or a count is not an ``int``.
        ValueError: The lengths differ, a count is negative, or a message cannot be stored.
    """
    messages = list(messages)
    counts = list(token_counts)
    if len(messages) != len(counts):
        raise ValueError(
            f"got {len(messages)} messages but {len(counts)} token counts; "
            "pass one count per message"
        )
    for i, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"token count {i} is a {type(count).__name__}, not an int")
        if count < 0:
            raise ValueError(f"token count {i} is {count}; counts must be >= 0")
    return [serialize_message(m, i) for i, m in enumerate(messages)], counts


def validate_session_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check the names and types of the fields passed to ``update_session``.

    Raises:
        TypeError: An unknown field or a value of the wrong type.
        ValueError: A negative count or position, or a non-positive calibration.
    """
    unknown = set(fields) - SESSION_FIELDS
    if unknown:
        raise TypeError(
            f"update_session() got unknown field(s) {sorted(unknown)}; "
            f"the session fields are {sorted(SESSION_FIELDS)}"
        )
    for name in ("summary_tokens", "summarized_through", "window_start"):
        if name in fields:
            value = fields[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} is {value}; it must be >= 0")
    if "summary" in fields and fields["summary"] is not None:
        if not isinstance(fields["summary"], str):
            raise TypeError(f"summary must be a str or None, got {type(fields['summary'])}")
        # The summary is text in a TEXT column: same rules as a message's text.
        try:
            fields["summary"].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("summary contains a lone surrogate; pass valid Unicode text") from None
        if "\x00" in fields["summary"]:
            raise ValueError("summary contains a NUL character, which databases cannot store")
    if "calibration" in fields and fields["calibration"] is not None:
        value = fields["calibration"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"calibration must be a float or None, got {type(value).__name__}")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"calibration is {value}; it must be a finite number > 0")
    return dict(fields)


def check_session_update(current: SessionRecord, fields: Mapping[str, Any]) -> None:
    """Check that applying ``fields`` to ``current`` leaves a consistent record.

    The summary must cover a prefix of the transcript, and the window must start at or after
    the end of the summary: ``summarized_through <= window_start <= message_count``.

    Raises:
        ValueError: The update would break that order; the numbers are in the message.
    """
    through = fields.get("summarized_through", current.summarized_through)
    start = fields.get("window_start", current.window_start)
    count = current.message_count
    if not through <= start <= count:
        raise ValueError(
            f"session {current.session_id!r}: summarized_through={through}, window_start={start}"
            f" and message_count={count} must satisfy summarized_through <= window_start <= "
            "message_count; the update was not applied"
        )


def validate_read_range(start: int, end: int | None) -> None:
    """Check the bounds of ``read``.

    Raises:
        ValueError: ``start`` is negative or ``end`` is before ``start``.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start is {start!r}; it must be an int >= 0")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < start):
        raise ValueError(f"end is {end!r}; it must be None or an int >= start ({start})")


def validate_lease(owner: object, ttl: float) -> None:
    """Check the arguments of ``acquire_lease``.

    Raises:
        TypeError: ``owner`` is not a string.
        ValueError: ``owner`` is empty or too long, or ``ttl`` is not a positive number.
    """
    validate_key(owner, "owner")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < float("inf"):
        raise ValueError(f"ttl is {ttl!r} seconds; it must be a finite number > 0")


_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_password(conninfo: str) -> str:
    """Return a connection string with its password replaced by ``***``.

    Handles both URLs (``postgresql://user:secret@host/db``) and ``key=value`` strings.
    """
    masked = _URL_PASSWORD.sub(r"\g<head>***@", conninfo)
    return _KV_PASSWORD.sub(r"\g<head>***", masked)


class MessageStore(ABC):
    """Durable conversations: per session, an append-only transcript and one session record.

    One store instance is bound to one namespace (a tenant or user); no method reaches a
    session of another namespace. :meth:`with_namespace` returns a store bound to another
    namespace that shares this one's connections.

    Guarantees every implementation gives (checked by one contract test suite):

    * ``append`` is atomic and totally ordered: concurrent appends to one session, from any
      number of threads or processes, get gap-free, duplicate-free sequence numbers from 0.
    * ``update_session`` is compare-and-swap on the record's ``version``.
    * A batch that cannot be stored (bad message, bad count, database down) writes nothing.

    The async methods default to running the sync ones in a worker thread; stores with a
    native async driver override them.
    """

    namespace: str

    # -- sync ---------------------------------------------------------------------------------

    @abstractmethod
    def append(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Append messages atomically; return their sequence numbers (gap-free, from 0)."""

    @abstractmethod
    def read(self, session_id: str, start: int = 0, end: int | None = None) -> list[StoredMessage]:
        """Return the messages with ``start <= seq < end``, in order (``end=None``: to the end).

        Raises:
            CorruptMessageError: A stored message in the range cannot be decoded.
        """

    @abstractmethod
    def get_session(self, session_id: str) -> SessionRecord:
        """Return the session record; a version-0 record if the session does not exist."""

    @abstractmethod
    def update_session(self, session_id: str, *, expected_version: int, **fields: Any) -> bool:
        """Compare-and-swap the session record.

        Applies ``fields`` (names in :data:`SESSION_FIELDS`) and bumps the version only when
        the stored version equals ``expected_version`` (``0`` for a session never updated).

        Returns:
            ``True`` when applied, ``False`` when the version had moved on.

        Raises:
            ValueError: The update would leave ``summarized_through <= window_start <=
                message_count`` false.
        """

    @abstractmethod
    def delete_session(self, session_id: str) -> None:
        """Remove the session's messages and record; a no-op for an unknown session."""

    @abstractmethod
    def list_sessions(self) -> list[str]:
        """Return the ids of this namespace's sessions, sorted."""

    @abstractmethod
    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the session's lease for ``ttl`` seconds (e.g. to summarize it).

        Succeeds when nobody holds the lease, when its holder's lease has expired, or when
        ``owner`` already holds it (renewal). Leases do not change ``version``.

        Returns:
            ``True`` when ``owner`` now holds the lease.
        """

    @abstractmethod
    def release_lease(self, session_id: str, owner: str) -> bool:
        """Release the lease if ``owner`` holds it; return whether it did."""

    @abstractmethod
    def with_namespace(self: _StoreT, namespace: str) -> _StoreT:
        """Return a store bound to ``namespace`` sharing this store's connections."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release connections this store opened. The store may not be used afterwards."""

    # -- async twins --------------------------------------------------------------------------

    async def aappend(
        self, session_id: str, messages: Sequence[BaseMessage], token_counts: Sequence[int]
    ) -> list[int]:
        """Async :meth:`append`."""
        return await asyncio.to_thread(self.append, session_id, messages, token_counts)

    async def aread(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[StoredMessage]:
        """Async :meth:`read`."""
        return await asyncio.to_thread(self.read, session_id, start, end)

    async def aget_session(self, session_id: str) -> SessionRecord:
        """Async :meth:`get_session`."""
        return await asyncio.to_thread(self.get_session, session_id)

    async def aupdate_session(
        self, session_id: str, *, expected_version: int, **fields: Any
    ) -> bool:
        """Async :meth:`update_session`."""
        return await asyncio.to_thread(
            lambda: self.update_session(session_id, expected_version=expected_version, **fields)
        )

    async def adelete_session(self, session_id: str) -> None:
        """Async :meth:`delete_session`."""
        await asyncio.to_thread(self.delete_session, session_id)

    async def alist_sessions(self) -> list[str]:
        """Async :meth:`list_sessions`."""
        return await asyncio.to_thread(self.list_sessions)

    async def aacquire_lease(self, session_id: str, owner: str, ttl: float) -> bool:
        """Async :meth:`acquire_lease`."""
        return await asyncio.to_thread(self.acquire_lease, session_id, owner, ttl)

    async def arelease_lease(self, session_id: str, owner: str) -> bool:
        """Async :meth:`release_lease`."""
        return await asyncio.to_thread(self.release_lease, session_id, owner)

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self: _StoreT) -> _StoreT:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self: _StoreT) -> _StoreT:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def check_expected_version(expected_version: object) -> int:
    """Check the ``expected_version`` of a compare-and-swap.

    Raises:
        TypeError: It is not an int.
        ValueError: It is negative.
    """
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise TypeError(f"expected_version must be an int, got {type(expected_version).__name__}")
    if expected_version < 0:
        raise ValueError(f"expected_version is {expected_version}; it must be >= 0")
    return expected_version
