"""Errors ``ChatHolySheep`` raises: what went wrong at the relay, with the numbers and a remedy.

Each HTTP error also inherits from the openai SDK's and LangChain's classes for the same
condition, so ``except openai.RateLimitError`` and ``except ModelRateLimitError`` keep working.
"""

from __future__ import annotations

import openai
from langchain_core.exceptions import ModelAPIError
from langchain_openai.chat_models.base import (
    OpenAIAPIError,
    OpenAIAuthenticationError,
    OpenAIConnectionError,
    OpenAIRateLimitError,
    OpenAITimeoutError,
)

__all__ = [
    "HolySheepAuthenticationError",
    "HolySheepConnectionError",
    "HolySheepError",
    "HolySheepIncompleteStreamError",
    "HolySheepRateLimitError",
    "HolySheepResponseError",
    "HolySheepServerError",
    "HolySheepTimeoutError",
]


class HolySheepError(Exception):
    """Base of every error raised by ``ChatHolySheep`` itself; catch it to catch them all."""


class HolySheepAuthenticationError(OpenAIAuthenticationError, HolySheepError):
    """The relay rejected the API key (HTTP 401).

    Also an ``openai.AuthenticationError`` and a LangChain ``ModelAuthenticationError``.
    """


class HolySheepRateLimitError(OpenAIRateLimitError, HolySheepError):
    """The relay kept answering 429 after every retry allowed by ``max_retries``.

    Also an ``openai.RateLimitError`` and a LangChain ``ModelRateLimitError``.
    """


class HolySheepServerError(OpenAIAPIError, HolySheepError):
    """The relay kept answering 5xx after every retry allowed by ``max_retries``.

    Also an ``openai.InternalServerError`` and a LangChain ``ModelAPIError``.
    """


class HolySheepTimeoutError(OpenAITimeoutError, HolySheepError):
    """No answer within the configured ``timeout``, on the first attempt and every retry.

    Also an ``openai.APITimeoutError`` and a LangChain ``ModelTimeoutError``.
    """

    def __init__(self, message: str, *, request: object) -> None:
        # APITimeoutError fixes its message to "Request timed out."; ours names the timeout.
        openai.APIConnectionError.__init__(self, message=message, request=request)  # type: ignore[arg-type]


class HolySheepConnectionError(OpenAIConnectionError, HolySheepError):
    """The relay could not be reached (DNS, refused or dropped connection) after every retry.

    Also an ``openai.APIConnectionError`` and a LangChain ``ModelConnectionError``.
    """


class HolySheepResponseError(ModelAPIError, ValueError, HolySheepError):
    """The relay answered 200 with a body that is not a chat completion.

    Also a LangChain ``ModelAPIError`` (retryable) and a ``ValueError``, which is what
    ``langchain-openai`` raised for such bodies before.
    """


class HolySheepIncompleteStreamError(HolySheepResponseError):
    """A stream ended without a finish reason: cut, truncated, or with a malformed chunk.

    Raised instead of returning a silently shortened answer. The stream is retried first
    when nothing had been yielded yet; this is raised when that is no longer possible.

    Attributes:
        chunks_received: Chunks received before the stream broke.
    """

    def __init__(self, message: str, *, chunks_received: int) -> None:
        super().__init__(message)
        self.chunks_received = chunks_received
