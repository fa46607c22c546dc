"""std(K_t) growth fits describe their points: on runs with a known growth law, fed through the real
per-position accumulator, the fitted curves lie within the points' sampling spread, and the exponent
and its standard error are what the data say.

The spread of a point: s_t from n_t Gaussian K values has sd(log s_t) ~ 1 / sqrt(2 n_t).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import positions
from ctpo_cli.algo import diagnostics

ROWS = 2000
LENGTH = 300


def position_rows(
    tmp_path: Path, cumulative: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
) -> pd.DataFrame:
    """Per-position statistics of K = cumulative(t, gen) for ROWS responses of LENGTH tokens, through
    :class:`ctpo_cli.algo.diagnostics.PositionStats` (off-policy plane), as ``ctpo plot`` reads them."""
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(1, LENGTH + 1, dtype=torch.float64).expand(ROWS, LENGTH)
    k = cumulative(t, gen)
    d = torch.diff(k, dim=1, prepend=torch.zeros(ROWS, 1, dtype=torch.float64))
    stats = diagnostics.PositionStats(tmp_path, rank=0)
    stats.end_minibatch()
    no_clip = torch.zeros_like(k, dtype=torch.bool)
    stats.record(k, d, t, torch.ones_like(k), no_clip, no_clip)
    stats.flush(1)
    rows = positions.select_plane(diagnostics.read_positions(tmp_path))
    return positions.std_by_position(positions.step_rows(rows, 1))


def assert_within_spread(std: pd.DataFrame, fit: positions.GrowthFit, sqrt_model: bool = True) -> None:
    """The free fit (and the σ√τ model when ``sqrt_model``) against the points of the fit range: 95%
    of points within 3 sampling sds (+1%), and in each of 6 log-spaced bins of positions the mean log residual too (neighbouring s_t
    share their tokens' history, so a bin's mean is as uncertain as one point)."""
    used = std[(std["position"] >= fit.t_start) & (std["position"] <= fit.t_end)]
    t = used["position"].to_numpy(dtype=float)
    spread = 3 / np.sqrt(2 * used["n"].to_numpy(dtype=float)) + 0.01
    edges = np.geomspace(fit.t_start, fit.t_end + 1, 7)
    for curve in [fit.power_curve(t), *([fit.sqrt_curve(t)] if sqrt_model else [])]:
        residual = np.log(used["std"].to_numpy(dtype=float) / curve)
        assert np.mean(np.abs(residual) <= spread) >= 0.95, residual
        for low, high in itertools.pairwise(edges):
            inside = (t >= low) & (t < high)
            if inside.any():
                assert abs(residual[inside].mean()) < spread[inside].min(), (low, high, residual[inside])


def test_known_power_growth(tmp_path: Path) -> None:
    """K_t = 0.01 t^0.7 z_i: std(K_t) grows exactly like t^0.7 from the first token."""

    def cumulative(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return 0.01 * t**0.7 * torch.randn(ROWS, 1, generator=gen, dtype=torch.float64)

    std = position_rows(tmp_path, cumulative)
    fit = positions.fit_growth(std)
    assert (fit.t_start, fit.t_end, fit.positions) == (1, LENGTH, LENGTH)
    assert fit.exponent == pytest.approx(0.7, abs=1e-6)
    assert fit.exponent_se < 1e-6  # one exact power law: no residual scatter
    used = std.assign(std=fit.power_curve(std["position"].to_numpy(dtype=float)))
    pd.testing.assert_series_equal(used["std"], std["std"], rtol=1e-6)


def test_deterministic_prefix_then_independent_tokens(tmp_path: Path) -> None:
    """The first 40 tokens are deterministic (d_t = 0, as a response's fixed format), then iid
    N(0, 0.05^2): std(K_t) = 0 before t = 41 and 0.05 sqrt(t - 40) after. The fit starts at t_0 = 41,
    its exponent is 0.5 within 4 standard errors, and both curves pass through the points."""

    def cumulative(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d = 0.05 * torch.randn(ROWS, LENGTH, generator=gen, dtype=torch.float64) * (t > 40)
        return d.cumsum(dim=1)

    std = position_rows(tmp_path, cumulative)
    assert (std.loc[std["position"] <= 40, "std"] == 0).all()
    fit = positions.fit_growth(std)
    assert fit.t_start == 41
    assert fit.sigma == pytest.approx(0.05, rel=0.05)
    assert 0 < fit.exponent_se < 0.02
    assert abs(fit.exponent - 0.5) < 4 * fit.exponent_se + 0.01
    assert_within_spread(std, fit)


def test_deterministic_format_then_one_decision_token(tmp_path: Path) -> None:
    """The case of the issue: format tokens are deterministic up to t = 29, one high-variance decision
    token at t = 30 (K steps by N(0, 0.3^2)), then small drift N(0, 0.005^2): std(K_t) is 0, jumps and
    stays nearly flat. The fit starts at the jump, finds a small exponent and follows the points
    (fitted from t = 1, a power law would rise steeply through the zeros)."""

    def cumulative(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d = 0.005 * torch.randn(ROWS, LENGTH, generator=gen, dtype=torch.float64) * (t > 30)
        d = d + 0.3 * torch.randn(ROWS, 1, generator=gen, dtype=torch.float64) * (t == 30)
        return d.cumsum(dim=1)

    std = position_rows(tmp_path, cumulative)
    fit = positions.fit_growth(std)
    assert fit.t_start == 30
    late = std[std["position"] >= 30]
    assert late["std"].max() / late["std"].min() < 1.2  # the data: flat after the step
    assert fit.exponent < 0.05
    assert_within_spread(std, fit, sqrt_model=False)
    with pytest.raises(AssertionError):  # and σ√τ does not describe flat points: the model is rejected
        assert_within_spread(std, fit)


def test_no_variance_anywhere_is_refused(tmp_path: Path) -> None:
    std = position_rows(tmp_path, lambda t, gen: torch.zeros_like(t))
    with pytest.raises(ValueError, match="non-zero std of K_t"):
        positions.fit_growth(std)
