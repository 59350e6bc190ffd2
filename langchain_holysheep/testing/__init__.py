"""Offline testing helpers: a loopback OpenAI-compatible server with scripted faults.

Use it to test an application built on ``ChatHolySheep`` (or any OpenAI client) without the
network: point ``base_url`` / ``HOLYSHEEP_API_BASE`` at :attr:`HolySheepTestServer.base_url`.
"""

from langchain_holysheep.testing.server import (
    DEFAULT_TEST_API_KEY,
    Fault,
    HolySheepTestServer,
    RecordedRequest,
    Reply,
    ToolCallReply,
    count_text_tokens,
    default_reply,
)

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
