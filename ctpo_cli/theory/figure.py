"""The figure of ``ctpo theory --monte-carlo``: IS-weight variance by position, sampled against exact.

Input is the per-position table of :class:`ctpo_cli.theory.exact.MonteCarloStudy` (its ``positions``
records, or the CSV the command writes), never a training backend. Built on
:class:`matplotlib.figure.Figure` directly (no pyplot state; Agg renders the PNG). Colours: one per
estimator, from the project's method colours (:data:`analysis.style.METHOD_COLORS`); in the ratio
panel, shades of the full-sequence colour tell the horizons apart (darkest = longest).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.style import METHOD_COLORS

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

ESTIMATOR_LABELS = {
    "token": "token $r_t$ (GRPO)",
    "geometric": "geometric $R^{1/T}$ (GSPO)",
    "cumulative": r"cumulative $\rho_t$ (CTPO)",
    "full": "full sequence $R$",
}
"""Estimator name (``ctpo_cli.theory.exact.WEIGHTINGS``) to legend label, in drawing order."""
ESTIMATOR_METHODS = {"token": "grpo", "geometric": "gspo", "cumulative": "ctpo", "full": "seq-is"}
HORIZON_MARKERS = ("o", "s", "^", "D", "v", "P")
STYLE: dict[RcKeyType, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,
}
FIGURE_STEM = "theory_variance_by_position"
REQUIRED_COLUMNS = (
    "seed",
    "horizon",
    "estimator",
    "position",
    "variance_exact",
    "variance_sampled",
    "variance_se",
    "ratio_exact",
    "ratio_sampled",
    "ratio_se",
    "ratio_independence",
)


def shade(color: str, amount: float) -> str:
    """``color`` mixed towards black (amount < 0) or white (amount > 0) by |amount|."""
    rgb = np.array(to_rgb(color))
    target = np.ones(3) if amount > 0 else np.zeros(3)
    return to_hex(rgb + abs(amount) * (target - rgb))


def horizon_colors(horizons: list[int]) -> dict[int, str]:
    """Shades of the full-sequence colour, lightest for the shortest horizon, darkest for the longest."""
    amounts = np.linspace(0.45, -0.35, len(horizons)) if len(horizons) > 1 else [0.0]
    return {h: shade(METHOD_COLORS["seq-is"], float(a)) for h, a in zip(horizons, amounts, strict=True)}


def plot_variance_panel(ax: Axes, rows: pd.DataFrame) -> None:
    """Var_t of every estimator at one horizon: exact (line), sampled ± standard error (points)."""
    for estimator, label in ESTIMATOR_LABELS.items():
        series = rows[rows["estimator"] == estimator].sort_values("position")
        color = METHOD_COLORS[ESTIMATOR_METHODS[estimator]]
        ax.plot(series["position"], series["variance_exact"], color=color, label=label)
        ax.errorbar(
            series["position"],
            series["variance_sampled"],
            yerr=series["variance_se"],
            fmt="o",
            ms=2.5,
            elinewidth=0.8,
            color=color,
            alpha=0.8,
        )
    ax.set_yscale("log")
    ax.set_xlabel("position t")
    ax.set_ylabel(r"$\mathrm{Var}_\mu(w_t\, \nabla\log\pi(a_t|s_t)\, A_t)$  (trace)")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="0.3", marker="o", ls="none", ms=3))
    labels.append("sampled ± s.e. (points); exact (lines)")
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)


def plot_ratio_panel(ax: Axes, rows: pd.DataFrame) -> None:
    """Var_t(full) / Var_t(cumulative) per horizon: sampled ± s.e., exact, closed form under independence."""
    full = rows[rows["estimator"] == "full"]
    horizons = sorted(int(h) for h in full["horizon"].unique())
    colors = horizon_colors(horizons)
    for index, horizon in enumerate(horizons):
        series = full[full["horizon"] == horizon].sort_values("position")
        color = colors[horizon]
        ax.plot(series["position"], series["ratio_exact"], color=color)
        ax.plot(series["position"], series["ratio_independence"], color=color, ls="--", lw=1.2)
        ax.errorbar(
            series["position"],
            series["ratio_sampled"],
            yerr=series["ratio_se"],
            fmt=HORIZON_MARKERS[index % len(HORIZON_MARKERS)],
            ms=3,
            elinewidth=0.8,
            color=color,
            alpha=0.8,
            label=f"T = {horizon}",
        )
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("position t")
    ax.set_ylabel(r"$\mathrm{Var}_t(\mathrm{full}) \,/\, \mathrm{Var}_t(\mathrm{cumulative})$")
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3"), Line2D([], [], color="0.3", ls="--")]
    labels += ["exact", r"closed form $\prod_{u>t} E_\mu[r_u^2]$ (independent ratios)"]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)


def plot_variance_by_position(positions: pd.DataFrame, out_dir: Path, seed: int | None = None) -> list[Path]:
    """Two panels for one seed (default: the first): Var_t of each estimator at the longest horizon, and
    Var_t(full)/Var_t(cumulative) for every horizon against the closed form. Writes
    ``out_dir/theory_variance_by_position.png`` and ``.pdf``; returns the paths.

    ``positions`` has the columns :data:`REQUIRED_COLUMNS` (``MonteCarloStudy.positions`` or its CSV).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in positions.columns]
    if missing:
        raise ValueError(f"positions table lacks columns {', '.join(missing)}")
    chosen = int(positions["seed"].min()) if seed is None else seed
    rows = positions[positions["seed"] == chosen]
    if rows.empty:
        raise ValueError(f"no rows for seed {chosen}")
    longest = int(rows["horizon"].max())
    with rc_context(STYLE):
        fig = Figure(figsize=(11.0, 5.0), layout="constrained")
        left, right = fig.subplots(1, 2)
        plot_variance_panel(left, rows[rows["horizon"] == longest])
        left.set_title(f"(a) per-position variance, T = {longest}")
        plot_ratio_panel(right, rows)
        right.set_title("(b) full-sequence variance over cumulative's")
        fig.suptitle(f"IS weights under the behaviour policy (Markov policies, seed {chosen})")
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{FIGURE_STEM}.png", out_dir / f"{FIGURE_STEM}.pdf"]
        for path in paths:
            fig.savefig(path)
    return paths
