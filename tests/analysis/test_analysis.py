"""analysis/ and `ctpo plot` / `ctpo report` on data with known statistics.

Per-position files are produced by the real accumulator (ctpo_cli.algo.diagnostics.PositionStats) from
cumulative sums of iid N(0, sigma^2) log ratios, so std(K_t) = sigma sqrt(t) exactly in expectation
and every clip rate is a Gaussian tail probability. Tolerances come from the sampling error of the
simulated data, not from the code under test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from analysis import positions, report
from analysis.curves import CURVES, curve_series, seed_band
from analysis.runs import Run, load_metrics, load_positions, resolve_runs
from ctpo_cli.algo import diagnostics
from ctpo_cli.cli import app
from ctpo_cli.errors import UserError
from ctpo_cli.runs import rundir

A_LOW, A_HIGH, POWER = diagnostics.SQRT_WINDOW
FIXED_LOW, FIXED_HIGH = diagnostics.FIXED_WINDOW
SEQUENCES = 1500
ONPOLICY_SEQUENCES = 100
MAX_LEN = 512
SIGMAS = {10: 0.015, 20: 0.020, 30: 0.030}
"""Synthetic off-policy sigma of the per-token log ratio at each step."""
ONPOLICY_SIGMA = 1e-4


def tail(x: float) -> float:
    """P(Z > x) for a standard normal Z."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


# ---------------------------------------------------------------------------------------------
# synthetic runs


@dataclass(frozen=True)
class Synthetic:
    run_dir: Path
    lengths: np.ndarray
    onpolicy_lengths: np.ndarray

    def tokens_at(self, onpolicy: bool = False) -> np.ndarray:
        """n_t for t = 1..MAX_LEN, from the generated lengths (independent of the files)."""
        lengths = self.onpolicy_lengths if onpolicy else self.lengths
        t = np.arange(1, MAX_LEN + 1)
        return (lengths[None, :] >= t[:, None]).sum(axis=1)


def record_plane(
    stats: diagnostics.PositionStats, sigma: float, lengths: np.ndarray, gen: torch.Generator
) -> None:
    """Feed ``stats`` responses with iid N(0, sigma^2) per-token log ratios, in micro-batches."""
    position = torch.arange(1, MAX_LEN + 1, dtype=torch.float64).expand(500, MAX_LEN)
    for start in range(0, len(lengths), 500):
        chunk = torch.as_tensor(lengths[start : start + 500])
        d = sigma * torch.randn(len(chunk), MAX_LEN, generator=gen, dtype=torch.float64)
        mask = (position[: len(chunk)] <= chunk[:, None]).double()
        d = d * mask
        k = d.cumsum(dim=1)
        own = torch.zeros_like(k, dtype=torch.bool)
        stats.record(k, d, mask.cumsum(dim=1), mask, own, own)  # t counts model tokens, as the loss's


def write_synthetic_run(
    run_dir: Path, method: str, seed: int, sigmas: dict[int, float], sequences: int = SEQUENCES
) -> Synthetic:
    """A run directory whose per-position files hold ``sequences`` off-policy responses per step with
    per-token sigma ``sigmas[step]`` and, in the on-policy plane, the first ONPOLICY_SEQUENCES of each
    rank with sigma 1e-4; two ranks; lengths uniform in [MAX_LEN/2, MAX_LEN]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MAX_LEN // 2, MAX_LEN + 1, size=sequences)
    gen = torch.Generator().manual_seed(seed)
    rundir.write_run_info(
        run_dir, {"method": method, "seed": seed, "model": "tiny", "started": f"2026-01-0{seed + 1}"}
    )
    halves = (lengths[: sequences // 2], lengths[sequences // 2 :])
    for step, sigma in sigmas.items():
        for rank, part in enumerate(halves):
            stats = diagnostics.PositionStats(run_dir, rank=rank)
            record_plane(stats, ONPOLICY_SIGMA, part[:ONPOLICY_SEQUENCES], gen)
            stats.end_minibatch()
            record_plane(stats, sigma, part, gen)
            stats.flush(step)
    onpolicy = np.concatenate([half[:ONPOLICY_SEQUENCES] for half in halves])
    return Synthetic(run_dir, lengths, onpolicy)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "ctpo-tiny-s0", "ctpo", 0, SIGMAS)


@pytest.fixture(scope="module")
def offpolicy(synthetic: Synthetic) -> pd.DataFrame:
    return positions.select_plane(diagnostics.read_positions(synthetic.run_dir))


# ---------------------------------------------------------------------------------------------
# per-position statistics


def test_std_is_the_unbiased_sample_std() -> None:
    # K values {1, 3} at t=1 and {2, 2, 5} at t=2: sample stds sqrt(2) and sqrt(3).
    rows = pd.DataFrame({"position": [1, 2], "n": [2, 3], "k_sum": [4.0, 9.0], "k_sumsq": [10.0, 33.0]})
    std = positions.std_by_position(rows)
    assert std["std"].tolist() == pytest.approx([math.sqrt(2.0), math.sqrt(3.0)])
    assert std["mean"].tolist() == pytest.approx([2.0, 3.0])


def test_default_plane_is_offpolicy_and_ranks_are_summed(
    synthetic: Synthetic, offpolicy: pd.DataFrame
) -> None:
    n_t = synthetic.tokens_at()
    step = offpolicy[offpolicy["step"] == 10].sort_values("position")
    assert step["n"].to_numpy() == pytest.approx(n_t)  # both ranks, off-policy plane only
    both = positions.select_plane(diagnostics.read_positions(synthetic.run_dir), include_onpolicy=True)
    both_n = both[both["step"] == 10].sort_values("position")["n"].to_numpy()
    assert both_n == pytest.approx(n_t + synthetic.tokens_at(onpolicy=True))
    onpolicy_only = diagnostics.read_positions(synthetic.run_dir).assign(offpolicy=False)
    with pytest.raises(ValueError, match="include-onpolicy"):
        positions.select_plane(onpolicy_only)


@pytest.mark.parametrize("step", sorted(SIGMAS))
def test_fitted_sigma_and_exponent(synthetic: Synthetic, offpolicy: pd.DataFrame, step: int) -> None:
    sigma = SIGMAS[step]
    fit = positions.fit_growth(positions.std_by_position(positions.step_rows(offpolicy, step)))
    # sigma_hat is the n_t-weighted mean of s_t / sqrt(t); sd(s_t / sqrt(t)) ~ sigma / sqrt(2 n_t), and
    # the sd of a weighted mean of correlated terms is at most the weighted mean of their sds.
    n_t = synthetic.tokens_at()
    se_bound = sigma * np.sum(n_t / np.sqrt(2 * n_t)) / np.sum(n_t)
    assert abs(fit.sigma - sigma) < 4 * se_bound
    assert fit.exponent == pytest.approx(0.5, abs=0.04)  # sd of b over simulated seeds: ~0.008
    assert fit.r2 > 0.99
    assert fit.positions == MAX_LEN


def expected_rate(n_t: np.ndarray, t: np.ndarray, rate: np.ndarray) -> float:
    return float(np.sum(n_t[t - 1] * rate[t - 1]) / np.sum(n_t[t - 1]))


def analytic_rates(sigma: float) -> dict[str, np.ndarray]:
    """P(K_t outside each window) per position t = 1..MAX_LEN, by direction, for K_t ~ N(0, sigma^2 t)."""
    scale = sigma * np.sqrt(np.arange(1, MAX_LEN + 1))
    ones = np.ones(MAX_LEN)
    rates = {
        "fixed_low": np.array([tail(-FIXED_LOW / s) for s in scale]),
        "fixed_high": np.array([tail(FIXED_HIGH / s) for s in scale]),
        "sqrt_low": tail(A_LOW / sigma) * ones,
        "sqrt_high": tail(A_HIGH / sigma) * ones,
    }
    rates["fixed"] = rates["fixed_low"] + rates["fixed_high"]
    rates["sqrt"] = rates["sqrt_low"] + rates["sqrt_high"]
    return rates


def test_binned_clip_rates_match_gaussian_tails(synthetic: Synthetic, offpolicy: pd.DataFrame) -> None:
    assert POWER == 0.5
    n_t = synthetic.tokens_at()
    truth = analytic_rates(SIGMAS[30])
    bins = positions.clip_rates(positions.step_rows(offpolicy, 30), bins=16)
    assert bins["n"].sum() == n_t.sum()
    assert bins["t_start"].iloc[0] == 1 and bins["t_end"].iloc[-1] == MAX_LEN
    for row in bins.itertuples():
        t = np.arange(row.t_start, row.t_end + 1)
        for column, rate in truth.items():
            p = expected_rate(n_t, t, rate)
            # Within a response the indicators are correlated; the variance of their mean is at most
            # p(1 - p), and responses are independent, so the bin rate has sd <= sqrt(p(1-p) / min n_t).
            tolerance = 4 * math.sqrt(p * (1 - p) / n_t[t - 1].min()) + 1e-12
            assert abs(getattr(row, column) - p) <= tolerance, (column, row.t_start, row.t_end)


def test_uniformity_fixed_window_rises_sqrt_window_flat(
    synthetic: Synthetic, offpolicy: pd.DataFrame
) -> None:
    n_t = synthetic.tokens_at()
    share = np.cumsum(n_t) / n_t.sum()
    first = np.flatnonzero(share - n_t / n_t.sum() < 0.25) + 1
    last = np.flatnonzero(share > 0.75) + 1
    truth = analytic_rates(SIGMAS[30])
    table = positions.uniformity(positions.step_rows(offpolicy, 30))
    for window in ("fixed", "sqrt"):
        early, late = expected_rate(n_t, first, truth[window]), expected_rate(n_t, last, truth[window])
        tol_early = 4 * math.sqrt(early * (1 - early) / n_t[first - 1].min())
        tol_late = 4 * math.sqrt(late * (1 - late) / n_t[last - 1].min())
        assert table.at[window, "early"] == pytest.approx(early, abs=tol_early)
        assert table.at[window, "late"] == pytest.approx(late, abs=tol_late)
        ratio_tol = (late / early) * (tol_early / early + tol_late / late) * 1.1
        assert table.at[window, "ratio"] == pytest.approx(late / early, abs=ratio_tol)
    assert table.at["fixed", "ratio"] > 3  # fixed window: late positions clipped far more often
    assert table.at["sqrt", "ratio"] == pytest.approx(1.0, abs=0.1)  # sqrt(t) window: uniform
    assert table.at["own", "early"] == 0 and math.isnan(table.at["own", "ratio"])


def test_step_choice() -> None:
    assert positions.nearest_steps([10, 20, 30, 40, 50], [12, 44, 15]) == [10, 40, 10]
    assert positions.spread_steps([50, 10, 20, 30, 40], 3) == [10, 30, 50]
    assert positions.spread_steps([7], 3) == [7, 7, 7]


# ---------------------------------------------------------------------------------------------
# run resolution and CLI errors


def test_latest_run_per_method_without_creating_an_mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, method, started in [
        ("a", "ctpo", "2026-01-01"),
        ("b", "ctpo", "2026-01-02"),
        ("c", "grpo", "2026-01-01"),
    ]:
        rundir.write_run_info(Path("runs") / name, {"method": method, "seed": 0, "started": started})
    runs = resolve_runs([])
    assert sorted((r.method, r.name) for r in runs) == [("ctpo", "b"), ("grpo", "c")]
    assert resolve_run_names(["c", "runs/a"]) == ["c", "a"]
    assert not (tmp_path / "mlflow.db").exists()


def resolve_run_names(args: list[str]) -> list[str]:
    return [r.name for r in resolve_runs(args)]


def test_cli_errors_are_one_liners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["plot", "clip-rate"])
    assert isinstance(result.exception, UserError)
    assert "no runs found" in str(result.exception) and "ctpo quickstart" in str(result.exception)
    result = runner.invoke(app, ["plot", "std-growth", "nope"])
    assert isinstance(result.exception, UserError) and "neither a run directory" in str(result.exception)
    rundir.write_run_info(tmp_path / "runs" / "bare", {"method": "grpo", "seed": 1})
    result = runner.invoke(app, ["plot", "std-growth", "bare", "--no-mlflow"])
    assert isinstance(result.exception, UserError)
    assert "no per-position diagnostics" in str(result.exception)
    result = runner.invoke(app, ["plot", "clip-rate", "bare", "--steps", "a,b"])
    assert isinstance(result.exception, UserError) and "--steps" in str(result.exception)


# ---------------------------------------------------------------------------------------------
# figures


def assert_figure(path: Path) -> None:
    """The PNG exists, is not tiny and not blank; the PDF beside it exists."""
    assert path.stat().st_size > 20_000
    pixels = imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05
    assert path.with_suffix(".pdf").stat().st_size > 5_000


def test_plot_position_figures(synthetic: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    second = write_synthetic_run(tmp_path / "grpo-tiny-s1", "grpo", 1, {12: 0.02, 24: 0.03}, sequences=200)
    runner = CliRunner()
    out = tmp_path / "figs"
    args = [str(synthetic.run_dir), str(second.run_dir), "--out", str(out), "--steps", "10,30"]
    result = runner.invoke(app, ["plot", "std-growth", *args])
    assert result.exit_code == 0, result.output
    assert_figure(out / "std_growth.png")
    fits = pd.read_csv(out / "std_growth_fits.csv")
    assert set(zip(fits["run"], fits["step"], strict=True)) == {
        ("ctpo-tiny-s0", 10),
        ("ctpo-tiny-s0", 30),
        ("grpo-tiny-s1", 12),
        ("grpo-tiny-s1", 24),
    }
    assert "wrote" in result.output and str(out / "std_growth.png") in result.output.replace("\n", "")
    result = runner.invoke(app, ["plot", "clip-rate", *args])
    assert result.exit_code == 0, result.output
    assert_figure(out / "clip_rate.png")
    table = pd.read_csv(out / "clip_rate_uniformity.csv")
    assert set(table["window"]) == {"fixed", "sqrt", "own"}


def test_curves_figure_from_metrics_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for seed, offset in ((0, 0.0), (1, 0.2)):
        run = tmp_path / "runs" / f"grpo-s{seed}"
        rundir.write_run_info(run, {"method": "grpo", "seed": seed, "started": f"2026-01-0{seed + 1}"})
        for step in range(1, 11):
            metrics = {
                "reward/mean": 0.1 * step + offset,
                "actor/pg_clipfrac": 0.01 * step,
                "actor/ppo_kl": 0.001 * step,
                "response_length/mean": 100 + step,
            }
            if step % 5 == 0:
                metrics["val/avg_at_k"] = 0.05 * step
            rundir.append_metrics(run, step, metrics)
    series = [curve_series(load_metrics(r), CURVES[0]) for r in resolve_runs(["grpo-s0", "grpo-s1"])]
    band = seed_band([s for s in series if s is not None])
    assert band.loc[3].tolist() == pytest.approx([0.4, 0.3, 0.5, 2])
    val = curve_series(load_metrics(resolve_runs(["grpo-s0"])[0]), CURVES[1])
    assert val is not None and val.to_dict() == pytest.approx({5: 0.25, 10: 0.5})
    result = CliRunner().invoke(
        app, ["plot", "curves", "grpo-s0", "grpo-s1", "--out", "figs", "--smooth", "3"]
    )
    assert result.exit_code == 0, result.output
    assert_figure(tmp_path / "figs" / "curves.png")


# ---------------------------------------------------------------------------------------------
# report


def write_summary(eval_dir: Path, values: dict[str, float], stderr: float = 0.02) -> None:
    """A ``ctpo eval`` summary.csv with these avg@k values (fractions), one row per benchmark."""
    rows = [
        {
            "benchmark": b,
            "n_problems": 30,
            "n_samples": 32,
            "avg_at_k": v,
            "stderr": stderr,
            "ci95_low": v - 1.96 * stderr,
            "ci95_high": v + 1.96 * stderr,
            "pass_at_1": v,
            "mean_turns": 2.0,
            "mean_tool_calls": 1.5,
            "tool_error_rate": 0.1,
            "mean_response_tokens": 900.0,
        }
        for b, v in values.items()
    ]
    eval_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(eval_dir / "summary.csv", index=False)


PAPER_SET = ("aime25", "aime26", "hmmt_nov_2025", "brumo_2025")


def make_eval_run(base: Path, method: str, seed: int, score: float) -> Path:
    run = base / f"{method}-s{seed}"
    rundir.write_run_info(
        run, {"method": method, "seed": seed, "model": "Qwen/Qwen3-14B", "started": f"2026-02-0{seed + 1}"}
    )
    values = {b: score + 0.01 * i for i, b in enumerate(PAPER_SET)}
    values["average"] = float(np.mean(list(values.values())))
    write_summary(run / "eval", values)
    return run


def test_report_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path / "runs"
    runs = [
        make_eval_run(base, "ctpo", 0, 0.50),
        make_eval_run(base, "ctpo", 1, 0.54),
        make_eval_run(base, "ctpo-fixed", 0, 0.46),
        make_eval_run(base, "ctpo-fixed", 1, 0.50),
        make_eval_run(base, "grpo", 0, 0.40),
    ]
    result = CliRunner().invoke(app, ["report", *map(str, runs), "--out", "out"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "report_table2.csv")
    ctpo = table[(table["method"] == "ctpo") & (table["benchmark"] == "aime25")].iloc[0]
    # two seeds 0.50 and 0.54: mean 0.52, sd 0.02 * sqrt(2), se 0.02, t_{0.975, 1} = 12.7062
    assert ctpo["mean"] == pytest.approx(0.52)
    assert ctpo["ci_high"] - ctpo["mean"] == pytest.approx(12.7062 * 0.02, rel=1e-4)
    assert ctpo["interval"] == "seeds" and ctpo["seeds"] == 2
    grpo = table[(table["method"] == "grpo") & (table["benchmark"] == "aime26")].iloc[0]
    assert (grpo["mean"], grpo["ci_low"], grpo["interval"]) == (
        pytest.approx(0.41),
        pytest.approx(0.41 - 0.0392),
        "problems",
    )
    average = table[table["benchmark"] == "average"].set_index("method")["paper"]
    assert average.to_dict() == pytest.approx({"ctpo": 0.588, "ctpo-fixed": 0.557, "grpo": 0.546})
    ablation = pd.read_csv(tmp_path / "out" / "report_ablation.csv")
    row = ablation[ablation["benchmark"] == "average"].iloc[0]
    # Δ = 0.04; equal se 0.02 each side -> Welch dof 2, t = 4.3027
    assert row["delta"] == pytest.approx(0.04)
    assert row["ci_high"] - row["delta"] == pytest.approx(4.3027 * 0.02 * math.sqrt(2), rel=1e-4)
    assert row["paper_delta"] == pytest.approx(0.031)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| ctpo |" in markdown.replace("| Qwen3-14B ", "") and "52.0 [" in markdown


def group_of(model: str, benchmarks: list[str]) -> report.Group:
    summary = pd.DataFrame({"benchmark": benchmarks, "avg_at_k": 0.5})
    return report.Group(model, "ctpo", (report.EvalResult(Path("."), summary, None),))


def test_report_is_not_compared_to_the_paper_on_other_benchmarks() -> None:
    assert not report.paper_comparable(group_of("Qwen3-14B", ["aime24", "average"]))
    names = ["math-ai/aime2025", "AIME26", "hmmt-nov-2025", "brumo_2025", "average"]
    assert report.paper_comparable(group_of("Qwen3-14B", names))
    assert not report.paper_comparable(group_of("Qwen3-4B-Instruct-2507", names))


def write_problems(eval_dir: Path, rates: list[float]) -> None:
    pd.DataFrame(
        {
            "benchmark": "count",
            "problem_id": [f"p{i}" for i in range(len(rates))],
            "n_samples": 4,
            "pass_rate": rates,
        }
    ).to_csv(eval_dir / "per_problem.csv", index=False)


def test_report_paired_ablation_named_eval_and_base_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rates = {"ctpo": [0.5, 0.75, 1.0, 0.25], "ctpo-fixed": [0.25, 0.75, 0.5, 0.25]}
    for method, values in rates.items():
        run = tmp_path / "runs" / method
        rundir.write_run_info(run, {"method": method, "seed": 0, "model": "tiny"})
        write_summary(run / "eval" / "quickstart", {"count": float(np.mean(values))}, stderr=0.1)
        write_problems(run / "eval" / "quickstart", values)
        write_summary(run / "eval" / "other", {"aime25": 0.0})  # a later evaluation on another set
    base = tmp_path / "evals" / "tiny"
    write_summary(base, {"count": 0.05})
    (base / "eval_config.json").write_text(json.dumps({"model": "tiny"}))
    result = CliRunner().invoke(
        app,
        [
            "report",
            "runs/ctpo",
            "runs/ctpo-fixed",
            str(base),
            "--eval",
            "quickstart",
            "--out",
            "out",
            "--no-mlflow",
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "report_table2.csv")
    assert set(table["benchmark"]) == {"count"}
    assert table.set_index("method")["mean"].to_dict() == pytest.approx(
        {"ctpo": 0.625, "ctpo-fixed": 0.4375, "base": 0.05}
    )
    row = pd.read_csv(tmp_path / "out" / "report_ablation.csv").iloc[0]
    # per-problem differences 0.25, 0, 0.5, 0: mean 0.1875, sample sd sqrt(0.171875 / 3), 4 problems
    half = 1.959964 * math.sqrt(0.171875 / 3) / 2
    assert (row["delta"], row["ci_high"] - row["delta"]) == (
        pytest.approx(0.1875),
        pytest.approx(half, rel=1e-5),
    )
    assert row["interval"] == "paired, 4 problems"
    behaviour = pd.read_csv(tmp_path / "out" / "report_behaviour.csv")  # single-benchmark summaries
    assert set(behaviour["method"]) == {"ctpo", "ctpo-fixed", "base"}


def test_seeds_of_a_method_get_distinct_markers_across_panels() -> None:
    from analysis.figures import Palette

    a, b = Run("a", "ctpo", 0), Run("b", "ctpo", 1)
    palette = Palette([a, b, a, b])  # the same runs in two panels
    assert (palette.marker(a), palette.marker(b)) == ("o", "s")
    assert palette.color(a) == palette.color(b)


# ---------------------------------------------------------------------------------------------
# MLflow: runs by id and name, verl metric names, positions as artifacts, figures logged back


@pytest.fixture(scope="module")
def mlflow_store(
    tmp_path_factory: pytest.TempPathFactory, synthetic: Synthetic
) -> Iterator[tuple[str, Path]]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        experiment = client.create_experiment("ctpo", artifact_location=(root / "artifacts").as_uri())
        run = client.create_run(experiment, run_name="verl-ctpo-14b")
        run_id = run.info.run_id
        client.log_param(run_id, "actor_rollout_ref.actor.policy_loss.loss_mode", "ctpo/ctpo")
        for step in range(1, 6):
            for key, value in {
                "critic/score/mean": 0.1 * step,
                "actor/pg_clipfrac": 0.02,
                "actor/ppo_kl": 0.001,
                "response_length/mean": 500.0,
                "val-core/aime25/acc/mean_at_32": 0.2 * step,
                "val-core/brumo/acc/mean_at_32": 0.1 * step,
                "timing_s/step": 3.0,
            }.items():
                client.log_metric(run_id, key, value, step=step)
        for file in sorted((synthetic.run_dir / diagnostics.POSITIONS_DIR).glob("*.parquet")):
            client.log_artifact(run_id, str(file), diagnostics.POSITIONS_DIR)
        yield uri, root


def test_mlflow_run_by_name_and_id(
    mlflow_store: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    uri, _ = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (run,) = resolve_runs(["verl-ctpo-14b"])
    assert (run.method, run.run_dir) == ("ctpo", None)
    assert resolve_runs([str(run.mlflow_run_id)])[0].name == "verl-ctpo-14b"
    metrics = load_metrics(run)
    val = curve_series(metrics, CURVES[1])
    assert val is not None and val.to_dict() == pytest.approx({s: 0.15 * s for s in range(1, 6)})
    reward = curve_series(metrics, CURVES[0])
    assert reward is not None and reward.to_dict() == pytest.approx({s: 0.1 * s for s in range(1, 6)})
    assert load_positions(run)["n"].sum() > 0
    result = CliRunner().invoke(app, ["plot", "std-growth", "--out", "figs"])  # latest per method: MLflow
    assert result.exit_code == 0, result.output
    assert "logged to MLflow run" in result.output
    artifacts = {
        Path(a.path).name for a in MlflowClient(uri).list_artifacts(str(run.mlflow_run_id), "figures")
    }
    assert {"std_growth.png", "std_growth.pdf", "std_growth_fits.csv"} <= artifacts


def test_local_run_found_through_mlflow_reads_its_directory(
    mlflow_store: tuple[str, Path], synthetic: Synthetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    uri, _ = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ctpo")
    assert experiment is not None
    record = client.create_run(
        experiment.experiment_id, run_name="local-ctpo", tags={"run_dir": str(synthetic.run_dir)}
    )
    run = resolve_runs([record.info.run_id])[0]
    assert run == Run(
        name=synthetic.run_dir.name,
        method="ctpo",
        seed=0,
        model="tiny",
        run_dir=synthetic.run_dir,
        mlflow_run_id=record.info.run_id,
    )
    assert json.loads((synthetic.run_dir / "run.json").read_text())["method"] == "ctpo"


def test_verl_run_directory_reads_metrics_jsonl_else_mlflow(
    mlflow_store: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    uri, _ = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    record = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()],
        filter_string="attributes.run_name = 'verl-ctpo-14b'",
    )[0]
    run_dir = tmp_path / "runs" / "ctpo-Qwen3-14B-s0"
    rundir.write_run_info(
        run_dir, {"method": "ctpo", "backend": "verl", "seed": 0, "mlflow_run_id": record.info.run_id}
    )
    (run,) = resolve_runs([str(run_dir)])
    # during training: no metrics.jsonl yet, verl's metrics come from MLflow (`@` logged as `_at_`)
    val = curve_series(load_metrics(run), CURVES[1])
    assert val is not None and val.to_dict() == pytest.approx({s: 0.15 * s for s in range(1, 6)})
    # after training the launcher copies verl's file log (original names, `@`) into metrics.jsonl
    for step in (1, 2):
        rundir.append_metrics(
            run_dir, step, {"critic/rewards/mean": 0.3 * step, "val-core/aime25/reward/mean@32": 0.1}
        )
    metrics = load_metrics(run)
    reward, val = curve_series(metrics, CURVES[0]), curve_series(metrics, CURVES[1])
    assert reward is not None and reward.to_dict() == pytest.approx({1: 0.3, 2: 0.6})
    assert val is not None and val.to_dict() == pytest.approx({1: 0.1, 2: 0.1})


def test_report_pairs_methods_by_seed_and_problem_when_there_are_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeds of two methods: ctpo is grpo + 0.1 on every problem of seed 0 and + 0.3 on seed 1;
    the problems differ in difficulty. The pair (methods in registry order): grpo − ctpo = −0.2 with the
    t-interval of (−0.1, −0.3), 1 dof."""
    monkeypatch.chdir(tmp_path)
    base_rates = {0: [0.1, 0.4, 0.2, 0.5], 1: [0.3, 0.0, 0.6, 0.2]}
    args = []
    for method, offset in (("ctpo", {0: 0.1, 1: 0.3}), ("grpo", {0: 0.0, 1: 0.0})):
        for seed, rates in base_rates.items():
            run = tmp_path / "runs" / f"{method}-s{seed}"
            rundir.write_run_info(
                run, {"method": method, "seed": seed, "model": "tiny", "started": f"{seed}"}
            )
            values = [r + offset[seed] for r in rates]
            write_summary(run / "eval", {"count": float(np.mean(values))})
            write_problems(run / "eval", values)
            args.append(str(run))
    result = CliRunner().invoke(app, ["report", *args, "--out", "out", "--no-mlflow"])
    assert result.exit_code == 0, result.output
    (row,) = pd.read_csv(tmp_path / "out" / "report_pairs_tiny.csv").itertuples()
    assert (row.a, row.b, row.seeds, row.a_ahead) == ("grpo", "ctpo", 2, 0)
    # per-seed differences -0.1 and -0.3: mean -0.2, se 0.1, t_{0.975, 1} = 12.7062
    assert (row.delta, row.ci_high - row.delta) == (pytest.approx(-0.2), pytest.approx(1.27062, rel=1e-4))
    assert "pairwise differences" in (tmp_path / "out" / "report.md").read_text()
