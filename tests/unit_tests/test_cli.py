from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from langchain_holysheep.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from langchain_holysheep.profiles import known_models
from langchain_holysheep.stores.sqlite import SQLiteMessageStore
from langchain_holysheep.testing import HolySheepTestServer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ usage errors


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == EXIT_USAGE
    assert "COMMAND" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "simulate", "--help")
    assert code == EXIT_OK
    assert "--transcript" in out
    assert "--plot" in out


@pytest.mark.parametrize("budget", ["0", "-5", "lots"])
def test_bad_budget_is_a_usage_error(capsys: pytest.CaptureFixture[str], budget: str) -> None:
    code, _, err = run(capsys, "simulate", "--budget", budget)
    assert code == EXIT_USAGE
    assert "--budget" in err


def test_unknown_model_lists_known_models_and_how_to_size_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "simulate", "--model", "my-local-llm")
    assert code == EXIT_USAGE
    assert "unknown model 'my-local-llm'" in err
    for name in known_models():
        assert name in err
    assert "--price" in err
    assert out == ""


def test_malformed_transcript_names_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"role": "user", "content": "hi"})
        + "\n"
        + json.dumps({"role": "assistant", "content": "hello"})
        + "\n"
        + '{"role": "user", "content": \n',
        encoding="utf-8",
    )
    code, _, err = run(capsys, "simulate", "--transcript", str(path))
    assert code == EXIT_USAGE
    assert "line 3" in err
    assert "invalid JSON" in err


def test_missing_transcript_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "simulate", "--transcript", str(tmp_path / "none.jsonl"))
    assert code == EXIT_USAGE
    assert "cannot read transcript" in err


def test_contradictory_summary_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "simulate", "--summarize", "--no-summaries")
    assert code == EXIT_USAGE
    assert "contradict" in err


# ------------------------------------------------------------------ simulate


def test_simulate_offline_prints_three_policies_and_draws_the_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "out" / "sim.png"
    code, out, err = run(capsys, "simulate", "--turns", "30", "--plot", str(plot))
    assert code == EXIT_OK, err
    for name in ("send everything", "sliding window", "ContextWindow"):
        assert name in out
    assert "OFFLINE FAKE summarizer" in out
    assert "33 model calls" in out  # 30 turns, 3 of them with a tool call
    assert plot.exists()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Plot written to {plot}" in " ".join(out.split())


def test_simulate_says_when_summaries_are_off(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "simulate", "--turns", "12", "--no-summaries")
    assert code == EXIT_OK
    assert "Summaries: off" in out


def test_simulate_summarize_without_key_falls_back_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "simulate", "--turns", "12", "--summarize")
    assert code == EXIT_OK
    flat = " ".join(out.split())
    assert "HOLYSHEEP_API_KEY is not set" in flat
    assert "OFFLINE FAKE summarizer" in flat


def test_simulate_a_transcript_with_anchors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = [{"role": "system", "content": "be brief"}]
    for i in range(30):
        lines.append({"role": "user", "content": f"question {i} " + "word " * 80})
        lines.append({"role": "assistant", "content": f"answer {i} " + "text " * 120})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    code, out, err = run(
        capsys, "simulate", "--transcript", str(path), "--budget", "3000", "--anchors"
    )
    assert code == EXIT_OK, err
    assert "30 model calls" in out
    for name in ("trim_messages", "SummarizationMiddleware"):
        assert name in out


def test_simulate_unknown_model_with_a_price_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "simulate", "--turns", "12", "--model", "my-llm", "--price", "1,0.1,2"
    )
    assert code == EXIT_OK, err
    assert "$1 input / $0.1 cached input / $2 output" in out


# ------------------------------------------------------------------ chat and inspect


def test_chat_without_a_key_says_how_to_set_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "chat")
    assert code == EXIT_USAGE
    assert "HOLYSHEEP_API_KEY is not set" in err
    assert "export HOLYSHEEP_API_KEY=" in err


def test_inspect_without_a_database(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "inspect", "s1", "--db", str(tmp_path / "none.db"))
    assert code == EXIT_USAGE
    assert "no session database" in err
    assert not (tmp_path / "none.db").exists()


def chat_script(monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))


def test_chat_end_to_end_against_the_loopback_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "chat.db")
    with HolySheepTestServer(prices=(0.28, 0.028, 0.42)) as server:
        monkeypatch.setenv("HOLYSHEEP_API_KEY", server.api_key or "")
        filler = "please check the parcel delivery status again " * 30
        chat_script(
            monkeypatch,
            [
                "/summary",
                "My order number is ORD-1 and my code word is ABC12.",
                *(f"message {i}: {filler}" for i in range(10)),
                "/plan",
                "/summary",
                "/nonsense",
                "/quit",
                "never sent",
            ],
        )
        args = ["--db", db, "--base-url", server.base_url, "--budget", "3000"]
        code, out, err = run(capsys, "chat", "--session", "s1", *args)
        assert code == EXIT_OK, err
        # 11 answers, and the summarizer ran when the window compacted.
        answers = [r for r in server.chat_requests if "You are a helpful" in json.dumps(r.body)]
        assert len(answers) == 11
        assert len(server.chat_requests) > 11
    flat = " ".join(out.split())
    assert flat.count("tokens sent of") == 11
    assert "No summary yet" in flat
    assert "+ summary $" in flat  # a turn that paid for a summary says so
    assert "Summary of messages 0-" in flat
    assert "ContextPlan for deepseek-v3.2" in flat
    assert "Unknown command /nonsense" in flat
    assert "never sent" not in json.dumps([r.body for r in server.chat_requests])
    # Every status line: the prompt sent is smaller than the transcript once it has grown.
    last = [line for line in out.splitlines() if "tokens sent of" in line][-1]
    sent, total = (int(x.replace(",", "")) for x in re.findall(r"([\d,]+) ", last)[:2])
    assert sent < total

    code, out, err = run(capsys, "inspect", "s1", "--db", db, "--budget", "3000")
    assert code == EXIT_OK, err
    flat = " ".join(out.split())
    assert "22 messages" in flat
    assert "summarized" in flat
    assert "Summary of messages 0-" in flat
    assert "Next prompt" in flat
    assert re.search(r"Cost so far: \$0\.\d+", flat)

    code, _, err = run(capsys, "inspect", "nobody", "--db", db)
    assert code == EXIT_USAGE
    assert "sessions there: s1" in " ".join(err.split())


def test_chat_reset_deletes_the_session(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "chat.db"
    with HolySheepTestServer() as server:
        monkeypatch.setenv("HOLYSHEEP_API_KEY", server.api_key or "")
        chat_script(monkeypatch, ["hello", "/reset", "again"])
        code, out, err = run(
            capsys, "chat", "--db", str(db), "--base-url", server.base_url, "--session", "r"
        )
        assert code == EXIT_OK, err
    assert "Session r deleted" in out
    store = SQLiteMessageStore(db)
    try:
        assert [m.message.text for m in store.read("r")][:1] == ["again"]
    finally:
        store.close()


def test_chat_with_a_wrong_key_fails_with_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HolySheepTestServer() as server:
        monkeypatch.setenv("HOLYSHEEP_API_KEY", "wrong-key")
        chat_script(monkeypatch, ["hello"])
        code, _, err = run(
            capsys, "chat", "--db", str(tmp_path / "c.db"), "--base-url", server.base_url
        )
    assert code == EXIT_FAILURE
    assert "Authentication" in err or "401" in err


def test_simulate_with_a_key_and_summarize_calls_the_relay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with HolySheepTestServer() as server:
        monkeypatch.setenv("HOLYSHEEP_API_KEY", server.api_key or "")
        monkeypatch.setenv("HOLYSHEEP_API_BASE", server.base_url)
        code, out, err = run(capsys, "simulate", "--turns", "40", "--summarize")
        assert code == EXIT_OK, err
        requests = len(server.chat_requests)
    flat = " ".join(out.split())
    assert "Summaries: real, written by deepseek-v3.2 through ChatHolySheep" in flat
    assert "OFFLINE FAKE" not in flat
    # Every summary the window asked for went to the relay, and the table counts them.
    row = next(line for line in out.splitlines() if line.strip().startswith("ContextWindow"))
    assert requests > 0
    assert re.search(rf"\b{requests}, \$", row)
