"""Run the loopback test server until interrupted: ``python -m langchain_holysheep.testing``.

It prints the environment variables that point ``ChatHolySheep`` (or any script using it) at
the server, then serves the default replies (they quote the last user message).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Sequence

from langchain_holysheep.testing.server import DEFAULT_TEST_API_KEY, HolySheepTestServer


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, start the server, print its settings and wait for Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m langchain_holysheep.testing",
        description="Serve an offline OpenAI-compatible endpoint for ChatHolySheep.",
    )
    parser.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    parser.add_argument("--api-key", default=DEFAULT_TEST_API_KEY, help="the key accepted")
    parser.add_argument(
        "--usage-style", choices=["openai", "deepseek", "both"], default="openai",
        help="how cached prompt tokens are reported",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with HolySheepTestServer(
        api_key=args.api_key, usage_style=args.usage_style, port=args.port
    ) as server:
        for name, value in server.env().items():
            print(f"export {name}={value}")
        print("# serving; press Ctrl-C (or send SIGTERM) to stop", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
