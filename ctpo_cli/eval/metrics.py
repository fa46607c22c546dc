"""Metrics of ``ctpo eval`` and the tables it writes and prints.

For each benchmark, every problem gets ``n`` sampled trajectories (a ``ctpo_cli.tir.protocol`` protocol),
each scored under both rewards of ``ctpo_cli.tir.scoring``: the authors' (any of verl's scorers accepts the
whole response; ``correct_authors``, comparable to the paper's Table 2) and the strict one (the final
``\\boxed{}`` of the assistant text under math-verify; ``correct_strict``), reported side by side; the
headline columns (avg@k, CI, pass@k) use ``correct``, the one ``--reward`` names (default: the authors').

Metrics per benchmark (P problems, problem i with n_i samples of which c_i are correct, p_i = c_i/n_i;
the headline reward unless ``_authors`` / ``_strict``):

    avg@k      = (1/P) sum_i p_i                        the paper's avg@32 (k = n); avg_at_k_<reward> likewise
    stderr     = sd(p_1..p_P) / sqrt(P)                  (sample sd, ddof = 1)
    ci95       = avg@k -/+ 1.96 stderr, clipped to [0, 1]
    pass@k     = (1/P) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)]     unbiased (Chen et al. 2021), k = 1, 2, 4, ..., n

The interval treats the problems as the sampling unit (a benchmark as a sample from a population of
similar problems); with 30 problems it is wide (often +/- 8 points), and it ignores the (smaller)
sampling noise within each problem. Also: mean assistant turns and tool calls per sample, tool error
rate (failed executions / executions), mean response tokens (assistant + tool output) and the number of
crashed samples. A sample that failed (its server or sandbox still erred after retries) is no answer:
it is left out of every formula above (n_i counts the samples that finished; a problem none of whose
samples finished is left out), counted in ``n_errors`` and named in ``failed_samples``, and rerunning
the same command generates it again. The ``average`` row is the unweighted mean over benchmarks, with
stderr = sqrt(sum_b stderr_b^2) / B (independent benchmarks).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from ctpo_cli.eval.settings import PER_PROBLEM_FILE, SUMMARY_FILE, SUMMARY_MD, EvalSettings
from ctpo_cli.runs import atomic, tracking
from ctpo_cli.runs.atomic import atomic_path
from ctpo_cli.tir.scoring import REWARDS


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k) / C(n, k) (n samples, c correct, k <= n)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def problem_table(benchmark: str, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per problem of the finished samples: samples, correct, pass rate, means of the sample stats."""
    frame = pd.DataFrame(
        [
            {
                k: r[k]
                for k in (
                    "problem_id",
                    "ground_truth",
                    "correct",
                    "correct_authors",
                    "correct_strict",
                    "num_turns",
                    "tool_calls",
                    "response_tokens",
                )
            }
            for r in records
        ]
    )
    grouped = frame.groupby("problem_id", sort=False)
    table = pd.DataFrame(
        {
            "benchmark": benchmark,
            "problem_id": list(grouped.groups),
            "ground_truth": grouped["ground_truth"].first().to_numpy(),
            "n_samples": grouped.size().to_numpy(),
            "n_correct": grouped["correct"].sum().to_numpy().astype(int),
            "n_correct_authors": grouped["correct_authors"].sum().to_numpy().astype(int),
            "n_correct_strict": grouped["correct_strict"].sum().to_numpy().astype(int),
            "mean_turns": grouped["num_turns"].mean().to_numpy(),
            "mean_tool_calls": grouped["tool_calls"].mean().to_numpy(),
            "mean_response_tokens": grouped["response_tokens"].mean().to_numpy(),
        }
    )
    table.insert(5, "pass_rate", table["n_correct"] / table["n_samples"])
    table.insert(7, "pass_rate_authors", table["n_correct_authors"] / table["n_samples"])
    table.insert(9, "pass_rate_strict", table["n_correct_strict"] / table["n_samples"])
    return table


def benchmark_summary(
    benchmark: str, records: Sequence[dict[str, Any]], problems: pd.DataFrame
) -> dict[str, Any]:
    """The summary row of one benchmark (see the module docstring for the formulas)."""
    rates = problems["pass_rate"].to_numpy()
    count = len(rates)
    avg = float(rates.mean())
    stderr = _stderr(rates)
    k_max = int(problems["n_samples"].min())
    calls = sum(r["tool_calls"] for r in records)
    row: dict[str, Any] = {
        "benchmark": benchmark,
        "n_problems": count,
        "n_samples": len(records),
        "k": k_max,
        "avg_at_k": avg,
        "stderr": stderr,
        **ci95(avg, stderr),
    }
    for reward in REWARDS:
        rates_of = problems[f"pass_rate_{reward}"].to_numpy()
        row |= {f"avg_at_k_{reward}": float(rates_of.mean()), f"stderr_{reward}": _stderr(rates_of)}
    for k in ks_for(k_max):
        row[f"pass_at_{k}"] = (
            sum(
                pass_at_k(int(n), int(c), k)
                for n, c in zip(problems["n_samples"], problems["n_correct"], strict=True)
            )
            / count
        )
    row |= {
        "mean_turns": sum(r["num_turns"] for r in records) / len(records),
        "mean_tool_calls": calls / len(records),
        "tool_error_rate": sum(r["tool_errors"] for r in records) / calls if calls else math.nan,
        "mean_response_tokens": sum(r["response_tokens"] for r in records) / len(records),
    }
    return row


def _stderr(rates: Any) -> float:
    """sd(p_1..p_P) / sqrt(P) (ddof 1); NaN with one problem."""
    return float(rates.std(ddof=1) / math.sqrt(len(rates))) if len(rates) > 1 else math.nan


def ci95(avg: float, stderr: float) -> dict[str, float]:
    """avg -/+ 1.96 stderr, clipped to [0, 1] (a pass rate cannot leave it); NaN with one problem."""
    if math.isnan(stderr):
        return {"ci95_low": math.nan, "ci95_high": math.nan}
    return {"ci95_low": max(0.0, avg - 1.96 * stderr), "ci95_high": min(1.0, avg + 1.96 * stderr)}


def average_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over benchmarks; stderr = sqrt(sum stderr_b^2) / B; counts are summed."""
    frame = pd.DataFrame(rows)
    row: dict[str, Any] = {"benchmark": "average"}
    for column in frame.columns.drop("benchmark"):
        if column == "failed_samples":
            continue
        summed = column in ("n_problems", "n_samples", "n_errors")
        row[column] = frame[column].sum() if summed else frame[column].mean(skipna=False)
    row["k"] = int(frame["k"].min())
    row["stderr"] = math.sqrt(float((frame["stderr"] ** 2).sum())) / len(frame)
    for reward in REWARDS:
        row[f"stderr_{reward}"] = math.sqrt(float((frame[f"stderr_{reward}"] ** 2).sum())) / len(frame)
    row |= ci95(row["avg_at_k"], row["stderr"])
    return row


def summarize(records_by_benchmark: dict[str, list[dict[str, Any]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per benchmark plus ``average``, per-problem table)."""
    rows, tables = [], []
    for benchmark, records in records_by_benchmark.items():
        finished = [r for r in records if r["error"] is None]
        failed = [r for r in records if r["error"] is not None]
        names = {
            "n_errors": len(failed),
            "failed_samples": " ".join(f"{r['problem_id']}#{r['sample']}" for r in failed),
        }
        if not finished:  # nothing to average: the row only counts and names the failures
            rows.append({"benchmark": benchmark, "n_problems": 0, "n_samples": 0, "k": 0} | names)
            continue
        problems = problem_table(benchmark, finished)
        per_problem = Counter(r["problem_id"] for r in failed)
        problems["n_errors"] = [per_problem[pid] for pid in problems["problem_id"]]
        rows.append(benchmark_summary(benchmark, finished, problems) | names)
        tables.append(problems)
    if len(rows) > 1:
        rows.append(average_row(rows))
    summary = pd.DataFrame(rows)
    pass_columns = sorted(
        (c for c in summary.columns if c.startswith("pass_at_")), key=lambda c: int(c.rsplit("_", 1)[1])
    )
    head = ["benchmark", "n_problems", "n_samples", "k", "avg_at_k", "stderr", "ci95_low", "ci95_high"]
    head += [f"{column}_{reward}" for reward in REWARDS for column in ("avg_at_k", "stderr")]
    tail = ["mean_turns", "mean_tool_calls", "tool_error_rate", "mean_response_tokens", "n_errors"]
    tail += ["failed_samples"]
    problems = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return summary.reindex(columns=head + pass_columns + tail), problems


# --------------------------------------------------------------------------------------------------
# Output


def _percent(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def display_rows(summary: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and cells shown in the terminal and in summary.md (rates in percent)."""
    passes = [c for c in summary.columns if c.startswith("pass_at_")]
    header = [
        "benchmark",
        "problems",
        "samples",
        "avg@k %",
        "95% CI",
        *[f"{reward} %" for reward in REWARDS],
        *[c.replace("pass_at_", "pass@") for c in passes],
        "turns",
        "tool calls",
        "tool err %",
        "resp. tokens",
        "crashed",
    ]
    cells = []
    for _, row in summary.iterrows():
        cells.append(
            [
                str(row["benchmark"]),
                str(int(row["n_problems"])),
                str(int(row["n_samples"])),
                f"{_percent(row['avg_at_k'])} ± {_percent(row['stderr'])}",
                f"[{_percent(row['ci95_low'])}, {_percent(row['ci95_high'])}]",
                *[f"{_percent(row[f'avg_at_k_{r}'])} ± {_percent(row[f'stderr_{r}'])}" for r in REWARDS],
                *[_percent(row[c]) for c in passes],
                f"{row['mean_turns']:.2f}",
                f"{row['mean_tool_calls']:.2f}",
                _percent(row["tool_error_rate"]),
                f"{row['mean_response_tokens']:.0f}",
                str(int(row["n_errors"])),
            ]
        )
    return header, cells


def write_outputs(out: Path, summary: pd.DataFrame, problems: pd.DataFrame, title: str) -> list[Path]:
    for frame, name in ((summary, SUMMARY_FILE), (problems, PER_PROBLEM_FILE)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    header, cells = display_rows(summary)
    lines = [
        f"# {title}",
        "",
        "avg@k ± stderr across problems, in percent. avg@k, CI and pass@k: the headline reward; authors: "
        "any of verl's math_reward, math_dapo, math_verify accepts the whole response; strict: the final "
        "\\boxed{} of the assistant text under math-verify.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    failed = summary.dropna(subset=["failed_samples"]).query("failed_samples != ''")
    if len(failed):
        lines += ["", "Failed samples (excluded from avg@k; run the same command again to retry them):", ""]
        lines += [f"- {row.benchmark}: {row.failed_samples}" for row in failed.itertuples()]
    atomic.write_text(out / SUMMARY_MD, "\n".join(lines) + "\n")
    return [out / SUMMARY_FILE, out / SUMMARY_MD, out / PER_PROBLEM_FILE]


def print_summary(console: Console, summary: pd.DataFrame, title: str) -> None:
    header, cells = display_rows(summary)
    table = Table(
        title=title,
        caption="avg@k ± stderr across problems (the 95% CI treats problems as the sampling unit); avg@k, "
        "CI and pass@k: the headline reward; authors and strict: each reward",
    )
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for i, row in enumerate(cells):
        table.add_row(*row, end_section=i == len(cells) - 2 and cells[-1][0] == "average")
    console.print(table)


def mlflow_params(settings: EvalSettings, backend: str, out: Path) -> dict[str, Any]:
    return {
        "model": settings.model,
        "benchmarks": ",".join(settings.benchmarks),
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_turns": settings.max_turns,
        "max_tokens": settings.max_tokens,
        "backend": backend,
        "tools": settings.tools,
        "tir": settings.tir,
        "reward": settings.reward,
        "seed": settings.seed,
        "rescore": settings.rescore,
        "out": str(out),
    }


def log_summary(run_id: str, summary: pd.DataFrame, files: Sequence[Path]) -> None:
    """``<benchmark>/<column>`` metrics of every finite summary value, and the files as artifacts."""
    metrics = {}
    for _, row in summary.iterrows():
        for column, value in row.items():
            skipped = ("benchmark", "n_problems", "n_samples", "k", "failed_samples")
            if column in skipped or not math.isfinite(float(value)):
                continue
            metrics[f"{row['benchmark']}/{column}"] = float(value)
    tracking.log_metrics(run_id, metrics)
    tracking.log_artifacts(run_id, files)
