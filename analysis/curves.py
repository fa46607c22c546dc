"""Training curves under one set of names, whichever backend logged them, and their seed bands.

Each canonical curve lists the metric names (regular expressions, matched whole) under which the
backends log it, most specific first; the first pattern that matches any column is used, and when
several columns match it (verl logs one validation metric per data source) their mean is the curve.

* local backend (metrics.jsonl): ``reward/mean``, ``val/avg_at_k``, ``actor/pg_clipfrac``,
  ``actor/ppo_kl``, ``response_length/mean``.
* verl (MLflow; ``@`` is logged as ``_at_``): ``critic/score/mean`` (``critic/rewards/mean`` when a
  KL penalty is in the reward), ``val-core/<data_source>/<acc|reward>/mean@N``, and the same actor
  and response-length names as the local backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Curve:
    """A canonical training curve."""

    name: str
    label: str
    """Axis label, with the unit."""
    patterns: tuple[str, ...]
    """Candidate metric names (regular expressions), most specific first."""
    dense: bool = True
    """Logged at every step (smoothing applies); validation curves are sparse."""
    percent: bool = False
    """A fraction, shown in percent."""

    def compiled(self) -> list[re.Pattern[str]]:
        """The patterns, compiled."""
        return [re.compile(p) for p in self.patterns]


CURVES: tuple[Curve, ...] = (
    Curve(
        "reward",
        "training reward (mean score)",
        (r"reward/mean", r"critic/score/mean", r"critic/rewards/mean"),
    ),
    Curve(
        "val",
        "validation avg@k (% of samples solved)",
        (r"val/avg_at_k", r"val-core/[^/]+/acc/mean(@|_at_)\d+", r"val-core/[^/]+/reward/mean(@|_at_)\d+"),
        dense=False,
        percent=True,
    ),
    Curve("clipfrac", "clipped tokens (pg_clipfrac)", (r"actor/pg_clipfrac",), percent=True),
    Curve("kl", "KL(μ‖π_θ) estimate (nats/token)", (r"actor/ppo_kl",)),
    Curve("length", "response length (tokens)", (r"response_length/mean",)),
)


def all_patterns() -> list[re.Pattern[str]]:
    """Every curve's patterns (which MLflow metrics to fetch)."""
    return [p for curve in CURVES for p in curve.compiled()]


def curve_series(metrics: pd.DataFrame, curve: Curve) -> pd.Series | None:
    """The curve's values indexed by step (steps without a value dropped), or None if not logged."""
    for pattern in curve.compiled():
        columns = [c for c in metrics.columns if isinstance(c, str) and pattern.fullmatch(c)]
        if columns:
            values = metrics.set_index("step")[columns].astype(float).mean(axis=1, skipna=True)
            return values.dropna().sort_index()
    return None


def smooth(series: pd.Series, window: int) -> pd.Series:
    """Centred rolling mean over ``window`` logged steps (1: unchanged)."""
    if window <= 1:
        return series
    return series.rolling(window, center=True, min_periods=1).mean()


def seed_band(series: Sequence[pd.Series]) -> pd.DataFrame:
    """Across seeds, per step: mean, low (min), high (max) and n (seeds with a value at that step)."""
    wide = pd.concat(list(series), axis=1)
    return pd.DataFrame(
        {
            "mean": wide.mean(axis=1),
            "low": wide.min(axis=1),
            "high": wide.max(axis=1),
            "n": wide.notna().sum(axis=1),
        }
    ).sort_index()
