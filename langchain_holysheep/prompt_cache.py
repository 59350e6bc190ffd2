"""Estimates how much of a prompt a provider serves from its prompt cache.

Providers cache a prompt prefix that repeats byte for byte; this module measures the repeated
prefix between two consecutive prompts and applies the provider's caching granularity.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

# OpenAI caches prefixes of at least 1,024 tokens, in steps of 128 tokens; DeepSeek's 64-token
# units are finer, so these defaults are the conservative choice for a relay.
MIN_CACHED_PREFIX = 1024
CACHE_BLOCK = 128


def same_message(a: BaseMessage, b: BaseMessage) -> bool:
    """Return whether two messages serialise to the same prompt bytes (cheap checks first)."""
    if a is b:
        return True
    if a.type != b.type or a.content != b.content or a.name != b.name:
        return False
    # Read the fields only where the class has them: a missing attribute of a message costs
    # microseconds (pydantic's lookup raises and catches AttributeError), and this runs for
    # every message of the window, every turn.
    a_ai, b_ai = isinstance(a, AIMessage), isinstance(b, AIMessage)
    if a_ai or b_ai:
        return a_ai and b_ai and a.tool_calls == b.tool_calls  # type: ignore[attr-defined]
    a_tool, b_tool = isinstance(a, ToolMessage), isinstance(b, ToolMessage)
    if a_tool or b_tool:
        return a_tool and b_tool and a.tool_call_id == b.tool_call_id  # type: ignore[attr-defined]
    return True


def same_message_and_id(a: BaseMessage, b: BaseMessage) -> bool:
    """Return whether two messages are the same message.

    Same prompt bytes, and the same id where both have one: two equal texts with different
    ids are different messages.
    """
    return same_message(a, b) and (a.id is None or b.id is None or a.id == b.id)


def shared_prefix_tokens(
    previous: Sequence[BaseMessage],
    current: Sequence[BaseMessage],
    current_counts: Sequence[int],
) -> int:
    """Return the tokens of ``current`` that repeat, message for message, the start of ``previous``.

    Args:
        previous: The prompt sent on the previous model call (empty on the first call).
        current: The prompt of this call.
        current_counts: Token count of each message of ``current``.

    Returns:
        The summed counts of the leading messages of ``current`` equal to those of ``previous``.
    """
    if len(current_counts) != len(current):
        raise ValueError(
            f"current_counts has {len(current_counts)} entries for {len(current)} messages"
        )
    total = 0
    for prev, cur, n in zip(previous, current, current_counts, strict=False):
        if not same_message(prev, cur):
            break
        total += n
    return total


def cacheable_tokens(
    prefix_tokens: int, *, minimum: int = MIN_CACHED_PREFIX, block: int = CACHE_BLOCK
) -> int:
    """Return the tokens a provider would bill at the cached price for a repeated prefix.

    Args:
        prefix_tokens: Tokens of the repeated prefix (see :func:`shared_prefix_tokens`).
        minimum: Shortest prefix the provider caches at all.
        block: Caching granularity; the cached length is rounded down to a multiple of it.
    """
    if prefix_tokens < minimum:
        return 0
    return prefix_tokens // block * block
