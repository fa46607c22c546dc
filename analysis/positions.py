"""Per-position statistics of the cumulative log ratio K_t: std growth, clip rates, uniformity.

Input is the frame of :func:`ctpo_cli.algo.diagnostics.read_positions` (one row per step, plane and
position t with sums over tokens). Everything here is a closed-form reduction of those sums.

* std of K_t at t:  s_t = sqrt((sum K^2 - (sum K)^2 / n_t) / (n_t - 1))   (unbiased; n_t >= 2)
* fit range (where K_t has variance): positions with n_t >= MIN_FIT_TOKENS tokens from t_0 on, the
  first such position where s_t reaches VARIANCE_FLOOR nats (the ratio exp(K_t) varies by 0.1%).
  Before t_0 the tokens are deterministic, e.g. a response's fixed format, and std(K_t) is 0 up to
  rounding: a power law fitted through them describes the jump out of 0, not the growth. Growth is measured
  from there: tau = t - t_0 + 1 (tau = t when K_t has variance from the first token).
* sigma fit over the range:  s_t = sigma sqrt(tau), weighted least squares with weights n_t / tau,
  the inverse of the large-sample variance Var(s_t) ~ sigma^2 tau / (2 n_t). Closed form:
      sigma = sum_t n_t s_t / sqrt(tau)  /  sum_t n_t
  (the token-weighted mean of s_t / sqrt(tau)).
* free exponent over the range: log s_t = log a + b log tau by least squares with weights n_t
  (Var(log s_t) ~ 1 / (2 n_t)); R^2 is the weighted coefficient of determination, and the standard
  error of b is the weighted-regression one from the residuals,
      se(b) = sqrt( sum_t n_t r_t^2 / (m - 2)  /  sum_t n_t (x_t - x̄)^2 ),   x = log tau, m positions
  (neighbouring s_t share tokens, so it understates the uncertainty of b; it measures how well one
  power law describes the points).
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


MIN_FIT_TOKENS = 10
"""Positions with fewer tokens are left out of the fits (and not drawn)."""
VARIANCE_FLOOR = 1e-3
"""The fit range starts where s_t first reaches this many nats (module docstring)."""
FIT_RULE = (
    f"fits in τ = t − t₀ + 1 over t ≥ t₀, the first position (with ≥ {MIN_FIT_TOKENS} tokens) where "
    f"std(K_t) ≥ {VARIANCE_FLOOR:g} nats: before t₀, K_t has no variance"
)


@dataclass(frozen=True)
class GrowthFit:
    """Fits of the std of K_t against position (see the module docstring)."""

    sigma: float
    """sigma of s_t = sigma sqrt(tau), tau = t - t_start + 1."""
    amplitude: float
    """a of the free fit s_t = a tau^b."""
    exponent: float
    """b of the free fit (0.5 for independent per-token log ratios)."""
    exponent_se: float
    """Standard error of b (module docstring)."""
    r2: float
    """Weighted R^2 of the log-log regression."""
    positions: int
    """Positions used (the fit range, s_t > 0)."""
    t_start: int
    """t_0, the first position of the fit range."""
    t_end: int
    """The last position of the fit range."""

    def sqrt_curve(self, t: np.ndarray) -> np.ndarray:
        """sigma sqrt(tau) at positions t of the fit range."""
        return self.sigma * np.sqrt(t - self.t_start + 1)

    def power_curve(self, t: np.ndarray) -> np.ndarray:
        """a tau^b at positions t of the fit range."""
        return self.amplitude * (t - self.t_start + 1) ** self.exponent


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


def fit_range(std: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`std_by_position`'s output that the fits use (module docstring)."""
    rows = std[(std["n"] >= MIN_FIT_TOKENS) & (std["std"] > 0)]
    if rows.empty:
        return rows
    has_variance = rows["std"] >= VARIANCE_FLOOR
    if not has_variance.any():
        return rows.iloc[:0]
    return rows[rows["position"] >= rows.loc[has_variance, "position"].min()]


def fit_growth(std: pd.DataFrame) -> GrowthFit:
    """The sigma sqrt(t) fit and the free power-law fit of :func:`std_by_position`'s output, over the
    fit range (module docstring)."""
    std = fit_range(std)
    if std["position"].nunique() < 3:
        raise DataError(
            f"need at least three positions with ≥ {MIN_FIT_TOKENS} tokens and a non-zero std of K_t to fit its growth"
        )
    t = std["position"].to_numpy(dtype=float)
    tau = t - t.min() + 1
    n = std["n"].to_numpy(dtype=float)
    s = std["std"].to_numpy(dtype=float)
    sigma = float(np.sum(n * s / np.sqrt(tau)) / np.sum(n))
    x, y = np.log(tau), np.log(s)
    x_bar, y_bar = np.average(x, weights=n), np.average(y, weights=n)
    sxx = np.sum(n * (x - x_bar) ** 2)
    slope = float(np.sum(n * (x - x_bar) * (y - y_bar)) / sxx)
    intercept = y_bar - slope * x_bar
    residual = np.sum(n * (y - intercept - slope * x) ** 2)
    total = np.sum(n * (y - y_bar) ** 2)
    r2 = float(1.0 - residual / total) if total > 0 else 1.0
    se = float(math.sqrt(residual / (len(t) - 2) / sxx))
    return GrowthFit(sigma, float(math.exp(intercept)), slope, se, r2, len(t), int(t.min()), int(t.max()))


def step_summary(rows: pd.DataFrame) -> dict[str, float]:
    """One step in numbers: the growth fits (NaN when K_t has no variance to fit) and, for the fixed
    and sqrt(t) windows, the clip rate in the first and last token-quartile of positions and their
    ratio."""
    keys = ("sigma", "exponent", "exponent_se", "r2", "t_start")
    try:
        fit = fit_growth(std_by_position(rows))
        summary: dict[str, float] = {key: float(getattr(fit, key)) for key in keys}
    except ValueError:
        summary = dict.fromkeys(keys, math.nan)
    table = uniformity(rows)
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
