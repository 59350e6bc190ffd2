"""A scripted tool-calling agent run, for the middleware tests and ``benchmarks/bench_agent.py``.

The chat model replays a fixed script (tool calls on some turns, several rounds on a few) and
records every prompt it receives, so a test can check each model call of a long agent run.
The script does not depend on what the model is sent, so two agents built with different
memory middleware make exactly the same calls and can be compared message for message.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolCall
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

_WORDS = (
    "account billing invoice refund order shipment delivery address warehouse ticket customer "
    "support password login error timeout network router firmware update payment card charge "
    "subscription plan upgrade discount coupon receipt tracking carrier parcel return exchange "
    "warranty device battery screen cable adapter please thanks check confirm verify resolve "
    "schedule today tomorrow morning evening week month again still the a of to in for on with "
    "at by from about after before because is are was were be have has do can will may must"
).split()

SYSTEM_PROMPT = (
    "You are Sheepdog, the support assistant of an online electronics shop. Be concise and "
    "accurate. Use the tools to look up orders, refunds and stock; never invent order data. "
    "Escalate to a human agent when the customer asks for one. Answer in the customer's "
    "language and keep a friendly, professional tone."
)


def text(rng: random.Random, n_words: int) -> str:
    """Return ``n_words`` words of support-desk prose, in sentences of twelve words."""
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return " ".join(
        " ".join(words[k : k + 12]).capitalize() + "." for k in range(0, len(words), 12)
    )


def _report(kind: str, key: str) -> str:
    # Deterministic per argument: the same call gives the same result in every run.
    rng = random.Random(f"{kind}:{key}")
    return f"{kind} report for {key}: " + text(rng, rng.randint(60, 420))


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order by its number and return its status, items and shipping details."""
    return _report("order", order_id)


@tool
def refund_status(order_id: str) -> str:
    """Return the state of the refund requested for an order."""
    return _report("refund", order_id)


@tool
def check_stock(sku: str) -> str:
    """Return warehouse stock levels and restock dates for a product SKU."""
    return _report("stock", sku)


TOOLS: list[BaseTool] = [lookup_order, refund_status, check_stock]


@dataclass(frozen=True)
class ScriptedTurn:
    """One user turn: the user's message, the tool-call rounds, and the final answer."""

    index: int
    user: HumanMessage
    rounds: list[list[ToolCall]]
    answer: str
    fact: str | None = None


@dataclass
class AgentScript:
    """The whole scripted run; ``responses()`` is what the chat model replays, in order."""

    turns: list[ScriptedTurn]

    def responses(self, from_turn: int = 0) -> list[AIMessage]:
        """Return the model's responses for the turns from ``from_turn`` on."""
        out: list[AIMessage] = []
        for turn in self.turns[from_turn:]:
            for r, calls in enumerate(turn.rounds):
                out.append(AIMessage("", tool_calls=calls, id=f"t{turn.index}-r{r}"))
            out.append(AIMessage(turn.answer, id=f"t{turn.index}-answer"))
        return out

    @property
    def model_calls(self) -> int:
        """Number of model calls the whole run makes."""
        return sum(len(t.rounds) + 1 for t in self.turns)


def build_script(
    turns: int = 120,
    *,
    seed: int = 0,
    tool_every: int = 3,
    long_loop_every: int = 25,
    fact_every: int = 10,
) -> AgentScript:
    """Build a deterministic support-agent run.

    Every ``tool_every``-th turn the model calls tools (sometimes two in parallel); every
    ``long_loop_every``-th turn it runs a long loop of four rounds, so one user turn causes
    five model calls and the window must compact in the middle of a tool loop.
    """
    rng = random.Random(seed)
    out: list[ScriptedTurn] = []
    tools = ("lookup_order", "refund_status", "check_stock")
    for i in range(turns):
        fact = None
        body = text(rng, rng.randint(12, 90))
        if fact_every and i % fact_every == 0:
            fact = f"My order number is ORD-{100000 + i * 37} and my code word is K{i:03d}."
            body = f"{fact} {body}"
        n_rounds = 0
        if long_loop_every and i % long_loop_every == long_loop_every - 1:
            n_rounds = 4
        elif tool_every and i % tool_every == tool_every - 1:
            n_rounds = 1 + (i % 2)
        rounds: list[list[ToolCall]] = []
        for r in range(n_rounds):
            width = 2 if (i + r) % 4 == 0 else 1
            calls: list[ToolCall] = []
            for c in range(width):
                name = tools[(i + r + c) % 3]
                arg = "sku" if name == "check_stock" else "order_id"
                calls.append(
                    ToolCall(
                        name=name,
                        args={arg: f"ORD-{100000 + i * 7 + r * 3 + c}"},
                        id=f"call_{i}_{r}_{c}",
                        type="tool_call",
                    )
                )
            rounds.append(calls)
        answer = text(rng, rng.randint(30, 220))
        out.append(
            ScriptedTurn(
                index=i,
                user=HumanMessage(body, id=f"t{i}-user"),
                rounds=rounds,
                answer=answer,
                fact=fact,
            )
        )
    return AgentScript(out)


@dataclass
class RecordedCall:
    """One model call: exactly the messages and tool schemas the model received."""

    messages: list[BaseMessage]
    tools: list[dict[str, Any]] = field(default_factory=list)


class ScriptedChatModel(BaseChatModel):
    """A chat model that replays scripted responses and records every prompt.

    ``bind_tools`` returns the model bound to the tools' OpenAI schemas, as a real
    OpenAI-compatible model would, so the schemas it was sent are recorded too.
    """

    responses: list[AIMessage]
    calls: list[RecordedCall] = Field(default_factory=list)
    _cursor: int = PrivateAttr(default=0)

    @property
    def _llm_type(self) -> str:
        return "scripted-chat-model"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        schemas = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=schemas, **kwargs)

    def _next(self, messages: list[BaseMessage], tools: list[dict[str, Any]] | None) -> ChatResult:
        if self._cursor >= len(self.responses):
            raise AssertionError(
                f"the script has {len(self.responses)} responses and all were used; "
                "the agent made more model calls than scripted"
            )
        self.calls.append(RecordedCall(list(messages), list(tools or [])))
        message = self.responses[self._cursor].model_copy(deep=True)
        self._cursor += 1
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._next(messages, kwargs.get("tools"))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(0)
        return self._next(messages, kwargs.get("tools"))


class RecapModel(BaseChatModel):
    """A summarizer stand-in: a short deterministic recap of the prompt it receives.

    Counts its calls. With ``async_only=True`` the sync path raises, so a test can prove that
    ``ainvoke`` never summarizes on the blocking path.
    """

    words: int = 120
    async_only: bool = False
    fail: bool = False
    calls: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "recap-model"

    def recap_text(self, messages: Sequence[BaseMessage]) -> str:
        """Return the recap this model writes for ``messages``: their last ``words`` words."""
        source = " ".join(m.text for m in messages).split()
        return "Recap of the earlier conversation: " + " ".join(source[-self.words :])

    def _recap(self, messages: list[BaseMessage]) -> ChatResult:
        if self.fail:
            raise RuntimeError("summarizer unavailable (injected failure)")
        self.calls.append(list(messages))
        message = AIMessage(self.recap_text(messages))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.async_only:
            raise AssertionError("the summarizer was called on the sync path under ainvoke")
        return self._recap(messages)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(0)
        return self._recap(messages)


def thread(thread_id: str) -> RunnableConfig:
    """Return the run config of a checkpointer thread."""
    return {"configurable": {"thread_id": thread_id}, "recursion_limit": 50}


def run_turns(
    agent: Any, script: AgentScript, thread_id: str, start: int = 0, end: int | None = None
) -> None:
    """Drive ``agent`` through the script's turns ``[start, end)`` with ``invoke``."""
    for turn in script.turns[start:end]:
        agent.invoke({"messages": [turn.user]}, thread(thread_id))


async def arun_turns(
    agent: Any, script: AgentScript, thread_id: str, start: int = 0, end: int | None = None
) -> None:
    """Drive ``agent`` through the script's turns ``[start, end)`` with ``ainvoke``."""
    for turn in script.turns[start:end]:
        await agent.ainvoke({"messages": [turn.user]}, thread(thread_id))
