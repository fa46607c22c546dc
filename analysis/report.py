"""The paper's tables from `ctpo eval` results: Table 2 (method x benchmark avg@k) and the ablation.

Input: each run's ``<run_dir>/eval/summary.csv`` (one row per benchmark plus a final ``average``
row; avg@k as a fraction). Runs are grouped by (model, method); the seeds of a group combine as:

* k >= 2 seeds with values x_1..x_k: mean x̄ and the 95% interval x̄ ± t_{0.975, k-1} s / sqrt(k),
  s the sample std over seeds (seed-to-seed variation); standard error s / sqrt(k).
* k = 1: the summary's own 95% interval across problems (ci95_low, ci95_high) and its stderr.

Ablation: Δ = ctpo - ctpo-fixed per benchmark with the 95% interval Δ ± q sqrt(se_1^2 + se_2^2),
q the Welch t quantile when both sides have >= 2 seeds, else the normal quantile 1.96.

The paper's Table 2 averages (avg@32 over AIME 2025, AIME 2026, HMMT Nov 2025, BRUMO 2025) are
shown as a reference column when a group's model and benchmark set are the paper's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs import Run

EVAL_DIR = "eval"
SUMMARY_FILE = "summary.csv"
AVERAGE = "average"
Z95 = 1.959963984540054
PAPER_BENCHMARKS = frozenset({"aime25", "aime26", "hmmtnov2025", "brumo2025"})
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "qwen3-4b": {"base": 3.9, "grpo": 43.2, "gspo": 47.7, "ctpo": 51.4},
    "qwen3-14b": {"base": 6.1, "grpo": 54.6, "gspo": 55.5, "ctpo": 58.8, "ctpo-fixed": 55.7},
}
"""Paper Table 2 and ablation: avg@32 (%) averaged over the four benchmarks."""
BEHAVIOUR_COLUMNS = ("pass_at_1", "mean_turns", "mean_tool_calls", "tool_error_rate", "mean_response_tokens")


@dataclass(frozen=True)
class Group:
    """The runs of one (model, method)."""

    model: str
    method: str
    summaries: tuple[pd.DataFrame, ...]


def read_summary(run: Run) -> pd.DataFrame:
    """The run's eval summary (``<run_dir>/eval/summary.csv``, else the newest one below eval/)."""
    if run.run_dir is None:
        raise FileNotFoundError(f"run {run.label} ({run.source}) has no run directory with eval results")
    eval_dir = run.run_dir / EVAL_DIR
    candidates = [eval_dir / SUMMARY_FILE] if (eval_dir / SUMMARY_FILE).is_file() else []
    candidates = (
        candidates or sorted(eval_dir.glob(f"**/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime)[-1:]
    )
    if not candidates:
        raise FileNotFoundError(f"run {run.label}: no {EVAL_DIR}/{SUMMARY_FILE} in {run.run_dir}")
    frame = pd.read_csv(candidates[0])
    frame["benchmark"] = frame["benchmark"].astype(str)
    return frame


def group_runs(summaries: Sequence[tuple[Run, pd.DataFrame]]) -> list[Group]:
    """Runs grouped by (model, method), in order of first appearance."""
    grouped: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for run, summary in summaries:
        grouped.setdefault((Path(run.model).name, run.method), []).append(summary)
    return [Group(model, method, tuple(frames)) for (model, method), frames in grouped.items()]


def benchmarks(groups: Sequence[Group]) -> list[str]:
    """Benchmarks in order of first appearance, ``average`` last."""
    names = dict.fromkeys(b for g in groups for s in g.summaries for b in s["benchmark"] if b != AVERAGE)
    return [*names, AVERAGE]


def combine(summaries: Sequence[pd.DataFrame], benchmark: str) -> dict[str, float] | None:
    """One benchmark over seeds (module docstring): mean, ci_low, ci_high, stderr, seeds."""
    rows = [s[s["benchmark"] == benchmark].iloc[0] for s in summaries if (s["benchmark"] == benchmark).any()]
    if not rows:
        return None
    values = np.array([float(r["avg_at_k"]) for r in rows])
    if len(values) == 1:
        row = rows[0]
        return {
            "mean": values[0],
            "ci_low": float(row["ci95_low"]),
            "ci_high": float(row["ci95_high"]),
            "stderr": float(row["stderr"]),
            "seeds": 1,
        }
    from scipy.stats import t

    stderr = float(values.std(ddof=1) / math.sqrt(len(values)))
    half = float(t.ppf(0.975, len(values) - 1)) * stderr
    mean = float(values.mean())
    return {
        "mean": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "stderr": stderr,
        "seeds": len(values),
    }


def table2(groups: Sequence[Group]) -> pd.DataFrame:
    """Long table: model, method, benchmark, mean, ci_low, ci_high, stderr, seeds, interval, paper
    (fractions; ``paper`` is the paper's average for the ``average`` row when comparable, else NaN)."""
    rows = []
    names = benchmarks(groups)
    for group in groups:
        comparable = paper_comparable(group)
        for benchmark in names:
            cell = combine(group.summaries, benchmark)
            if cell is None:
                continue
            paper = PAPER_TABLE2[group.model.lower()].get(group.method) if comparable else None
            rows.append(
                {
                    "model": group.model,
                    "method": group.method,
                    "benchmark": benchmark,
                    **cell,
                    "interval": "seeds" if cell["seeds"] > 1 else "problems",
                    "paper": paper / 100 if paper is not None and benchmark == AVERAGE else math.nan,
                }
            )
    return pd.DataFrame(rows)


def normalize_benchmark(name: str) -> str:
    """Benchmark name without path, case and punctuation, ``aime2025`` as ``aime25``."""
    key = re.sub(r"[^a-z0-9]", "", name.lower().rsplit("/", 1)[-1])
    return re.sub(r"^aime20(\d\d)$", r"aime\1", key)


def paper_comparable(group: Group) -> bool:
    """Whether the group's model is the paper's and each of its summaries has the paper's benchmarks."""
    if group.model.lower() not in PAPER_TABLE2:
        return False
    return all(
        {normalize_benchmark(b) for b in s["benchmark"] if b != AVERAGE} == PAPER_BENCHMARKS
        for s in group.summaries
    )


def ablation(table: pd.DataFrame, method: str = "ctpo", baseline: str = "ctpo-fixed") -> pd.DataFrame | None:
    """Per (model, benchmark): ``method`` and ``baseline`` avg@k and their difference with its 95%
    interval (module docstring); None when no model has both methods."""
    rows = []
    for (model, benchmark), cells in table.groupby(["model", "benchmark"], sort=False):
        by_method = cells.set_index("method")
        if method not in by_method.index or baseline not in by_method.index:
            continue
        a, b = by_method.loc[method], by_method.loc[baseline]
        delta = float(a["mean"] - b["mean"])
        half = _difference_quantile(a, b) * math.hypot(a["stderr"], b["stderr"])
        paper = PAPER_TABLE2.get(str(model).lower(), {})
        paper_delta = (
            (paper[method] - paper[baseline]) / 100
            if benchmark == AVERAGE and not math.isnan(a["paper"]) and not math.isnan(b["paper"])
            else math.nan
        )
        rows.append(
            {
                "model": model,
                "benchmark": benchmark,
                method: a["mean"],
                baseline: b["mean"],
                "delta": delta,
                "ci_low": delta - half,
                "ci_high": delta + half,
                "paper_delta": paper_delta,
            }
        )
    return pd.DataFrame(rows) if rows else None


def _difference_quantile(a: pd.Series, b: pd.Series) -> float:
    """Welch t quantile (97.5%) when both sides are seed means, else the normal one."""
    if a["seeds"] < 2 or b["seeds"] < 2:
        return Z95
    from scipy.stats import t

    va, vb = a["stderr"] ** 2, b["stderr"] ** 2
    if va + vb == 0:
        return Z95
    dof = (va + vb) ** 2 / (va**2 / (a["seeds"] - 1) + vb**2 / (b["seeds"] - 1))
    return float(t.ppf(0.975, dof))


def behaviour(groups: Sequence[Group]) -> pd.DataFrame:
    """Per group, the mean over seeds of the ``average`` row's behaviour columns that exist."""
    rows = []
    for group in groups:
        averages = pd.DataFrame(
            [s[s["benchmark"] == AVERAGE].iloc[0] for s in group.summaries if AVERAGE in set(s["benchmark"])]
        )
        present = [c for c in BEHAVIOUR_COLUMNS if c in averages.columns]
        if averages.empty or not present:
            continue
        means = averages[present].astype(float).mean()
        rows.append({"model": group.model, "method": group.method, **means.to_dict()})
    return pd.DataFrame(rows)


def cell_text(mean: float, low: float, high: float) -> str:
    """``51.4 [48.0, 54.8]`` from fractions (shown in %)."""
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def table2_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 as strings: one row per (model, method), one column per benchmark, then seeds and
    the paper's average when comparable."""
    rows = []
    for (model, method), cells in table.groupby(["model", "method"], sort=False):
        row = {"model": model, "method": method}
        for cell in cells.itertuples():
            row[str(cell.benchmark)] = cell_text(cell.mean, cell.ci_low, cell.ci_high)
        row["seeds"] = str(int(cells["seeds"].max()))
        paper = cells["paper"].dropna()
        row["paper avg"] = f"{100 * paper.iloc[0]:.1f}" if not paper.empty else "–"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–")


def ablation_display(frame: pd.DataFrame, method: str = "ctpo", baseline: str = "ctpo-fixed") -> pd.DataFrame:
    """The ablation as strings (percentages)."""
    return pd.DataFrame(
        {
            "model": frame["model"],
            "benchmark": frame["benchmark"],
            method: [f"{100 * v:.1f}" for v in frame[method]],
            baseline: [f"{100 * v:.1f}" for v in frame[baseline]],
            f"Δ {method} − {baseline}": [
                f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                for d, lo, hi in zip(frame["delta"], frame["ci_low"], frame["ci_high"], strict=True)
            ],
            "paper Δ": ["–" if math.isnan(p) else f"{100 * p:+.1f}" for p in frame["paper_delta"]],
        }
    )


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a frame of strings."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
