"""Answer checking with real math-verify in the worker pool."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ctpo_cli.tir.scoring import ScoringPool, extract_boxed, get_pool, is_correct, score_batch


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{3} first, then finally \\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{9}}", "\\frac{1}{9}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {12}", "12"),
        ("\\boxed{3} and a cut-off \\boxed{\\frac{1}{", "3"),
        ("no box at all", None),
        ("\\boxed{", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("025", "25"),
        ("25", "025"),
        ("8.50", "8.5"),
        ("1/9", "\\frac{1}{9}"),
        ("\\dfrac{1}{9}", "\\frac{1}{9}"),
        ("\\frac{1}{91}", "1/91"),
        (str(2**99), "2^{99}"),
        ("\\text{25}", "25"),
        ("25 \\text{ cm}", "25"),
        ("\\$25", "25"),
        ("30^\\circ", "30"),
        ("6\\sqrt3+5\\pi", "5\\pi + 6\\sqrt{3}"),
        ("-48.62", "-\\frac{2431}{50}"),
        (
            "3, 2, \\frac{3-i\\sqrt{3}}{2}, \\frac{3+i\\sqrt{3}}{2}",
            "2,3,\\frac{3+i\\sqrt{3}}{2},\\frac{3-i\\sqrt{3}}{2}",
        ),
        ("204", "\\boxed{204}"),
        ("-0", "0"),
        ("0" + "1" * 150, "1" * 150),  # too long for the integer shortcut: math-verify decides
    ],
)
def test_equivalent_answers_are_right(answer: str, truth: str) -> None:
    assert is_correct(f"Reasoning... so the answer is $\\boxed{{{answer}}}$.", truth)


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        ("\\boxed{26}", "25"),
        ("\\boxed{8.51}", "8.5"),
        (f"\\boxed{{{2**99 + 1}}}", "2^{99}"),
        ("\\boxed{2, 3}", "2,3,\\frac{3+i\\sqrt{3}}{2},\\frac{3-i\\sqrt{3}}{2}"),
        ("\\boxed{\\frac{1}{8}}", "\\frac{1}{9}"),
        ("the answer is 25", "25"),  # no box
        ("\\boxed{25} was wrong, it is \\boxed{24}", "25"),  # only the last box counts
        ("\\boxed{}", "25"),
        ("\\boxed{-25}", "25"),
        (f"\\boxed{{{'1' * 150}}}", "1" * 149),
    ],
)
def test_wrong_answers_are_wrong(response: str, truth: str) -> None:
    assert not is_correct(response, truth)


def test_thread_safe_from_many_threads() -> None:
    # The authors' release lost exactly these (025 vs 25) when math-verify ran in worker threads.
    pairs = [("\\boxed{025}", "25"), ("\\boxed{8.50}", "8.5"), ("\\boxed{26}", "25")] * 8
    with ThreadPoolExecutor(max_workers=8) as threads:
        verdicts = list(threads.map(lambda p: is_correct(*p), pairs))
    assert verdicts == [True, True, False] * 8


def test_math_verify_in_the_workers_from_many_threads() -> None:
    # The pool itself (score_batch compares plain integers without it): padded integers, decimals.
    pool = get_pool()
    pairs = [("25", "025"), ("8.5", "8.50"), ("25", "26"), ("\\frac{1}{9}", "1/9")] * 6
    with ThreadPoolExecutor(max_workers=8) as threads:
        verdicts = list(threads.map(lambda p: pool.check(*p, timeout=10.0), pairs))
    assert verdicts == [True, True, False, True] * 6


def test_score_batch_keeps_order_and_checks_lengths() -> None:
    responses = [f"\\boxed{{{i}}}" for i in range(40)]
    truths = [str(i if i % 3 else i + 1) for i in range(40)]
    assert score_batch(responses, truths) == [i % 3 != 0 for i in range(40)]
    assert score_batch([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        score_batch(["a", "b"], ["a"])


def test_stuck_worker_is_killed_and_replaced() -> None:
    pool = ScoringPool(1)
    try:
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # a worker that no signal-based timeout can save
        start = time.monotonic()
        # The first answer misses its 3 s deadline; the other two go to the replacement worker.
        assert pool.map(["25", "25", "8.5"], ["25", "025", "8.50"], timeout=3.0) == [False, True, True]
        assert time.monotonic() - start < 30
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(pid, 0)
        (replacement,) = pool.pids()
        assert replacement != pid
    finally:
        pool.close()
