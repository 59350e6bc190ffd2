"""Usage and cost tracking for chat model calls, with an optional spend limit.

``get_usage_callback()`` totals input, cached and output tokens and dollars per model for
every chat model call made inside it (sync, async, streaming, concurrent), and can stop
further calls, before they are sent, once the total reaches a spend limit.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata, add_usage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from langchain_holysheep.pricing import cost, get_price

__all__ = ["ModelUsage", "SpendLimitExceeded", "UsageCallbackHandler", "get_usage_callback"]

logger = logging.getLogger(__name__)


class SpendLimitExceeded(RuntimeError):
    """The tracked spend reached its limit, so the model call was not sent.

    Attributes:
        spent: Dollars tracked so far.
        limit: The spend limit in dollars.
    """

    def __init__(self, spent: float, limit: float, model: str | None = None) -> None:
        self.spent = spent
        self.limit = limit
        target = f" to {model}" if model else ""
        super().__init__(
            f"spend limit reached: ${spent:,.6f} tracked against a ${limit:,.6f} limit, so the "
            f"call{target} was not sent. Raise spend_limit, or start a new get_usage_callback() "
            "block to reset the total"
        )


@dataclass(frozen=True)
class ModelUsage:
    """Totals for one model.

    Attributes:
        calls: Model calls that reported usage.
        input_tokens: Input tokens, cached ones included.
        cached_input_tokens: Input tokens served from the provider's prompt cache.
        output_tokens: Output tokens, reasoning included.
        cost: Dollars (0.0 when the model has no price; see ``priced``).
        priced: Whether every call of this model had a price.
    """

    calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    priced: bool = True

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


class UsageCallbackHandler(BaseCallbackHandler):
    """Total tokens and dollars per model from ``AIMessage.usage_metadata``; thread-safe.

    Every generation's usage is added (streamed results included, when the model reports
    usage in streams, as ``ChatHolySheep`` does by default). The model is the one the
    response names (``response_metadata["model_name"]``), else the one the call asked for.
    Dollars use ``langchain_holysheep.pricing`` (cached input at the cached price); a model
    without a price is counted in tokens, listed in ``unpriced_models``, and warned about once.

    With ``spend_limit``, a chat model call that starts when the total has reached the limit
    raises ``SpendLimitExceeded`` before anything is sent. Calls already in flight finish and
    are counted, so concurrent calls can overshoot the limit by what they cost.

    Attributes:
        spend_limit: Dollars after which model calls are refused, or None.
        usage_metadata: Summed ``UsageMetadata`` per model (as in langchain-core's
            ``UsageMetadataCallbackHandler``).
    """

    raise_error: bool = True  # so that SpendLimitExceeded reaches the caller
    run_inline: bool = True

    def __init__(self, spend_limit: float | None = None) -> None:
        """Create a handler.

        Args:
            spend_limit: Dollars after which model calls are refused; None for no limit.

        Raises:
            ValueError: For a negative spend limit.
        """
        super().__init__()
        if spend_limit is not None and not spend_limit >= 0:
            raise ValueError(f"spend_limit must be >= 0 dollars, got {spend_limit!r}")
        self.spend_limit = spend_limit
        self._lock = threading.Lock()
        self._models: dict[str, ModelUsage] = {}
        self.usage_metadata: dict[str, UsageMetadata] = {}
        self._requested: dict[UUID, str | None] = {}
        self._unpriced: set[str] = set()
        self._total_cost = 0.0

    # -- totals ----------------------------------------------------------------------------

    @property
    def total_cost(self) -> float:
        """Dollars tracked so far, all models."""
        return self._total_cost

    @property
    def by_model(self) -> dict[str, ModelUsage]:
        """A snapshot of the totals per model."""
        with self._lock:
            return dict(self._models)

    @property
    def unpriced_models(self) -> set[str]:
        """Models whose calls had no price (their dollars are not in ``total_cost``)."""
        with self._lock:
            return set(self._unpriced)

    def _sum(self, field: str) -> int:
        with self._lock:
            return sum(int(getattr(u, field)) for u in self._models.values())

    @property
    def calls(self) -> int:
        """Model calls that reported usage."""
        return self._sum("calls")

    @property
    def input_tokens(self) -> int:
        """Input tokens, cached ones included, all models."""
        return self._sum("input_tokens")

    @property
    def cached_input_tokens(self) -> int:
        """Input tokens served from prompt caches, all models."""
        return self._sum("cached_input_tokens")

    @property
    def output_tokens(self) -> int:
        """Output tokens, all models."""
        return self._sum("output_tokens")

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens, all models."""
        return self.input_tokens + self.output_tokens

    def __repr__(self) -> str:
        return (
            f"UsageCallbackHandler(calls={self.calls}, input_tokens={self.input_tokens}, "
            f"cached_input_tokens={self.cached_input_tokens}, "
            f"output_tokens={self.output_tokens}, total_cost={self.total_cost:.6f}, "
            f"spend_limit={self.spend_limit})"
        )

    def __str__(self) -> str:
        lines = [f"{'model':<24}{'calls':>7}{'input':>12}{'cached':>12}{'output':>12}{'$':>12}"]
        for model, u in sorted(self.by_model.items()):
            dollars = f"{u.cost:.6f}" if u.priced else "no price"
            lines.append(
                f"{model:<24}{u.calls:>7}{u.input_tokens:>12,}{u.cached_input_tokens:>12,}"
                f"{u.output_tokens:>12,}{dollars:>12}"
            )
        lines.append(f"total cost: ${self.total_cost:.6f}")
        return "\n".join(lines)

    # -- callbacks -------------------------------------------------------------------------

    def _check_limit(self, run_id: UUID, kwargs: dict[str, Any]) -> None:
        model = _requested_model(kwargs)
        with self._lock:
            self._requested[run_id] = model
            limit, spent = self.spend_limit, self._total_cost
            if limit is not None and spent >= limit:
                self._requested.pop(run_id, None)
                raise SpendLimitExceeded(spent, limit, model)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        """Refuse the call when the spend limit is reached; remember the requested model."""
        self._check_limit(run_id, kwargs)

    def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Same as ``on_chat_model_start``, for text-completion models."""
        self._check_limit(run_id, kwargs)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the failed run."""
        with self._lock:
            self._requested.pop(run_id, None)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Add the usage of every generation of the response."""
        with self._lock:
            requested = self._requested.pop(run_id, None)
        try:
            self._record(response, requested)
        except Exception:
            # Tracking must never break a call that has already been paid for.
            logger.exception("could not record usage of run %s", run_id)

    def _record(self, response: LLMResult, requested: str | None) -> None:
        llm_output = response.llm_output or {}
        for generations in response.generations:
            for generation in generations:
                if not isinstance(generation, ChatGeneration):
                    continue
                message = generation.message
                if not isinstance(message, AIMessage) or not message.usage_metadata:
                    continue
                model = (
                    message.response_metadata.get("model_name")
                    or llm_output.get("model_name")
                    or requested
                    or "unknown"
                )
                self._add(str(model), message.usage_metadata)

    def _add(self, model: str, usage: UsageMetadata) -> None:
        details = usage.get("input_token_details") or {}
        cached = int(details.get("cache_read", 0) or 0)
        priced = get_price(model) is not None
        dollars = cost(usage, model) if priced else 0.0
        warn = False
        with self._lock:
            current = self._models.get(model, ModelUsage())
            self._models[model] = replace(
                current,
                calls=current.calls + 1,
                input_tokens=current.input_tokens + int(usage.get("input_tokens", 0) or 0),
                cached_input_tokens=current.cached_input_tokens + cached,
                output_tokens=current.output_tokens + int(usage.get("output_tokens", 0) or 0),
                cost=current.cost + dollars,
                priced=current.priced and priced,
            )
            previous = self.usage_metadata.get(model)
            self.usage_metadata[model] = usage if previous is None else add_usage(previous, usage)
            self._total_cost += dollars
            if not priced and model not in self._unpriced:
                self._unpriced.add(model)
                warn = True
        if warn:
            extra = " The spend limit cannot account for it." if self.spend_limit else ""
            warnings.warn(
                f"no price for model {model!r}: its tokens are tracked but not its dollars."
                f"{extra} Set one with langchain_holysheep.pricing.set_price({model!r}, "
                "ModelPrice(...)).",
                UserWarning,
                stacklevel=2,
            )


def _requested_model(kwargs: dict[str, Any]) -> str | None:
    params = kwargs.get("invocation_params") or {}
    for key in ("model", "model_name"):
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    metadata = kwargs.get("metadata") or {}
    value = metadata.get("ls_model_name")
    return value if isinstance(value, str) and value else None


# One context variable per nesting depth, registered once: nested blocks each see the calls
# made inside them, and entering a block does not register a new hook every time.
_depth: ContextVar[int] = ContextVar("holysheep_usage_callback_depth", default=0)
_vars: list[ContextVar[UsageCallbackHandler | None]] = []
_vars_lock = threading.Lock()


def _var_at(depth: int) -> ContextVar[UsageCallbackHandler | None]:
    with _vars_lock:
        while len(_vars) <= depth:
            var: ContextVar[UsageCallbackHandler | None] = ContextVar(
                f"holysheep_usage_callback_{len(_vars)}", default=None
            )
            register_configure_hook(var, inheritable=True)
            _vars.append(var)
        return _vars[depth]


@contextmanager
def get_usage_callback(spend_limit: float | None = None) -> Iterator[UsageCallbackHandler]:
    """Track tokens and dollars of every model call made inside the ``with`` block.

    Like langchain-core's ``get_usage_metadata_callback``, with dollars per model and an
    optional spend limit. Blocks nest: an outer block also counts the calls of inner ones.

    Example:
        ```python
        from langchain_holysheep import ChatHolySheep, SpendLimitExceeded, get_usage_callback

        llm = ChatHolySheep(model="deepseek-v3.2")
        with get_usage_callback(spend_limit=0.50) as usage:
            llm.invoke("Hello")
            print(usage.total_cost, usage.by_model)
        ```

    Args:
        spend_limit: Dollars; once the tracked total reaches it, the next model call raises
            ``SpendLimitExceeded`` before anything is sent. None for no limit.

    Yields:
        The handler holding the totals.
    """
    handler = UsageCallbackHandler(spend_limit=spend_limit)
    depth = _depth.get()
    var = _var_at(depth)
    var_token = var.set(handler)
    depth_token = _depth.set(depth + 1)
    try:
        yield handler
    finally:
        _depth.reset(depth_token)
        var.reset(var_token)
