"""Answer checking: the final ``\\boxed{}`` of a response against the ground truth, with math-verify.

Why a process pool: math-verify enforces its parsing/verification timeouts with SIGALRM, which only
works in a process's main thread. Called from a worker thread (as the authors' release does) the
timeout raises immediately and the answer silently scores 0, e.g. ``025`` vs ``25``. Here every
check runs in the main thread of a long-lived worker process (a fresh interpreter, as with the
``spawn`` start method: nothing forked from a parent holding torch or Ray threads), where
math-verify's own timeouts work; the parent additionally enforces a per-answer deadline, and a
worker that misses it (stuck in C code that no signal interrupts) is killed and replaced, so one
pathological answer costs one worker restart, never a hang.

The pool is created on first use, kept warm for later batches (training scores every rollout batch)
and shut down at interpreter exit. ``is_correct`` and ``score_batch`` are safe to call from several
threads at once.

What is compared: only the content of the LAST complete ``\\boxed{...}`` (or ``\\fbox{...}``) of the
response, because math-verify parses several boxed answers as a set. The ground truth is used as is
(a ``\\boxed{}`` around it is removed). Both are parsed as LaTeX math (``$...$``) with math-verify's
LaTeX and plain-expression extractors; its normalisation removes ``\\text{}``/units/``\\$``/``\\dfrac``
and compares numbers with 6-digit rounding, so ``025`` = ``25``, ``8.50`` = ``8.5``,
``1/9`` = ``\\frac{1}{9}`` and ``2^{99}`` = its integer value. A ground truth that math-verify cannot
parse at all is compared as a whitespace-free string. Two shortcuts give math-verify's verdict
without its cost: the same text (whitespace aside) is right, and two plain integers (most AIME
answers) are compared by value.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 10.0
"""Seconds one answer may take in a worker (enforced by the parent) before it is judged wrong."""

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INTEGER = re.compile(r"-?[0-9]{1,100}")
"""A plain integer (``25``, ``025``, ``-3``): compared by value in the parent, without math-verify."""


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` whose braces balance, else None.

    Escaped braces ``\\{``/``\\}`` inside do not count. A final box cut off by the token limit (never
    closed) is skipped in favour of the last complete one before it.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : i].strip()
            i += 1
    return None


def _gold_answer(ground_truth: Any) -> str:
    gold = str(ground_truth).strip()
    return extract_boxed(gold) or gold


# --------------------------------------------------------------------------------------------------
# Worker side (runs in the pool processes' main thread, where SIGALRM works).


def _parse(answer: str, timeout: int) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        f"${answer}$",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


@lru_cache(maxsize=8192)
def _parse_gold(gold: str, timeout: int) -> list[Any]:
    # The same ground truth is checked against every sample of a problem (8 in training, 32 in eval).
    return _parse(gold, timeout)


def _verify(gold: str, answer: str, timeout: int, parse_gold: Any = None) -> bool:
    """math-verify's verdict (gold first); a gold it cannot parse falls back to string equality.

    ``parse_gold`` defaults to the cached gold parser of the workers."""
    from math_verify import verify

    parsed_gold = (parse_gold or _parse_gold)(gold, timeout)
    if not parsed_gold:
        return "".join(gold.split()) == "".join(answer.split())
    return bool(verify(parsed_gold, _parse(answer, timeout), timeout_seconds=timeout))


def _serve(fd: int) -> None:
    """Worker loop on socket ``fd``: receive ``([(gold, answer), ...], timeout)`` and send one bool per
    pair as soon as it is known; ``None`` ends it."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # a timeout is a verdict, not a warning
    _verify("\\frac{1}{2}", "0.5", 5, parse_gold=_parse)  # import and warm up before signalling readiness
    conn = Connection(fd)
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        pairs, timeout = task
        for gold, answer in pairs:  # one verdict at a time: the parent times each answer
            try:
                conn.send(_verify(gold, answer, timeout))
            except Exception:
                conn.send(False)


# --------------------------------------------------------------------------------------------------
# Parent side.


class _Worker:
    """A ``python -c`` child process (not ``multiprocessing``: spawn/forkserver re-run the caller's
    ``__main__``, which breaks scripts without a main guard) talking over a socket pair."""

    def __init__(self) -> None:
        self.conn, child = multiprocessing.Pipe(duplex=True)
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from ctpo_cli.scoring import _serve; _serve({child.fileno()})"],
            pass_fds=[child.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self.conn.poll(timeout) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError("a math-verify scoring worker did not start")

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()


class ScoringPool:
    """``size`` math-verify worker processes; each check borrows one idle worker.

    A worker that misses the per-answer deadline (or dies) is killed and replaced by a fresh one,
    which joins the pool once it has imported math-verify.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="ctpo-scoring")
        workers = [_Worker() for _ in range(size)]  # start all, then wait: imports run in parallel
        for worker in workers:
            worker.wait_ready()
            self._idle.put(worker)
        self._closed = False

    def check(self, gold: str, answer: str, timeout: float) -> bool:
        """math-verify's verdict for one extracted answer; False when it misses ``timeout`` seconds."""
        return self._run(((gold, answer),), timeout)[0]

    def _run(self, pairs: Sequence[tuple[str, str]], timeout: float) -> list[bool]:
        """Verdicts for ``pairs`` from one borrowed worker, each due ``timeout`` s after the previous.

        A worker that misses a deadline (or dies) is killed and replaced, that answer is judged wrong,
        and the remaining pairs go to the next idle worker.
        """
        verdicts: list[bool] = []
        while len(verdicts) < len(pairs):
            rest = pairs[len(verdicts) :]
            worker = self._idle.get()
            try:
                worker.conn.send((list(rest), max(1, int(timeout / 3))))
                while len(verdicts) < len(pairs) and worker.conn.poll(timeout):
                    verdicts.append(bool(worker.conn.recv()))
            except (EOFError, OSError):
                pass
            if len(verdicts) == len(pairs):
                self._idle.put(worker)
                break
            verdicts.append(False)
            worker.kill()
            threading.Thread(target=self._replace, daemon=True).start()
        return verdicts

    def _replace(self) -> None:
        worker = _Worker()
        worker.wait_ready()
        self._idle.put(worker)

    def pids(self) -> list[int]:
        """Process ids of the idle workers."""
        return [worker.process.pid for worker in list(self._idle.queue)]

    def map(self, golds: Sequence[str], answers: Sequence[str], timeout: float) -> list[bool]:
        """Verdicts for many pairs: chunks of up to 32 sent to the workers in parallel."""
        pairs = list(zip(golds, answers, strict=True))
        size = max(1, min(32, math.ceil(len(pairs) / (4 * self.size))))
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        return [v for chunk in self._threads.map(lambda c: self._run(c, timeout), chunks) for v in chunk]

    def close(self) -> None:
        """Stop all idle workers (busy ones are daemons and die with the interpreter)."""
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            worker.stop()


_pool: ScoringPool | None = None
_pool_lock = threading.Lock()


def default_workers() -> int:
    """``$CTPO_SCORING_WORKERS``, else the usable CPU cores, at most 8."""
    env = os.environ.get("CTPO_SCORING_WORKERS")
    if env:
        return max(1, int(env))
    return max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def get_pool() -> ScoringPool:
    """The module's warm pool, created on first use (``default_workers()`` processes)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ScoringPool(default_workers())
            atexit.register(shutdown)
        return _pool


def shutdown() -> None:
    """Stop the module's pool (also registered at exit); the next check starts a new one."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def is_correct(response_text: str, ground_truth: Any, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether the final ``\\boxed{}`` answer of ``response_text`` equals ``ground_truth``.

    False when there is no complete boxed answer or the check misses ``timeout`` seconds. Thread-safe.
    """
    return score_batch([response_text], [ground_truth], timeout)[0]


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    timeout: float = DEFAULT_TIMEOUT,
    pool: ScoringPool | None = None,
) -> list[bool]:
    """``is_correct`` for each pair, spread over the workers (order preserved).

    ``pool`` defaults to the module's warm pool (``get_pool()``).
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    answers = [extract_boxed(text) for text in responses]
    golds = [_gold_answer(truth) for truth in ground_truths]
    results = [False] * len(responses)
    todo = []
    for i, (answer, gold) in enumerate(zip(answers, golds, strict=True)):
        if answer is None:
            continue
        if "".join(answer.split()) == "".join(gold.split()):
            results[i] = True  # the same text: what the check below would conclude
        elif _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold):
            results[i] = int(answer) == int(gold)  # math-verify's verdict too, without the round trip
        else:
            todo.append(i)
    if todo:
        verdicts = (pool or get_pool()).map(
            [golds[i] for i in todo], [answers[i] or "" for i in todo], timeout
        )
        for i, verdict in zip(todo, verdicts, strict=True):
            results[i] = verdict
    return results


# --------------------------------------------------------------------------------------------------
# ``ctpo bench scoring``


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
    verdicts = []
    for response, truth in zip(responses, truths, strict=True):
        answer = extract_boxed(response)
        verdicts.append(answer is not None and _verify(_gold_answer(truth), answer, 3, parse_gold=_parse))
    return verdicts


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
