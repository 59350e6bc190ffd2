"""ContextWindowMiddleware in real ``create_agent`` runs: long tool-calling conversations.

Every model call's prompt is captured by the scripted model and checked: valid, within the
budget (tool schemas included), the newest user message verbatim, the current turn intact.
"""

from __future__ import annotations

import importlib
import math
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.exceptions import ContextOverflowError
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph.message import REMOVE_ALL_MESSAGES

from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.middleware import (
    ContextWindowMiddleware,
    tool_schema_tokens,
    window_state_from,
)
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.testing import (
    HolySheepTestServer,
    Reply,
    ToolCallReply,
    count_text_tokens,
)
from langchain_holysheep.tokens import TokenCounter
from langchain_holysheep.window import ContextPlan
from tests.unit_tests.middleware_harness import (
    SYSTEM_PROMPT,
    TOOLS,
    AgentScript,
    RecapModel,
    ScriptedChatModel,
    arun_turns,
    build_script,
    run_turns,
    thread,
)

MODEL = "deepseek-v3.2"
BUDGET = 6000  # whole budget: prompt + response reserve
TURNS = 120
# Each long-run test runs a short conversation always and the 100+ turn one when slow tests run.
LENGTHS = [
    pytest.param(36, id="36-turns"),
    pytest.param(TURNS, id="120-turns", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def script() -> AgentScript:
    return build_script(TURNS)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(MODEL)


class Run:
    """One agent with the middleware, its scripted model, summarizer and recorded plans."""

    def __init__(
        self,
        script: AgentScript,
        checkpointer: BaseCheckpointSaver[Any],
        *,
        from_turn: int = 0,
        budget: int = BUDGET,
        summarizer: RecapModel | None = None,
        tools: list[Any] | None = None,
        count_tools: bool = True,
    ) -> None:
        self.model = ScriptedChatModel(responses=script.responses(from_turn))
        self.summarizer = summarizer if summarizer is not None else RecapModel()
        self.window = ContextWindow(model=MODEL, max_tokens=budget, summarizer=self.summarizer)
        self.plans: list[ContextPlan] = []
        self.middleware: ContextWindowMiddleware[Any, Any] = ContextWindowMiddleware(
            window=self.window, on_plan=self.plans.append, count_tools=count_tools
        )
        self.agent = create_agent(
            self.model,
            TOOLS if tools is None else tools,
            system_prompt=SYSTEM_PROMPT,
            middleware=[self.middleware],
            checkpointer=checkpointer,
        )


def _calls_per_turn(script: AgentScript, start: int, end: int) -> list[int]:
    """For each model call of turns [start, end), the index of its turn."""
    out: list[int] = []
    for turn in script.turns[start:end]:
        out.extend([turn.index] * (len(turn.rounds) + 1))
    return out


def _expected_ids(script: AgentScript, end: int) -> list[str]:
    """The shape of the transcript of turns [0, end): every message, in order."""
    ids: list[str] = []
    for turn in script.turns[:end]:
        ids.append(f"human:{turn.user.id}")
        for calls in turn.rounds:
            ids.append("ai:" + ",".join(str(c["id"]) for c in calls))
            ids.extend(f"tool:{c['id']}" for c in calls)
        ids.append("ai:")
    return ids


def _transcript_ids(messages: list[BaseMessage]) -> list[str]:
    out: list[str] = []
    for m in messages:
        if isinstance(m, AIMessage):
            out.append("ai:" + ",".join(str(c["id"]) for c in m.tool_calls))
        elif isinstance(m, ToolMessage):
            out.append(f"tool:{m.tool_call_id}")
        else:
            out.append(f"{m.type}:{m.id}")
    return out


def check_calls(
    run: Run,
    script: AgentScript,
    counter: TokenCounter,
    start: int,
    end: int,
    state: list[BaseMessage],
) -> None:
    """Check every model call of turns [start, end) against the transcript ``state``."""
    owners = _calls_per_turn(script, start, end)
    assert len(run.model.calls) == len(owners)
    assert len(run.plans) == len(owners)
    positions = {str(m.id): i for i, m in enumerate(state)}
    for k, (call, turn_index) in enumerate(zip(run.model.calls, owners, strict=True)):
        sent = call.messages
        assert find_prompt_problems(sent) == [], f"call {k} (turn {turn_index})"
        assert sent[0].type == "system"
        assert sent[0].content == SYSTEM_PROMPT
        # The budget holds for what the model actually received, tool schemas included.
        plan = run.plans[k]
        used = counter.count_messages(sent) + tool_schema_tokens(call.tools, counter)
        assert used == plan.tokens.total, f"call {k}"
        assert used <= plan.tokens.prompt_limit, f"call {k}: {used} tokens sent"
        assert plan.tokens.prompt_limit + plan.tokens.reserve <= plan.tokens.budget
        # The newest user message, and everything after it, is sent verbatim.
        user = script.turns[turn_index].user
        at = [i for i, m in enumerate(sent) if m.id == user.id]
        assert len(at) == 1, f"call {k}: the user's request of turn {turn_index} was not sent"
        current = sent[at[0] :]
        assert current[0].content == user.content
        begin = positions[str(user.id)]
        assert [m.id for m in current] == [m.id for m in state[begin : begin + len(current)]]
        assert all(
            a.content == b.content
            for a, b in zip(current, state[begin : begin + len(current)], strict=True)
        )


@pytest.mark.parametrize("turns", LENGTHS)
def test_long_run_in_memory(script: AgentScript, counter: TokenCounter, turns: int) -> None:
    run = Run(script, InMemorySaver())
    run_turns(run.agent, script, "t1", 0, turns)
    values = run.agent.get_state(thread("t1")).values
    messages: list[BaseMessage] = values["messages"]
    # Nothing was removed from the agent state.
    assert _transcript_ids(messages) == _expected_ids(script, turns)
    check_calls(run, script, counter, 0, turns, messages)
    # The window did its job: it compacted (with a summary) and sent far less than all.
    state = window_state_from(values)
    assert state.summary
    assert state.summarized_through > 0
    assert run.summarizer.calls
    assert any(p.compacted for p in run.plans)
    assert len(run.model.calls[-1].messages) < len(messages) // 2
    # Between compactions the prompt grows append-only: its prefix is served from cache.
    assert sum(p.cached_tokens for p in run.plans) > 0


def test_each_call_indexes_only_the_new_messages(script: AgentScript) -> None:
    # Between compactions the middleware extends the previous call's index with the messages
    # that arrived since, rather than indexing (and looking up the count of) the whole window
    # again; across turns too, where the agent state comes back from the checkpointer.
    run = Run(script, InMemorySaver())
    adopted: list[bool] = []
    adopt = run.window._adopt_index

    def spy(*args: Any) -> Any:
        index = adopt(*args)
        adopted.append(index is not None)
        return index

    run.window._adopt_index = spy  # type: ignore[method-assign,assignment]
    run_turns(run.agent, script, "t-adopt", 0, 30)
    compactions = sum(p.compacted for p in run.plans)
    assert len(adopted) == len(run.plans) > 40
    # Rebuilt only on the first call and after the window let go of messages.
    assert adopted.count(False) <= compactions + 2
    messages = run.agent.get_state(thread("t-adopt")).values["messages"]
    check_calls(run, script, TokenCounter(MODEL), 0, 30, messages)


def test_compacts_inside_tool_loops(script: AgentScript, counter: TokenCounter) -> None:
    """A small budget forces compaction in the middle of a tool loop; every call stays valid.

    No orphan tool results (langchain-ai/langchain#38352) and the user's request is sent
    verbatim, never replaced by a placeholder (langchain-ai/langchain#39261): see check_calls.
    """
    run = Run(script, InMemorySaver(), budget=4500)
    end = 50
    run_turns(run.agent, script, "t2", 0, end)
    owners = _calls_per_turn(script, 0, end)
    first_call_of_turn = [k == 0 or owners[k - 1] != owners[k] for k in range(len(owners))]
    mid_loop = [k for k, p in enumerate(run.plans) if p.compacted and not first_call_of_turn[k]]
    assert mid_loop, "the scenario never compacted inside a tool loop"
    messages = run.agent.get_state(thread("t2")).values["messages"]
    check_calls(run, script, counter, 0, end, messages)


@pytest.mark.parametrize("turns", LENGTHS)
def test_summary_survives_restart_sqlite(
    script: AgentScript, counter: TokenCounter, tmp_path: Path, turns: int
) -> None:
    db = tmp_path / "agent.sqlite"
    half = turns * 7 // 12
    with sqlite3.connect(db, check_same_thread=False) as conn:
        first = Run(script, SqliteSaver(conn))
        run_turns(first.agent, script, "t3", 0, half)
        stored = window_state_from(first.agent.get_state(thread("t3")).values)
    assert stored.summary
    assert stored.summarized_through > 0

    # A new process: new connection, saver, window, middleware and agent; same thread.
    with sqlite3.connect(db, check_same_thread=False) as conn:
        second = Run(script, SqliteSaver(conn), from_turn=half)
        run_turns(second.agent, script, "t3", half, turns)
        values = second.agent.get_state(thread("t3")).values
    messages = values["messages"]
    assert _transcript_ids(messages) == _expected_ids(script, turns)
    # The first call after the restart carries on from the stored summary and window: it
    # sends the stored summary, or hands it to the summarizer if it compacts at once.
    assert second.plans[0].state.summarized_through >= stored.summarized_through
    if second.plans[0].compacted:
        carried = second.summarizer.calls[0]
    else:
        carried = second.model.calls[0].messages
    assert any(stored.summary in m.text for m in carried)
    check_calls(second, script, counter, half, turns, messages)
    assert window_state_from(values).summarized_through > stored.summarized_through


@pytest.mark.parametrize("turns", LENGTHS)
async def test_async_run_awaits_summarizer(
    script: AgentScript, counter: TokenCounter, turns: int
) -> None:
    # The summarizer raises on its sync path: a blocking (sync) step under ainvoke fails.
    run = Run(script, InMemorySaver(), summarizer=RecapModel(async_only=True))
    await arun_turns(run.agent, script, "t4", 0, turns)
    values = (await run.agent.aget_state(thread("t4"))).values
    messages = values["messages"]
    assert _transcript_ids(messages) == _expected_ids(script, turns)
    check_calls(run, script, counter, 0, turns, messages)
    assert run.summarizer.calls
    assert window_state_from(values).summary


def test_tool_schemas_count_toward_budget(script: AgentScript, counter: TokenCounter) -> None:
    """Big tool schemas (langchain-ai/langchain#34664): counted, they keep prompts in budget."""

    def search_catalog(query: str) -> str:
        return "no results"

    catalog = StructuredTool.from_function(
        search_catalog,
        description="Search the product catalog. " + "Field notes on catalog records. " * 150,
    )
    tools = [*TOOLS, catalog]

    def overshoot(count_tools: bool) -> int:
        run = Run(script, InMemorySaver(), tools=tools, count_tools=count_tools)
        run_turns(run.agent, script, "t5", 0, 25)
        worst = 0
        for call, plan in zip(run.model.calls, run.plans, strict=True):
            used = counter.count_messages(call.messages) + tool_schema_tokens(call.tools, counter)
            worst = max(worst, used - plan.tokens.prompt_limit)
        return worst

    assert overshoot(count_tools=True) <= 0
    assert overshoot(count_tools=False) > 0


def test_state_fields_are_in_the_state_schema(script: AgentScript) -> None:
    run = Run(script, InMemorySaver())
    keys = set(run.agent.get_output_jsonschema()["properties"])
    assert {"context_summary", "context_window_start", "context_summarized_through"} <= keys
    assert "context_summary" not in run.agent.get_input_jsonschema()["properties"]


def test_import_does_not_pull_in_langchain_agents() -> None:
    code = (
        "import sys, langchain_holysheep as h\n"
        "h.ContextWindow, h.TokenCounter\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('langchain.agents', "
        "'langchain_holysheep.middleware')))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def _without_langchain(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "langchain",
        "langchain.agents",
        "langchain.agents.middleware",
        "langchain.agents.middleware.types",
    ):
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    for name in ("langchain_holysheep.middleware", "langchain_holysheep.middleware.context_window"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.usefixtures("_without_langchain")
def test_missing_langchain_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r'pip install "langchain-holysheep\[agents\]"'):
        importlib.import_module("langchain_holysheep.middleware")


def test_failed_summary_keeps_history_and_valid_prompts(
    script: AgentScript, counter: TokenCounter
) -> None:
    run = Run(script, InMemorySaver(), summarizer=RecapModel(fail=True))
    end = 40
    with pytest.warns(UserWarning, match="summary failed"):
        run_turns(run.agent, script, "t7", 0, end)
    values = run.agent.get_state(thread("t7")).values
    messages = values["messages"]
    assert _transcript_ids(messages) == _expected_ids(script, end)
    assert any(p.summary_failed for p in run.plans)
    assert window_state_from(values).summary is None
    check_calls(run, script, counter, 0, end, messages)


def test_system_messages_in_the_state_are_kept_first(script: AgentScript) -> None:
    """An agent without ``system_prompt`` whose input starts with a system message."""
    model = ScriptedChatModel(responses=script.responses())
    plans: list[ContextPlan] = []
    window = ContextWindow(model=MODEL, max_tokens=4500, summarizer=RecapModel())
    agent = create_agent(
        model,
        TOOLS,
        middleware=[ContextWindowMiddleware(window=window, on_plan=plans.append)],
        checkpointer=InMemorySaver(),
    )
    rules = SystemMessage("House rules: never share another customer's data.", id="rules")
    end = 40
    for turn in script.turns[:end]:
        new = [rules, turn.user] if turn.index == 0 else [turn.user]
        agent.invoke({"messages": new}, thread("t8"))
    assert any(p.compacted for p in plans)
    for call in model.calls:
        assert call.messages[0].content == rules.content
        assert sum(m.type == "system" for m in call.messages) == 1
        assert find_prompt_problems(call.messages) == []
    # Positions exclude the leading system message: the window never points past the end.
    values = agent.get_state(thread("t8")).values
    assert window_state_from(values).window_start <= len(values["messages"]) - 1


@pytest.mark.slow
def test_chat_holysheep_against_loopback_server(script: AgentScript, counter: TokenCounter) -> None:
    """The real HTTP path: ChatHolySheep agent and summarizer, each on a loopback server."""
    replies = [
        Reply(
            content=str(r.content),
            tool_calls=[ToolCallReply(c["name"], c["args"], c["id"]) for c in r.tool_calls],
        )
        for r in script.responses()
    ]
    with HolySheepTestServer() as agent_server, HolySheepTestServer() as summary_server:
        agent_server.script(*replies)
        plans: list[ContextPlan] = []
        window = ContextWindow(
            model=MODEL, max_tokens=BUDGET, summarizer=summary_server.chat_model(MODEL)
        )
        agent = create_agent(
            agent_server.chat_model(MODEL),
            TOOLS,
            system_prompt=SYSTEM_PROMPT,
            middleware=[ContextWindowMiddleware(window=window, on_plan=plans.append)],
            checkpointer=InMemorySaver(),
        )
        run_turns(agent, script, "t9")
        requests = agent_server.chat_requests
        summaries = summary_server.chat_requests
    values = agent.get_state(thread("t9")).values
    assert _transcript_ids(values["messages"]) == _expected_ids(script, TURNS)
    assert len(requests) == script.model_calls == len(plans)
    assert summaries
    assert window_state_from(values).summary
    owners = _calls_per_turn(script, 0, TURNS)
    for request, plan, turn_index in zip(requests, plans, owners, strict=True):
        sent = convert_to_messages(request.messages)
        assert find_prompt_problems(sent) == []
        assert sent[0].content == SYSTEM_PROMPT
        users = [m.content for m in sent if m.type == "human"]
        assert users[-1] == script.turns[turn_index].user.content
        assert len(request.body["tools"]) == len(TOOLS)
        assert plan.tokens.total <= plan.tokens.prompt_limit
    # What the server counted and billed: every prompt within the budget's prompt limit,
    # and compaction in steps lets the provider serve repeated prefixes from its cache.
    reported = [m.usage_metadata for m in values["messages"] if m.type == "ai"]
    assert len(reported) == script.model_calls
    assert max(u["input_tokens"] for u in reported) <= plans[0].tokens.prompt_limit
    assert sum(u["input_token_details"].get("cache_read", 0) for u in reported) > 0


def test_history_rewritten_elsewhere_restarts_the_window(
    script: AgentScript, caplog: pytest.LogCaptureFixture
) -> None:
    """Positions stored in the state stop matching when something else deletes messages."""
    run = Run(script, InMemorySaver())
    run_turns(run.agent, script, "t10", 0, 30)
    config = thread("t10")
    values = run.agent.get_state(config).values
    assert window_state_from(values).summarized_through > 4
    messages = values["messages"]
    keep = messages[max(i for i, m in enumerate(messages) if m.type == "human") :]
    run.agent.update_state(config, {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), *keep]})
    with caplog.at_level("WARNING", logger="langchain_holysheep.middleware.context_window"):
        run_turns(run.agent, script, "t10", 30, 32)
    assert "starts afresh" in caplog.text
    for call in run.model.calls[-3:]:
        assert find_prompt_problems(call.messages) == []
    after = run.agent.get_state(config).values
    assert len(after["messages"]) < window_state_from(values).summarized_through
    assert window_state_from(after).summarized_through < len(after["messages"])


def test_current_turn_too_big_raises_context_overflow() -> None:
    def dump_logs(order_id: str) -> str:
        return "log line with many words in it. " * 2000

    dump = StructuredTool.from_function(dump_logs, description="Return the full order logs.")
    call = ToolCall(name="dump_logs", args={"order_id": "ORD-1"}, id="call_big", type="tool_call")
    model = ScriptedChatModel(responses=[AIMessage("", tool_calls=[call]), AIMessage("done")])
    window = ContextWindow(model=MODEL, max_tokens=BUDGET)
    agent = create_agent(
        model,
        [dump],
        middleware=[ContextWindowMiddleware(window=window)],
        checkpointer=InMemorySaver(),
    )
    with pytest.raises(ContextOverflowError, match="budget"):
        agent.invoke({"messages": [HumanMessage("Show me the logs of ORD-1.")]}, thread("t11"))
    # The first call went out; the second (with the huge result) was refused, not cut.
    assert len(model.calls) == 1


# -- calibration: the budget learns the provider's tokenizer -------------------------------


def _scripted_replies(script: AgentScript, turns: int) -> list[Reply]:
    calls = sum(len(t.rounds) + 1 for t in script.turns[:turns])
    return [
        Reply(
            content=str(r.content),
            tool_calls=[ToolCallReply(c["name"], c["args"], c["id"]) for c in r.tool_calls],
        )
        for r in script.responses()[:calls]
    ]


def _run_against_a_bigger_tokenizer(
    script: AgentScript, turns: int, *, calibrate: bool
) -> tuple[ContextWindow, list[ContextPlan], list[int]]:
    """An agent on the loopback server, whose tokenizer makes 25 % more tokens than cl100k.

    Returns the window, the plan of every model call and the input tokens the server counted.
    """
    with HolySheepTestServer(
        count_tokens=lambda text: math.ceil(1.25 * count_text_tokens(text))
    ) as server:
        server.script(*_scripted_replies(script, turns))
        plans: list[ContextPlan] = []
        # high_water=1.0: the window fills up to its limit before compacting (the worst case).
        window = ContextWindow(
            model=MODEL, max_tokens=BUDGET, summarizer=RecapModel(), high_water=1.0
        )
        if not calibrate:
            window.counter.observe_response = lambda plan, message: None  # type: ignore[method-assign]
        agent = create_agent(
            server.chat_model(MODEL, max_retries=0),
            TOOLS,
            system_prompt=SYSTEM_PROMPT,
            middleware=[ContextWindowMiddleware(window=window, on_plan=plans.append)],
            checkpointer=InMemorySaver(),
        )
        run_turns(agent, script, "cal", 0, turns)
    values = agent.get_state(thread("cal")).values
    reported = [m.usage_metadata["input_tokens"] for m in values["messages"] if m.type == "ai"]
    assert len(reported) == len(plans) == len(server.chat_requests)
    return window, plans, reported


def _real_prompt_limit(window: ContextWindow) -> int:
    allocation = window.budget.allocate(calibration=1.0)
    return allocation.total - allocation.response


@pytest.mark.parametrize("calibrate", [True, False], ids=["calibrated", "control"])
def test_budget_learns_the_providers_tokenizer(script: AgentScript, calibrate: bool) -> None:
    window, plans, reported = _run_against_a_bigger_tokenizer(script, 24, calibrate=calibrate)
    real_limit = _real_prompt_limit(window)
    if not calibrate:
        # The cl100k estimate alone lets the real prompt outgrow the budget.
        assert window.counter.calibration == 1.0
        assert max(reported) > real_limit
        return
    counter = window.counter
    # Like for like: each plan's total (system prompt, recap, messages, reply priming and the
    # tool schemas) against what the server counted for that very call.
    ratios = [r / p.tokens.total for r, p in zip(reported, plans, strict=True)]
    assert counter.calibration_samples == len(plans)
    assert 1.15 < counter.calibration < 1.4
    assert min(ratios) <= counter.calibration <= max(ratios)
    # The limits shrank by the factor, and every prompt the server counted fit the budget.
    first_limit = plans[0].tokens.prompt_limit  # planned before any report
    assert window.limits().prompt == math.floor(first_limit / counter.calibration)
    assert plans[-1].tokens.prompt_limit < first_limit / 1.15
    assert max(reported) <= real_limit


def test_calibration_ignores_responses_without_usage(script: AgentScript) -> None:
    run = Run(script, InMemorySaver())  # the scripted model reports no usage
    run_turns(run.agent, script, "t10", 0, 3)
    assert run.window.counter.calibration_samples == 0
