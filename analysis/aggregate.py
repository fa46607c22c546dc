"""Methods compared over seeds: the statistics of ``ctpo sweep``'s report and of ``ctpo report`` when
it finds several seeds.

Input: one :class:`Evaluated` per (method, seed), the run's held-out (or benchmark) eval: its overall
avg@k and, per problem, the pass rate p_{m,s,i} of method m, seed s, problem i.

* Per method, over its S seeds with overall avg@k x_s: the mean x̄, and the 95% interval
  x̄ ± t_{0.975, S-1} sd(x_s) / sqrt(S) (seed-to-seed variation: each seed is one independent
  training run).
* Per pair of methods (a, b), paired by seed and problem: for each seed s that both have,
  d_s = mean over the problems i both evaluated of (p_{a,s,i} - p_{b,s,i}) (the same starting policy
  and the same held-out problems, so both cancel), then Δ = mean_s d_s with the interval
  Δ ± t_{0.975, S-1} sd(d_s) / sqrt(S) over the S paired seeds. With a single paired seed the
  interval is across problems instead: Δ ± 1.96 sd_i(p_a - p_b) / sqrt(P).

Every interval is a 95% interval; a pair whose interval excludes 0 is marked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

Z95 = 1.959963984540054
"""The 97.5% quantile of the standard normal."""


@dataclass(frozen=True)
class Evaluated:
    """One evaluated run: its method, seed, overall avg@k and per-problem pass rates
    (columns benchmark, problem_id, pass_rate)."""

    method: str
    seed: int
    avg_at_k: float
    problems: pd.DataFrame


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, standard error sd / sqrt(n) and the 95% t half-width (NaN for fewer than 2 values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan, math.nan
    stderr = float(x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), stderr, t_quantile(len(x) - 1) * stderr


def method_table(runs: Sequence[Evaluated]) -> pd.DataFrame:
    """Per method (first-appearance order): seeds, mean, stderr, ci_low, ci_high over seeds, and the
    per-seed values (``values``, in seed order)."""
    rows = []
    for method in dict.fromkeys(r.method for r in runs):
        members = sorted((r for r in runs if r.method == method), key=lambda r: r.seed)
        values = [r.avg_at_k for r in members]
        mean, stderr, half = mean_interval(values)
        rows.append(
            {
                "method": method,
                "seeds": len(values),
                "mean": mean,
                "stderr": stderr,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "values": values,
                "seed_list": [r.seed for r in members],
            }
        )
    return pd.DataFrame(rows)


def seed_difference(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """p_a - p_b over the problems both per-problem tables hold (matched by benchmark and problem id)."""
    both = a.merge(b, on=["benchmark", "problem_id"], suffixes=("_a", "_b"))
    return (both["pass_rate_a"] - both["pass_rate_b"]).to_numpy(dtype=float)


PAIR_COLUMNS = [
    "a",
    "b",
    "delta",
    "stderr",
    "ci_low",
    "ci_high",
    "seeds",
    "problems",
    "a_ahead",
    "basis",
    "per_seed",
]
"""The columns of :func:`pair_table`."""


def pair_table(runs: Sequence[Evaluated], methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Every pair (a, b) of ``methods`` (default: all, first-appearance order; a before b):
    delta = mean over paired seeds of the per-seed mean difference, its 95% interval (module
    docstring), the paired seeds and problems, the basis of the interval, and in how many seeds a
    was ahead."""
    order = list(methods or dict.fromkeys(r.method for r in runs))
    by_key = {(r.method, r.seed): r for r in runs}
    rows = []
    for a, b in combinations(order, 2):
        seeds = sorted(s for (m, s) in by_key if m == a and (b, s) in by_key)
        diffs = [seed_difference(by_key[(a, s)].problems, by_key[(b, s)].problems) for s in seeds]
        per_seed = [float(d.mean()) for d in diffs if len(d)]
        if not per_seed:
            continue
        if len(per_seed) >= 2:
            delta, stderr, half = mean_interval(per_seed)
            basis = f"{len(per_seed)} seeds (t)"
        else:
            d = diffs[0]
            delta, stderr = (
                float(d.mean()),
                float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan,
            )
            half, basis = Z95 * stderr, "1 seed (z, across problems)"
        rows.append(
            {
                "a": a,
                "b": b,
                "delta": delta,
                "stderr": stderr,
                "ci_low": delta - half,
                "ci_high": delta + half,
                "seeds": len(per_seed),
                "problems": int(np.mean([len(d) for d in diffs])),
                "a_ahead": sum(d > 0 for d in per_seed),
                "basis": basis,
                "per_seed": per_seed,
            }
        )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)  # the columns even without a pair (one method)


def percent(value: float, signed: bool = False) -> str:
    return "–" if math.isnan(value) else f"{100 * value:{'+' if signed else ''}.1f}"


def method_display(table: pd.DataFrame) -> pd.DataFrame:
    """The per-method table as strings (percent)."""
    return pd.DataFrame(
        {
            "method": table["method"],
            "seeds": table["seeds"],
            "avg@k % (95% t-interval over seeds)": [
                f"{percent(m)} [{percent(lo)}, {percent(hi)}]"
                for m, lo, hi in zip(table["mean"], table["ci_low"], table["ci_high"], strict=True)
            ],
            "per seed": [" ".join(percent(v) for v in values) for values in table["values"]],
        }
    )


def pair_display(table: pd.DataFrame) -> pd.DataFrame:
    """The pairwise table as strings (percentage points); ``*`` marks an interval that excludes 0."""
    marks = [
        "*" if lo > 0 or hi < 0 else "" for lo, hi in zip(table["ci_low"], table["ci_high"], strict=True)
    ]
    return pd.DataFrame(
        {
            "a − b": [f"{a} − {b}" for a, b in zip(table["a"], table["b"], strict=True)],
            "Δ points (95% interval)": [
                f"{percent(d, True)} [{percent(lo, True)}, {percent(hi, True)}]{mark}"
                for d, lo, hi, mark in zip(
                    table["delta"], table["ci_low"], table["ci_high"], marks, strict=True
                )
            ],
            "a ahead in": [f"{n}/{s} seeds" for n, s in zip(table["a_ahead"], table["seeds"], strict=True)],
            "paired over": table["basis"].map(str) + ", " + table["problems"].map(str) + " problems each",
        }
    )


def drift_row(run_dir: Path) -> dict[str, float]:
    """How far the policy moved within its rollout batches, over all steps of one run.

    From the per-position files, off-policy plane (mini-batches 2..M of each batch): the RMS of the
    per-token log ratio d_t, sqrt(sum d^2 / n); the share of tokens outside the method's own clip
    window; the share of K_t outside the fixed reference window and outside the √t window. From the
    metrics, the step mean of ``ctpo/cum_log_ratio_abs_mean`` (mean |K_t|) and ``actor/pg_clipfrac``
    (all mini-batches, the first included); verl's runs log the former as ``actor/ctpo/...``.
    """
    from ctpo_cli.algo.diagnostics import read_positions
    from ctpo_cli.runs.rundir import read_metrics

    rows = read_positions(run_dir)
    off = rows[rows["offpolicy"].astype(bool)].sum(numeric_only=True)
    metrics = read_metrics(run_dir)
    metrics = metrics[metrics["step"] > 0]
    return {
        "rms_log_ratio": math.sqrt(off["d_sumsq"] / off["n"]),
        "mean_abs_cum_log_ratio": float(_metric(metrics, "ctpo/cum_log_ratio_abs_mean").mean()),
        "own_clip": float((off["own_low"] + off["own_high"]) / off["n"]),
        "fixed_window_out": float((off["fixed_low"] + off["fixed_high"]) / off["n"]),
        "sqrt_window_out": float((off["sqrt_low"] + off["sqrt_high"]) / off["n"]),
        "pg_clipfrac": float(metrics["actor/pg_clipfrac"].mean()),
    }


def _metric(metrics: pd.DataFrame, name: str) -> pd.Series:
    """The column ``name`` of a run's metrics, or ``actor/<name>`` (the name verl's trainer logs it under)."""
    return metrics[name] if name in metrics else metrics[f"actor/{name}"]


DRIFT_COLUMNS = {
    "rms_log_ratio": "RMS d_t",
    "mean_abs_cum_log_ratio": "mean abs(K_t)",
    "own_clip": "own clip %",
    "fixed_window_out": "K_t outside [0.5, 5] %",
    "sqrt_window_out": "K_t outside √t window %",
    "pg_clipfrac": "pg_clipfrac %",
}


def drift_table(runs: Sequence[tuple[str, Path]]) -> pd.DataFrame:
    """Per method (first-appearance order), the mean over its runs of :func:`drift_row`."""
    frame = pd.DataFrame([{"method": method, **drift_row(run)} for method, run in runs])
    return frame.groupby("method", sort=False).mean().reset_index()


def drift_display(table: pd.DataFrame) -> pd.DataFrame:
    """The drift table as strings: log ratios in nats (3 digits), shares in percent."""
    shown = pd.DataFrame({"method": table["method"]})
    for key, label in DRIFT_COLUMNS.items():
        values = table[key]
        shown[label] = (
            values.map("{:.3g}".format) if "%" not in label else values.map(lambda v: f"{100 * v:.2f}")
        )
    return shown
