from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources

import pytest

from langchain_holysheep import pricing
from langchain_holysheep.pricing import ModelPrice, cost, get_price, price_entry, set_price
from langchain_holysheep.profiles import known_models


@pytest.fixture(autouse=True)
def _clean_overrides() -> Iterator[None]:
    pricing.reset_prices()
    yield
    pricing.reset_prices()


def test_every_profiled_model_has_a_price_with_source_and_date() -> None:
    for model in known_models():
        price = get_price(model)
        assert price is not None, model
        assert 0 < price.cached_input <= price.input < price.output, model
        entry = price_entry(model)
        assert entry is not None
        assert entry["source"].startswith("https://"), model
        assert len(entry["as_of"]) == 10, model


def test_data_file_says_the_relay_may_charge_differently() -> None:
    raw = resources.files("langchain_holysheep.data").joinpath("prices.json").read_text("utf-8")
    about = json.loads(raw)["_about"]
    assert "relay may charge differently" in about
    assert "set_price" in about


def test_names_resolve_case_aliases_and_dated_snapshots() -> None:
    assert get_price("DeepSeek-V3.2") == get_price("deepseek-chat") == get_price("deepseek-v3.2")
    assert get_price("gpt-4.1-2025-04-14") == get_price("gpt-4.1")
    assert get_price("gpt-4.1-mini-2025-04-14") == get_price("gpt-4.1-mini")
    assert get_price("no-such-model") is None


def test_cost_prices_cached_input_at_the_cached_price() -> None:
    usage = {
        "input_tokens": 1_000_000,
        "output_tokens": 100_000,
        "total_tokens": 1_100_000,
        "input_token_details": {"cache_read": 800_000},
    }
    # deepseek-v3.2: $0.28 input, $0.028 cached, $0.42 output per 1M
    expected = 200_000 * 0.28 / 1e6 + 800_000 * 0.028 / 1e6 + 100_000 * 0.42 / 1e6
    assert cost(usage, "deepseek-v3.2") == pytest.approx(expected)
    assert cost(usage, "deepseek-v3.2") == pytest.approx(0.056 + 0.0224 + 0.042)


def test_cost_without_cache_details_and_gpt_prices() -> None:
    usage = {"input_tokens": 2000, "output_tokens": 500, "total_tokens": 2500}
    assert cost(usage, "gpt-4.1") == pytest.approx((2000 * 2.0 + 500 * 8.0) / 1e6)


def test_set_price_overrides_and_prices_unknown_models() -> None:
    usage = {"input_tokens": 1_000_000, "output_tokens": 0, "total_tokens": 1_000_000}
    set_price("deepseek-v3.2", ModelPrice(input=1.0, cached_input=0.1, output=2.0))
    assert cost(usage, "deepseek-chat") == pytest.approx(1.0)  # the alias sees the override
    set_price("my-model", ModelPrice(input=3.0, cached_input=3.0, output=3.0))
    assert cost(usage, "MY-MODEL") == pytest.approx(3.0)
    pricing.reset_prices()
    assert cost(usage, "deepseek-v3.2") == pytest.approx(0.28)
    assert get_price("my-model") is None


def test_unpriced_model_is_a_key_error_with_advice() -> None:
    with pytest.raises(KeyError, match=r"no price for model 'my-model'.*set_price\('my-model'"):
        cost({"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}, "my-model")


def test_invalid_prices_and_usage() -> None:
    with pytest.raises(ValueError, match=r"ModelPrice.output must be >= 0 dollars per 1M, got -1"):
        ModelPrice(input=1, cached_input=1, output=-1)
    with pytest.raises(TypeError, match="must be a ModelPrice"):
        set_price("x", (1, 2, 3))  # type: ignore[arg-type]
    bad = {"input_tokens": 10, "output_tokens": 0, "input_token_details": {"cache_read": 20}}
    with pytest.raises(ValueError, match="20 cache-read tokens but only 10 input tokens"):
        cost(bad, "gpt-4.1")
    with pytest.raises(ValueError, match="input_tokens must be a non-negative"):
        cost({"input_tokens": -1, "output_tokens": 0}, "gpt-4.1")
