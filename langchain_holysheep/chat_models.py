"""``ChatHolySheep``: the chat model for the HolySheep relay, an OpenAI-compatible endpoint.

A thin ``BaseChatOpenAI`` subclass: HolySheep endpoint and key, model profiles, usage on
every result (cached prompt tokens and the relay's cost included), actionable errors, and
streams that never end silently short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias, cast

import openai
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils import from_env, secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai.chat_models.base import BaseChatOpenAI
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from typing_extensions import Self

from langchain_holysheep.errors import (
    HolySheepAuthenticationError,
    HolySheepConnectionError,
    HolySheepIncompleteStreamError,
    HolySheepRateLimitError,
    HolySheepResponseError,
    HolySheepServerError,
    HolySheepTimeoutError,
)
from langchain_holysheep.profiles import get_model_profile

try:  # private helpers, present in the langchain-openai versions we support
    from langchain_openai.chat_models import _client_utils
except ImportError:  # pragma: no cover - then the openai SDK's own clients are used
    _client_utils = None  # type: ignore[assignment]

__all__ = ["DEFAULT_API_BASE", "PROVIDER", "ChatHolySheep"]

logger = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.holysheep.ai/v1"
"""The HolySheep relay; ``HOLYSHEEP_API_BASE`` or ``base_url=`` points elsewhere."""

PROVIDER = "holysheep"
"""``response_metadata["model_provider"]`` of every result, equal to ``ls_provider``."""

# The openai SDK's defaults, used when ``timeout`` / ``max_retries`` are left unset.
_SDK_DEFAULT_TIMEOUT = 600.0
_SDK_DEFAULT_MAX_RETRIES = 2
# Backoff between retries of a broken stream (the SDK's own schedule for HTTP retries).
_STREAM_RETRY_BASE_DELAY = 0.5
_STREAM_RETRY_MAX_DELAY = 8.0

_DictOrPydanticClass: TypeAlias = dict[str, Any] | type[BaseModel] | type
_DictOrPydantic: TypeAlias = dict[str, Any] | BaseModel


# --------------------------------------------------------------------------------------------
# Usage


def _usage_dict(response: Any) -> dict[str, Any] | None:
    """Return the ``usage`` object of a completion or chunk as a dict, relay extras included."""
    usage = (
        response.get("usage") if isinstance(response, dict) else getattr(response, "usage", None)
    )
    if isinstance(usage, openai.BaseModel):
        # Fields beyond OpenAI's schema (cost_usd, prompt_cache_hit_tokens) are kept as
        # extras, which model_dump includes.
        usage = usage.model_dump()
    return usage if isinstance(usage, dict) else None


def _apply_usage(message: BaseMessage, usage: Mapping[str, Any] | None) -> None:
    """Stamp the provider and relay usage extras on a message, and map cached tokens.

    OpenAI reports cached prompt tokens as ``prompt_tokens_details.cached_tokens`` (mapped to
    ``cache_read`` by the base class); DeepSeek as top-level ``prompt_cache_hit_tokens``,
    mapped here when the nested form is absent. A cache *miss* is an ordinary input token,
    not a cache write, so it is not mapped to ``cache_creation``.
    """
    message.response_metadata["model_provider"] = PROVIDER
    if not usage:
        return
    if "cost_usd" in usage and usage["cost_usd"] is not None:
        message.response_metadata["cost_usd"] = usage["cost_usd"]
    hit = usage.get("prompt_cache_hit_tokens")
    if not isinstance(message, AIMessage) or message.usage_metadata is None:
        return
    if isinstance(hit, int) and not isinstance(hit, bool):
        details = dict(message.usage_metadata.get("input_token_details") or {})
        if "cache_read" not in details:
            details["cache_read"] = hit
            metadata: dict[str, Any] = dict(message.usage_metadata)
            metadata["input_token_details"] = cast("InputTokenDetails", details)
            message.usage_metadata = cast("UsageMetadata", metadata)


# --------------------------------------------------------------------------------------------
# Errors


def _redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        return text.replace(secret, "[REDACTED]")
    return text


def _redact_value(value: Any, secret: str) -> Any:
    if isinstance(value, str):
        return _redact(value, secret)
    if isinstance(value, dict):
        return {k: _redact_value(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, secret) for v in value]
    return value


def _scrub_error(error: BaseException, secret: str | None) -> None:
    """Redact the key from an SDK error in place: it is chained to ours and logged with it.

    A relay that quotes the key in an error body would otherwise leak it through the
    traceback of ``logger.exception`` (which prints the chained error) or ``error.body``.
    """
    if not secret or len(secret) < 4:
        return
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:  # the whole chain: langchain-openai wraps the SDK's error in its own
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(_redact_value(a, secret) for a in current.args)
        if isinstance(current, openai.APIError):
            current.message = _redact(current.message, secret)
            current.body = _redact_value(current.body, secret)
        pending += [current.__cause__, current.__context__]


def _server_message(error: openai.APIError, secret: str | None) -> str:
    """The relay's own error text, short and without the key, as `` Relay said: ...``."""
    body = error.body
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        return ""
    message = _redact(" ".join(message.split()), secret)
    if len(message) > 300:
        message = message[:300] + "..."
    return f" Relay said: {message!r}"


def _retries_taken(error: openai.APIError) -> int | None:
    """Retries the openai SDK made before giving up (it sends ``x-stainless-retry-count``)."""
    request = getattr(error, "request", None)
    headers = getattr(request, "headers", None)
    value = headers.get("x-stainless-retry-count") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _retry_after(error: openai.APIStatusError) -> str | None:
    headers = error.response.headers
    if headers.get("retry-after-ms"):
        return f"{float(headers['retry-after-ms']) / 1000:g}s"
    if headers.get("retry-after"):
        value = headers["retry-after"]
        try:
            return f"{float(value):g}s"
        except ValueError:
            return value
    return None


def _root_cause(error: BaseException) -> str:
    """Describe the innermost cause of ``error`` (e.g. the socket error under the SDK's)."""
    seen = {id(error)}
    while True:
        cause = error.__cause__ or error.__context__
        if cause is None or id(cause) in seen:
            break
        seen.add(id(cause))
        error = cause
    text = str(error).strip().rstrip(".")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _describe_timeout(timeout: Any) -> str:
    if timeout is None:
        return f"{_SDK_DEFAULT_TIMEOUT:g}s (the openai SDK default)"
    if isinstance(timeout, int | float):
        return f"{timeout:g}s"
    if isinstance(timeout, tuple):
        return "(" + ", ".join(f"{t:g}s" if t is not None else "None" for t in timeout) + ")"
    read = getattr(timeout, "read", None)
    return f"{read:g}s (read)" if isinstance(read, int | float) else repr(timeout)


# --------------------------------------------------------------------------------------------
# The model


class ChatHolySheep(BaseChatOpenAI):
    r"""Chat model for the HolySheep relay (``https://api.holysheep.ai/v1``).

    HolySheep serves DeepSeek, OpenAI, Anthropic and Google models behind one
    OpenAI-compatible endpoint. Any OpenAI-compatible server can stand in for it through
    ``base_url`` / ``HOLYSHEEP_API_BASE`` (for example the loopback server of
    ``langchain_holysheep.testing``).

    Setup:
        Install ``langchain-holysheep`` and set ``HOLYSHEEP_API_KEY``.

        ```bash
        pip install -U langchain-holysheep
        export HOLYSHEEP_API_KEY="your-api-key"
        # optional: another OpenAI-compatible endpoint
        export HOLYSHEEP_API_BASE="https://api.holysheep.ai/v1"
        ```

    Key init args — completion params:
        model:
            Model name, e.g. ``"deepseek-v3.2"``, ``"gpt-4.1-mini"``, ``"claude-sonnet-4.5"``,
            ``"gemini-2.5-flash"``. Unknown names work too; they just have no ``profile``.
        temperature:
            Sampling temperature.
        max_tokens:
            Max number of tokens to generate.

    Key init args — client params:
        timeout:
            Seconds to wait for an answer (the openai SDK's 600 s when unset).
        max_retries:
            Retries after a 408/409/429/5xx answer, a timeout or a lost connection, with
            exponential backoff (0.5 s doubling, at most 8 s) or the server's ``Retry-After``.
            A stream that breaks before yielding anything is retried the same number of times.
        api_key:
            HolySheep API key; read from ``HOLYSHEEP_API_KEY`` when not passed.
        base_url:
            API base URL; read from ``HOLYSHEEP_API_BASE``, default ``DEFAULT_API_BASE``.
        stream_usage:
            Whether streams end with a usage chunk. On by default (``langchain-openai``
            turns it on only for OpenAI's own URL).

    Instantiate:
        ```python
        from langchain_holysheep import ChatHolySheep

        model = ChatHolySheep(
            model="deepseek-v3.2",
            temperature=0,
            max_tokens=None,
            timeout=30,
            max_retries=2,
            # api_key="...",  # or HOLYSHEEP_API_KEY
            # base_url="...",  # or HOLYSHEEP_API_BASE
        )
        ```

    Invoke:
        ```python
        messages = [
            ("system", "You are a helpful translator. Translate the user sentence to French."),
            ("human", "I love programming."),
        ]
        model.invoke(messages)
        ```

    Stream:
        ```python
        for chunk in model.stream(messages):
            print(chunk.text, end="")
        ```
        ```python
        stream = model.stream(messages)
        full = next(stream)
        for chunk in stream:
            full += chunk
        full.usage_metadata  # the final chunk carries usage
        ```

        A stream that ends without a finish reason (connection cut, truncated, a malformed
        chunk) raises ``HolySheepIncompleteStreamError`` instead of a shorter answer.

    Async:
        ```python
        await model.ainvoke(messages)

        # stream:
        async for chunk in model.astream(messages):
            print(chunk.text, end="")

        # batch:
        await model.abatch([messages])
        ```

    Tool calling:
        ```python
        from pydantic import BaseModel, Field


        class GetWeather(BaseModel):
            '''Get the current weather in a given location'''

            location: str = Field(..., description="The city and state, e.g. San Francisco, CA")


        model_with_tools = model.bind_tools([GetWeather])
        ai_msg = model_with_tools.invoke("What is the weather like in Paris?")
        ai_msg.tool_calls
        ```

    Structured output:
        ```python
        from pydantic import BaseModel, Field


        class Joke(BaseModel):
            '''Joke to tell user.'''

            setup: str = Field(description="The setup of the joke")
            punchline: str = Field(description="The punchline to the joke")


        structured_model = model.with_structured_output(Joke)  # tool calling by default
        structured_model.invoke("Tell me a joke about sheep")
        ```

    Token usage:
        ```python
        ai_msg = model.invoke(messages)
        ai_msg.usage_metadata
        ```
        ```python
        {
            "input_tokens": 2048,
            "output_tokens": 12,
            "total_tokens": 2060,
            "input_token_details": {"cache_read": 1920},
            "output_token_details": {},
        }
        ```

        ``cache_read`` comes from OpenAI's ``prompt_tokens_details.cached_tokens`` or
        DeepSeek's ``prompt_cache_hit_tokens``; the relay's ``usage.cost_usd``, when it sends
        one, is in ``ai_msg.response_metadata["cost_usd"]`` and the raw usage in
        ``response_metadata["token_usage"]``.

    Response metadata:
        ```python
        ai_msg.response_metadata["model_provider"]  # "holysheep", on stream chunks too
        ```

    Errors:
        ``HolySheepAuthenticationError`` (401), ``HolySheepRateLimitError`` (429 after all
        retries), ``HolySheepServerError`` (5xx after all retries), ``HolySheepTimeoutError``,
        ``HolySheepConnectionError``, ``HolySheepResponseError`` (a body that is not a chat
        completion) and ``HolySheepIncompleteStreamError``, all in
        ``langchain_holysheep.errors``. Each also is the matching ``openai`` and
        ``langchain_core.exceptions`` error, so existing ``except`` clauses keep working.
    """

    model_name: str = Field(alias="model")
    """Model name, e.g. ``"deepseek-v3.2"``."""
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("HOLYSHEEP_API_KEY", default=None),
    )
    """HolySheep API key; read from ``HOLYSHEEP_API_KEY`` when not passed."""
    api_base: str = Field(
        alias="base_url",
        default_factory=from_env("HOLYSHEEP_API_BASE", default=DEFAULT_API_BASE),
    )
    """API base URL; read from ``HOLYSHEEP_API_BASE`` when not passed."""
    stream_usage: bool | None = True
    """Whether streams end with a usage chunk (on by default)."""
    use_responses_api: bool | None = False
    """The relay speaks Chat Completions; set ``True`` only for an endpoint with Responses."""

    _token_counter: Any = PrivateAttr(default=None)

    model_config = ConfigDict(populate_by_name=True)

    @property
    def _llm_type(self) -> str:
        """Return type of chat model."""
        return "chat-holysheep"

    @property
    def lc_secrets(self) -> dict[str, str]:
        """A map of constructor argument names to secret ids."""
        return {"api_key": "HOLYSHEEP_API_KEY", "openai_api_key": "HOLYSHEEP_API_KEY"}

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Return whether this model can be serialized by LangChain (it can; keys excluded)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """Return ``["langchain_holysheep", "chat_models"]``."""
        return ["langchain_holysheep", "chat_models"]

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        ls_params = super()._get_ls_params(stop=stop, **kwargs)
        ls_params["ls_provider"] = PROVIDER
        return ls_params

    @model_validator(mode="after")
    def _set_holysheep_version(self) -> Self:
        """Record the package version in metadata (a unique name: see BaseChatOpenAI)."""
        from langchain_holysheep import __version__

        self._add_version("langchain-holysheep", __version__)
        return self

    @model_validator(mode="after")
    def validate_environment(self) -> Self:
        """Require a key, then build the openai clients for the HolySheep endpoint."""
        if not (self.api_key and self.api_key.get_secret_value()):
            msg = (
                "ChatHolySheep needs an API key: set the HOLYSHEEP_API_KEY environment "
                "variable or pass api_key=... (for a local OpenAI-compatible server that "
                "ignores keys, any placeholder such as api_key='unused' will do)."
            )
            raise ValueError(msg)
        # BaseChatOpenAI's own key and URL fields share the aliases api_key/base_url; they
        # are unused here, so they are cleared rather than serialised twice.
        self.openai_api_key = None
        self.openai_api_base = None
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be at least 1, got n={self.n}.")
        if self.n is not None and self.n > 1 and self.streaming:
            raise ValueError(f"n must be 1 when streaming, got n={self.n}.")
        client_params: dict[str, Any] = {
            k: v
            for k, v in {
                "api_key": self.api_key.get_secret_value(),
                "base_url": self.api_base,
                "timeout": self.request_timeout,
                "max_retries": self.max_retries,
                "default_headers": self.default_headers,
                "default_query": self.default_query,
            }.items()
            if v is not None
        }
        sync_http, async_http = self._http_clients()
        if not self.client:
            self.root_client = openai.OpenAI(**client_params, http_client=sync_http)
            self.client = self.root_client.chat.completions
        if not self.async_client:
            self.root_async_client = openai.AsyncOpenAI(**client_params, http_client=async_http)
            self.async_client = self.root_async_client.chat.completions
        return self

    def _http_clients(self) -> tuple[Any, Any]:
        """Return the httpx clients to use: the user's, or shared ones.

        Sharing them per (base URL, timeout) like ``ChatOpenAI`` does makes construction
        cheap (a new TLS context costs tens of milliseconds) and pools connections across
        instances. The sync client is langchain-openai's (its TCP keep-alive and proxy
        handling come with it); the async one keeps one pool per event loop, so a model
        survives ``asyncio.run`` being called twice (pooled connections are bound to the loop
        that opened them).
        """
        sync_http, async_http = self.http_client, self.http_async_client
        base, timeout = self.api_base, self.request_timeout
        if async_http is None:
            async_http = _loop_local_async_client(base, timeout, self.openai_proxy)
        if sync_http is not None or _client_utils is None:
            return sync_http, async_http
        if _client_utils._should_bypass_socket_options_for_proxy_env(
            http_socket_options=self.http_socket_options,
            # The user's clients, not the shared async one built above: that one would make
            # the check think the user opted out of httpx's proxy-from-environment handling.
            http_client=self.http_client,
            http_async_client=self.http_async_client,
            openai_proxy=self.openai_proxy,
        ):
            sockets: tuple[Any, ...] = ()
        else:
            sockets = _client_utils._resolve_socket_options(self.http_socket_options)
        if self.openai_proxy:
            sync_http = _client_utils._build_proxied_sync_httpx_client(
                self.openai_proxy, True, sockets
            )
        else:
            sync_http = _client_utils._get_default_httpx_client(base, timeout, sockets)
        return sync_http, async_http

    def _resolve_model_profile(self) -> ModelProfile | None:
        return get_model_profile(self.model_name)

    # Results ---------------------------------------------------------------------------

    def _create_chat_result(
        self,
        response: dict[str, Any] | openai.BaseModel,
        generation_info: dict[str, Any] | None = None,
    ) -> ChatResult:
        response_dict = self._check_completion(response)
        result = super()._create_chat_result(response, generation_info)
        usage = _usage_dict(response_dict)
        for generation in result.generations:
            _apply_usage(generation.message, usage)
        if result.llm_output is not None:
            result.llm_output["model_provider"] = PROVIDER
        return result

    def _check_completion(self, response: Any) -> dict[str, Any]:
        """Raise ``HolySheepResponseError`` unless ``response`` is a chat completion."""
        if isinstance(response, openai.BaseModel):
            response_dict: Any = response.model_dump(
                exclude={"choices": {"__all__": {"message": {"parsed"}}}}, warnings=False
            )
        else:
            response_dict = response
        problem = None
        if not isinstance(response_dict, dict):
            problem = f"a {type(response).__name__}, not a JSON object"
        elif response_dict.get("error"):
            problem = f"an error object: {json.dumps(response_dict['error'])[:300]}"
        elif not isinstance(response_dict.get("choices"), list) or not response_dict["choices"]:
            problem = f"no 'choices' (keys: {sorted(response_dict)})"
        elif not all(isinstance(c, dict) and c.get("message") for c in response_dict["choices"]):
            problem = "a choice without a 'message'"
        if problem is None:
            return cast("dict[str, Any]", response_dict)
        preview = repr(response)
        if len(preview) > 200:
            preview = preview[:200] + "..."
        raise HolySheepResponseError(self._redact(
            f"The relay at {self.api_base} answered model {self.model_name!r} with {problem}; "
            f"expected a chat completion. Body starts: {preview}. Check that HOLYSHEEP_API_BASE "
            "/ base_url points at an OpenAI-compatible /v1 endpoint; if it does, the relay "
            "is misbehaving: retry later."
        ))  # fmt: skip

    def _convert_chunk_to_generation_chunk(
        self,
        chunk: dict[str, Any],
        default_chunk_class: type,
        base_generation_info: dict[str, Any] | None,
    ) -> ChatGenerationChunk | None:
        generation_chunk = super()._convert_chunk_to_generation_chunk(
            chunk, default_chunk_class, base_generation_info
        )
        if generation_chunk is not None:
            # Usage arrives in a trailing chunk without choices; it is stamped too.
            usage = _usage_dict(chunk) or _usage_dict(chunk.get("chunk") or {})
            _apply_usage(generation_chunk.message, usage)
            if usage:
                generation_chunk.message.response_metadata["token_usage"] = usage
        return generation_chunk

    # Calls -----------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        try:
            return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        except (openai.APIError, json.JSONDecodeError) as e:
            error = self._translate_error(e)
            if error is e:
                raise
            raise error from e

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        try:
            return await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)
        except (openai.APIError, json.JSONDecodeError) as e:
            error = self._translate_error(e)
            if error is e:
                raise
            raise error from e

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        max_retries = self._max_retries
        expect_usage = self._should_stream_usage(kwargs.get("stream_usage"), **kwargs)
        for attempt in range(max_retries + 1):
            guard = _StreamGuard(self, attempt, max_retries, expect_usage=expect_usage)
            try:
                for chunk in super()._stream(
                    messages, stop=stop, run_manager=run_manager, **kwargs
                ):
                    yield from guard.feed(chunk)
                yield from guard.finish()
                return
            except _RetryStream as retry:
                logger.warning("%s", retry)
                time.sleep(_stream_retry_delay(attempt))
            except (openai.APIError, json.JSONDecodeError) as e:
                failure = guard.fail(e)
                if isinstance(failure, _RetryStream):
                    logger.warning("%s", failure)
                    time.sleep(_stream_retry_delay(attempt))
                    continue
                if failure is e:
                    raise
                raise failure from e

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        max_retries = self._max_retries
        expect_usage = self._should_stream_usage(kwargs.get("stream_usage"), **kwargs)
        for attempt in range(max_retries + 1):
            guard = _StreamGuard(self, attempt, max_retries, expect_usage=expect_usage)
            try:
                async for chunk in super()._astream(
                    messages, stop=stop, run_manager=run_manager, **kwargs
                ):
                    for out in guard.feed(chunk):
                        yield out
                for out in guard.finish():
                    yield out
                return
            except _RetryStream as retry:
                logger.warning("%s", retry)
                await asyncio.sleep(_stream_retry_delay(attempt))
            except (openai.APIError, json.JSONDecodeError) as e:
                failure = guard.fail(e)
                if isinstance(failure, _RetryStream):
                    logger.warning("%s", failure)
                    await asyncio.sleep(_stream_retry_delay(attempt))
                    continue
                if failure is e:
                    raise
                raise failure from e

    # Tools, structured output, token counts --------------------------------------------

    def with_structured_output(
        self,
        schema: _DictOrPydanticClass | None = None,
        *,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, _DictOrPydantic]:
        """Return a runnable whose output follows ``schema``.

        Same as ``BaseChatOpenAI.with_structured_output`` except that the default method is
        ``"function_calling"``: every model the relay serves supports tool calling, while
        OpenAI's ``"json_schema"`` response format is not supported by all of them (DeepSeek).

        Args:
            schema: A Pydantic class, ``TypedDict`` class, JSON schema or OpenAI tool schema.
            method: ``"function_calling"`` (default), ``"json_schema"`` or ``"json_mode"``.
            include_raw: Also return the raw message and any parsing error.
            strict: Ask for strict schema adherence (models that support it).
            **kwargs: Passed to ``BaseChatOpenAI.with_structured_output``.

        Returns:
            A runnable that returns a ``schema`` instance (Pydantic) or a dict; with
            ``include_raw=True`` a dict with ``raw``, ``parsed`` and ``parsing_error``.
        """
        return super().with_structured_output(
            schema, method=method, include_raw=include_raw, strict=strict, **kwargs
        )

    def _counter(self) -> Any:
        from langchain_holysheep.tokens import TokenCounter

        if self._token_counter is None or self._token_counter.model != self.model_name:
            self._token_counter = TokenCounter(self.model_name)
        return self._token_counter

    def get_num_tokens_from_messages(
        self,
        messages: Sequence[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool] | None = None,
        *,
        allow_fetching_images: bool = True,
    ) -> int:
        """Count the prompt tokens of ``messages`` (and ``tools``) offline.

        Uses ``langchain_holysheep.tokens.TokenCounter`` for this model: its own tokenizer for
        OpenAI models, ``cl100k_base`` as an estimate for the others (DeepSeek, Claude,
        Gemini, unknown models). No network access, unlike the base class for images.

        Args:
            messages: The messages of the prompt.
            tools: Tools that will be bound; their JSON schemas are counted too.
            allow_fetching_images: Ignored; images are never fetched.

        Returns:
            The estimated prompt tokens, per-message overhead and reply priming included.
        """
        counter = self._counter()
        total = int(counter.count_messages(messages))
        if tools:
            schemas = [convert_to_openai_tool(tool) for tool in tools]
            total += int(counter.count_text(json.dumps(schemas, sort_keys=True)))
        return total

    def get_token_ids(self, text: str) -> list[int]:
        """Return the token ids of ``text`` with this model's tokenizer (offline)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        from langchain_holysheep.tokens import load_encoding

        encoding = load_encoding(self._counter().encoding_name)
        return list(encoding.encode_ordinary(text))

    @property
    def _max_retries(self) -> int:
        return self.max_retries if self.max_retries is not None else _SDK_DEFAULT_MAX_RETRIES

    def _redact(self, text: str) -> str:
        return _redact(text, self.api_key.get_secret_value() if self.api_key else None)

    def _translate_error(self, error: Exception) -> Exception:
        """Return the actionable error for an SDK/LangChain error, or ``error`` itself."""
        secret = self.api_key.get_secret_value() if self.api_key else None
        model, base = self.model_name, self.api_base
        if isinstance(error, json.JSONDecodeError):
            return HolySheepResponseError(self._redact(
                f"The relay at {base} answered model {model!r} with a body that is not JSON "
                f"({error.msg} at position {error.pos}). Check that HOLYSHEEP_API_BASE / "
                "base_url points at an OpenAI-compatible /v1 endpoint; if it does, the relay "
                "is misbehaving: retry later."
            ))  # fmt: skip
        if not isinstance(error, openai.APIError) or isinstance(error, HolySheepResponseError):
            return error
        _scrub_error(error, secret)
        retries = _retries_taken(error)
        limit = self._max_retries
        tries = (
            f"after {retries} retr{'y' if retries == 1 else 'ies'} (max_retries={limit})"
            if retries is not None
            else f"(max_retries={limit})"
        )
        said = _server_message(error, secret)
        if isinstance(error, openai.AuthenticationError):
            return HolySheepAuthenticationError(
                message=(
                    f"The relay at {base} rejected the API key (HTTP 401). Check "
                    "HOLYSHEEP_API_KEY or api_key=: it may be mistyped, revoked, or meant for "
                    f"another endpoint.{said}"
                ),
                response=error.response,
                body=error.body,
            )
        if isinstance(error, openai.RateLimitError):
            wait = _retry_after(error)
            asked = f"; it last asked to wait {wait} (Retry-After)" if wait else ""
            return HolySheepRateLimitError(
                message=(
                    f"The relay at {base} kept rate-limiting model {model!r} (HTTP 429) "
                    f"{tries}{asked}. Lower the request rate or concurrency, raise "
                    f"max_retries, or retry later.{said}"
                ),
                response=error.response,
                body=error.body,
            )
        if isinstance(error, openai.InternalServerError):
            status = error.status_code
            return HolySheepServerError(
                message=(
                    f"The relay at {base} kept failing for model {model!r} (HTTP {status}) "
                    f"{tries}. The relay or its upstream provider is having trouble: retry "
                    f"later or try another model.{said}"
                ),
                response=error.response,
                body=error.body,
            )
        if isinstance(error, openai.APITimeoutError):
            return HolySheepTimeoutError(
                (
                    f"The relay at {base} did not answer model {model!r} within the timeout "
                    f"of {_describe_timeout(self.request_timeout)} {tries}. Raise timeout= on "
                    "ChatHolySheep for long answers, or retry later."
                ),
                request=error.request,
            )
        if isinstance(error, openai.APIConnectionError):
            reason = f": {self._redact(_root_cause(error))}"
            return HolySheepConnectionError(
                message=(
                    f"Could not connect to the relay at {base} {tries}{reason}. Check "
                    "HOLYSHEEP_API_BASE / base_url and the network."
                ),
                request=error.request,
            )
        return error


class _LoopLocalAsyncClient(openai.DefaultAsyncHttpxClient):  # type: ignore[misc,valid-type]
    """An async httpx client that sends through one inner client per running event loop."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._inner_kwargs = kwargs
        self._inner: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._inner_lock = threading.Lock()

    async def send(self, request: Any, **kwargs: Any) -> Any:
        """Send ``request`` with the client of the running loop (created on first use)."""
        loop = asyncio.get_running_loop()
        with self._inner_lock:
            client = self._inner.get(loop)
            if client is None:
                # Pooled connections refer to their loop, so entries of closed loops would
                # never be collected; drop them (their sockets close when collected).
                for old in [old for old in self._inner if old.is_closed()]:
                    del self._inner[old]
                client = openai.DefaultAsyncHttpxClient(**self._inner_kwargs)
                self._inner[loop] = client
        return await client.send(request, **kwargs)

    async def aclose(self) -> None:
        """Close the running loop's inner client and this one."""
        with self._inner_lock:
            client = self._inner.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        await super().aclose()


_ASYNC_CLIENTS: dict[tuple[Any, ...], _LoopLocalAsyncClient] = {}
_ASYNC_CLIENTS_LOCK = threading.Lock()


def _loop_local_async_client(
    base_url: str, timeout: Any, proxy: str | None
) -> _LoopLocalAsyncClient:
    kwargs: dict[str, Any] = {"base_url": base_url}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if proxy:
        kwargs["proxy"] = proxy
    try:
        key = (base_url, timeout, proxy)
        hash(key)
    except TypeError:  # an httpx.Timeout: not shared
        return _LoopLocalAsyncClient(**kwargs)
    with _ASYNC_CLIENTS_LOCK:
        client = _ASYNC_CLIENTS.get(key)
        if client is None:
            client = _ASYNC_CLIENTS[key] = _LoopLocalAsyncClient(**kwargs)
        return client


class _RetryStream(Exception):
    """A broken stream that yielded nothing yet, so it is safe to request again."""


def _stream_retry_delay(attempt: int) -> float:
    delay = min(_STREAM_RETRY_BASE_DELAY * 2.0**attempt, _STREAM_RETRY_MAX_DELAY)
    return delay * (1 - 0.25 * random.random())


class _StreamGuard:
    """Watches one streaming attempt: holds back empty leading chunks, requires a finish reason.

    Leading chunks with no text, tool call or usage are held back, so a stream that breaks
    before saying anything can be retried without the caller having seen a partial answer.
    """

    def __init__(
        self, model: ChatHolySheep, attempt: int, max_retries: int, *, expect_usage: bool
    ) -> None:
        self.model = model
        self.expect_usage = expect_usage
        self.attempt = attempt
        self.max_retries = max_retries
        self.received = 0
        self.yielded = 0
        self.finished = False
        self.held: list[ChatGenerationChunk] = []

    def feed(self, chunk: ChatGenerationChunk) -> Iterator[ChatGenerationChunk]:
        self.received += 1
        message = chunk.message
        if (chunk.generation_info or {}).get("finish_reason"):
            self.finished = True
            if not self.expect_usage and isinstance(message, AIMessageChunk):
                message.chunk_position = "last"
        elif self.finished and isinstance(message, AIMessageChunk) and message.usage_metadata:
            # The usage chunk ends the stream. Marked, it stops LangChain from appending an
            # empty closing chunk of its own (which would lack model_provider).
            message.chunk_position = "last"
        if self.yielded == 0 and _is_empty(chunk) and not self.finished:
            self.held.append(chunk)
            return
        yield from self._flush()
        self.yielded += 1
        yield chunk

    def _flush(self) -> Iterator[ChatGenerationChunk]:
        held, self.held = self.held, []
        self.yielded += len(held)
        yield from held

    def finish(self) -> Iterator[ChatGenerationChunk]:
        if not self.finished:
            raise self._failure("was truncated (it ended without a finish reason)")
        yield from self._flush()

    def fail(self, error: Exception) -> Exception:
        """Return what to raise for an error during this attempt."""
        if self.received == 0 and not self._broke_after_response(error):
            # The request itself failed: the openai SDK already retried it.
            return self.model._translate_error(error)
        if isinstance(error, json.JSONDecodeError):
            what = f"sent a chunk that is not JSON ({error.msg})"
        elif isinstance(error, openai.APITimeoutError):
            what = "stalled past the timeout"
        elif isinstance(error, openai.APIConnectionError):
            what = f"was cut ({_root_cause(error)})"
        else:
            what = f"failed ({type(error).__name__})"
        return self._failure(what)

    def _broke_after_response(self, error: Exception) -> bool:
        """Whether ``error`` struck after the stream's 200 answer, where the SDK never retries.

        The SDK retries a failed connection or timeout until ``max_retries`` is spent, so one
        that reaches us with retries left happened while reading the stream.
        """
        if isinstance(error, json.JSONDecodeError):
            return True
        if isinstance(error, openai.APIStatusError) or not isinstance(
            error, openai.APIConnectionError
        ):
            return False
        retries = _retries_taken(error)
        return retries is not None and retries < self.max_retries

    def _failure(self, what: str) -> Exception:
        model = self.model
        where = f"The stream from {model.api_base} for model {model.model_name!r}"
        meaningful = self.yielded > 0
        if not meaningful and self.attempt < self.max_retries:
            return _RetryStream(
                f"{where} {what} after {self.received} chunks, before any content; "
                f"retrying ({self.attempt + 1} of max_retries={self.max_retries})."
            )
        if meaningful:
            advice = (
                f"{self.yielded} chunks were already yielded, so it was not retried; "
                "discard the partial answer and call again"
            )
        else:
            retries = f"{self.attempt} retr{'y' if self.attempt == 1 else 'ies'}"
            advice = f"gave up after {retries} (max_retries={self.max_retries}); retry later"
        return HolySheepIncompleteStreamError(
            model._redact(
                f"{where} {what} after {self.received} chunks: the answer is incomplete. "
                f"{advice[0].upper()}{advice[1:]}."
            ),
            chunks_received=self.received,
        )


def _is_empty(chunk: ChatGenerationChunk) -> bool:
    message = chunk.message
    if message.content:
        return False
    if isinstance(message, AIMessageChunk) and (message.tool_call_chunks or message.usage_metadata):
        return False
    return not message.additional_kwargs
