"""What the reliability tests and ``benchmarks/soak.py`` share: stores, models, turns, checks.

A conversation turn here is what an application does with the package: read the managed
context from a :class:`ManagedChatMessageHistory`, call ``ChatHolySheep`` on the loopback
relay, append the question and the answer in one batch. Every question carries a tag
``[<session>#T<turn>]`` so a transcript read back can be checked message by message, and a
summarizer that answers ``covers <session> T<lo>..T<hi>`` lets a test check that a stored
summary covers exactly a prefix of the transcript.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

from langchain_holysheep.chat_models import ChatHolySheep
from langchain_holysheep.history import ManagedChatMessageHistory
from langchain_holysheep.memory import ContextWindow
from langchain_holysheep.prompt_check import find_prompt_problems
from langchain_holysheep.stores import MessageStore, SessionRecord, SQLiteMessageStore
from langchain_holysheep.summarize import SUMMARY_INSTRUCTIONS, SUMMARY_REQUEST_MARKER
from langchain_holysheep.testing import Reply

SYSTEM_PROMPT = "You are Sheepdog, a terse support assistant. Never invent order data."
SYSTEM = SystemMessage(SYSTEM_PROMPT)
FILLER = "The parcel was due last week and the tracking page has not moved since Monday."
MODEL = "deepseek-v3.2"

_TAG = re.compile(r"\[([A-Za-z0-9_.:/-]+)#T(\d+)\]")
_COVERS = re.compile(r"covers (\S+) T(\d+)\.\.T(\d+)")
_SUMMARY_HEAD = SUMMARY_INSTRUCTIONS[:80]


@dataclass(frozen=True)
class StoreSpec:
    """How to open a durable store, in this process or another one.

    Attributes:
        kind: ``"sqlite"`` or ``"postgres"``.
        target: The SQLite file or the PostgreSQL URL.
        namespace: The namespace the tests write to.
    """

    kind: str
    target: str
    namespace: str


def open_store(spec: StoreSpec, namespace: str | None = None, **kwargs: Any) -> MessageStore:
    """Open the store ``spec`` describes (``kwargs`` go to the PostgreSQL store)."""
    ns = namespace or spec.namespace
    if spec.kind == "sqlite":
        return SQLiteMessageStore(spec.target, namespace=ns)
    from langchain_holysheep.stores import PostgresMessageStore

    return PostgresMessageStore(spec.target, namespace=ns, **kwargs)


def make_model(
    base_url: str, api_key: str, *, max_retries: int = 1, timeout: float = 5.0, **kwargs: Any
) -> ChatHolySheep:
    """A ``ChatHolySheep`` on the loopback relay with short retries (tests stay fast)."""
    return ChatHolySheep(
        model=MODEL,
        base_url=base_url,
        api_key=api_key,
        max_retries=max_retries,
        timeout=timeout,
        **kwargs,
    )


def make_window(summarizer: Any | None, *, max_tokens: int = 1200, **kwargs: Any) -> ContextWindow:
    """The window every test uses: small enough that 50 turns compact several times."""
    return ContextWindow(model=MODEL, max_tokens=max_tokens, summarizer=summarizer, **kwargs)


def make_chain(
    model: ChatHolySheep,
    store: MessageStore,
    window: ContextWindow,
    *,
    reserved_tokens: int = 60,
) -> RunnableWithMessageHistory:
    """``prompt | model`` wrapped in ``RunnableWithMessageHistory`` over a managed history."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", SYSTEM_PROMPT), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RunnableWithMessageHistory is deprecated upstream
        return RunnableWithMessageHistory(
            prompt | model,
            lambda session_id: ManagedChatMessageHistory(
                session_id, store, window, reserved_tokens=reserved_tokens
            ),
            input_messages_key="question",
            history_messages_key="history",
        )


def question(session: str, turn: int, extra: str = "") -> str:
    """The tagged user text of ``turn`` in ``session``."""
    return f"[{session}#T{turn}] Where is my parcel? {FILLER}{extra}"


def tag_of(text: str) -> tuple[str, int] | None:
    """Return ``(session, turn)`` of the first tag in ``text``."""
    match = _TAG.search(text)
    return (match.group(1), int(match.group(2))) if match else None


# -- the summarizer's side of the relay ------------------------------------------------------


def is_summary_request(body: Mapping[str, Any]) -> bool:
    """Whether a chat request is the running summarizer's, in either of its two modes.

    Isolated: the summary instructions are its system message. Cache-aligned: the last chat
    prompt resent, followed by a human message that starts with the summary-request marker.
    """
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if not messages:
        return False
    first, last = messages[0], messages[-1]
    if first.get("role") == "system" and str(first.get("content", "")).startswith(_SUMMARY_HEAD):
        return True
    return last.get("role") == "user" and str(last.get("content", "")).startswith(
        SUMMARY_REQUEST_MARKER
    )


def covers_summary(body: Mapping[str, Any]) -> str | None:
    """A summarizer reply that states which turns it covers, or ``None`` for a chat request.

    It reads the turn tags of everything the summarizer was shown (the previous summary, the
    messages leaving the window and, in cache-aligned mode, the whole last prompt), so the
    summary a store ends up with says which turns of the conversation it reflects.
    """
    if not is_summary_request(body):
        return None
    turns: set[int] = set()
    session = "?"
    for message in body["messages"]:
        data = str(message.get("content", ""))
        for match in _COVERS.finditer(data):
            session = match.group(1)
            turns.update(range(int(match.group(2)), int(match.group(3)) + 1))
        for match in _TAG.finditer(data):
            session = match.group(1)
            turns.add(int(match.group(2)))
    if not turns:
        return "covers nothing"
    return f"covers {session} T{min(turns)}..T{max(turns)}"


def tag_responder(body: dict[str, Any]) -> Reply | None:
    """Responder for a loopback relay: summaries state their coverage; chat gets the default."""
    text = covers_summary(body)
    return Reply(text) if text is not None else None


def covered_range(summary: str | None) -> tuple[int, int] | None:
    """The ``(lo, hi)`` turns a ``covers`` summary states, or ``None`` if it states none."""
    if not summary:
        return None
    match = _COVERS.search(summary)
    return (int(match.group(2)), int(match.group(3))) if match else None


# -- turns -----------------------------------------------------------------------------------


@dataclass
class TurnResult:
    """What one turn measured.

    Attributes:
        overhead: Seconds spent in the memory layer (history read and append), model excluded.
        prompt: The prompt sent.
        prompt_limit: The window's prompt limit for this turn.
        prompt_tokens: What the plan counted for the prompt.
    """

    overhead: float
    prompt: list[BaseMessage]
    prompt_limit: int | None
    prompt_tokens: int | None


def _plan_numbers(history: ManagedChatMessageHistory) -> tuple[int | None, int | None]:
    plan = history.last_plan
    if plan is None:
        return None, None
    return plan.tokens.prompt_limit, plan.tokens.total


def sync_turn(
    history: ManagedChatMessageHistory, model: ChatHolySheep, session: str, turn: int
) -> TurnResult:
    """One turn through the sync API; the model call is not counted as overhead."""
    ask = HumanMessage(question(session, turn))
    t0 = time.perf_counter()
    context = history.messages
    t1 = time.perf_counter()
    prompt = [SYSTEM, *context, ask]
    answer = model.invoke(prompt)
    t2 = time.perf_counter()
    history.add_messages([ask, answer])
    t3 = time.perf_counter()
    limit, tokens = _plan_numbers(history)
    return TurnResult((t1 - t0) + (t3 - t2), prompt, limit, tokens)


async def async_turn(
    history: ManagedChatMessageHistory, model: ChatHolySheep, session: str, turn: int
) -> TurnResult:
    """One turn through the async API; the model call is not counted as overhead."""
    ask = HumanMessage(question(session, turn))
    t0 = time.perf_counter()
    context = await history.aget_messages()
    t1 = time.perf_counter()
    prompt = [SYSTEM, *context, ask]
    answer = await model.ainvoke(prompt)
    t2 = time.perf_counter()
    await history.aadd_messages([ask, answer])
    t3 = time.perf_counter()
    limit, tokens = _plan_numbers(history)
    return TurnResult((t1 - t0) + (t3 - t2), prompt, limit, tokens)


def prompt_problems(result: TurnResult) -> list[str]:
    """What is wrong with a turn's prompt: invalid, or over the window's limit."""
    problems = list(find_prompt_problems(result.prompt))
    limit, tokens = result.prompt_limit, result.prompt_tokens
    if limit is not None and tokens is not None and tokens > limit:
        problems.append(f"the plan counts {tokens} tokens, over its limit of {limit}")
    return problems


# -- checks ----------------------------------------------------------------------------------


def record_problems(record: SessionRecord) -> list[str]:
    """What is inconsistent in a session record (empty when consistent)."""
    problems = []
    if not 0 <= record.summarized_through <= record.window_start <= record.message_count:
        problems.append(
            f"{record.session_id}: summarized_through={record.summarized_through}, "
            f"window_start={record.window_start}, message_count={record.message_count} out of "
            "order"
        )
    return problems


def transcript_problems(
    store: MessageStore, session: str, turns: int, *, tag: str | None = None
) -> list[str]:
    """Check a single-writer session: exactly ``turns`` question/answer pairs, in order."""
    tag = tag or session
    stored = store.read(session)
    problems: list[str] = []
    seqs = [m.seq for m in stored]
    if seqs != list(range(len(stored))):
        problems.append(f"{session}: sequence numbers {seqs[:10]}... have gaps or duplicates")
    if len(stored) != 2 * turns:
        problems.append(f"{session}: {len(stored)} messages stored, expected {2 * turns}")
    for t in range(min(turns, len(stored) // 2)):
        q, a = stored[2 * t].message, stored[2 * t + 1].message
        if not isinstance(q, HumanMessage) or q.content != question(tag, t):
            problems.append(f"{session}: message {2 * t} is {q.content!r:.80}, expected turn {t}")
            break
        if not isinstance(a, AIMessage) or f"[{tag}#T{t}]" not in str(a.content):
            problems.append(f"{session}: message {2 * t + 1} is not the answer to turn {t}")
            break
    record = store.get_session(session)
    if record.message_count != len(stored):
        problems.append(f"{session}: message_count={record.message_count}, {len(stored)} stored")
    problems.extend(record_problems(record))
    problems.extend(summary_problems(record, stored_tags(store, session)))
    return problems


def stored_tags(store: MessageStore, session: str) -> list[int | None]:
    """The turn number tagged in each stored message (``None`` when untagged)."""
    out: list[int | None] = []
    for m in store.read(session):
        found = tag_of(str(m.message.content))
        out.append(found[1] if found else None)
    return out


def summary_problems(record: SessionRecord, tags: Sequence[int | None]) -> list[str]:
    """Check a ``covers`` summary against the transcript it summarizes.

    The summary must cover at least the prefix ``[0, summarized_through)`` (a cache-aligned
    summarizer may also reflect later messages, which stay in the window) and nothing that is
    not in the transcript (for example a batch whose append was rolled back).
    """
    if record.summary is None or record.summarized_through == 0:
        return []
    covered = covered_range(record.summary)
    if covered is None:
        return []  # not written by the covers summarizer: nothing to compare
    prefix = [t for t in tags[: record.summarized_through] if t is not None]
    stored = [t for t in tags if t is not None]
    if not prefix:
        return []
    lo, hi = covered
    if lo > min(prefix) or hi < max(prefix) or hi > max(stored):
        return [
            f"{record.session_id}: summary covers turns {covered}, but summarized_through="
            f"{record.summarized_through} needs turns {min(prefix)}..{max(prefix)} and the "
            f"transcript ends at turn {max(stored)}"
        ]
    return []


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]
