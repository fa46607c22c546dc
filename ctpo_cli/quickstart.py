"""``ctpo quickstart``: the whole comparison on one CPU, with no GPU and no downloads.

Every method trains from the same warm-started tiny policy on the same problems and seed (local
backend), is evaluated with ``ctpo eval``'s machinery (avg@k on held-out synthetic problems), and
the analysis module draws the std-growth, clip-rate and training-curve figures and the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from ctpo_cli.algo.losses import METHODS
from ctpo_cli.runs import rundir
from ctpo_cli.train.local.config import build_config
from ctpo_cli.train.local.task import DATA_SOURCE, write_eval_set
from ctpo_cli.train.local.train import starting_checkpoint, train_local

QUICKSTART_EVAL = Path("eval") / "quickstart"
"""Where the held-out eval goes inside each run, beside what a later `ctpo eval` writes to eval/."""
QUICKSTART_DIR = "quickstart"
"""Under the runs directory: the held-out problems and the starting policy's eval."""
START_EVAL = "start-policy-eval"
"""The starting (warm-started) policy's held-out eval, under ``runs/quickstart/``: the baseline."""


def quickstart(
    seed: int = 0,
    preset: str = "tiny",
    methods: Sequence[str] = tuple(METHODS),
    overrides: Sequence[str] = (),
    samples: int = 8,
    runs_dir: Path = rundir.RUNS_DIR,
    figures_dir: Path = Path("figures"),
    console: Console | None = None,
) -> pd.DataFrame:
    """Train, evaluate, plot and compare ``methods``; returns the comparison table."""
    from analysis import commands
    from ctpo_cli.eval.runner import run_eval
    from ctpo_cli.eval.settings import EvalSettings

    console = console or Console()
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    config = build_config(preset, list(overrides))
    began = time.perf_counter()
    console.rule("[bold]ctpo quickstart")
    console.print(
        f"Training {', '.join(methods)} with the local backend (preset {preset!r}, seed {seed}) on the same\n"
        "synthetic counting task, then avg@k on held-out problems, figures and a report.\n"
    )
    runs = {}
    for method in methods:
        console.rule(f"[bold]{method}")
        runs[method] = train_local(
            method, seed=seed, preset=preset, overrides=list(overrides), runs_dir=runs_dir, console=console
        )

    console.rule("[bold]held-out evaluation (ctpo eval)")
    benchmark = write_eval_set(runs_dir / QUICKSTART_DIR / f"{DATA_SOURCE}.parquet", config.task, seed)
    start_eval = runs_dir / QUICKSTART_DIR / START_EVAL

    def evaluate(model: Path, out: Path) -> None:
        settings = EvalSettings(
            model=str(model),
            benchmarks=(str(benchmark),),
            n=samples,
            temperature=config.rl.temperature,
            max_tokens=config.rl.max_new_tokens,
            tools=False,
            prompt_as_is=True,  # the prompts the policy was trained on, no system prompt
            reward="strict",  # the reward the local engine trains with
            backend="hf",
            out=out,
            seed=seed,
        )
        run_eval(settings, console)

    evaluate(starting_checkpoint(config, None, seed, runs_dir), start_eval)
    for run in runs.values():
        evaluate(run / rundir.CHECKPOINT_DIR, run / QUICKSTART_EVAL)

    console.rule("[bold]figures and report")
    options = commands.Options(out=Path(figures_dir), console=console)
    run_args = [str(run) for run in runs.values()]
    commands.std_growth(run_args, [], False, "linear", options)
    commands.clip_rate(run_args, [], False, 12, options)
    commands.curves(run_args, 3, options)
    commands.run_report([str(start_eval), *run_args], options)

    table = comparison(runs, start_eval)
    show(table, console, samples, time.perf_counter() - began)
    table.to_csv(Path(figures_dir) / "quickstart_comparison.csv", index=False)
    return table


def comparison(runs: dict[str, Path], start_eval: Path) -> pd.DataFrame:
    """One row per method: held-out avg@k after RL and its gain over the starting policy (paired
    over problems, 95% interval), training reward, clipping, drift and throughput.

    The first row, ``start``, is the warm-started policy every method began from.
    """
    from analysis.report import Z95, paired_deltas, read_eval

    start = read_eval(start_eval)
    assert start.problems is not None  # ctpo eval writes per_problem.csv
    rows: list[dict[str, object]] = [{"method": "start", **_heldout(start.summary), "run": str(start_eval)}]
    for method, run in runs.items():
        metrics = rundir.read_metrics(run)
        train = metrics[metrics["step"] > 0]
        result = read_eval(run / QUICKSTART_EVAL)
        assert result.problems is not None
        ((gain, stderr, _),) = paired_deltas(result.problems, start.problems).values()
        head, tail = train.head(5), train.tail(5)
        rows.append(
            {
                "method": method,
                **_heldout(result.summary),
                "gain": gain,
                "gain_ci95_low": gain - Z95 * stderr,
                "gain_ci95_high": gain + Z95 * stderr,
                "reward_first5": float(head["reward/mean"].mean()),
                "reward_last5": float(tail["reward/mean"].mean()),
                "clipfrac": float(train["actor/pg_clipfrac"].mean()),
                "ppo_kl": float(train["actor/ppo_kl"].mean()),
                "tokens_per_s": float(train["perf/tokens_per_s"].mean()),
                "run": str(run),
            }
        )
    return pd.DataFrame(rows)


def _heldout(summary: pd.DataFrame) -> dict[str, float]:
    """avg@k and its 95% interval from an eval summary (its only benchmark: the held-out set)."""
    row = summary.iloc[-1]
    return {
        "heldout_avg_at_k": float(row["avg_at_k"]),
        "heldout_ci95_low": float(row["ci95_low"]),
        "heldout_ci95_high": float(row["ci95_high"]),
    }


def show(table: pd.DataFrame, console: Console, samples: int, seconds: float) -> None:
    """The comparison as a Rich table (``start`` first: the policy every method began from)."""
    out = Table(title=f"ctpo quickstart: {seconds / 60:.1f} min")
    for column in (
        "method",
        f"held-out avg@{samples} (95% CI)",
        "gain over start (paired 95% CI)",
        "train reward, first 5 → last 5 steps",
        "clip frac",
        "ppo KL",
        "tokens/s",
    ):
        out.add_column(column, justify="left" if column == "method" else "right")
    for row in table.itertuples(index=False):
        heldout = f"{row.heldout_avg_at_k:.1%} ({row.heldout_ci95_low:.1%}, {row.heldout_ci95_high:.1%})"
        gain = f"{row.gain:+.1%} ({100 * row.gain_ci95_low:+.1f}, {100 * row.gain_ci95_high:+.1f})"
        if row.method == "start":
            out.add_row("start (warm start)", heldout, *[""] * 5)
            continue
        out.add_row(
            row.method,
            heldout,
            gain,
            f"{row.reward_first5:.1%} → {row.reward_last5:.1%}",
            f"{row.clipfrac:.3f}",
            f"{row.ppo_kl:.2e}",
            f"{row.tokens_per_s:,.0f}",
        )
    console.print(out)
