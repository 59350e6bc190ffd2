from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import GenericFakeChatModel

from langchain_holysheep.budget import Allocation, ContextBudget


def parts(a: Allocation) -> int:
    return a.system + a.summary + a.recent + a.response + a.margin


def test_default_split_of_an_explicit_budget() -> None:
    a = ContextBudget(10_000).allocate()
    assert a == Allocation(
        total=10_000, system=500, summary=1500, recent=5000, response=2500, margin=500
    )
    assert a.prompt == 7000


@pytest.mark.parametrize(
    ("n_messages", "summary", "recent"),
    [(0, 1500, 5000), (20, 1500, 5000), (21, 2000, 4500), (50, 2000, 4500), (51, 2500, 4000)],
)
def test_summary_share_grows_with_the_conversation(
    n_messages: int, summary: int, recent: int
) -> None:
    a = ContextBudget(10_000).allocate(n_messages)
    assert (a.summary, a.recent) == (summary, recent)
    assert a.prompt == 7000
    assert parts(a) == a.total


def test_a_budget_is_immutable() -> None:
    # Its figures are validated together (and allocations are memoized), so a change made
    # after construction could break the split unnoticed.
    budget = ContextBudget(10_000)
    with pytest.raises(AttributeError, match="immutable"):
        budget.total_tokens = 1_000
    assert budget.allocate().total == 10_000


def test_allocations_are_memoized_per_growth_step_and_calibration() -> None:
    budget = ContextBudget(10_000)
    assert budget.allocate(5) is budget.allocate(20)  # the same growth step
    assert budget.allocate(21) is not budget.allocate(20)
    assert budget.allocate(21) == ContextBudget(10_000).allocate(49)
    calibrated = budget.allocate(5, calibration=1.25)
    assert calibrated is not budget.allocate(5)
    assert calibrated.prompt == 5600  # 7000 / 1.25
    assert budget.allocate(5, calibration=1.25) is calibrated
    with pytest.raises(ValueError, match="calibration"):
        budget.allocate(5, calibration=float("nan"))
    for factor in (0.5 + i / 100 for i in range(200)):  # a drifting calibration
        assert budget.allocate(5, calibration=factor).prompt == int(7000 / factor)


def test_growth_steps_are_overridable() -> None:
    b = ContextBudget(10_000, summary=0.1, recent=0.55, growth=((5, 0.3, 0.35),))
    assert b.allocate(5).summary == 1000
    assert (b.allocate(6).summary, b.allocate(6).recent) == (3000, 3500)
    assert ContextBudget(10_000, growth=()).allocate(500).summary == 1500


def test_response_reserve_is_capped_by_max_output_and_the_rest_goes_to_the_prompt() -> None:
    a = ContextBudget(100_000, max_output_tokens=8192).allocate()
    assert a.response == 8192
    assert a.margin == 5000
    assert a.prompt == 100_000 - 8192 - 5000
    assert parts(a) == 100_000
    # system : summary : recent keep their 5 : 15 : 50 proportions
    assert a.system / a.prompt == pytest.approx(5 / 70, abs=1e-4)
    assert a.summary / a.prompt == pytest.approx(15 / 70, abs=1e-4)


def test_fixed_response_tokens() -> None:
    a = ContextBudget(10_000, response_tokens=1000).allocate()
    assert a.response == 1000
    assert a.prompt == 10_000 - 1000 - 500


def test_max_prompt_tokens_caps_the_prompt() -> None:
    a = ContextBudget(100_000, max_prompt_tokens=6000).allocate()
    assert a.prompt == 6000
    assert a.response == 25_000
    assert parts(a) == a.total


def test_for_model_reads_the_profile() -> None:
    b = ContextBudget.for_model("deepseek-v3.2")
    assert (b.total_tokens, b.max_output_tokens, b.model) == (128_000, 8192, "deepseek-v3.2")
    a = b.allocate()
    assert a.response == 8192
    assert a.prompt == 128_000 - 8192 - 6400


def test_for_model_with_max_tokens_and_overrides() -> None:
    b = ContextBudget.for_model("deepseek-v3.2", max_tokens=6000, summary=0.1, recent=0.55)
    a = b.allocate()
    assert (a.total, a.response, a.prompt) == (6000, 1500, 4200)
    assert a.summary == 600
    gpt = ContextBudget.for_model("gpt-4.1").allocate()
    assert gpt.response == 32_768  # 25 % of 1M would be 261,894


def test_for_model_accepts_a_chat_model_with_a_profile() -> None:
    model = GenericFakeChatModel(
        messages=iter([]), profile={"max_input_tokens": 32_000, "max_output_tokens": 4000}
    )
    a = ContextBudget.for_model(model).allocate()
    assert (a.total, a.response) == (32_000, 4000)


def test_for_model_accepts_a_chat_model_by_name() -> None:
    class Named:
        model_name = "gemini-2.5-flash"
        profile = None

    assert ContextBudget.for_model(Named()).total_tokens == 1_048_576  # type: ignore[arg-type]


def test_for_model_without_size_names_the_model() -> None:
    with pytest.raises(ValueError, match=r"no context size for model 'my-llm'.*pass max_tokens"):
        ContextBudget.for_model("my-llm")
    assert ContextBudget.for_model("my-llm", max_tokens=4000).total_tokens == 4000
    assert ContextBudget.for_model(None, max_tokens=4000).total_tokens == 4000


def test_for_model_rejects_more_than_the_window() -> None:
    with pytest.raises(ValueError, match=r"max_tokens=200,000 exceeds deepseek-v3.2's 128,000"):
        ContextBudget.for_model("deepseek-v3.2", max_tokens=200_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_tokens": 0}, "total_tokens must be a positive whole number of tokens, got 0"),
        ({"total_tokens": -5}, "got -5"),
        ({"total_tokens": 1000, "max_prompt_tokens": 0}, "max_prompt_tokens must be"),
        ({"total_tokens": 1000, "max_output_tokens": -1}, "max_output_tokens must be"),
        ({"total_tokens": 1000, "summary": -0.1}, "summary must be a fraction"),
        ({"total_tokens": 1000, "response": 0}, "response must be a fraction between above 0"),
        ({"total_tokens": 1000, "recent": 0.0}, "recent must be a fraction"),
        ({"total_tokens": 1000, "margin": 1.5}, "margin must be a fraction"),
        (
            {"total_tokens": 1000, "recent": 0.6},
            r"sum to 1\.100, over 1: system 0\.05, summary 0\.15, recent 0\.6",
        ),
        (
            {"total_tokens": 1000, "growth": ((20, 0.4, 0.45),)},
            r"at the growth step over 20 messages sum to 1\.200.*growth=\(\)",
        ),
        ({"total_tokens": 1000, "growth": ((50, 0.2, 0.4), (20, 0.2, 0.4))}, "increasing"),
        ({"total_tokens": 1000, "growth": ((-1, 0.2, 0.4),)}, "must be >= 0"),
        (
            {"total_tokens": 2000, "response_tokens": 1950},
            "2,000-token budget leaves -50 tokens for the prompt after the 1,950-token "
            "response reserve and 100-token margin; a turn needs at least 64",
        ),
        ({"total_tokens": 80}, "80-token budget leaves 56 tokens"),
        ({"total_tokens": 10_000, "max_prompt_tokens": 10}, "max_prompt_tokens=10 is smaller"),
    ],
)
def test_invalid_budgets_raise_with_the_numbers(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ContextBudget(**kwargs)


def test_error_names_the_model() -> None:
    with pytest.raises(ValueError, match=r"for deepseek-v3\.2"):
        ContextBudget.for_model("deepseek-v3.2", max_tokens=6000, recent=0.9)


def test_fractions_summing_to_exactly_one_are_fine() -> None:
    a = ContextBudget(
        1000, system=0.1, summary=0.2, recent=0.4, response=0.2, margin=0.1, growth=()
    )
    assert parts(a.allocate()) == 1000


def test_calibration_puts_the_allocation_in_counter_units() -> None:
    b = ContextBudget(10_000)
    a = b.allocate(calibration=1.25)
    assert a.prompt == 7000 / 1.25
    assert parts(a) == a.total
    assert b.allocate(calibration=0.8).prompt == 8750
    with pytest.raises(ValueError, match="calibration"):
        b.allocate(calibration=0)
    with pytest.raises(ValueError, match="n_messages"):
        b.allocate(-1)


@pytest.mark.parametrize("total", [92, 100, 997, 4096, 128_000, 1_047_576])
@pytest.mark.parametrize("n", [0, 21, 51])
def test_allocation_always_adds_up(total: int, n: int) -> None:
    a = ContextBudget(total, max_output_tokens=8192).allocate(n)
    assert parts(a) == a.total == total
    assert min(a.system, a.summary, a.recent, a.response, a.margin) >= 0
    assert a.prompt >= ContextBudget.MIN_PROMPT_TOKENS
