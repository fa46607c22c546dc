"""Answer checking under two named rewards (``REWARDS``; ``ctpo.reward`` in an experiment):

``authors`` (the default: the authors' released run)
    correct if any of verl's ``math_reward``, ``math_dapo`` or ``math_verify`` accepts the whole response,
    tool output included (:mod:`ctpo_cli.tir.authors_reward`).
``strict`` (this project's)
    the final ``\\boxed{}`` of the assistant text only, checked with math-verify (below).

Both run in the same pool of worker processes.

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

AUTHORS = "authors"
STRICT = "strict"
REWARDS = (AUTHORS, STRICT)
"""The reward rules by name; ``authors`` reproduces the paper's runs."""
REWARD_SUMMARIES = {
    AUTHORS: "the authors' released run: correct if any of verl's math_reward, math_dapo or math_verify "
    "accepts the whole response, tool output included",
    STRICT: "ctpo's: the final \\boxed{} of the assistant text, tool output excluded, under math-verify",
}

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


def verify_here(response_text: str, ground_truth: Any, timeout: int = 3) -> bool:
    """The verdict a worker gives, computed in this process (main thread only: math-verify's timeout
    is SIGALRM) without the pool or the gold cache. ``ctpo bench scoring``'s baseline."""
    answer = extract_boxed(response_text)
    return answer is not None and _verify(_gold_answer(ground_truth), answer, timeout, parse_gold=_parse)


def _judge(rule: str, gold: str, text: str, timeout: int) -> bool:
    """One verdict in a worker: ``strict`` compares an extracted answer, ``authors`` a whole response."""
    if rule == AUTHORS:
        from ctpo_cli.tir import authors_reward

        return authors_reward.accepts(text, gold)
    return _verify(gold, text, timeout)


def _serve(fd: int) -> None:
    """Worker loop on socket ``fd``: receive ``([(rule, gold, text), ...], timeout)`` and send one bool
    per item as soon as it is known; ``None`` ends it."""
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
        for rule, gold, text in pairs:  # one verdict at a time: the parent times each answer
            try:
                conn.send(_judge(rule, gold, text, timeout))
            except Exception:
                conn.send(False)


# --------------------------------------------------------------------------------------------------
# Parent side.


class _Worker:
    """A ``python -c`` child process (not ``multiprocessing``: spawn/forkserver re-run the caller's
    ``__main__``, which breaks scripts without a main guard) talking over a socket pair."""

    def __init__(self) -> None:
        self.conn, child = multiprocessing.Pipe(duplex=True)
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding ctpo_cli
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from ctpo_cli.tir.scoring import _serve; _serve({child.fileno()})"],
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
        return self._run(((STRICT, gold, answer),), timeout)[0]

    def _run(self, pairs: Sequence[tuple[str, str, str]], timeout: float) -> list[bool]:
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

    def map(
        self, golds: Sequence[str], answers: Sequence[str], timeout: float, rule: str = STRICT
    ) -> list[bool]:
        """Verdicts for many pairs under ``rule``: chunks of up to 32 sent to the workers in parallel."""
        pairs = [(rule, gold, answer) for gold, answer in zip(golds, answers, strict=True)]
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
    rule: str = STRICT,
) -> list[bool]:
    """The verdict of ``rule`` for each pair, spread over the workers (order preserved).

    ``strict``: ``is_correct`` (``responses`` are assistant text); ``authors``: the authors' reward
    (``responses`` are whole responses, tool output included). ``pool`` defaults to the module's warm
    pool (``get_pool()``).
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if rule not in REWARDS:
        raise ValueError(f"unknown reward {rule!r}; choose one of {', '.join(REWARDS)}")
    if rule == AUTHORS:
        golds = [str(truth).strip() for truth in ground_truths]
        return (pool or get_pool()).map(golds, list(responses), timeout, rule=AUTHORS)
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
