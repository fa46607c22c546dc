"""Interleaved timing: the one way every ``ctpo bench`` measures a ratio against a named baseline.

A benchmark names a baseline and its contestants; each is a callable that performs one measured call and
returns its seconds (so a contestant times only what it claims to, without set-up). Then:

1. **Warm-up:** every contestant, the baseline included, is called ``warmup`` times untimed.
2. **Rounds:** each round times the baseline, then every contestant (their order rotated from round to
   round, so none always runs right after the baseline), then the baseline again. A round's figure for a
   contestant is the median of its ``calls`` calls; the baseline's pools both of its halves.
3. **Summary:** a contestant's time is the minimum over rounds of its round medians (the least disturbed
   round), and its ratio is that divided by the baseline's. The spread of the per-round ratios (each
   contestant against the baseline of the same round) shows how much the host's load moved, and the
   baseline's drift (its last "after" against its first "before") says whether it moved during the run.

Ratios are reproducible on the same machine only: floats and timings differ across CPUs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.progress import Progress
from rich.table import Table

Call = Callable[[], float]
"""One measured call; returns the seconds it measured."""


@dataclass(frozen=True)
class Contestant:
    name: str
    call: Call


@dataclass(frozen=True)
class Timing:
    """One contestant's round medians (seconds) and per-round ratios to the baseline of the same round."""

    name: str
    round_medians: list[float]
    round_ratios: list[float]

    @property
    def best(self) -> float:
        """Minimum over rounds of the round medians."""
        return min(self.round_medians)

    @property
    def median(self) -> float:
        return statistics.median(self.round_medians)


@dataclass(frozen=True)
class Interleaved:
    """The baseline's and every contestant's timings, in the order they were given."""

    baseline: Timing
    contestants: list[Timing]
    before: list[float] = field(default_factory=list)
    """The baseline's round medians from the first half of each round."""
    after: list[float] = field(default_factory=list)
    """... and from the second half."""

    def ratio(self, timing: Timing) -> float:
        """Best (min over rounds) time of ``timing`` over the baseline's best."""
        return timing.best / self.baseline.best

    @property
    def drift(self) -> float:
        """The baseline's last-round "after" median over its first-round "before" median."""
        return self.after[-1] / self.before[0]


def _median_of(call: Call, calls: int) -> tuple[float, list[float]]:
    samples = [call() for _ in range(calls)]
    return statistics.median(samples), samples


def interleave(
    baseline: Contestant,
    contestants: Sequence[Contestant],
    rounds: int,
    calls: int,
    warmup: int,
    progress: Progress | None = None,
) -> Interleaved:
    """Time ``baseline`` and ``contestants`` in interleaved rounds (see the module docstring)."""
    if rounds < 1 or calls < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, calls >= 1 and warmup >= 0, got {rounds}, {calls}, {warmup}")
    everyone = [baseline, *contestants]
    task = progress.add_task("timing", total=warmup * len(everyone) + rounds) if progress else None
    for contestant in everyone:
        for _ in range(warmup):
            contestant.call()
            if progress and task is not None:
                progress.advance(task)
    before: list[float] = []
    after: list[float] = []
    pooled: list[float] = []
    medians: dict[str, list[float]] = {c.name: [] for c in contestants}
    ratios: dict[str, list[float]] = {c.name: [] for c in contestants}
    for index in range(rounds):
        first, first_samples = _median_of(baseline.call, calls)
        shift = index % len(contestants) if contestants else 0
        this_round = {}
        for contestant in [*contestants[shift:], *contestants[:shift]]:
            this_round[contestant.name], _ = _median_of(contestant.call, calls)
        last, last_samples = _median_of(baseline.call, calls)
        reference = statistics.median(first_samples + last_samples)
        before.append(first)
        after.append(last)
        pooled.append(reference)
        for name, seconds in this_round.items():
            medians[name].append(seconds)
            ratios[name].append(seconds / reference)
        if progress and task is not None:
            progress.advance(task)
    return Interleaved(
        baseline=Timing(baseline.name, pooled, [1.0] * rounds),
        contestants=[Timing(c.name, medians[c.name], ratios[c.name]) for c in contestants],
        before=before,
        after=after,
    )


def ratio_table(result: Interleaved, title: str, unit: str = "ms", scale: float = 1e3) -> Table:
    """Best and median time per contestant, the ratio of best times, and the range of per-round ratios."""
    table = Table(title=title)
    for column in ("contestant", f"best {unit}", f"median {unit}", "x baseline", "per-round x (min-max)"):
        table.add_column(column, justify="left" if column == "contestant" else "right", no_wrap=True)
    for timing in [result.baseline, *result.contestants]:
        is_baseline = timing is result.baseline
        table.add_row(
            f"{timing.name} (baseline)" if is_baseline else timing.name,
            f"{timing.best * scale:.2f}",
            f"{timing.median * scale:.2f}",
            "1.00" if is_baseline else f"{result.ratio(timing):.2f}",
            "" if is_baseline else f"{min(timing.round_ratios):.2f}-{max(timing.round_ratios):.2f}",
        )
    table.caption = (
        f"{len(result.before)} interleaved rounds; baseline before/after drift {result.drift:.2f}x "
        "(1.00 = no drift); same machine only"
    )
    return table
