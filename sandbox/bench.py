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


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 1]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(run_once: Callable[[], None], requests: int, concurrency: int) -> dict[str, float]:
    """Run ``requests`` calls from ``concurrency`` threads: executions/s and p50/p99 latency in ms."""

    def timed(_: int) -> float:
        start = time.perf_counter()
        run_once()
        return time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, range(WARMUP)))
        start = time.perf_counter()
        latencies = list(pool.map(timed, range(requests)))
        wall = time.perf_counter() - start
    return {
        "executions_per_s": requests / wall,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


def bare_python() -> None:
    """The baseline: the same program in a plain ``python -c`` subprocess, no isolation, no HTTP."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True
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


def bench_sandbox(
    requests: int, concurrencies: Sequence[int], out: str | None, console: Console
) -> list[dict[str, Any]]:
    """Print (and optionally save as CSV) both runners at each concurrency, with the sandbox/bare ratios."""
    if requests < 1 or not concurrencies or min(concurrencies) < 1:
        raise ValueError("need --requests >= 1 and concurrency levels >= 1")
    console.print(f"[bold]sandbox benchmark[/]: {requests} runs of {PROGRAM!r} per runner and concurrency")
    rows: list[dict[str, Any]] = []
    try:
        with running_service(max_concurrency=max(concurrencies)) as service:
            for concurrency in concurrencies:
                bare = measure(bare_python, requests, concurrency)
                boxed = measure(sandboxed(service.url), requests, concurrency)
                rows.append({"concurrency": concurrency, "runner": "bare python -c", **bare})
                rows.append(
                    {
                        "concurrency": concurrency,
                        "runner": "sandbox service",
                        **boxed,
                        "p50_ratio": boxed["p50_ms"] / bare["p50_ms"],
                        "throughput_ratio": boxed["executions_per_s"] / bare["executions_per_s"],
                    }
                )
    except SandboxUnavailable as error:
        raise ValueError(str(error)) from error
    table = Table(title="trivial program: sandbox service vs bare `python -c` (same run)")
    for column in ("concurrency", "runner", "exec/s", "p50 ms", "p99 ms", "p50 x bare", "exec/s x bare"):
        table.add_column(column, justify="left" if column == "runner" else "right")
    for row in rows:
        ratios = [f"{row[key]:.2f}" if key in row else "" for key in ("p50_ratio", "throughput_ratio")]
        table.add_row(
            str(row["concurrency"]),
            row["runner"],
            f"{row['executions_per_s']:.1f}",
            f"{row['p50_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
            *ratios,
        )
    console.print(table)
    if out:
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*rows[-1]])
            writer.writeheader()
            writer.writerows(rows)
        console.print(f"wrote {out}")
    return rows
