"""A deterministic synthetic support conversation, for the simulator, benchmarks and notebooks.

Same seed, same conversation, byte for byte: figures measured on it can be reproduced.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

_WORDS = (
    "account billing invoice refund order shipment delivery address warehouse ticket "
    "customer agent support password login error timeout network router firmware update "
    "payment card charge subscription plan upgrade downgrade discount coupon receipt "
    "tracking carrier parcel return exchange warranty device battery screen cable adapter "
    "please thanks could would should check confirm verify resolve escalate schedule "
    "today tomorrow yesterday morning evening week month quickly carefully again still "
    "the a an of to in for on with at by from about after before during because while "
    "is are was were be been have has had do does did can will may might must need want"
).split()

_SYSTEM_PROMPT = (
    "You are Sheepdog, the support assistant of an online electronics shop. Be concise and "
    "accurate. Use the tools to look up orders and refunds; never invent order data. "
    "Escalate to a human agent when the customer asks for one."
)

_TOOLS = ("lookup_order", "refund_status", "check_stock", "create_ticket")


@dataclass(frozen=True)
class PlantedFact:
    """A fact the user states at a known turn, to check that memory keeps it.

    Attributes:
        turn: The 0-based turn whose user message states the fact.
        message_index: Index of that user message in the conversation.
        text: The exact fact string, unique in the conversation.
    """

    turn: int
    message_index: int
    text: str


@dataclass
class SyntheticConversation:
    """A generated conversation and where to call the model in it.

    Attributes:
        messages: System prompt, then the turns; every message has a stable ``id``.
        facts: The planted facts, in order.
        turn_starts: Index of each turn's user message.
        call_points: For each model call, the length of the prefix sent to it: a plain turn
            has one call (after the user message); a tool turn has two (after the user
            message, and after the tool results).
    """

    messages: list[BaseMessage]
    facts: list[PlantedFact] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    call_points: list[int] = field(default_factory=list)


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    sentences = []
    for k in range(0, len(words), 12):
        chunk = words[k : k + 12]
        sentences.append(" ".join(chunk).capitalize() + ".")
    return " ".join(sentences)


def synthetic_conversation(
    turns: int = 200,
    *,
    seed: int = 0,
    tool_every: int = 10,
    fact_every: int = 10,
    user_tokens: tuple[int, int] = (20, 200),
    assistant_tokens: tuple[int, int] = (100, 800),
) -> SyntheticConversation:
    """Generate a support conversation with tool calls and planted facts.

    Lengths are drawn uniformly in the given token ranges (about 1.3 tokens per word of the
    built-in vocabulary, so the ranges are approximate). Every ``tool_every``-th turn the
    assistant calls a tool, reads its result, and answers; every ``fact_every``-th turn the
    user states a unique fact (an order number with a code word).

    Args:
        turns: Number of user turns.
        seed: Random seed; the same seed gives the same conversation.
        tool_every: Period of tool-using turns (0 for none).
        fact_every: Period of turns with a planted fact (0 for none).
        user_tokens: Range of user message sizes, in tokens.
        assistant_tokens: Range of assistant answer sizes, in tokens.

    Returns:
        The conversation, its facts and its model call points.
    """
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    rng = random.Random(seed)
    messages: list[BaseMessage] = [SystemMessage(_SYSTEM_PROMPT, id="sys-0")]
    convo = SyntheticConversation(messages=messages)
    for turn in range(turns):
        user_words = max(3, int(rng.randint(*user_tokens) / 1.3))
        text = _text(rng, user_words)
        if fact_every and turn % fact_every == 0:
            fact = f"My order number is ORD-{100000 + turn * 37} and my code word is {_code(rng)}."
            text = f"{fact} {text}"
            convo.facts.append(PlantedFact(turn, len(messages), fact))
        convo.turn_starts.append(len(messages))
        messages.append(HumanMessage(text, id=f"t{turn}-user"))
        convo.call_points.append(len(messages))
        if tool_every and turn % tool_every == tool_every - 1:
            tool = _TOOLS[turn // tool_every % len(_TOOLS)]
            call_id = f"call_{turn}"
            messages.append(
                AIMessage(
                    "",
                    id=f"t{turn}-call",
                    tool_calls=[
                        {"name": tool, "args": {"order_id": f"ORD-{100000 + turn}"}, "id": call_id}
                    ],
                )
            )
            result = _text(rng, rng.randint(40, 300))
            messages.append(
                ToolMessage(result, tool_call_id=call_id, name=tool, id=f"t{turn}-tool")
            )
            convo.call_points.append(len(messages))
        answer_words = max(5, int(rng.randint(*assistant_tokens) / 1.3))
        messages.append(AIMessage(_text(rng, answer_words), id=f"t{turn}-answer"))
    return convo


def _code(rng: random.Random) -> str:
    return "".join(rng.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(3)) + str(rng.randint(10, 99))
