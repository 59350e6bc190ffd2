"""Checks that a list of messages is a prompt a chat API accepts.

Used by the property tests, the benchmarks, the simulator and the middleware tests to count
invalid prompts; it never changes a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage


def find_prompt_problems(messages: Sequence[BaseMessage]) -> list[str]:
    """Return what makes ``messages`` an invalid chat prompt; an empty list means valid.

    The rules are those of OpenAI-compatible chat APIs, which the HolySheep relay forwards:

    * the prompt is not empty and, after the leading system messages (and a summary recap,
      which is a human message), its first message is a human message;
    * every AI message with ``tool_calls`` is followed directly by one tool result per call;
    * every tool result answers a call of the AI message right before its run of results.

    Args:
        messages: The prompt exactly as it would be sent.

    Returns:
        Human-readable problems, each naming the position of the offending message.
    """
    problems: list[str] = []
    if not messages:
        return ["the prompt is empty"]
    i = 0
    while i < len(messages) and isinstance(messages[i], SystemMessage):
        i += 1
    if i == len(messages):
        problems.append("the prompt has only system messages")
    elif not isinstance(messages[i], HumanMessage):
        kind = messages[i].type
        article = "an" if kind[:1] in "aeiou" else "a"
        problems.append(
            f"message {i} is the first after the system block but is {article} "
            f"{kind} message, not a human message"
        )
    pending: dict[str, int] = {}  # tool_call_id -> index of the AI message that made the call
    for j, message in enumerate(messages):
        if isinstance(message, ToolMessage):
            if message.tool_call_id not in pending:
                problems.append(
                    f"message {j} is a tool result for call {message.tool_call_id!r} "
                    "with no matching tool call right before it"
                )
            else:
                del pending[message.tool_call_id]
            continue
        if pending:
            problems.append(_unanswered(pending))
            pending = {}
        if isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                pending[str(call.get("id"))] = j
    if pending:
        problems.append(_unanswered(pending))
    return problems


def _unanswered(pending: dict[str, int]) -> str:
    where = sorted(set(pending.values()))
    ids = ", ".join(repr(k) for k in sorted(pending))
    return f"tool call(s) {ids} of AI message(s) {where} have no tool result"


def is_valid_prompt(messages: Sequence[BaseMessage]) -> bool:
    """Return ``True`` when :func:`find_prompt_problems` finds nothing."""
    return not find_prompt_problems(messages)
