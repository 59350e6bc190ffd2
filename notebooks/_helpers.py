"""Connect a notebook to the HolySheep relay, or to a loopback stand-in when there is no key.

With ``HOLYSHEEP_API_KEY`` set, the notebooks talk to the relay (``HOLYSHEEP_API_BASE`` if set).
Without it they start ``langchain_holysheep.testing.HolySheepTestServer`` on 127.0.0.1 with the
small deterministic responder below, so every cell runs offline: the answers are canned, while
the HTTP path, token usage and the provider's prompt cache are the real code and a simulation.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_holysheep.chat_models import DEFAULT_API_BASE
from langchain_holysheep.testing import HolySheepTestServer, Reply

__all__ = ["Backend", "connect", "markdown_table", "offline_responder"]

KEY_ENV = "HOLYSHEEP_API_KEY"
BASE_ENV = "HOLYSHEEP_API_BASE"

# Words of a tool name that say nothing about what the tool is for.
_GENERIC = {"get", "lookup", "look", "check", "create", "find", "fetch", "search", "status"}
_IDENTIFIER = re.compile(r"\b[A-Z]{2,}-\d+\b")
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+\b")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FIGURE = re.compile(r"^(?:[-+]?\$?[\d.,]+\s?[%×]?|n/a)$")


@dataclass(frozen=True)
class Backend:
    """Where this notebook's model calls go.

    Attributes:
        mode: ``"relay"`` (a key is set) or ``"offline"`` (the loopback stand-in).
        server: The loopback server in offline mode, else ``None``.
    """

    mode: Literal["relay", "offline"]
    server: HolySheepTestServer | None = None

    @property
    def offline(self) -> bool:
        """Whether the loopback stand-in answers instead of the relay."""
        return self.mode == "offline"

    def describe(self) -> str:
        """One line saying where model calls go (no key, no port, no path)."""
        if self.offline:
            return (
                f"Mode: OFFLINE. {KEY_ENV} is not set, so a loopback HolySheepTestServer "
                "(langchain_holysheep.testing) stands in for the relay: answers are canned, "
                "token usage and the prompt cache are simulated. Set the key to use the relay."
            )
        base = os.environ.get(BASE_ENV) or DEFAULT_API_BASE
        return f"Mode: RELAY. {KEY_ENV} is set; model calls go to {base}."


def connect() -> Backend:
    """Use the relay when ``HOLYSHEEP_API_KEY`` is set; otherwise start the loopback stand-in.

    In offline mode ``HOLYSHEEP_API_BASE`` and ``HOLYSHEEP_API_KEY`` are pointed at the server
    for this process, so ``ChatHolySheep(...)`` needs no arguments either way.

    Returns:
        The backend in use.
    """
    if os.environ.get(KEY_ENV):
        return Backend("relay")
    server = HolySheepTestServer(responder=offline_responder).start()
    os.environ.update(server.env())
    atexit.register(server.stop)
    return Backend("offline", server)


# --------------------------------------------------------------------------------------------
# The offline responder: a deterministic, clearly labelled stand-in for a model


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, (str, dict))
        )
    return ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return " ".join(_text(message.get("content")).split())
    return ""


def _tool_name_of_result(messages: Sequence[Mapping[str, Any]], call_id: str | None) -> str:
    for message in reversed(messages):
        for call in message.get("tool_calls") or ():
            if call.get("id") == call_id:
                return str((call.get("function") or {}).get("name", "the tool"))
    return "the tool"


def _pick_tool(tools: Sequence[Mapping[str, Any]], text: str) -> Mapping[str, Any] | None:
    """The tool whose distinctive name words appear most in the user's text, if any."""
    lowered = text.lower()
    best: tuple[int, Mapping[str, Any]] | None = None
    for tool in tools:
        function = tool.get("function") or {}
        words = [w for w in str(function.get("name", "")).lower().split("_") if w]
        score = sum(1 for w in words if w not in _GENERIC and w in lowered)
        if score and (best is None or score > best[0]):
            best = (score, function)
    return best[1] if best else None


def _argument(schema: Mapping[str, Any], text: str) -> Any:
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind in ("integer", "number"):
        found = _NUMBER.search(_IDENTIFIER.sub("", text))
        value = float(found.group()) if found else 1.0
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind in ("array", "object"):
        return [] if kind == "array" else {}
    for pattern in (_IDENTIFIER, _NAME):
        found = pattern.search(text)
        if found:
            return found.group()
    return "example"


def offline_responder(body: dict[str, Any]) -> Reply | None:
    """Answer a chat-completions request the way a (very simple) assistant would.

    * After a tool result: a short answer quoting what the tool returned.
    * When tools are offered and the user's message names one (``get_weather`` for "weather"):
      a call of that tool, with identifiers (``ORD-1042``) or capitalised names (``Paris``)
      from the message as arguments.
    * Otherwise: a labelled canned answer that says how many messages the prompt had.

    Forced tool choices and JSON response formats are left to the server's default reply.

    Args:
        body: The request JSON.

    Returns:
        The reply, or ``None`` for the server's default.
    """
    if body.get("tool_choice") not in (None, "auto") or body.get("response_format"):
        return None
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        name = _tool_name_of_result(messages, last.get("tool_call_id"))
        result = " ".join(_text(last.get("content")).split())
        if len(result) > 160:
            result = result[:160] + "..."
        return Reply.text(f"[offline answer] {name} says: {result}")
    user_text = _last_user_text(messages)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    if last.get("role") == "user" and tools:
        function = _pick_tool(tools, user_text)
        if function is not None:
            properties = (function.get("parameters") or {}).get("properties") or {}
            args = {name: _argument(spec, user_text) for name, spec in properties.items()}
            return Reply.tool_call(str(function["name"]), args)
    quoted = user_text if len(user_text) <= 120 else user_text[:120] + "..."
    return Reply.text(
        f"[offline answer] You said “{quoted}” ({len(messages)} messages in the prompt)."
    )


# --------------------------------------------------------------------------------------------
# Display


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """Return a Markdown table for ``display`` (numbers right-aligned, with thousands commas).

    Args:
        headers: Column titles.
        rows: One sequence of cells per row; ints get thousands separators, floats are shown
            as given by ``str`` unless already formatted as strings.
    """
    from IPython.display import Markdown

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value).replace("|", "\\|")

    def is_number(value: Any) -> bool:
        if isinstance(value, bool):
            return False
        return isinstance(value, (int, float)) or bool(_FIGURE.match(str(value)))

    numeric = [all(is_number(r[i]) for r in rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("--:" if n else ":--" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return Markdown("\n".join(lines))  # type: ignore[no-untyped-call]
