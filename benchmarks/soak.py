"""Soak: many concurrent managed conversations, with relay faults, on SQLite and PostgreSQL.

Run: python benchmarks/soak.py [--sessions 200] [--turns 50] [--processes 4] [--quick]

Each conversation turn reads the managed context from a ``ManagedChatMessageHistory``, calls
``ChatHolySheep`` on the loopback relay (which runs in this process; the load runs in a fresh
child process per scenario, so its peak memory is its own), and appends the question and the
answer. A fraction of relay requests (``--fault-rate``, default 2%) fail with 429
(Retry-After 0) or 503 and are retried by the client. Afterwards every transcript is read back
and checked: no message lost, duplicated or reordered, every summary covering exactly a prefix
of its transcript, every prompt valid and within the window's limit.

Scenarios per store: ``baseline`` (one session alone: the uncontended cost), ``threads``
(one thread per session), ``asyncio`` (one task per session on one loop) and, for
PostgreSQL, ``processes`` (``--processes`` OS processes sharing the database, each with its
own sessions plus turns on sessions every process writes to). Figures per scenario: turns
per second, the memory layer's per-turn overhead (history read + append, model call
excluded; p50/p99 over all turns, and over turns that did not compact, i.e. did not call the
summarizer), compactions, problems, errors, and peak RSS of the child.
The exit status is 1 if any scenario lost, duplicated or reordered anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_holysheep.testing import Fault, HolySheepTestServer
from tests.reliability.load import (
    LoadReport,
    Relay,
    max_rss_mb,
    process_worker,
    run_asyncio,
    run_threads,
    shared_problems,
)
from tests.reliability.support import StoreSpec, open_store, tag_responder


class FaultyRelay:
    """The loopback relay with seeded random 429/503 faults on a fraction of requests."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults = 0
        self.server = HolySheepTestServer(
            responder=tag_responder, fault_policy=self._policy, max_logged_requests=10
        )

    def _policy(self, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            self.faults += 1
            if self._rng.random() < 0.5:
                return Fault.rate_limited(retry_after=0)
            return Fault.unavailable(retry_after=0)


def _child(kind: str, spec: StoreSpec, relay: Relay, sessions: int, turns: int, out: Any) -> None:
    if kind == "threads":
        report = run_threads(spec, relay, sessions=sessions, turns=turns)
    else:
        report = asyncio.run(run_asyncio(spec, relay, sessions=sessions, turns=turns))
    out.put(report)


def run_scenario(kind: str, spec: StoreSpec, relay: Relay, sessions: int, turns: int) -> LoadReport:
    """Run one scenario in a fresh spawned process; return its report."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, spec, relay, sessions, turns, out))
    proc.start()
    report: LoadReport = out.get(timeout=3600)
    proc.join(timeout=60)
    return report


def run_processes(
    spec: StoreSpec, relay: Relay, processes: int, sessions: int, turns: int, shared: int
) -> LoadReport:
    """Several OS processes on one database, each with its own sessions plus shared ones."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    names = [f"shared-{j}" for j in range(shared)]
    procs = [
        ctx.Process(
            target=process_worker, args=(spec, relay, p, sessions, turns, names, start, results)
        )
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    total = LoadReport("processes", spec.kind, processes * (sessions + shared), turns)
    for report in reports:
        total.merge(report)
    total.wall = max(r.wall for r in reports)
    store = open_store(spec)
    for name in names:
        writers = [f"{name}/p{p}" for p in range(processes)]
        total.problems.extend(shared_problems(store, name, writers, turns))
    store.close()
    return total


def _row(summary: dict[str, Any]) -> str:
    size = f"{summary['sessions']}x{summary['turns_per_session']}"
    return (
        f"{summary['store']:<9} {summary['mode']:<10} {size:>9}"
        f" {summary['wall_s']:>8.1f} {summary['turns_per_s']:>8.1f}"
        f" {summary['overhead_p50_ms']:>8.2f} {summary['overhead_p99_ms']:>8.2f}"
        f" {summary['quiet_p50_ms']:>8.2f} {summary['quiet_p99_ms']:>8.2f}"
        f" {summary['compactions']:>6} {summary['problems']:>5} {summary['errors']:>5}"
        f" {summary['max_rss_mb']:>8.1f}"
    )


HEADER = (
    f"{'store':<9} {'mode':<10} {'sess x t':>9} {'wall s':>8} {'turns/s':>8}"
    f" {'p50 ms':>8} {'p99 ms':>8} {'q.p50':>8} {'q.p99':>8} {'compac':>6} {'probl':>5}"
    f" {'errs':>5} {'RSS MB':>8}"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--fault-rate", type=float, default=0.02)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--modes", default="baseline,threads,asyncio,processes")
    parser.add_argument("--quick", action="store_true", help="20 sessions x 10 turns")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.turns = 20, 10
    stores = args.stores.split(",")
    modes = args.modes.split(",")

    summaries: list[dict[str, Any]] = []
    failed = False
    with ExitStack() as stack:
        relay_owner = FaultyRelay(args.fault_rate)
        stack.enter_context(relay_owner.server)
        relay = Relay(relay_owner.server.base_url, relay_owner.server.api_key or "")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="holysheep-soak-")))
        specs: dict[str, StoreSpec] = {}
        if "sqlite" in stores:
            specs["sqlite"] = StoreSpec("sqlite", str(tmp / "soak.db"), "soak")
        if "postgres" in stores:
            from tests.postgres_server import throwaway_postgres, unavailable_reason

            reason = unavailable_reason()
            if reason is None:
                pg = stack.enter_context(throwaway_postgres(fsync=True))
                specs["postgres"] = StoreSpec("postgres", pg.url, "soak")
            else:
                print(f"PostgreSQL skipped: {reason}")
        print(
            f"soak: {args.sessions} sessions x {args.turns} turns per scenario, fault rate "
            f"{args.fault_rate:.0%} (429/503, retried), window 1,200 tokens with a summarizer"
        )
        print(HEADER)
        for kind, spec in specs.items():
            for mode in modes:
                if mode == "processes":
                    if kind != "postgres":
                        continue
                    per = max(1, args.sessions // args.processes)
                    report = run_processes(
                        StoreSpec(spec.kind, spec.target, "soak-procs"),
                        relay, args.processes, per, args.turns, shared=args.processes,
                    )  # fmt: skip
                elif mode == "baseline":  # one session alone: the uncontended overhead
                    ns = StoreSpec(spec.kind, spec.target, "soak-baseline")
                    report = run_scenario("threads", ns, relay, 1, args.turns)
                    report.mode = "baseline"
                else:
                    ns = StoreSpec(spec.kind, spec.target, f"soak-{mode}")
                    report = run_scenario(mode, ns, relay, args.sessions, args.turns)
                summary = report.summary()
                summaries.append(summary)
                print(_row(summary), flush=True)
                for line in (report.problems + report.errors)[:5]:
                    print("   !", line.strip().splitlines()[-1][:200])
                failed |= bool(report.problems or report.errors)
        print(f"relay: {relay_owner.faults} injected faults; parent peak RSS {max_rss_mb():.0f} MB")
    print(
        "p50/p99: memory-layer time per turn (history read + append, model call excluded); "
        "q.: the same over turns without a compaction (no summarizer call)."
    )
    print(
        "result:",
        "FAILED (see problems/errors)" if failed else "OK: nothing lost, duplicated or reordered",
    )
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
