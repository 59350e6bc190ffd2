"""Every Python example of README.md runs as written against the loopback relay."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from langchain_holysheep.testing import HolySheepTestServer
from tests.postgres_server import PostgresServer

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), flags=re.S)
PG_PLACEHOLDER = "postgresql://app@db/chat"


def _run(code: str, server: HolySheepTestServer, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOLYSHEEP_", "OPENAI_"))}
    env.update(server.env())
    env["HOLYSHEEP_DB"] = str(cwd / "default.db")
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_readme_has_the_examples_this_file_runs() -> None:
    assert len(BLOCKS) == 5
    assert sum(PG_PLACEHOLDER in block for block in BLOCKS) == 1


@pytest.mark.parametrize(
    "index", [i for i, block in enumerate(BLOCKS) if PG_PLACEHOLDER not in block]
)
def test_example_runs_against_the_loopback_relay(index: int, tmp_path: Path) -> None:
    with HolySheepTestServer() as server:
        out = _run(BLOCKS[index], server, tmp_path)
        assert server.chat_requests, "the example made no model call"
    assert out.strip(), "the example printed nothing"


@pytest.mark.postgres
def test_postgres_example_runs(postgres_server: PostgresServer, tmp_path: Path) -> None:
    (block,) = [b for b in BLOCKS if PG_PLACEHOLDER in b]
    code = block.replace(PG_PLACEHOLDER, postgres_server.url)
    assert "    store.setup()" in code
    code = code.replace("    store.setup()", "    store.setup()\n    print(store.list_sessions())")
    with HolySheepTestServer() as server:
        assert _run(code, server, tmp_path).strip() == "[]"
