"""``ctpo bench sandbox``: executions/s and latency of a trivial program through the sandbox service, against
a bare ``python -c`` subprocess in the same run (the cost of isolation, HTTP and the service included)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console
from rich.table import Table

from sandbox.client import SandboxClient, SandboxUnavailable
from sandbox.server import running_service

PROGRAM = "print(6 * 7)"
EXPECTED = "42\n"
WARMUP = 4
BARE, SANDBOX = "python -c", "sandbox"
RATIOS = ("p50_ms", "p99_ms", "executions_per_s")
"""Reported as sandbox / bare ratios (the ``×`` columns)."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 1]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bare_python() -> None:
    """The baseline: the same program in a plain ``python -c`` subprocess, no isolation, no HTTP.

    In its own session like every sandbox: with the kernel's autogroup scheduling each session gets a fair
    CPU share, so on a busy host children sharing one session would be slowed unfairly.
    """
    command = [sys.executable, "-c", PROGRAM]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=True, start_new_session=True
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


def compare(url: str, requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    """Both runners ``requests`` times from ``concurrency`` threads: executions/s and p50/p99 latency (ms).

    Runs in two halves, bare then sandbox, then sandbox then bare, so a drifting load on the host weighs on
    both runners alike.
    """
    runners = {BARE: bare_python, SANDBOX: sandboxed(url)}

    def timed(run_once: Callable[[], None]) -> float:
        start = time.perf_counter()
        run_once()
        return time.perf_counter() - start

    walls = dict.fromkeys(runners, 0.0)
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    with ThreadPoolExecutor(concurrency) as pool:
        for run_once in runners.values():
            list(pool.map(timed, [run_once] * WARMUP))
        for share, order in ((requests // 2, [BARE, SANDBOX]), (requests - requests // 2, [SANDBOX, BARE])):
            for name in order:
                start = time.perf_counter()
                latencies[name] += pool.map(timed, [runners[name]] * share)
                walls[name] += time.perf_counter() - start
    return {
        name: {
            "executions_per_s": requests / walls[name],
            "p50_ms": percentile(latencies[name], 0.5) * 1e3,
            "p99_ms": percentile(latencies[name], 0.99) * 1e3,
        }
        for name in runners
    }


def bench_sandbox(
    requests: int, concurrencies: Sequence[int], out: str | None, console: Console
) -> list[dict[str, Any]]:
    """Print (and optionally save as CSV) both runners at each concurrency, with the sandbox/bare ratios."""
    if requests < 2 or not concurrencies or min(concurrencies) < 1:
        raise ValueError("need --requests >= 2 and concurrency levels >= 1")
    console.print(f"[bold]sandbox benchmark[/]: {requests} runs of {PROGRAM!r} per runner and concurrency")
    rows: list[dict[str, Any]] = []
    try:
        with running_service(max_concurrency=max(concurrencies)) as service:
            for concurrency in concurrencies:
                results = compare(service.url, requests, concurrency)
                bare, boxed = results[BARE], results[SANDBOX]
                ratios = {
                    f"{key}_ratio": boxed[key] / bare[key] for key in ("p50_ms", "p99_ms", "executions_per_s")
                }
                rows.append({"concurrency": concurrency, "runner": BARE, **bare})
                rows.append({"concurrency": concurrency, "runner": SANDBOX, **boxed, **ratios})
    except SandboxUnavailable as error:
        raise ValueError(str(error)) from error
    table = Table(title="trivial program, sandbox service vs bare `python -c` (×: sandbox / python -c)")
    for column in ("clients", "runner", "exec/s", "p50 ms", "p99 ms", "p50 ×", "p99 ×", "exec/s ×"):
        table.add_column(column, justify="left" if column == "runner" else "right", no_wrap=True)
    for row in rows:
        numbers = [f"{row[key]:.1f}" for key in ("executions_per_s", "p50_ms", "p99_ms")]
        factors = [f"{row[f'{key}_ratio']:.2f}" if row["runner"] == SANDBOX else "" for key in RATIOS]
        table.add_row(str(row["concurrency"]), row["runner"], *numbers, *factors)
    console.print(table)
    if out:
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        console.print(f"wrote {out}")
    return rows
