"""Fakes shared by the background-summary tests (no tests here): a summarizer that blocks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field

from langchain_holysheep import ContextWindow

MODEL = "deepseek-v3.2"
GATE_TIMEOUT = 30.0  # a test that forgets to open the gate fails instead of hanging


class GatedSummarizer(BaseChatModel):
    """Answers ``Recap <n>: ...`` once ``gate`` is open; the first ``fail_calls`` calls raise.

    ``started`` is set when a call begins (before it waits on the gate), so a test can wait
    for a background job to be inside the summarizer without sleeping.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    gate: threading.Event = Field(default_factory=threading.Event)
    started: threading.Event = Field(default_factory=threading.Event)
    fail_calls: int = 0
    calls: int = 0
    async_calls: int = 0
    transcripts: list[str] = Field(default_factory=list)
    lock: Any = Field(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "gated-summarizer"

    def _answer(self, messages: list[BaseMessage]) -> ChatResult:
        with self.lock:
            self.calls += 1
            n = self.calls
            if n <= self.fail_calls:
                raise RuntimeError(f"summarizer unavailable (call {n})")
            self.transcripts.append(str(messages[-1].content))
        text = f"Recap {n}: the customer discussed orders."
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.started.set()
        if not self.gate.wait(GATE_TIMEOUT):
            raise RuntimeError("the test never opened the gate")
        return self._answer(messages)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.started.set()
        self.async_calls += 1
        for _ in range(int(GATE_TIMEOUT * 1000)):
            if self.gate.is_set():
                return self._answer(messages)
            await asyncio.sleep(0.001)  # cancellable, unlike a thread blocked on the event
        raise RuntimeError("the test never opened the gate")


class FailingSummarizer(GatedSummarizer):
    """Always fails: an inline window with it keeps every leaving message pending."""

    fail_calls: int = 10**9

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._answer(messages)


def make_window(summarizer: BaseChatModel, **kw: Any) -> ContextWindow:
    """A small-budget window (compacts often) with background summaries on."""
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 3000)
    kw.setdefault("background_summary", True)
    kw.setdefault("summary_timeout", None)  # no per-call deadline threads in these tests
    kw.setdefault("summary_wait", GATE_TIMEOUT)
    return ContextWindow(summarizer=summarizer, **kw)


def background_threads() -> list[threading.Thread]:
    """Live threads started for background summaries."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("holysheep-background-summary") and t.is_alive()
    ]
