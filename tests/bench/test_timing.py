"""The interleaved timing harness: order of calls, warm-ups, and the ratios it reports."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from ctpo_cli.bench.timing import Contestant, interleave, ratio_table


def recording(name: str, seconds: list[float], log: list[str]) -> Contestant:
    """A contestant whose successive calls report ``seconds`` in turn (cycling) and log its name."""
    state = {"i": 0}

    def call() -> float:
        log.append(name)
        value = seconds[state["i"] % len(seconds)]
        state["i"] += 1
        return value

    return Contestant(name, call)


def test_every_contestant_is_warmed_up_and_each_round_brackets_them_with_the_baseline() -> None:
    log: list[str] = []
    base = recording("base", [1.0], log)
    a, b = recording("a", [2.0], log), recording("b", [3.0], log)
    interleave(base, [a, b], rounds=2, calls=1, warmup=1)
    warmups, round_1, round_2 = log[:3], log[3:7], log[7:]
    assert warmups == ["base", "a", "b"]
    assert round_1 == ["base", "a", "b", "base"]
    assert round_2 == ["base", "b", "a", "base"]  # the order rotates


def test_ratio_is_best_over_best_and_per_round_ratios_use_the_same_round_baseline() -> None:
    log: list[str] = []
    # the baseline slows down in round 2 (2 s both halves); the contestant takes 3 s then 5 s
    base = recording("base", [1.0, 1.0, 2.0, 2.0], log)
    slow = recording("slow", [3.0, 5.0], log)
    result = interleave(base, [slow], rounds=2, calls=1, warmup=0)
    timing = result.contestants[0]
    assert timing.round_medians == [3.0, 5.0]
    assert timing.round_ratios == [3.0, 2.5]
    assert result.ratio(timing) == 3.0  # best 3 s over the baseline's best 1 s
    assert result.drift == 2.0  # last "after" 2 s over first "before" 1 s
    console = Console(width=200, record=True)
    console.print(ratio_table(result, "t"))
    assert re.search(r"slow\s.*3\.00\s.*2\.50-3\.00", console.export_text())


def test_a_round_figure_is_the_median_of_its_calls() -> None:
    log: list[str] = []
    base = recording("base", [1.0, 9.0, 1.0], log)
    other = recording("other", [4.0, 2.0, 100.0], log)
    result = interleave(base, [other], rounds=1, calls=3, warmup=0)
    assert result.contestants[0].round_medians == [4.0]
    assert result.baseline.round_medians == [1.0]  # median of the six baseline calls 1, 9, 1, 1, 9, 1


@pytest.mark.parametrize("rounds, calls, warmup", [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_bad_settings_are_refused(rounds: int, calls: int, warmup: int) -> None:
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleave(Contestant("b", lambda: 1.0), [], rounds=rounds, calls=calls, warmup=warmup)
