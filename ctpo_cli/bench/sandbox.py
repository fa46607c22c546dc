"""``ctpo bench sandbox``: executions/s and latency of a trivial program through the sandbox service (started
with its default settings), against bare ``python -c`` subprocesses, the named baseline, in the same run.

Timed with the interleaved harness (:mod:`ctpo_cli.bench.timing`): one measured call is a batch of
``requests`` runs from ``concurrency`` client threads; its seconds give executions/s (batch / seconds). Every
contestant is warmed up; each round times bare, sandbox, bare. The cost of isolation, HTTP and the service is
all in the sandbox's figure.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ctpo_cli.bench.timing import Call, Contestant, interleave, ratio_table
from ctpo_cli.errors import BackendUnavailable, ConfigError
from sandbox.client import SandboxClient, SandboxUnavailable
from sandbox.server import running_service

PROGRAM = "print(6 * 7)"
EXPECTED = "42\n"
BARE, SANDBOX = "python -c", "sandbox"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 1]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bare_python() -> None:
    """The baseline: the same program in a plain ``python -c`` subprocess, no isolation, no HTTP.

    In its own session like every sandbox: with the kernel's autogroup scheduling each session gets a fair
    CPU share, so on a busy host children sharing one session would be slowed unfairly.
    """
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        start_new_session=True,
    )
    if done.stdout != EXPECTED:
        raise RuntimeError(f"bare python printed {done.stdout!r}")


def sandboxed(url: str) -> Callable[[], None]:
    """One service round trip per call, a client per thread."""
    local = threading.local()

    def run_once() -> None:
        if not hasattr(local, "client"):
            local.client = SandboxClient(url)
        result = local.client.run_code(PROGRAM, run_timeout=60)
        if (result.status, result.stdout) != ("Finished", EXPECTED):
            raise RuntimeError(f"sandboxed run gave {result}")

    return run_once


def batch(run_once: Callable[[], None], pool: ThreadPoolExecutor, size: int, latencies: list[float]) -> Call:
    """One measured call: ``size`` runs from the pool's threads; each run's latency goes to ``latencies``."""

    def timed(_: int) -> float:
        start = time.perf_counter()
        run_once()
        return time.perf_counter() - start

    def call() -> float:
        start = time.perf_counter()
        latencies.extend(pool.map(timed, range(size)))
        return time.perf_counter() - start

    return call


def compare(
    url: str, concurrency: int, requests: int, rounds: int, warmup: int, console: Console
) -> list[dict[str, Any]]:
    """Both runners at one concurrency: the harness's table, and one row per runner."""
    latencies: dict[str, list[float]] = {BARE: [], SANDBOX: []}
    with ThreadPoolExecutor(concurrency) as pool, Progress(console=console, transient=True) as progress:
        calls = {
            BARE: batch(bare_python, pool, requests, latencies[BARE]),
            SANDBOX: batch(sandboxed(url), pool, requests, latencies[SANDBOX]),
        }
        result = interleave(
            Contestant(BARE, calls[BARE]),
            [Contestant(SANDBOX, calls[SANDBOX])],
            rounds=rounds,
            calls=1,
            warmup=warmup,
            progress=progress,
        )
    console.print(
        ratio_table(result, f"{concurrency} clients: seconds per batch of {requests} runs (lower is faster)")
    )
    boxed = result.contestants[0]
    rows = []
    for timing in (result.baseline, boxed):
        timed = latencies[timing.name][warmup * requests :]  # the warm-up's runs are not counted
        rows.append(
            {
                "concurrency": concurrency,
                "runner": timing.name,
                "executions_per_s": requests / timing.best,
                "p50_ms": percentile(timed, 0.5) * 1e3,
                "p99_ms": percentile(timed, 0.99) * 1e3,
                "throughput_ratio": result.baseline.best / timing.best,
                "round_ratio_min": 1 / max(timing.round_ratios),
                "round_ratio_max": 1 / min(timing.round_ratios),
            }
        )
    return rows


def bench_sandbox(
    requests: int, concurrencies: Sequence[int], rounds: int, out: str | None, console: Console
) -> list[dict[str, Any]]:
    """Print (and optionally save as CSV) both runners at each concurrency, with the sandbox/bare ratios."""
    if requests < 1 or rounds < 1 or not concurrencies or min(concurrencies) < 1:
        raise ConfigError("need --requests >= 1, --rounds >= 1 and concurrency levels >= 1")
    console.print(
        f"[bold]sandbox benchmark[/]: batches of {requests} runs of {PROGRAM!r}, {rounds} interleaved rounds "
        "per concurrency; the service runs with its default settings"
    )
    rows: list[dict[str, Any]] = []
    try:
        with running_service() as service:
            for concurrency in concurrencies:
                rows += compare(service.url, concurrency, requests, rounds, warmup=1, console=console)
    except SandboxUnavailable as error:
        raise BackendUnavailable(str(error)) from error
    table = Table(title="trivial program, sandbox service vs bare `python -c` (x: throughput over bare's)")
    for column in ("clients", "runner", "exec/s", "p50 ms", "p99 ms", "exec/s x", "per-round x"):
        table.add_column(column, justify="left" if column == "runner" else "right", no_wrap=True)
    for row in rows:
        numbers = [f"{row[key]:.1f}" for key in ("executions_per_s", "p50_ms", "p99_ms")]
        spread = (
            f"{row['round_ratio_min']:.2f}-{row['round_ratio_max']:.2f}" if row["runner"] == SANDBOX else ""
        )
        table.add_row(
            str(row["concurrency"]), row["runner"], *numbers, f"{row['throughput_ratio']:.2f}", spread
        )
    console.print(table)
    if out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(out, index=False)
        console.print(f"wrote {out}")
    return rows
