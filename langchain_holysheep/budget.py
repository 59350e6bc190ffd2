"""Token budgets: how a model's window (or a chosen cap) splits between the parts of a prompt.

A budget's total is prompt plus response reserve. It allocates a share to the system
messages, the running summary and the recent messages, reserves room for the answer, and
keeps a safety margin for tokenizer error; the summary's share grows as conversations do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_holysheep.profiles import get_model_profile

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = ["Allocation", "ContextBudget"]

_DEFAULT_GROWTH: tuple[tuple[int, float, float], ...] = ((20, 0.20, 0.45), (50, 0.25, 0.40))


@dataclass(frozen=True)
class Allocation:
    """Token allocation for one turn. ``system + summary + recent + response + margin == total``.

    Attributes:
        total: The whole budget for the turn (prompt + response reserve + margin).
        system: Share for the system messages.
        summary: Share for the running summary of earlier conversation.
        recent: Share for the recent messages kept verbatim.
        response: Tokens reserved for the model's answer.
        margin: Safety margin for tokenizer error.
    """

    total: int
    system: int
    summary: int
    recent: int
    response: int
    margin: int

    @property
    def prompt(self) -> int:
        """The most tokens a prompt may count: ``total - response - margin``."""
        return self.total - self.response - self.margin


def _check_fraction(name: str, value: float, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a fraction between 0 and 1, got {value!r}")
    if value < 0 or value > 1 or (positive and value == 0):
        low = "above 0" if positive else "0"
        raise ValueError(f"{name} must be a fraction between {low} and 1, got {value!r}")


def _check_tokens(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number of tokens, got {value!r}")


def _model_name(model: Any) -> str | None:
    if model is None or isinstance(model, str):
        return model
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


class ContextBudget:
    """Split a token budget into system, summary, recent, response and margin allocations.

    The response reserve is ``response`` of the total (or ``response_tokens``), never more
    than the model's ``max_output_tokens`` when known; the margin is ``margin`` of the total;
    the rest is the prompt, shared by system, summary and recent in proportion to their
    fractions (so room freed by a capped response reserve goes to the prompt). With
    ``max_prompt_tokens`` the prompt is capped (a cost budget) and the total shrinks with it.

    As a conversation grows past a ``growth`` step's message count, that step's summary and
    recent fractions replace the defaults: long conversations keep more in the summary.

    Example:
        ```python
        from langchain_holysheep import ContextBudget

        budget = ContextBudget.for_model("deepseek-v3.2", max_tokens=8000)
        budget.allocate(n_messages=30).prompt  # most tokens this turn's prompt may count
        ```

    Attributes:
        total_tokens: The whole budget: prompt plus response reserve.
        max_output_tokens: The model's output limit, if known (caps the response reserve).
        max_prompt_tokens: Cap on prompt tokens, if any.
        model: The model name the budget was made for, if any (used in messages).
    """

    MIN_PROMPT_TOKENS = 64
    """Smallest prompt allowed: room for a system line and a short question."""

    def __init__(
        self,
        total_tokens: int,
        *,
        max_output_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        system: float = 0.05,
        summary: float = 0.15,
        recent: float = 0.50,
        response: float = 0.25,
        margin: float = 0.05,
        growth: Sequence[tuple[int, float, float]] = _DEFAULT_GROWTH,
        response_tokens: int | None = None,
        model: str | None = None,
    ) -> None:
        """Validate and store a budget.

        Args:
            total_tokens: The whole budget: prompt plus response reserve.
            max_output_tokens: The model's output limit; caps the response reserve.
            max_prompt_tokens: Optional cap on prompt tokens (a cost budget).
            system: Fraction for system messages.
            summary: Fraction for the running summary.
            recent: Fraction for recent messages (must be above 0).
            response: Fraction reserved for the answer (must be above 0).
            margin: Fraction kept as a safety margin.
            growth: ``(more_than_n_messages, summary, recent)`` steps, in increasing order.
            response_tokens: A fixed response reserve in tokens, instead of ``response``.
            model: The model name, used in error messages.

        Raises:
            ValueError: For negative or zero sizes, fractions outside [0, 1] or summing over 1
                (at any growth step), unordered growth steps, or a budget that leaves less
                than ``MIN_PROMPT_TOKENS`` for the prompt.
        """
        self.model = model
        where = f" for {model}" if model else ""
        _check_tokens("total_tokens", total_tokens)
        _check_tokens("max_output_tokens", max_output_tokens)
        _check_tokens("max_prompt_tokens", max_prompt_tokens)
        _check_tokens("response_tokens", response_tokens)
        for name, value in (("system", system), ("summary", summary), ("margin", margin)):
            _check_fraction(name, value)
        _check_fraction("recent", recent, positive=True)
        _check_fraction("response", response, positive=True)
        steps: list[tuple[int, float, float]] = []
        previous = -1
        for step in growth:
            if len(step) != 3:
                raise ValueError(
                    f"each growth step is (more_than_n_messages, summary, recent), got {step!r}"
                )
            after, step_summary, step_recent = step
            if isinstance(after, bool) or not isinstance(after, int) or after < 0:
                raise ValueError(f"growth step message counts must be >= 0, got {after!r}")
            if after <= previous:
                raise ValueError(
                    f"growth steps must be in increasing message counts, got {after} after "
                    f"{previous}"
                )
            _check_fraction(f"growth summary at >{after} messages", step_summary)
            _check_fraction(f"growth recent at >{after} messages", step_recent, positive=True)
            previous = after
            steps.append((after, float(step_summary), float(step_recent)))
        shares: list[tuple[int | None, float, float]] = [(None, summary, recent), *steps]
        response_share = 0.0 if response_tokens is not None else response
        for step_after, sh_summary, sh_recent in shares:
            fractions = system + sh_summary + sh_recent + response_share + margin
            if fractions > 1 + 1e-9:
                at, fix = "", "lower some of them"
                if step_after is not None:
                    at = f" at the growth step over {step_after} messages"
                    fix += " or pass growth=... (growth=() for none)"
                raise ValueError(
                    f"budget fractions{where}{at} sum to {fractions:.3f}, over 1: system "
                    f"{system}, summary {sh_summary}, recent {sh_recent}, response "
                    f"{response_share}, margin {margin}; {fix}"
                )
        self.total_tokens = total_tokens
        self.max_output_tokens = max_output_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.system = float(system)
        self.summary = float(summary)
        self.recent = float(recent)
        self.response = float(response)
        self.margin = float(margin)
        self.growth: tuple[tuple[int, float, float], ...] = tuple(steps)
        self.response_tokens = response_tokens
        # (growth step, calibration) -> allocation: a turn asks for one, so it must be cheap.
        self._allocations: dict[tuple[int, float], Allocation] = {}

        reserve = self.response_reserve
        margin_tokens = self.margin_tokens
        prompt = total_tokens - reserve - margin_tokens
        if prompt < self.MIN_PROMPT_TOKENS:
            raise ValueError(
                f"a {total_tokens:,}-token budget{where} leaves {prompt:,} tokens for the prompt "
                f"after the {reserve:,}-token response reserve and {margin_tokens:,}-token "
                f"margin; a turn needs at least {self.MIN_PROMPT_TOKENS}. Raise the budget or "
                "lower the response reserve"
            )
        if max_prompt_tokens is not None and max_prompt_tokens < self.MIN_PROMPT_TOKENS:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens:,}{where} is smaller than a minimal "
                f"turn ({self.MIN_PROMPT_TOKENS} tokens); raise it"
            )

        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"ContextBudget is immutable (its figures were validated together); make a "
                f"new one instead of setting {name!r}"
            )
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"ContextBudget(total_tokens={self.total_tokens}, model={self.model!r}, "
            f"max_output_tokens={self.max_output_tokens}, "
            f"max_prompt_tokens={self.max_prompt_tokens})"
        )

    @property
    def response_reserve(self) -> int:
        """Tokens reserved for the answer: the share or fixed figure, capped by the model."""
        if self.response_tokens is not None:
            reserve = self.response_tokens
        else:
            reserve = math.ceil(self.total_tokens * self.response)
        if self.max_output_tokens is not None:
            reserve = min(reserve, self.max_output_tokens)
        return reserve

    @property
    def margin_tokens(self) -> int:
        """Tokens kept free as a safety margin."""
        return math.ceil(self.total_tokens * self.margin)

    def shares(self, n_messages: int = 0) -> tuple[float, float, float]:
        """Return the (system, summary, recent) fractions in force at ``n_messages``."""
        step = self._step(n_messages)
        if step == 0:
            return self.system, self.summary, self.recent
        _, summary, recent = self.growth[step - 1]
        return self.system, summary, recent

    def _step(self, n_messages: int) -> int:
        """Return how many growth steps ``n_messages`` has passed (0 = the defaults)."""
        step = 0
        for after, _, _ in self.growth:
            if n_messages <= after:
                break
            step += 1
        return step

    def allocate(self, n_messages: int = 0, *, calibration: float = 1.0) -> Allocation:
        """Allocate the budget for a conversation of ``n_messages`` messages.

        Args:
            n_messages: Messages in the conversation so far (selects the growth step).
            calibration: The token counter's calibration factor (real/counted). Every figure
                of the allocation is divided by it, so it can be compared with counts as
                counted. 1.0 gives real tokens.

        Returns:
            The allocation; ``system + summary + recent + response + margin == total``.

        Raises:
            ValueError: For a negative ``n_messages`` or a non-positive ``calibration``.
        """
        if n_messages < 0:
            raise ValueError(f"n_messages must be >= 0, got {n_messages}")
        key = (self._step(n_messages), calibration)
        found = self._allocations.get(key)
        if found is not None:
            return found
        if not (math.isfinite(calibration) and calibration > 0):
            raise ValueError(f"calibration must be a positive number, got {calibration!r}")
        allocation = self._allocate(n_messages, calibration)
        if len(self._allocations) >= 64:  # calibration drifts: keep the memo small
            self._allocations.clear()
        self._allocations[key] = allocation
        return allocation

    def _allocate(self, n_messages: int, calibration: float) -> Allocation:
        response = self.response_reserve
        margin = self.margin_tokens
        prompt = self.total_tokens - response - margin
        if self.max_prompt_tokens is not None:
            prompt = min(prompt, self.max_prompt_tokens)
        if calibration != 1.0:
            response = math.floor(response / calibration)
            margin = math.ceil(margin / calibration)
            prompt = math.floor(prompt / calibration)
        system_share, summary_share, recent_share = self.shares(n_messages)
        weights = system_share + summary_share + recent_share
        # The epsilon keeps float error (0.15 / 0.7 * 7000 = 1499.9999...) from losing a token.
        system = math.floor(prompt * system_share / weights + 1e-6)
        summary = math.floor(prompt * summary_share / weights + 1e-6)
        recent = prompt - system - summary
        return Allocation(
            total=prompt + response + margin,
            system=system,
            summary=summary,
            recent=recent,
            response=response,
            margin=margin,
        )

    @classmethod
    def for_model(
        cls,
        model: str | BaseChatModel | None,
        max_tokens: int | None = None,
        **overrides: Any,
    ) -> ContextBudget:
        """Make a budget from a model's profile (context window, output limit) or ``max_tokens``.

        The total is ``max_tokens`` when given, else the model's ``max_input_tokens`` (the
        context window, which prompt and answer share). The model's ``max_output_tokens``
        caps the response reserve unless ``max_output_tokens`` is overridden.

        Args:
            model: A model name, a chat model (its ``profile``, else its model name is looked
                up), or None (then ``max_tokens`` is required).
            max_tokens: The whole budget, prompt plus response; at most the model's window.
            **overrides: Any other ``ContextBudget`` argument (fractions, ``growth``,
                ``max_prompt_tokens``, ``response_tokens``, ``max_output_tokens``).

        Returns:
            The budget.

        Raises:
            ValueError: When neither a profile nor ``max_tokens`` gives a size, when
                ``max_tokens`` exceeds the model's window, or for an invalid budget.
        """
        name = _model_name(model)
        profile: Any = None
        if model is not None and not isinstance(model, str):
            profile = getattr(model, "profile", None)
        if not profile and name is not None:
            profile = get_model_profile(name)
        profile = dict(profile or {})
        window = profile.get("max_input_tokens")
        max_output = profile.get("max_output_tokens")
        label = name or type(model).__name__
        if max_tokens is None:
            if not isinstance(window, int) or window <= 0:
                raise ValueError(
                    f"no context size for model {label!r}: it has no profile with "
                    "max_input_tokens; pass max_tokens (prompt plus response budget)"
                )
            max_tokens = window
        elif isinstance(window, int) and window > 0 and max_tokens > window:
            raise ValueError(
                f"max_tokens={max_tokens:,} exceeds {label}'s {window:,}-token context window; "
                f"pass at most {window:,}, or None to use the whole window"
            )
        overrides.setdefault(
            "max_output_tokens", max_output if isinstance(max_output, int) else None
        )
        overrides.setdefault("model", name)
        return cls(max_tokens, **overrides)
