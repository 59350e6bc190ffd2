"""Agent middleware for ``langchain.agents.create_agent`` (needs the ``agents`` extra).

The top-level ``langchain_holysheep`` package never imports this subpackage, so the package
works without LangChain's agent framework installed.
"""

from langchain_holysheep.middleware.context_window import (
    ContextWindowMiddleware,
    ContextWindowState,
    tool_schema_tokens,
    window_state_from,
)

__all__ = [
    "ContextWindowMiddleware",
    "ContextWindowState",
    "tool_schema_tokens",
    "window_state_from",
]
