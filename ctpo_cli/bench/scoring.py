"""``ctpo bench scoring``: answers per second of the scoring pool (``ctpo_cli.tir.scoring``) against
math-verify called in-process, the named baseline, on synthetic rollout-shaped answers."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctpo_cli.tir.scoring import ScoringPool, score_batch, verify_here


def synthetic_answers(count: int, group: int = 8, seed: int = 0) -> tuple[list[str], list[str]]:
    """``count`` responses and their ground truths, shaped like a rollout batch.

    Ground truths of the kinds the benchmarks have (AIME integers, fractions, surds, decimals, powers);
    ``group`` responses per ground truth (a GRPO group), each ~1 KB of text ending in a boxed answer
    that is an equivalent rewriting (``025``, ``1/9``, ``8.50``, ``2^{10}`` as 1024) or a wrong value.
    """
    import random

    rng = random.Random(seed)
    filler = "Let x be the quantity we want; substituting and simplifying gives the expression below. " * 12
    responses: list[str] = []
    truths: list[str] = []
    while len(responses) < count:
        a, b, c = rng.randint(1, 999), rng.randint(2, 97), rng.randint(2, 30)
        kind = rng.randrange(5)
        if kind == 0:
            truth, right, wrong = str(a), f"{a:03d}", str(a + 1)
        elif kind == 1:
            truth, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind == 2:
            truth, right, wrong = (
                f"{a}+{b}\\sqrt{{{c}}}",
                f"{b}\\sqrt{{{c}}}+{a}",
                f"{a}+{b}\\sqrt{{{c + 1}}}",
            )
        elif kind == 3:
            truth, right, wrong = f"{a}.5", f"{a}.50", f"{a}.25"
        else:
            truth, right, wrong = f"2^{{{c}}}", str(2**c), str(2**c + 2)
        for _ in range(group):
            answer = right if rng.random() < 0.5 else wrong
            responses.append(f"{filler}\nSo the answer is $\\boxed{{{answer}}}$.")
            truths.append(truth)
    return responses[:count], truths[:count]


def _in_process(responses: Sequence[str], truths: Sequence[str]) -> list[bool]:
    """The baseline: math-verify called directly in this process's main thread, one answer at a time
    (same final-box extraction and parsing as the workers, no pool, no cache)."""
    return [verify_here(response, truth) for response, truth in zip(responses, truths, strict=True)]


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of processes (Linux /proc); NaN elsewhere."""
    try:
        fields = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() for pid in pids]
    except OSError:
        return math.nan
    return sum(int(f[11]) + int(f[12]) for f in fields) / os.sysconf("SC_CLK_TCK")


def bench_scoring(answers: int, workers: int, out: str | None, console: Any) -> list[dict[str, Any]]:
    """Answers/s of ``score_batch`` on a ``workers``-process pool vs math-verify in-process.

    Wall-clock answers/s, and answers per CPU-second (all processes involved: on a shared machine the
    wall clock depends on the load, CPU time much less). Both sides first score 256 other answers
    (the steady state of a long training run, as the pool stays warm); then both score the same
    answers and must agree on every verdict.
    """
    import time

    import pandas as pd
    from rich.table import Table

    responses, truths = synthetic_answers(answers)
    warm_up = synthetic_answers(256, seed=1)  # other answers: steady state, not a cache of these
    _in_process(*warm_up)
    start, cpu = time.perf_counter(), time.process_time()
    baseline = _in_process(responses, truths)
    rows: list[dict[str, Any]] = [
        {
            "method": "math-verify in-process (baseline)",
            "workers": 1,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
        }
    ]
    pool = ScoringPool(workers)
    try:
        score_batch(*warm_up, pool=pool)
        pids = pool.pids()
        start, cpu, worker_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
        pooled = score_batch(responses, truths, pool=pool)
        rows.append(
            {
                "method": "score_batch (worker pool)",
                "workers": workers,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu + _cpu_seconds(pids) - worker_cpu,
            }
        )
    finally:
        pool.close()
    if pooled != baseline:
        raise RuntimeError(
            f"verdicts differ on {sum(a != b for a, b in zip(pooled, baseline, strict=True))} answers"
        )
    for row in rows:
        row["answers"] = answers
        row["answers_per_s"] = answers / row["seconds"]
        row["answers_per_cpu_s"] = answers / row["cpu_seconds"]
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    table = Table(
        title=f"Scoring throughput: {answers} answers ({sum(baseline)} right), {os.cpu_count()} CPUs, load {load:.1f}"
    )
    for column in ("method", "workers", "seconds", "answers/s", "answers/CPU-s", "vs baseline (wall)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"],
            str(row["workers"]),
            f"{row['seconds']:.2f}",
            f"{row['answers_per_s']:.0f}",
            f"{row['answers_per_cpu_s']:.0f}",
            f"{row['speedup']:.2f}x",
        )
    console.print(table)
    if out:
        pd.DataFrame(rows).to_csv(out, index=False)
        console.print(f"wrote {out}")
    return rows
