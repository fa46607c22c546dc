"""``ctpo bench scoring``: answers per second of the scoring pool (``ctpo_cli.tir.scoring``) against
math-verify called in-process, the named baseline, on synthetic rollout-shaped answers, timed in
interleaved rounds."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import Progress

from ctpo_cli.bench.timing import Contestant, interleave, ratio_table
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


@dataclass
class _Scorer:
    """One contestant: its k-th call scores answer set k (fresh answers each call, as in training,
    where only a ground truth's parse repeats within its group); keeps the verdicts of each set and
    the CPU seconds (this process, plus the pool's workers when there is a pool) of each call."""

    score: Callable[[Sequence[str], Sequence[str]], list[bool]]
    sets: Sequence[tuple[list[str], list[str]]]
    pids: Sequence[int] = ()
    verdicts: list[list[bool]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        responses, truths = self.sets[len(self.verdicts)]
        start, cpu, workers = time.perf_counter(), time.process_time(), _cpu_seconds(self.pids)
        self.verdicts.append(self.score(responses, truths))
        seconds = time.perf_counter() - start
        self.cpu.append(time.process_time() - cpu + (_cpu_seconds(self.pids) - workers if self.pids else 0.0))
        return seconds


def bench_scoring(
    answers: int, workers: int, rounds: int, out: str | None, console: Console
) -> list[dict[str, Any]]:
    """Answers/s of ``score_batch`` on a ``workers``-process pool vs math-verify in-process (the
    baseline), timed in interleaved rounds (:mod:`ctpo_cli.bench.timing`): each round scores the same
    answers with the baseline, the pool, the baseline again. The warm-up scores them once on each side
    (the steady state of a long training run, as the pool stays warm). Both sides must agree on every
    verdict. Also answers per CPU-second (all processes involved, median over calls): on a shared
    machine the wall clock depends on the load, CPU time much less.
    """
    sets = [synthetic_answers(answers, seed=k) for k in range(1 + 2 * rounds)]
    baseline = _Scorer(_in_process, sets)
    pool = ScoringPool(workers)
    try:
        pooled = _Scorer(lambda r, t: score_batch(r, t, pool=pool), sets, pool.pids())
        console.print(
            f"[bold]scoring benchmark[/]: {answers} answers, {rounds} interleaved rounds, "
            f"{workers} pool workers, {os.cpu_count()} CPUs"
        )
        with Progress(console=console, transient=True) as progress:
            result = interleave(
                Contestant("math-verify in-process", baseline),
                [Contestant(f"score_batch ({workers}-worker pool)", pooled)],
                rounds=rounds,
                calls=1,
                warmup=1,
                progress=progress,
            )
    finally:
        pool.close()
    pairs = zip(pooled.verdicts, baseline.verdicts, strict=False)  # the sets both scored
    differ = sum(a != b for pool_set, base_set in pairs for a, b in zip(pool_set, base_set, strict=True))
    if differ:
        raise RuntimeError(f"the pool and the in-process baseline disagree on {differ} answers")
    title = f"Scoring {answers} answers per call: seconds, ratio to in-process (lower is faster)"
    console.print(ratio_table(result, title, unit="s", scale=1.0))
    rows: list[dict[str, Any]] = []
    for timing, scorer, count in ((result.baseline, baseline, 1), (result.contestants[0], pooled, workers)):
        cpu = statistics.median(scorer.cpu[1:])  # the warm-up call left out
        rows.append(
            {
                "method": timing.name,
                "workers": count,
                "best_s": timing.best,
                "median_s": timing.median,
                "ratio": result.ratio(timing),
                "answers_per_s": answers / timing.best,
                "answers_per_cpu_s": answers / cpu,
            }
        )
    console.print(
        "answers/s (best round): "
        + ", ".join(
            f"{row['method']} {row['answers_per_s']:.0f} ({row['answers_per_cpu_s']:.0f} per CPU-s)"
            for row in rows
        )
    )
    if out:
        pd.DataFrame(rows).to_csv(out, index=False)
        console.print(f"wrote {out}")
    return rows
