"""The paper's tables from `ctpo eval` results: Table 2 (method x benchmark avg@k) and the ablation.

Input: per run, an eval directory written by ``ctpo eval`` (``<run_dir>/eval/`` by default, or the
``eval/<name>/`` one asked for): ``summary.csv`` (one row per benchmark, plus ``average`` when there
are several; avg@k as a fraction) and ``per_problem.csv`` (pass rate of every problem). An eval
directory outside any run (``ctpo eval --model M``: the base model) counts as method ``base``.

Runs are grouped by (model, method); the seeds of a group combine per benchmark as:

* k >= 2 seeds with values x_1..x_k: mean x̄ and the 95% interval x̄ ± t_{0.975, k-1} s / sqrt(k),
  s the sample std over seeds (seed-to-seed variation); standard error s / sqrt(k).
* k = 1: the summary's own 95% interval across problems (ci95_low, ci95_high) and its stderr.

Ablation (ctpo - ctpo-fixed per benchmark):

* one seed each and per-problem files for both: paired over problems, Δ = mean_i (p_i - q_i) with
  95% interval Δ ± 1.96 sd(p_i - q_i) / sqrt(P) (the same problems, so their difficulty cancels);
  the ``average`` row is the mean of the benchmark Δs with stderr sqrt(sum se_b^2) / B;
* otherwise Δ of the group means with Δ ± q sqrt(se_1^2 + se_2^2), q the Welch t quantile when both
  sides have >= 2 seeds, else 1.96.

The paper's Table 2 averages (avg@32 over AIME 2025, AIME 2026, HMMT Nov 2025, BRUMO 2025) are a
reference column when a group's model and benchmark set are the paper's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.aggregate import Z95, mean_interval
from analysis.runs import Run
from ctpo_cli.errors import DataError, InputFileError

EVAL_DIR = "eval"
SUMMARY_FILE = "summary.csv"
PER_PROBLEM_FILE = "per_problem.csv"
EVAL_CONFIG_FILE = "eval_config.json"
AVERAGE = "average"
BASE = "base"
PAPER_BENCHMARKS = frozenset({"aime25", "aime26", "hmmtnov2025", "brumo2025"})
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "qwen3-4b": {"base": 3.9, "grpo": 43.2, "gspo": 47.7, "ctpo": 51.4},
    "qwen3-14b": {"base": 6.1, "grpo": 54.6, "gspo": 55.5, "ctpo": 58.8, "ctpo-fixed": 55.7},
}
"""Paper Table 2 and ablation: avg@32 (%) averaged over the four benchmarks."""
PAPER_COLUMN = "paper avg@32"
BEHAVIOUR_COLUMNS = ("pass_at_1", "mean_turns", "mean_tool_calls", "tool_error_rate", "mean_response_tokens")


@dataclass(frozen=True)
class EvalResult:
    """One ``ctpo eval`` output directory."""

    path: Path
    summary: pd.DataFrame
    problems: pd.DataFrame | None


@dataclass(frozen=True)
class Group:
    """The evaluated runs of one (model, method)."""

    model: str
    method: str
    evals: tuple[EvalResult, ...]


def is_eval_dir(path: Path) -> bool:
    """Whether ``path`` is a ``ctpo eval`` output directory."""
    return (Path(path) / SUMMARY_FILE).is_file()


def read_eval(path: Path) -> EvalResult:
    """The summary and (if present) per-problem table of an eval directory; DataError naming a summary
    that is empty or damaged (never a method silently missing from the tables)."""
    try:
        summary = pd.read_csv(path / SUMMARY_FILE)
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"{path / SUMMARY_FILE} is damaged ({str(error).splitlines()[0]})") from None
    if summary.empty or "benchmark" not in summary.columns:
        raise DataError(f"{path / SUMMARY_FILE} has no results; run `ctpo eval` there again")
    summary["benchmark"] = summary["benchmark"].astype(str)
    per_problem = path / PER_PROBLEM_FILE
    problems = pd.read_csv(per_problem) if per_problem.is_file() else None
    return EvalResult(path, summary, problems)


def run_eval_dir(run: Run, name: str = "") -> Path:
    """The run's eval directory: ``eval/<name>`` when named, else ``eval/`` when it holds a summary,
    else the most recently written ``eval/**`` with one."""
    if run.run_dir is None:
        raise InputFileError(f"run {run.label} ({run.source}) has no run directory with eval results")
    root = run.run_dir / EVAL_DIR
    if name:
        if not is_eval_dir(root / name):
            raise InputFileError(f"run {run.label}: no {EVAL_DIR}/{name}/{SUMMARY_FILE} in {run.run_dir}")
        return root / name
    if is_eval_dir(root):
        return root
    found = sorted(root.glob(f"**/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputFileError(f"run {run.label}: no {EVAL_DIR}/{SUMMARY_FILE} in {run.run_dir}")
    return found[-1].parent


def base_run(path: Path) -> Run:
    """An eval directory outside any run as a run of method ``base`` (model from eval_config.json)."""
    config = path / EVAL_CONFIG_FILE
    model = str(json.loads(config.read_text()).get("model", path.name)) if config.is_file() else path.name
    return Run(name=path.name, method=BASE, model=model)


def group_runs(evaluated: Sequence[tuple[Run, EvalResult]]) -> list[Group]:
    """Runs grouped by (model, method), in order of first appearance."""
    grouped: dict[tuple[str, str], list[EvalResult]] = {}
    for run, result in evaluated:
        grouped.setdefault((Path(run.model).name, run.method), []).append(result)
    return [Group(model, method, tuple(results)) for (model, method), results in grouped.items()]


def benchmarks(groups: Sequence[Group]) -> list[str]:
    """Benchmarks in order of first appearance, ``average`` last (when any summary has it)."""
    names = dict.fromkeys(b for g in groups for e in g.evals for b in e.summary["benchmark"])
    return [b for b in names if b != AVERAGE] + ([AVERAGE] if AVERAGE in names else [])


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
    mean, stderr, half = mean_interval(values.tolist())
    return {
        "mean": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "stderr": stderr,
        "seeds": len(values),
    }


def table2(groups: Sequence[Group]) -> pd.DataFrame:
    """Long table: model, method, benchmark, mean, ci_low, ci_high, stderr, seeds, interval, paper
    (fractions; ``paper`` is the paper's average on the ``average`` row when comparable, else NaN)."""
    rows = []
    names = benchmarks(groups)
    for group in groups:
        paper = PAPER_TABLE2[group.model.lower()].get(group.method) if paper_comparable(group) else None
        for benchmark in names:
            cell = combine([e.summary for e in group.evals], benchmark)
            if cell is None:
                continue
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
        {normalize_benchmark(b) for b in e.summary["benchmark"] if b != AVERAGE} == PAPER_BENCHMARKS
        for e in group.evals
    )


def ablation(
    groups: Sequence[Group], table: pd.DataFrame, method: str = "ctpo", baseline: str = "ctpo-fixed"
) -> pd.DataFrame | None:
    """Per (model, benchmark): both methods' avg@k and Δ = method - baseline with its 95% interval
    (paired over problems when possible, see the module docstring); None when no model has both."""
    by_key = {(g.model, g.method): g for g in groups}
    frames = []
    for model in dict.fromkeys(g.model for g in groups):
        a, b = by_key.get((model, method)), by_key.get((model, baseline))
        if a is None or b is None:
            continue
        cells = table[table["model"] == model].set_index(["method", "benchmark"])
        paired = _paired(a, b)
        rows = []
        for benchmark in dict.fromkeys(table.loc[table["model"] == model, "benchmark"]):
            if (method, benchmark) not in cells.index or (baseline, benchmark) not in cells.index:
                continue
            x, y = cells.loc[(method, benchmark)], cells.loc[(baseline, benchmark)]
            delta, half, basis = (
                paired[benchmark] if paired is not None and benchmark in paired else _unpaired(x, y)
            )
            rows.append(
                {
                    "model": model,
                    "benchmark": benchmark,
                    method: x["mean"],
                    baseline: y["mean"],
                    "delta": delta,
                    "ci_low": delta - half,
                    "ci_high": delta + half,
                    "interval": basis,
                    "paper_delta": (x["paper"] - y["paper"]) if benchmark == AVERAGE else math.nan,
                }
            )
        frames.append(pd.DataFrame(rows))
    return pd.concat(frames, ignore_index=True) if frames else None


def _unpaired(x: pd.Series, y: pd.Series) -> tuple[float, float, str]:
    """Δ of two group means, the half-width of its 95% interval, and the interval's basis."""
    delta = float(x["mean"] - y["mean"])
    both_seeds = x["seeds"] >= 2 and y["seeds"] >= 2
    quantile = _welch_quantile(x, y) if both_seeds else Z95
    return (
        delta,
        quantile * math.hypot(x["stderr"], y["stderr"]),
        "seeds (Welch)" if both_seeds else "independent",
    )


def _welch_quantile(x: pd.Series, y: pd.Series) -> float:
    """The 97.5% t quantile with Welch-Satterthwaite degrees of freedom."""
    from scipy.stats import t

    vx, vy = x["stderr"] ** 2, y["stderr"] ** 2
    if vx + vy == 0:
        return Z95
    dof = (vx + vy) ** 2 / (vx**2 / (x["seeds"] - 1) + vy**2 / (y["seeds"] - 1))
    return float(t.ppf(0.975, dof))


def paired_deltas(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, tuple[float, float, int]]:
    """Per benchmark, over the P >= 2 problems both per-problem tables hold: Δ = mean_i (p_i - q_i)
    of the pass rates, its standard error sd(p_i - q_i) / sqrt(P), and P."""
    both = a.merge(b, on=["benchmark", "problem_id"], suffixes=("_a", "_b"))
    out: dict[str, tuple[float, float, int]] = {}
    for benchmark, rows in both.groupby("benchmark", sort=False):
        diff = (rows["pass_rate_a"] - rows["pass_rate_b"]).to_numpy(dtype=float)
        if len(diff) >= 2:
            out[str(benchmark)] = (
                float(diff.mean()),
                float(diff.std(ddof=1) / math.sqrt(len(diff))),
                len(diff),
            )
    return out


def _paired(a: Group, b: Group) -> dict[str, tuple[float, float, str]] | None:
    """Per benchmark (and ``average`` over several): paired Δ over problems and its 95% half-width,
    when both groups are one seed with per-problem files."""
    if len(a.evals) != 1 or len(b.evals) != 1 or a.evals[0].problems is None or b.evals[0].problems is None:
        return None
    out: dict[str, tuple[float, float, str]] = {}
    errors = []
    for benchmark, (delta, stderr, count) in paired_deltas(a.evals[0].problems, b.evals[0].problems).items():
        out[benchmark] = (delta, Z95 * stderr, f"paired, {count} problems")
        errors.append(stderr)
    if len(out) > 1:
        mean = float(np.mean([d for d, _, _ in out.values()]))
        stderr = math.sqrt(sum(e**2 for e in errors)) / len(errors)
        out[AVERAGE] = (mean, Z95 * stderr, f"paired, {len(out)} benchmarks")
    return out


def overall_row(summary: pd.DataFrame) -> pd.Series | None:
    """The summary's ``average`` row, or its only row when it has one benchmark."""
    rows = summary[summary["benchmark"] == AVERAGE]
    if rows.empty and len(summary) == 1:
        rows = summary
    return rows.iloc[0] if not rows.empty else None


def behaviour(groups: Sequence[Group]) -> pd.DataFrame:
    """Per group, the mean over seeds of the overall row's behaviour columns that exist."""
    rows = []
    for group in groups:
        overall = [r for r in (overall_row(e.summary) for e in group.evals) if r is not None]
        frame = pd.DataFrame(overall)
        present = [c for c in BEHAVIOUR_COLUMNS if c in frame.columns]
        if frame.empty or not present:
            continue
        means = frame[present].astype(float).mean()
        rows.append({"model": group.model, "method": group.method, **means.to_dict()})
    return pd.DataFrame(rows)


def cell_text(mean: float, low: float, high: float) -> str:
    """``51.4 [48.0, 54.8]`` from fractions (shown in %); the interval left out when unknown."""
    if math.isnan(low) or math.isnan(high):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def table2_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 as strings: one row per (model, method), one column per benchmark, then seeds and
    the paper's average when comparable."""
    names = list(dict.fromkeys(table["benchmark"]))
    rows = []
    for (model, method), cells in table.groupby(["model", "method"], sort=False):
        row = {"model": model, "method": method, **dict.fromkeys(names, "–")}
        for cell in cells.itertuples():
            row[str(cell.benchmark)] = cell_text(cell.mean, cell.ci_low, cell.ci_high)
        row["seeds"] = str(int(cells["seeds"].max()))
        paper = cells["paper"].dropna()
        row[PAPER_COLUMN] = f"{100 * paper.iloc[0]:.1f}" if not paper.empty else "–"
        rows.append(row)
    return pd.DataFrame(rows)


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
            "interval": frame["interval"],
            "paper Δ": ["–" if math.isnan(p) else f"{100 * p:+.1f}" for p in frame["paper_delta"]],
        }
    )


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a frame of strings."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
