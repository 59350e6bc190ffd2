"""Per-model token prices (input, cached input, output) and the dollar cost of a usage record.

Prices live in ``data/prices.json`` with their source and date: the upstream providers' list
prices. The HolySheep relay may charge differently; ``set_price`` overrides any model.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = [
    "ModelPrice",
    "cost",
    "get_price",
    "known_prices",
    "price_entry",
    "reset_prices",
    "set_price",
]


@dataclass(frozen=True)
class ModelPrice:
    """Prices of one model, in dollars per 1,000,000 tokens.

    Attributes:
        input: Input tokens not served from the provider's prompt cache.
        cached_input: Input tokens served from the prompt cache (cache hits / reads).
        output: Output tokens, reasoning tokens included.
    """

    input: float
    cached_input: float
    output: float

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"ModelPrice.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ModelPrice.{name} must be >= 0 dollars per 1M, got {value!r}")


_overrides: dict[str, ModelPrice] = {}
_lock = threading.Lock()
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    raw = resources.files("langchain_holysheep.data").joinpath("prices.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(raw)
    return data


def _canonical(model: str) -> str:
    """Lower-case, resolve aliases, and drop a date suffix when only the base is priced."""
    name = model.strip().lower()
    data = _data()
    for candidate in (name, _DATE_SUFFIX.sub("", name)):
        if candidate in _overrides or candidate in data["models"]:
            return candidate
        alias = data.get("aliases", {}).get(candidate)
        if alias is not None:
            return str(alias)
    return name


def price_entry(model: str) -> dict[str, Any] | None:
    """Return the data-file entry of ``model`` (prices, source, date), or None.

    Args:
        model: A model name (case-insensitive; aliases and dated snapshots resolve).

    Returns:
        A copy of the entry, or ``None`` when the data file has no price for it.
    """
    entry = _data()["models"].get(_canonical(model))
    return dict(entry) if entry is not None else None


def get_price(model: str) -> ModelPrice | None:
    """Return the price of ``model``: a ``set_price`` override, else the data file's.

    Args:
        model: A model name such as ``"deepseek-v3.2"``; case-insensitive, and aliases
            (``deepseek-chat``) and dated snapshots (``gpt-4.1-2025-04-14``) resolve.

    Returns:
        The price, or ``None`` for a model with no known price.
    """
    name = _canonical(model)
    with _lock:
        override = _overrides.get(name)
    if override is not None:
        return override
    entry = _data()["models"].get(name)
    if entry is None:
        return None
    return ModelPrice(
        input=float(entry["input"]),
        cached_input=float(entry["cached_input"]),
        output=float(entry["output"]),
    )


def set_price(model: str, price: ModelPrice) -> None:
    """Set (or replace) the price used for ``model`` in this process.

    Use it for what the relay actually charges you, or for a model without a list price.

    Args:
        model: The model name (case-insensitive).
        price: Dollars per 1M tokens.

    Raises:
        TypeError: When ``price`` is not a ``ModelPrice``.
    """
    if not isinstance(price, ModelPrice):
        raise TypeError(f"price must be a ModelPrice, got {type(price).__name__}")
    with _lock:
        _overrides[_canonical(model)] = price


def reset_prices() -> None:
    """Drop every ``set_price`` override, back to the data file's prices."""
    with _lock:
        _overrides.clear()


def known_prices() -> dict[str, ModelPrice]:
    """Return every priced model (data file and overrides) with its price."""
    names = set(_data()["models"])
    with _lock:
        names |= set(_overrides)
    prices = {name: get_price(name) for name in sorted(names)}
    return {name: price for name, price in prices.items() if price is not None}


def _get(usage: Any, key: str) -> Any:
    if isinstance(usage, Mapping):
        return usage.get(key)
    return getattr(usage, key, None)


def _tokens(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative token count, got {value!r}")
    return value


def cost(usage: Mapping[str, Any], model: str) -> float:
    """Return the dollars of one usage record, cached input at the cached price.

    ``input_tokens`` includes the cached ones (LangChain's ``UsageMetadata`` convention):
    ``input_token_details.cache_read`` of them are billed at the cached price, the rest (cache
    writes included) at the input price; ``output_tokens`` (reasoning included) at the output
    price.

    Args:
        usage: An ``AIMessage.usage_metadata`` (or a mapping with the same keys).
        model: The model that produced it.

    Returns:
        The cost in dollars.

    Raises:
        KeyError: When ``model`` has no price; the message says how to set one.
        ValueError: When a count is negative or cache reads exceed the input tokens.
    """
    price = get_price(model)
    if price is None:
        raise KeyError(
            f"no price for model {model!r}; priced models: {', '.join(known_prices())}. "
            f"Set one with langchain_holysheep.pricing.set_price({model!r}, "
            "ModelPrice(input=..., cached_input=..., output=...)) in dollars per 1M tokens"
        )
    input_tokens = _tokens(_get(usage, "input_tokens"), "input_tokens")
    output_tokens = _tokens(_get(usage, "output_tokens"), "output_tokens")
    details = _get(usage, "input_token_details") or {}
    cached = _tokens(_get(details, "cache_read"), "input_token_details.cache_read")
    if cached > input_tokens:
        raise ValueError(
            f"usage reports {cached:,} cache-read tokens but only {input_tokens:,} input "
            "tokens; input_tokens must include the cached ones"
        )
    return (
        (input_tokens - cached) * price.input
        + cached * price.cached_input
        + output_tokens * price.output
    ) / 1_000_000
