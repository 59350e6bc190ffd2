"""Agent middleware: each model call gets a bounded window of the conversation and a recap.

The agent state keeps every message; only what each model call receives is shortened. The
summary and the window position are agent state fields, so a checkpointer persists them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, SystemMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from typing_extensions import NotRequired

from langchain_holysheep.window import WindowState

_EXTRA_HINT = 'pip install "langchain-holysheep[agents]"'

try:
    from langchain.agents.middleware.types import (
        AgentMiddleware,
        AgentState,
        ContextT,
        ExtendedModelResponse,
        ModelRequest,
        ModelResponse,
        OmitFromInput,
        ResponseT,
    )
    from langgraph.config import get_config
    from langgraph.types import Command
except ImportError as e:  # pragma: no cover - exercised by a test that hides `langchain`
    raise ImportError(
        "ContextWindowMiddleware plugs into `langchain.agents.create_agent`, and importing "
        f"LangChain's agent middleware failed ({e}). It needs langchain>=1.2 with "
        "`ExtendedModelResponse` and langgraph, which the `agents` extra installs: "
        f"{_EXTRA_HINT}"
    ) from e

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

    from langchain_holysheep.memory import ContextWindow
    from langchain_holysheep.tokens import TokenCounter
    from langchain_holysheep.window import ContextPlan

logger = logging.getLogger(__name__)

# Rough per-tool framing cost on top of the schema JSON (OpenAI wraps tools in a namespace
# declaration in the system prompt); an over-estimate keeps the prompt inside the budget.
TOOL_OVERHEAD = 8


class ContextWindowState(AgentState[Any]):
    """Agent state with the window's persisted fields (see ``WindowState``).

    The fields are ``NotRequired``: a thread that has never compacted has none of them, and
    a checkpointer stores them with the thread, so an agent restarted on the same thread
    carries on from the same summary and window start. They are omitted from the agent's
    input schema (the middleware writes them) but appear in its output and state.
    """

    context_summary: NotRequired[Annotated[str | None, OmitFromInput]]
    context_summary_tokens: NotRequired[Annotated[int, OmitFromInput]]
    context_summarized_through: NotRequired[Annotated[int, OmitFromInput]]
    context_window_start: NotRequired[Annotated[int, OmitFromInput]]
    context_version: NotRequired[Annotated[int, OmitFromInput]]


_STATE_FIELDS: dict[str, str] = {
    "summary": "context_summary",
    "summary_tokens": "context_summary_tokens",
    "summarized_through": "context_summarized_through",
    "window_start": "context_window_start",
    "version": "context_version",
}


def window_state_from(values: Mapping[str, Any]) -> WindowState:
    """Read the window state stored in an agent state (a fresh state when there is none).

    Args:
        values: The agent state, e.g. ``agent.get_state(config).values``.
    """
    return WindowState(
        summary=values.get("context_summary"),
        summary_tokens=int(values.get("context_summary_tokens") or 0),
        summarized_through=int(values.get("context_summarized_through") or 0),
        window_start=int(values.get("context_window_start") or 0),
        version=int(values.get("context_version") or 0),
    )


def _state_update(state: WindowState) -> dict[str, Any]:
    return {key: getattr(state, attr) for attr, key in _STATE_FIELDS.items()}


@dataclass(frozen=True)
class _Step:
    """The inputs of one window step, derived from a model request."""

    system: list[BaseMessage]
    tail: list[BaseMessage]
    offset: int
    state: WindowState
    reserved_tokens: int
    thread: str | None
    stored: WindowState  # as read from the agent state (differs from `state` after a reset)


class ContextWindowMiddleware(AgentMiddleware[ContextWindowState, ContextT, ResponseT]):
    """Sends each model call a window of the conversation that fits the token budget.

    Every model call of the agent, including each call of a tool loop, gets the prompt that
    a ``ContextWindow`` plans: the system prompt, a recap of earlier conversation when there
    is one, and the most recent messages verbatim. The agent state is never shortened; the
    summary and the window start are stored as agent state fields (``context_*``), so a
    checkpointer persists them with the thread.

    Unlike LangChain's ``SummarizationMiddleware`` it:

    * never removes messages from the state (the transcript stays whole);
    * counts the system prompt and the tool schemas toward the budget;
    * keeps the current turn (the newest user message and the tool calls and results after
      it) verbatim and never separates a tool call from its results, so each model call of a
      tool loop gets a valid prompt;
    * compacts in steps (prompt-cache friendly) instead of on every call;
    * learns the model's real tokenizer: after each call, the answer's reported
      ``usage_metadata.input_tokens`` is compared with the plan's counted total and
      calibrates ``window.counter`` (``TokenCounter.observe_response``), whose factor the
      budget divides its limits by. The factor lives in the counter (per model, in memory);
      a restarted process learns it again from its first answer.

    Setup:
        ```bash
        pip install "langchain-holysheep[agents]"
        ```

    Use it in an agent:
        ```python
        from langchain.agents import create_agent
        from langgraph.checkpoint.memory import InMemorySaver

        from langchain_holysheep import ChatHolySheep, ContextWindow
        from langchain_holysheep.middleware import ContextWindowMiddleware

        window = ContextWindow(
            model="deepseek-v3.2",
            max_tokens=8000,
            summarizer=ChatHolySheep(model="gpt-4.1-mini"),
        )
        agent = create_agent(
            ChatHolySheep(model="deepseek-v3.2"),
            tools=[lookup_order],
            system_prompt="You are a support assistant.",
            middleware=[ContextWindowMiddleware(window=window)],
            checkpointer=InMemorySaver(),
        )
        config = {"configurable": {"thread_id": "customer-7"}}
        agent.invoke({"messages": [{"role": "user", "content": "Where is order 42?"}]}, config)
        ```

        The summary and the window start are agent state:
        ``window_state_from(agent.get_state(config).values)`` reads them as a ``WindowState``.

    Limits:
        Tools that a ``response_format`` adds when the model is bound (structured output
        through ``ToolStrategy``) are not counted (calibration then folds them into the
        factor, which keeps the real prompt within the budget). A middleware that deletes
        messages from the state (such as ``SummarizationMiddleware``) invalidates the stored
        positions; the window then starts afresh and logs a warning, so do not combine the
        two.

    Raises:
        ContextOverflowError: From a model call whose current turn alone (the newest user
            message and the tool calls and results after it) cannot fit the budget.

    Args:
        window: The ``ContextWindow`` that plans each prompt (budget, tokenizer, summarizer).
        count_tools: Count the tool schemas sent with each call toward the budget. Turn off
            only when the provider does not bill tool schemas as prompt tokens.
        on_plan: Called with the ``ContextPlan`` of every model call (for logging, metrics or
            tests); exceptions it raises propagate.
        max_threads: Threads whose last plan is remembered, to estimate the tokens the
            provider serves from its prompt cache (``ContextPlan.cached_tokens``).
    """

    state_schema = ContextWindowState

    def __init__(
        self,
        window: ContextWindow,
        *,
        count_tools: bool = True,
        on_plan: Callable[[ContextPlan], None] | None = None,
        max_threads: int = 1024,
    ) -> None:
        super().__init__()
        self.window = window
        self.count_tools = count_tools
        self.on_plan = on_plan
        self.max_threads = max_threads
        self.tools: list[BaseTool] = []
        self._tool_tokens: dict[str, int] = {}
        self._last_plans: OrderedDict[str, ContextPlan] = OrderedDict()
        self._lock = threading.Lock()

    # -- hooks ---------------------------------------------------------------------------

    def wrap_model_call(
        self,
        request: ModelRequest[ContextT],
        handler: Callable[[ModelRequest[ContextT]], ModelResponse[ResponseT]],
    ) -> ModelResponse[ResponseT] | ExtendedModelResponse[ResponseT]:
        """Send the model the planned window; store the new window state with the response.

        Args:
            request: The model request built by the agent (full conversation).
            handler: Calls the model (or the next middleware).

        Returns:
            The model's response, with a state update when the window moved.
        """
        step = self._prepare(request)
        plan = self.window.step(
            step.system,
            step.tail,
            offset=step.offset,
            state=step.state,
            reserved_tokens=step.reserved_tokens,
            previous=self._previous(step.thread),
        )
        self._planned(step.thread, plan)
        response = handler(self._planned_request(request, plan))
        self._calibrate(plan, response)
        return self._with_state(response, plan, step.stored)

    async def awrap_model_call(
        self,
        request: ModelRequest[ContextT],
        handler: Callable[[ModelRequest[ContextT]], Awaitable[ModelResponse[ResponseT]]],
    ) -> ModelResponse[ResponseT] | ExtendedModelResponse[ResponseT]:
        """Async twin of :meth:`wrap_model_call`: plans with ``astep`` (summarizer awaited).

        Args:
            request: The model request built by the agent (full conversation).
            handler: Calls the model (or the next middleware).

        Returns:
            The model's response, with a state update when the window moved.
        """
        step = self._prepare(request)
        plan = await self.window.astep(
            step.system,
            step.tail,
            offset=step.offset,
            state=step.state,
            reserved_tokens=step.reserved_tokens,
            previous=self._previous(step.thread),
        )
        self._planned(step.thread, plan)
        response = await handler(self._planned_request(request, plan))
        self._calibrate(plan, response)
        return self._with_state(response, plan, step.stored)

    # -- helpers -------------------------------------------------------------------------

    def _calibrate(self, plan: ContextPlan, response: Any) -> None:
        """Calibrate the window's counter from the answer's reported prompt tokens.

        The plan's total counts exactly what this call sent as input: the system prompt,
        the recap, the messages, the reply priming and (with ``count_tools``) the tool
        schemas, so it is compared like for like with ``usage_metadata.input_tokens``.
        """
        answer = _answer_of(response)
        if answer is not None:
            self.window.counter.observe_response(plan, answer)

    def _previous(self, thread: str | None) -> ContextPlan | None:
        if thread is None:
            return None
        with self._lock:
            return self._last_plans.get(thread)

    def _planned(self, thread: str | None, plan: ContextPlan) -> None:
        if thread is not None:
            # The previous call's plan only sharpens the cached-token estimate, so a bounded
            # LRU of recent threads is enough (a miss estimates without it).
            with self._lock:
                self._last_plans[thread] = plan
                self._last_plans.move_to_end(thread)
                while len(self._last_plans) > self.max_threads:
                    self._last_plans.popitem(last=False)
        if self.on_plan is not None:
            self.on_plan(plan)

    def _prepare(self, request: ModelRequest[ContextT]) -> _Step:
        # Only the tail from the stored window on is copied: the whole history (the agent
        # state keeps every message) would cost O(n) a call.
        messages = request.messages
        lead = 0
        while lead < len(messages) and isinstance(messages[lead], SystemMessage):
            lead += 1
        system: list[BaseMessage] = (
            [] if request.system_message is None else [request.system_message]
        )
        system.extend(messages[:lead])
        length = len(messages) - lead  # of the conversation after the system messages
        stored = state = window_state_from(request.state)
        if max(state.load_from, state.window_start) > length:
            # Something else rewrote the history (e.g. a middleware that deletes messages):
            # the stored positions no longer point into it, so start the window afresh.
            logger.warning(
                "ContextWindowMiddleware: the stored window needs messages from index %d but "
                "the conversation has only %d; the history was shortened by something else, "
                "so the window starts afresh without the previous summary.",
                max(state.load_from, state.window_start),
                length,
            )
            state = WindowState(version=state.version)
        offset = state.load_from
        reserved = self._count_tools(request.tools) if self.count_tools else 0
        tail: list[BaseMessage] = list(messages[lead + offset :])
        return _Step(system, tail, offset, state, reserved, _thread_id(), stored)

    @staticmethod
    def _planned_request(
        request: ModelRequest[ContextT], plan: ContextPlan
    ) -> ModelRequest[ContextT]:
        sent = list(plan.messages)
        # The agent sends `request.system_message` itself, ahead of `messages`.
        if (
            request.system_message is not None
            and sent
            and isinstance(sent[0], SystemMessage)
            and sent[0].content == request.system_message.content
        ):
            sent = sent[1:]
        # AnyMessage is the union of the concrete message classes the plan is made of.
        return request.override(messages=cast("list[AnyMessage]", sent))

    @staticmethod
    def _with_state(
        response: ModelResponse[ResponseT], plan: ContextPlan, before: WindowState
    ) -> ModelResponse[ResponseT] | ExtendedModelResponse[ResponseT]:
        if plan.state == before:
            return response
        return ExtendedModelResponse(
            model_response=response, command=Command(update=_state_update(plan.state))
        )

    def _count_tools(self, tools: Sequence[BaseTool | dict[str, Any]]) -> int:
        total = 0
        for tool in tools:
            text = _tool_text(tool)
            tokens = self._tool_tokens.get(text)
            if tokens is None:
                tokens = self.window.counter.count_text(text) + TOOL_OVERHEAD
                self._tool_tokens[text] = tokens
            total += tokens
        return total


def _answer_of(response: Any) -> AIMessage | None:
    """The AI message of a model response (``ModelResponse``, extended, or a bare message)."""
    if isinstance(response, AIMessage):
        return response
    inner = getattr(response, "model_response", None)  # ExtendedModelResponse
    if inner is not None:
        response = inner
    for message in getattr(response, "result", None) or ():
        if isinstance(message, AIMessage):
            return message
    return None


def _thread_id() -> str | None:
    try:
        config = get_config()
    except RuntimeError:  # called outside a graph run (e.g. directly in a test)
        return None
    thread = (config.get("configurable") or {}).get("thread_id")
    return None if thread is None else str(thread)


def _tool_text(tool: BaseTool | Mapping[str, Any]) -> str:
    try:
        schema: Any = convert_to_openai_tool(tool)  # type: ignore[arg-type]
    except Exception:  # provider built-ins (e.g. {"type": "web_search"}) stay as given
        schema = dict(tool) if isinstance(tool, Mapping) else {"name": getattr(tool, "name", "")}
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), default=str)


def tool_schema_tokens(tools: Sequence[BaseTool | Mapping[str, Any]], counter: TokenCounter) -> int:
    """Return the tokens the tool schemas add to a prompt, as the middleware counts them.

    Each tool counts as its OpenAI function schema in compact JSON plus ``TOOL_OVERHEAD``; the
    provider's own rendering of tools is usually a little shorter, so this errs on the safe
    side.

    Args:
        tools: Tools as given to ``create_agent`` (``BaseTool``) or as schema dicts.
        counter: The token counter of the window.
    """
    return sum(counter.count_text(_tool_text(t)) + TOOL_OVERHEAD for t in tools)
