"""Model profiles of the models the HolySheep relay serves, read from ``data/profiles.json``.

The figures live in the data file, with their source and date; this module only loads them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, cast

from langchain_core.language_models import ModelProfile

# Keys of a profile entry that describe the entry, not the model's capabilities.
_BOOKKEEPING = frozenset({"source", "as_of", "tokenizer", "tokenizer_exact"})


@lru_cache(maxsize=1)
def _entries() -> dict[str, dict[str, Any]]:
    raw = resources.files("langchain_holysheep.data").joinpath("profiles.json").read_text("utf-8")
    models: dict[str, dict[str, Any]] = json.loads(raw)["models"]
    return models


def known_models() -> list[str]:
    """Return the model names that have a profile, sorted."""
    return sorted(_entries())


def profile_entry(model: str) -> dict[str, Any] | None:
    """Return the whole data-file entry for ``model`` (profile, tokenizer, source, date).

    Args:
        model: A model name such as ``"deepseek-v3.2"``. Case-insensitive.

    Returns:
        A copy of the entry, or ``None`` when the model has no profile.
    """
    entry = _entries().get(model.lower())
    return dict(entry) if entry is not None else None


def get_model_profile(model: str) -> ModelProfile | None:
    """Return the LangChain ``ModelProfile`` for ``model``, or ``None`` for an unknown model.

    Unknown models are allowed everywhere in this package: they simply have no profile, so
    callers must give context sizes themselves (for example ``ContextWindow(max_tokens=...)``).
    """
    entry = profile_entry(model)
    if entry is None:
        return None
    fields = {k: v for k, v in entry.items() if k not in _BOOKKEEPING}
    return cast("ModelProfile", fields)
