"""The notebooks: generated from their cell lists, free of secrets and paths, and runnable offline.

Each notebook is executed top to bottom in a fresh ``python3`` kernel (this venv's Python) with
``HOLYSHEEP_API_KEY`` unset, so it runs against the loopback stand-in; an IPython startup file in
the kernel makes any connection or name lookup beyond loopback fail the run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat as _nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from langchain_holysheep.testing import DEFAULT_TEST_API_KEY

# nbformat has no type hints for its constructors: call them through Any.
nbformat: Any = _nbformat

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
REGENERATE = ".venv/bin/python notebooks/build_notebooks.py --execute"


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOKS_DIR / "build_notebooks.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
NAMES: tuple[str, ...] = builder.NOTEBOOKS


def _committed(name: str) -> dict[str, Any]:
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    assert path.exists(), f"{path.name} is missing; run {REGENERATE}"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _forbidden() -> list[str]:
    return [DEFAULT_TEST_API_KEY, *builder.machine_strings()]


def _all_text(nb: Any) -> str:
    return "\n".join(text for _, text in builder._text_parts(nb))


def test_the_four_notebooks_are_committed_and_nothing_else() -> None:
    committed = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert committed == sorted(NAMES)
    assert NAMES == (
        "01_quickstart",
        "02_memory_in_lcel",
        "03_agent_memory",
        "04_cost_of_long_conversations",
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_what_the_generator_writes(name: str) -> None:
    committed = _committed(name)
    generated = builder.build(name)
    assert [(c["cell_type"], "".join(c["source"])) for c in committed["cells"]] == [
        (c.cell_type, c.source) for c in generated.cells
    ], f"{name}.ipynb differs from notebooks/_cells/{name}.py; run {REGENERATE}"
    assert committed["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_holds_no_secret_port_or_machine_path(name: str) -> None:
    assert builder.find_leaks(_committed(name), _forbidden()) == []


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_error_output(name: str) -> None:
    assert builder.errors_in(_committed(name)) == []


def test_leak_scanner_finds_each_kind_of_leak() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print(1)"),
        nbformat.v4.new_markdown_cell("clean text: https://api.holysheep.ai/v1, a task-list"),
    ]
    assert builder.find_leaks(nb, _forbidden()) == []
    leaks = {
        "/tmp/tmpabc/conversations.db": "absolute machine path",
        "/work/main/.venv/lib/python3.11/site-packages/x.py": "absolute machine path",
        "key sk-proj-abcdefghijklmnop": "OpenAI-style key",
        f"Bearer {DEFAULT_TEST_API_KEY}": "test server's key",
        "http://127.0.0.1:54321/v1": "loopback address with a port",
        "http://localhost:8000": "loopback address with a port",
    }
    for text, what in leaks.items():
        cell = nbformat.v4.new_code_cell("x = 1")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells = [cell]
        found = builder.find_leaks(nb)
        assert len(found) == 1, (text, found)
        assert what in found[0], (text, found)
    # Images are base64, whose alphabet includes '/': they are not scanned as text.
    cell = nbformat.v4.new_code_cell("plot()")
    cell.outputs = [
        nbformat.v4.new_output(
            "display_data", data={"image/png": "iVBOR/tmp/AAAA", "text/plain": "<Figure>"}
        )
    ]
    nb.cells = [cell]
    assert builder.find_leaks(nb) == []


# Runs in the kernel before the notebook (an IPython startup file): any connection or name
# lookup beyond loopback raises, so a notebook cannot quietly reach the relay while offline.
_LOOPBACK_ONLY = """
import socket

_ALLOWED = {"127.0.0.1", "::1", "localhost"}
_connect, _connect_ex, _getaddrinfo = (
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
)


def _check(host):
    if str(host) not in _ALLOWED:
        raise OSError(f"offline notebook test: {host!r} is not loopback; blocked")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address[0])
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address[0])
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None:
        _check(host.decode() if isinstance(host, bytes) else host)
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
"""


def _loopback_only_env(tmp_path: Path) -> dict[str, str]:
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-loopback-only.py").write_text(_LOOPBACK_ONLY, encoding="utf-8")
    env: dict[str, str] = builder.offline_env()
    assert "HOLYSHEEP_API_KEY" not in env
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    return env


@pytest.mark.slow
def test_the_kernel_guard_blocks_everything_but_loopback(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import socket\n"
            "try:\n"
            "    socket.create_connection(('192.0.2.1', 443), timeout=1)\n"
            "except OSError as exc:\n"
            "    print('remote:', exc)\n"
            "try:\n"
            "    socket.getaddrinfo('api.holysheep.ai', 443)\n"
            "except OSError as exc:\n"
            "    print('dns:', exc)\n"
            "server = socket.create_server(('127.0.0.1', 0))\n"
            "socket.create_connection(server.getsockname(), timeout=1).close()\n"
            "print('loopback: ok')"
        )
    ]
    builder.execute(nb, timeout=60, env=_loopback_only_env(tmp_path))
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "remote: offline notebook test: '192.0.2.1' is not loopback; blocked" in text
    assert "dns: offline notebook test: 'api.holysheep.ai' is not loopback; blocked" in text
    assert "loopback: ok" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_offline(name: str, tmp_path: Path) -> None:
    nb = builder.build(name)
    try:
        builder.execute(nb, timeout=120, env=_loopback_only_env(tmp_path))
    except CellExecutionError as exc:
        pytest.fail(f"{name}.ipynb failed offline:\n{exc}")
    assert builder.errors_in(nb) == []
    text = _all_text(nb)
    assert "Mode: OFFLINE" in text, "the set-up cell must say it runs against the stand-in"
    assert "Mode: RELAY" not in text
    # Outputs written by `build_notebooks.py --execute` would be committed: they must be clean.
    assert builder.find_leaks(nb, _forbidden()) == []
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs, "an executed notebook shows outputs"
    if name == "02_memory_in_lcel":
        html = [o for o in outputs if "text/html" in o.get("data", {})]
        assert any("ContextPlan" in o["data"]["text/html"] for o in html)
    if name in ("03_agent_memory", "04_cost_of_long_conversations"):
        assert builder.images_in(nb) >= 1
