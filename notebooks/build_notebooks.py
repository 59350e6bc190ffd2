"""Write the notebooks from the cell lists in ``notebooks/_cells``; ``--execute`` also runs them.

The ``.ipynb`` files are generated: edit the cells in ``notebooks/_cells/*.py`` and run

    .venv/bin/python notebooks/build_notebooks.py            # sources only, outputs cleared
    .venv/bin/python notebooks/build_notebooks.py --execute  # run offline and keep the outputs

``--execute`` runs each notebook top to bottom in a fresh ``python3`` kernel with
``HOLYSHEEP_API_KEY`` unset (so against the loopback stand-in, never the relay), then refuses to
write any notebook whose outputs hold a key, a port or a machine path.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat as _nbformat
from nbformat import NotebookNode

# nbformat has no type hints for its constructors: call them through Any.
nbformat: Any = _nbformat

HERE = Path(__file__).resolve().parent
CELLS_DIR = HERE / "_cells"
NOTEBOOKS = (
    "01_quickstart",
    "02_memory_in_lcel",
    "03_agent_memory",
    "04_cost_of_long_conversations",
)
KERNEL = "python3"
CELL_TIMEOUT = 120  # seconds per cell
# Environment variables that must not reach a kernel that writes committed outputs.
SCRUBBED_ENV = (
    "HOLYSHEEP_API_KEY",
    "HOLYSHEEP_API_BASE",
    "OPENAI_API_KEY",
    "LANGSMITH_API_KEY",
    "LANGCHAIN_API_KEY",
    "LANGSMITH_TRACING",
    "LANGCHAIN_TRACING_V2",
)

# What must never appear in a committed notebook: keys, the test server's key, loopback ports,
# and absolute paths of a machine.
LEAK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an OpenAI-style key", re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")),
    ("the test server's key", re.compile(r"hs-test-[0-9a-f]+")),
    ("a loopback address with a port", re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\]):\d+")),
    (
        "an absolute machine path",
        re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users|private|var/folders|opt)/"),
    ),
    ("a Windows user path", re.compile(r"[A-Za-z]:\\\\?Users\\\\?")),
)


def load_cells(name: str) -> list[tuple[str, str]]:
    """Return the ``(kind, source)`` cells of a notebook, read from ``_cells/<name>.py``."""
    path = CELLS_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cells_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no cell list for notebook {name!r} at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells: list[tuple[str, str]] = module.CELLS
    for kind, _ in cells:
        if kind not in ("markdown", "code"):
            raise ValueError(f"{path.name}: cell kind {kind!r} is neither 'markdown' nor 'code'")
    return cells


def build(name: str) -> NotebookNode:
    """Return the notebook ``name`` with its sources and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": KERNEL},
        "language_info": {"name": "python"},
    }
    for k, (kind, source) in enumerate(load_cells(name)):
        text = source.strip("\n")
        cell = (
            nbformat.v4.new_markdown_cell(text)
            if kind == "markdown"
            else nbformat.v4.new_code_cell(text)
        )
        cell["id"] = f"{name[:2]}-{k:02d}"  # stable ids: regenerating changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    notebook: NotebookNode = nb
    return notebook


def offline_env() -> dict[str, str]:
    """The environment for a kernel: this one without keys or endpoints."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def execute(
    nb: NotebookNode,
    *,
    timeout: int = CELL_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> NotebookNode:
    """Run ``nb`` top to bottom in a fresh kernel, with the notebooks directory as cwd.

    Args:
        nb: The notebook; its outputs are filled in place.
        timeout: Seconds each cell may take.
        env: The kernel's environment (default: :func:`offline_env`, so never the relay).

    Raises:
        nbclient.exceptions.CellExecutionError: A cell raised.
    """
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    manager = KernelManager(kernel_name=KERNEL)
    client = NotebookClient(
        nb,
        km=manager,
        timeout=timeout,
        kernel_name=KERNEL,
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    client.execute(env=dict(env) if env is not None else offline_env())
    return nb


def _text_parts(nb: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield ``(where, text)`` for every source and text output (images are skipped)."""
    for k, cell in enumerate(nb.get("cells", [])):
        yield f"cell {k} source", "".join(cell.get("source", ""))
        for output in cell.get("outputs", []):
            if "text" in output:
                yield f"cell {k} output", "".join(output["text"])
            for key in ("evalue", "ename"):
                if key in output:
                    yield f"cell {k} output", str(output[key])
            for line in output.get("traceback", []):
                yield f"cell {k} traceback", line
            for mime, data in (output.get("data") or {}).items():
                if mime.startswith("image/") and mime != "image/svg+xml":
                    continue
                yield f"cell {k} {mime}", data if isinstance(data, str) else "".join(data)
        yield f"cell {k} metadata", json.dumps(cell.get("metadata", {}))
    yield "notebook metadata", json.dumps(nb.get("metadata", {}))


def find_leaks(nb: Mapping[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """Return what in ``nb`` looks like a secret or a machine-specific path, with where.

    Args:
        nb: The notebook (as parsed JSON or a NotebookNode).
        extra: Further literal strings that must not appear (e.g. this machine's home).
    """
    problems: list[str] = []
    for where, text in _text_parts(nb):
        for what, pattern in LEAK_PATTERNS:
            found = pattern.search(text)
            if found:
                problems.append(f"{where}: {what} ({found.group()!r})")
        for literal in extra:
            if literal and literal in text:
                problems.append(f"{where}: {literal!r}")
    return problems


def machine_strings() -> list[str]:
    """Strings specific to this machine that must not be committed."""
    home = str(Path.home())
    out = [str(HERE.parent)]
    if home not in ("/", ""):
        out.append(home)
    return out


def errors_in(nb: Mapping[str, Any]) -> list[str]:
    """Return the error outputs of an executed notebook, as ``cell k: Name: value``."""
    found = []
    for k, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {k}: {output.get('ename')}: {output.get('evalue')}")
    return found


def images_in(nb: Mapping[str, Any]) -> int:
    """Count the PNG images in a notebook's outputs (each checked to decode as PNG)."""
    count = 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            data = (output.get("data") or {}).get("image/png")
            if data:
                raw = base64.b64decode(data if isinstance(data, str) else "".join(data))
                if not raw.startswith(b"\x89PNG"):
                    raise ValueError("an image/png output is not a PNG")
                count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """Write (and with ``--execute`` run) the notebooks; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"notebooks to build (default: all of {NOTEBOOKS})"
    )
    parser.add_argument("--execute", action="store_true", help="run offline and keep outputs")
    args = parser.parse_args(argv)
    names = args.names or list(NOTEBOOKS)
    unknown = sorted(set(names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(NOTEBOOKS)}")
    status = 0
    for name in names:
        nb = build(name)
        if args.execute:
            execute(nb)
            leaks = find_leaks(nb, machine_strings())
            if leaks:
                print(f"{name}: NOT written, its outputs would leak:", file=sys.stderr)
                for leak in leaks:
                    print(f"  {leak}", file=sys.stderr)
                status = 1
                continue
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        state = f"executed, {images_in(nb)} plot(s)" if args.execute else "outputs cleared"
        print(f"wrote {path.name} ({len(nb.cells)} cells, {state})")
    return status


if __name__ == "__main__":
    sys.exit(main())
