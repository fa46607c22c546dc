"""Per-position statistics of the cumulative log ratio K_t: std growth, clip rates, uniformity.

Input is the frame of :func:`ctpo_cli.algo.diagnostics.read_positions` (one row per step, plane and
position t with sums over tokens). Everything here is a closed-form reduction of those sums.

* std of K_t at t:  s_t = sqrt((sum K^2 - (sum K)^2 / n_t) / (n_t - 1))   (unbiased; n_t >= 2)
* sigma fit:  s_t = sigma sqrt(t), weighted least squares with weights n_t / t, the inverse of the
  large-sample variance Var(s_t) ~ sigma^2 t / (2 n_t). Closed form:
      sigma = sum_t n_t s_t / sqrt(t)  /  sum_t n_t
  (the token-weighted mean of s_t / sqrt(t)).
* free exponent: log s_t = log a + b log t by least squares with weights n_t (Var(log s_t) ~
  1 / (2 n_t)); R^2 is the weighted coefficient of determination of that regression.
* clip rate of a window in a set of positions: (tokens below + tokens above) / tokens.
* uniformity: clip rate in the last token-quartile of positions over the rate in the first one,
  where the first quartile is the positions holding the first 25% of tokens (cumulative n_t) and
  the last holds the last 25%. 1 means position-independent clipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctpo_cli.algo.diagnostics import FIXED_WINDOW, SQRT_WINDOW, STAT_COLUMNS
from ctpo_cli.errors import DataError

WINDOWS: dict[str, tuple[str, str]] = {
    "fixed": ("fixed_low", "fixed_high"),
    "sqrt": ("sqrt_low", "sqrt_high"),
    "own": ("own_low", "own_high"),
}
"""Clip windows recorded in the per-position files: name -> (below column, above column)."""


def window_label(window: str) -> str:
    """Human-readable description of a recorded clip window."""
    if window == "fixed":
        low, high = (math.exp(b) for b in FIXED_WINDOW)
        return f"fixed: ratio in [{low:.3g}, {high:.3g}]"
    if window == "sqrt":
        a_low, a_high, power = SQRT_WINDOW
        root = "√t" if power == 0.5 else f"t^{power:g}"
        return f"{root}: K_t in [-{a_low:g}{root}, {a_high:g}{root}]"
    return "method's own window"


@dataclass(frozen=True)
class GrowthFit:
    """Fits of the std of K_t against position (see the module docstring)."""

    sigma: float
    """sigma of s_t = sigma sqrt(t)."""
    amplitude: float
    """a of the free fit s_t = a t^b."""
    exponent: float
    """b of the free fit (0.5 for independent per-token log ratios)."""
    r2: float
    """Weighted R^2 of the log-log regression."""
    positions: int
    """Positions used (n_t >= 2 and s_t > 0)."""


def select_plane(frame: pd.DataFrame, include_onpolicy: bool = False) -> pd.DataFrame:
    """Off-policy rows (default) or both planes summed, one row per (step, position).

    The first mini-batch of a step is on-policy (pi == mu up to numerics, K_t ~ 0), so by default it
    is left out; ``include_onpolicy`` adds it.
    """
    rows = frame if include_onpolicy else frame[frame["offpolicy"].astype(bool)]
    if rows.empty:
        raise DataError(
            "no off-policy per-position rows (one mini-batch per step?); use --include-onpolicy to "
            "plot the on-policy rows, where K_t is ~0"
        )
    return rows.groupby(["step", "position"], as_index=False)[list(STAT_COLUMNS)].sum()


def nearest_steps(available: Sequence[int], requested: Sequence[int]) -> list[int]:
    """For each requested step, the nearest available one (ties: the earlier)."""
    steps = _sorted_steps(available)
    return [min(steps, key=lambda s: (abs(s - r), s)) for r in requested]


def spread_steps(available: Sequence[int], count: int = 3) -> list[int]:
    """``count`` steps spread evenly over the available ones: the first, evenly spaced, the last."""
    steps = _sorted_steps(available)
    return [steps[round(i * (len(steps) - 1) / max(count - 1, 1))] for i in range(count)]


def _sorted_steps(available: Sequence[int]) -> list[int]:
    steps = sorted(set(available))
    if not steps:
        raise DataError("no steps with per-position diagnostics")
    return steps


def step_rows(rows: pd.DataFrame, step: int) -> pd.DataFrame:
    """The rows of one step, sorted by position."""
    return rows[rows["step"] == step].sort_values("position").reset_index(drop=True)


def std_by_position(rows: pd.DataFrame) -> pd.DataFrame:
    """Columns position, n, mean, std of K_t at each position with n_t >= 2 (unbiased variance)."""
    rows = rows[rows["n"] >= 2]
    n = rows["n"].to_numpy(dtype=float)
    mean = rows["k_sum"].to_numpy(dtype=float) / n
    var = (rows["k_sumsq"].to_numpy(dtype=float) - n * mean**2) / (n - 1)
    return pd.DataFrame(
        {
            "position": rows["position"].to_numpy(dtype=int),
            "n": n,
            "mean": mean,
            "std": np.sqrt(np.clip(var, 0.0, None)),
        }
    )


def fit_growth(std: pd.DataFrame) -> GrowthFit:
    """The sigma sqrt(t) fit and the free power-law fit of :func:`std_by_position`'s output."""
    std = std[std["std"] > 0]
    if std["position"].nunique() < 2:
        raise DataError("need at least two positions with a non-zero std of K_t to fit its growth")
    t = std["position"].to_numpy(dtype=float)
    n = std["n"].to_numpy(dtype=float)
    s = std["std"].to_numpy(dtype=float)
    sigma = float(np.sum(n * s / np.sqrt(t)) / np.sum(n))
    x, y = np.log(t), np.log(s)
    x_bar, y_bar = np.average(x, weights=n), np.average(y, weights=n)
    slope = float(np.sum(n * (x - x_bar) * (y - y_bar)) / np.sum(n * (x - x_bar) ** 2))
    intercept = y_bar - slope * x_bar
    residual = np.sum(n * (y - intercept - slope * x) ** 2)
    total = np.sum(n * (y - y_bar) ** 2)
    r2 = float(1.0 - residual / total) if total > 0 else 1.0
    return GrowthFit(sigma, float(math.exp(intercept)), slope, r2, len(t))


def step_summary(rows: pd.DataFrame) -> dict[str, float]:
    """One step in numbers: the growth fits and, for the fixed and sqrt(t) windows, the clip rate in
    the first and last token-quartile of positions and their ratio."""
    fit = fit_growth(std_by_position(rows))
    table = uniformity(rows)
    summary = {"sigma": fit.sigma, "exponent": fit.exponent, "r2": fit.r2}
    for window in ("fixed", "sqrt"):
        for column in ("early", "late", "ratio"):
            summary[f"{window}_{column}"] = float(table.at[window, column])
    return summary


def log_bins(max_position: int, bins: int) -> np.ndarray:
    """Integer bin edges from 1 to ``max_position + 1``, log-spaced (width >= 1), ``bins`` at most."""
    edges = np.unique(np.round(np.geomspace(1, max_position + 1, bins + 1)).astype(int))
    return edges if len(edges) >= 2 else np.array([1, max_position + 1])


def _rates(sums: pd.DataFrame) -> pd.DataFrame:
    """Clip rates (``w_low``, ``w_high`` and total ``w``) of every window from rows of summed counts."""
    columns = {}
    for window, (low, high) in WINDOWS.items():
        columns[f"{window}_low"] = sums[low] / sums["n"]
        columns[f"{window}_high"] = sums[high] / sums["n"]
        columns[window] = (sums[low] + sums[high]) / sums["n"]
    return pd.DataFrame(columns, index=sums.index)


def clip_rates(rows: pd.DataFrame, bins: int = 24) -> pd.DataFrame:
    """Clip rates of every window per log-spaced position bin.

    Columns: t_start, t_end (inclusive), position (token-weighted mean t in the bin), n, and for each
    window w of :data:`WINDOWS`: ``w_low``, ``w_high``, ``w`` (fractions of the bin's tokens).
    """
    rows = rows[rows["n"] > 0]
    edges = log_bins(int(rows["position"].max()), bins)
    index = np.searchsorted(edges, rows["position"].to_numpy(), side="right") - 1
    weighted = rows.assign(bin=index, tn=rows["position"] * rows["n"])
    sums = weighted.groupby("bin")[[*STAT_COLUMNS, "tn"]].sum()
    head = pd.DataFrame(
        {
            "t_start": edges[sums.index],
            "t_end": edges[sums.index + 1] - 1,
            "position": sums["tn"] / sums["n"],
            "n": sums["n"],
        },
        index=sums.index,
    )
    return pd.concat([head, _rates(sums)], axis=1).reset_index(drop=True)


def uniformity(rows: pd.DataFrame) -> pd.DataFrame:
    """Per window: clip rate in the first and last token-quartile of positions and late/early.

    Index: window name; columns early, late, ratio (inf when only the late quartile clips, NaN when
    neither does), and t_early, t_late: the position ranges of the two quartiles.
    """
    rows = rows[rows["n"] > 0].sort_values("position")
    share = rows["n"].cumsum() / rows["n"].sum()
    early = rows[(share - rows["n"] / rows["n"].sum()) < 0.25]
    late = rows[share > 0.75]
    stats = list(STAT_COLUMNS)
    rates = _rates(pd.DataFrame([early[stats].sum(), late[stats].sum()], index=["early", "late"]))
    frame = pd.DataFrame(
        {
            "early": [rates.at["early", w] for w in WINDOWS],
            "late": [rates.at["late", w] for w in WINDOWS],
        },
        index=list(WINDOWS),
    )
    frame["ratio"] = [
        _ratio(late_rate, early_rate)
        for early_rate, late_rate in zip(frame["early"], frame["late"], strict=True)
    ]
    frame["t_early"] = f"{early['position'].min()}-{early['position'].max()}"
    frame["t_late"] = f"{late['position'].min()}-{late['position'].max()}"
    return frame


def _ratio(late: float, early: float) -> float:
    if early > 0:
        return late / early
    return math.inf if late > 0 else math.nan
