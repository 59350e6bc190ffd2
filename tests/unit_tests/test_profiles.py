from __future__ import annotations

import json
from importlib import resources

import pytest

from langchain_holysheep.profiles import get_model_profile, known_models, profile_entry

REQUIRED = {
    "deepseek-v3.2",
    "gpt-4.1",
    "gpt-4.1-mini",
    "claude-sonnet-4.5",
    "gemini-2.5-flash",
    "gemini-2.5-pro",
}


def test_required_models_have_profiles() -> None:
    assert set(known_models()) >= REQUIRED


@pytest.mark.parametrize("model", sorted(REQUIRED))
def test_every_entry_names_its_source_and_date(model: str) -> None:
    entry = profile_entry(model)
    assert entry is not None
    assert entry["source"]
    assert len(entry["as_of"]) == 10
    assert entry["tokenizer"] in {"cl100k_base", "o200k_base"}
    profile = get_model_profile(model)
    assert profile is not None
    assert profile["max_input_tokens"] > profile["max_output_tokens"] > 0
    assert "source" not in profile
    assert "tokenizer" not in profile


def test_unknown_model_has_no_profile() -> None:
    assert get_model_profile("my-private-model") is None
    assert profile_entry("my-private-model") is None


def test_lookup_is_case_insensitive_and_returns_copies() -> None:
    entry = profile_entry("GPT-4.1")
    assert entry is not None
    entry["max_input_tokens"] = 1
    again = get_model_profile("gpt-4.1")
    assert again is not None
    assert again["max_input_tokens"] == 1047576


def test_data_file_is_valid_json_with_about() -> None:
    raw = resources.files("langchain_holysheep.data").joinpath("profiles.json").read_text("utf-8")
    data = json.loads(raw)
    assert "_about" in data
