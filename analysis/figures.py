"""The figures: std growth of K_t, clip rate by position, training curves. PNG + PDF, one style.

Built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend state; rendering
is Agg's). Colour means method everywhere (:mod:`analysis.style`); line style and marker mean the
quantity (fit, window, direction) and seeds of one method differ by marker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

from analysis.curves import CURVES, Curve
from analysis.positions import FIT_RULE, MIN_FIT_TOKENS, GrowthFit, window_label
from analysis.runs import Run
from analysis.style import method_color
from ctpo_cli.runs.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

STYLE: dict[RcKeyType, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,
}
SEED_MARKERS = ("o", "s", "^", "D", "v", "P")
MIN_TOKENS_SHOWN = MIN_FIT_TOKENS
"""Per-position std points from fewer tokens are not drawn (too noisy), nor fitted."""
LEGEND_HEADROOM = 1.35
"""Top of a linear y axis as a multiple of the data's, leaving room for an upper-left legend."""
WINDOW_STYLE = {"fixed": "-", "sqrt": "--"}
DIRECTION_MARKER = {"low": "v", "high": "^"}


@contextmanager
def styled() -> Iterator[None]:
    """The house style for building and saving a figure."""
    with rc_context(STYLE):
        yield


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``out_dir/stem.png`` and ``.pdf``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    with styled():
        for path in paths:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=path.suffix.removeprefix("."))
    return paths


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """Colour of each method (registry colours; distinct fallbacks for unknown methods)."""
    unique = list(dict.fromkeys(methods))
    return {m: method_color(m, i) for i, m in enumerate(unique)}


class Palette:
    """Colour per method, marker per run within its method (stable over one figure)."""

    def __init__(self, runs: Sequence[Run]) -> None:
        runs = list({r.name: r for r in runs}.values())  # a run may appear in several panels
        methods = list(dict.fromkeys(r.method for r in runs))
        self._color = method_colors(methods)
        self._marker: dict[str, str] = {}
        for method in methods:
            same = [r for r in runs if r.method == method]
            for i, run in enumerate(same):
                self._marker[run.name] = SEED_MARKERS[i % len(SEED_MARKERS)]

    def color(self, run: Run) -> str:
        """The run's method colour."""
        return self._color[run.method]

    def marker(self, run: Run) -> str:
        """The run's marker (distinguishes seeds of one method)."""
        return self._marker[run.name]


def _grid(panels: int, rows: int = 1, width: float = 4.3, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with ``rows`` x ``panels`` axes (always a 2-D array)."""
    fig = Figure(figsize=(width * panels, height * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, panels, squeeze=False)
    return fig, axes


def _readable_log_ticks(ax: Axes, which: str = "xy") -> None:
    """Log axes labelled 0.01, 0.02, 0.05, 0.1, ... (1-2-5 steps over up to 3 decades, else powers of
    ten) instead of 10^k."""
    for name, axis, (low, high) in (("x", ax.xaxis, ax.get_xlim()), ("y", ax.yaxis, ax.get_ylim())):
        if name not in which:
            continue
        decades = math.log10(high / low) if low > 0 else math.inf
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())


def _style_handles(entries: Sequence[tuple[str, dict[str, Any]]]) -> list[Line2D]:
    """Grey legend handles that explain line styles and markers."""
    return [Line2D([], [], color="0.35", label=label, **kwargs) for label, kwargs in entries]


# ---------------------------------------------------------------------------------------------
# std of K_t against t


@dataclass(frozen=True)
class StdSeries:
    """One run at one step: per-position std of K_t and its fits."""

    run: Run
    step: int
    std: pd.DataFrame
    fit: GrowthFit | None
    """None when K_t has no variance to fit at this step."""


def std_growth_figure(panels: Sequence[tuple[str, Sequence[StdSeries]]], scale: str = "log") -> Figure:
    """One panel per (title, series): points s_t, solid sigma sqrt(t) fit, dashed a t^b fit."""
    palette = Palette([s.run for _, series in panels for s in series])
    entries = max(len(series) for _, series in panels)
    with styled():
        fig, axes = _grid(len(panels), height=3.4 + 0.2 * entries)  # room for the legends below
        for ax, (title, series) in zip(axes[0], panels, strict=True):
            for s in series:
                _draw_std(ax, s, palette)
            ax.set(title=title, xlabel="token position t (model tokens)", xscale=scale, yscale=scale)
            if scale == "log":
                _readable_log_ticks(ax)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        axes[0, 0].set_ylabel("std of K_t (nats)")
        fig.suptitle("Std of the cumulative log ratio K_t by position")
        fig.legend(
            handles=_style_handles(
                [
                    (
                        f"per-position std of K_t (positions with ≥ {MIN_TOKENS_SHOWN} tokens)",
                        {"marker": "o", "linestyle": "none", "markersize": 4},
                    ),
                    ("fit σ√τ (weights n_t/τ)", {"linestyle": "-"}),
                    ("free fit a·τ^b, b ± se (log-log, weights n_t)", {"linestyle": "--"}),
                ]
            ),
            loc="outside lower center",
            ncol=3,
            frameon=False,
            title=FIT_RULE,
            title_fontsize=8,
        )
    return fig


def _draw_std(ax: Axes, s: StdSeries, palette: Palette) -> None:
    color = palette.color(s.run)
    shown = s.std[s.std["n"] >= MIN_TOKENS_SHOWN]
    ax.plot(
        shown["position"],
        shown["std"],
        linestyle="none",
        marker=palette.marker(s.run),
        markersize=2.5,
        alpha=0.35,
        color=color,
        rasterized=True,
    )
    fit = s.fit
    if fit is None:
        ax.plot([], [], color=color, label=f"{s.run.label}, step {s.step}: no variance in K_t to fit")
        return
    grid = np.geomspace(fit.t_start, fit.t_end, 200)
    label = (
        f"{s.run.label}, step {s.step}: σ̂={fit.sigma:.3g}; b={fit.exponent:.2f} ± {fit.exponent_se:.2f}, "
        f"R²={fit.r2:.2f}, t ≥ {fit.t_start}"
    )
    ax.plot(grid, fit.sqrt_curve(grid), color=color, label=label)
    ax.plot(grid, fit.power_curve(grid), color=color, linestyle="--", linewidth=1.2)


# ---------------------------------------------------------------------------------------------
# clip rate by position


@dataclass(frozen=True)
class ClipSeries:
    """One run at one step: binned clip rates and the late/early uniformity table."""

    run: Run
    step: int
    rates: pd.DataFrame
    uniformity: pd.DataFrame


def clip_rate_figure(panels: Sequence[tuple[str, Sequence[ClipSeries]]]) -> Figure:
    """Per step (column): total clip rate of the fixed and the sqrt(t) window (top row) and the same
    split by direction (bottom row), against position on a log axis."""
    palette = Palette([s.run for _, series in panels for s in series])
    with styled():
        fig, axes = _grid(len(panels), rows=2, height=3.3)
        for column, (title, series) in enumerate(panels):
            top, bottom = axes[0, column], axes[1, column]
            for s in series:
                _draw_clip_total(top, s, palette)
                _draw_clip_direction(bottom, s, palette)
            top.set_title(title)
            for ax in (top, bottom):
                ax.set_xscale("log")
                _readable_log_ticks(ax, "x")
                ax.set_ylim(0, ax.get_ylim()[1] * LEGEND_HEADROOM)
                ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
            top.legend(loc="upper left", frameon=False)
            bottom.set_xlabel("token position t (model tokens, log-spaced bins)")
        axes[0, 0].set_ylabel("tokens clipped, total")
        axes[1, 0].set_ylabel("tokens clipped, by direction")
        fig.suptitle("Clip rate of K_t by position: fixed window vs √t window")
        fig.legend(handles=_clip_handles(), loc="outside lower center", ncol=4, frameon=False)
    return fig


def _clip_handles() -> list[Line2D]:
    entries = [
        (window_label(w), {"linestyle": WINDOW_STYLE[w], "marker": "o", "markersize": 3})
        for w in WINDOW_STYLE
    ]
    entries += [
        (
            f"{d} {'(K_t below window)' if d == 'low' else '(K_t above window)'}",
            {"marker": m, "linestyle": "none"},
        )
        for d, m in DIRECTION_MARKER.items()
    ]
    return _style_handles(entries)


def _draw_clip_total(ax: Axes, s: ClipSeries, palette: Palette) -> None:
    color = palette.color(s.run)
    u = s.uniformity["ratio"]
    label = (
        f"{s.run.label}, step {s.step}: late/early fixed {ratio_text(u['fixed'])}, √t {ratio_text(u['sqrt'])}"
    )
    for window, style in WINDOW_STYLE.items():
        ax.plot(
            s.rates["position"],
            s.rates[window],
            linestyle=style,
            marker="o",
            markersize=3,
            color=color,
            label=label if window == "fixed" else None,
        )


def _draw_clip_direction(ax: Axes, s: ClipSeries, palette: Palette) -> None:
    color = palette.color(s.run)
    for window, style in WINDOW_STYLE.items():
        for direction, marker in DIRECTION_MARKER.items():
            ax.plot(
                s.rates["position"],
                s.rates[f"{window}_{direction}"],
                linestyle=style,
                marker=marker,
                markersize=4,
                linewidth=1.1,
                color=color,
            )


def ratio_text(ratio: float) -> str:
    """A late/early clip-rate ratio: ``×1.04``, ``×41``, ``×∞`` (only late positions clip), ``n/a`` (none clip)."""
    if math.isnan(ratio):
        return "n/a"
    return "×∞" if math.isinf(ratio) else f"×{ratio:.3g}" if ratio < 1000 else f"×{ratio:.0f}"


# ---------------------------------------------------------------------------------------------
# training curves


@dataclass(frozen=True)
class MethodCurves:
    """One method's curves: per canonical curve name, the seed band (see analysis.curves.seed_band)."""

    method: str
    seeds: int
    bands: dict[str, pd.DataFrame]


def curves_figure(methods: Sequence[MethodCurves], smooth_window: int = 1) -> Figure:
    """One panel per canonical curve, one line per method (mean over seeds, min-max band)."""
    colors = method_colors([m.method for m in methods])
    with styled():
        fig = Figure(figsize=(13.5, 7.2), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        for ax, curve in zip(axes[: len(CURVES)], CURVES, strict=True):
            _draw_curve(ax, curve, methods, colors)
        legend_ax = axes[len(CURVES)]
        legend_ax.axis("off")
        handles = [Line2D([], [], color=colors[m.method], label=_method_label(m)) for m in methods]
        legend_ax.legend(handles=handles, loc="center", frameon=False, fontsize=10, title="method")
        notes = ["band: min–max over seeds"] if any(m.seeds > 1 for m in methods) else []
        notes += (
            [f"rolling mean of {smooth_window} logged steps (not validation)"] if smooth_window > 1 else []
        )
        note = "; ".join(notes)
        legend_ax.text(0.5, 0.08, note, ha="center", transform=legend_ax.transAxes, fontsize=8, color="0.35")
        fig.suptitle("Training dynamics")
    return fig


def _method_label(m: MethodCurves) -> str:
    return f"{m.method} ({m.seeds} seed{'s' if m.seeds != 1 else ''})"


def _draw_curve(ax: Axes, curve: Curve, methods: Sequence[MethodCurves], colors: dict[str, str]) -> None:
    drawn = False
    for m in methods:
        band = m.bands.get(curve.name)
        if band is None or band.empty:
            continue
        color = colors[m.method]
        marker = None if curve.dense else "o"
        ax.plot(band.index, band["mean"], color=color, marker=marker, markersize=4)
        if m.seeds > 1:
            ax.fill_between(band.index, band["low"], band["high"], color=color, alpha=0.2, linewidth=0)
        drawn = True
    ax.set(xlabel="training step", ylabel=curve.label)
    if curve.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "not logged by these runs",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )


# ---------------------------------------------------------------------------------------------
# methods over seeds


def comparison_figure(methods: pd.DataFrame, pairs: pd.DataFrame, title: str) -> Figure:
    """Left: each method's avg@k per seed (dots) and its mean with the 95% t-interval over seeds.
    Right: every pairwise difference a − b, paired by seed and problem, with its 95% interval
    (``analysis.aggregate``); intervals that exclude 0 are drawn solid, the others faded."""
    colors = method_colors(list(methods["method"]))
    with styled():
        fig = Figure(figsize=(11, 0.9 + 0.42 * max(len(methods), len(pairs), 4)), layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=(1, 1.2))
        for row, item in enumerate(methods.itertuples(index=False)):
            y = len(methods) - 1 - row
            color = colors[item.method]
            left.plot(
                [100 * v for v in item.values], [y] * len(item.values), "o", color=color, alpha=0.45, ms=4
            )
            if not math.isnan(item.ci_low):
                left.plot([100 * item.ci_low, 100 * item.ci_high], [y, y], color=color, lw=2.5)
            left.plot([100 * item.mean], [y], "|", color="black", ms=14, mew=2)
        left.set_yticks(range(len(methods)), list(methods["method"])[::-1])
        left.set(xlabel="avg@k (%)", title="per method: seeds (dots), mean, 95% t-interval")
        for row, item in enumerate(pairs.itertuples(index=False)):
            y = len(pairs) - 1 - row
            excludes_zero = item.ci_low > 0 or item.ci_high < 0
            alpha = 1.0 if excludes_zero else 0.45
            right.plot([100 * item.ci_low, 100 * item.ci_high], [y, y], color="0.2", lw=2.5, alpha=alpha)
            right.plot([100 * item.delta], [y], "o", color="0.2", alpha=alpha)
            right.plot([100 * d for d in item.per_seed], [y] * len(item.per_seed), "x", color="0.5", ms=4)
        if pairs.empty:
            right.text(0.5, 0.5, "one method: no pair to compare", ha="center", transform=right.transAxes)
        right.axvline(0, color="0.5", lw=1, linestyle=":")
        right.set_yticks(
            range(len(pairs)), [f"{a} − {b}" for a, b in zip(pairs["a"], pairs["b"], strict=True)][::-1]
        )
        right.set(
            xlabel="difference (percentage points)",
            title="pairs, by seed and problem: per seed (x), Δ and 95% interval",
        )
        fig.suptitle(title)
    return fig
