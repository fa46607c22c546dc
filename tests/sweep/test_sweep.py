"""`ctpo sweep`: the grid, the statistics of its report, the verl jobs it would submit, and a real local
sweep on Ray (smoke preset) that resumes without training anything twice."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import aggregate
from ctpo_cli.sweep.grid import Cell, SweepDir, SweepSpec, parse_grid, parse_methods, parse_seeds
from ctpo_cli.sweep.jobs import HF_CHECKPOINT, eval_entrypoint, train_entrypoint

RunCtpo = Callable[..., subprocess.CompletedProcess[str]]

# ---------------------------------------------------------------------------------------------
# the grid


def test_seeds_methods_and_grid_axes() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-2,9,1") == [0, 1, 2, 9]
    assert parse_methods("all") == ["grpo", "gspo", "ctpo", "ctpo-fixed", "seq-is"]
    assert parse_methods("ctpo, grpo") == ["ctpo", "grpo"]
    assert parse_grid(["rl.lr=1e-3,3e-3", "rl.minibatches=4,16"]) == [
        ("rl.lr=1e-3", "rl.minibatches=4"),
        ("rl.lr=1e-3", "rl.minibatches=16"),
        ("rl.lr=3e-3", "rl.minibatches=4"),
        ("rl.lr=3e-3", "rl.minibatches=16"),
    ]
    assert parse_grid([]) == [()]
    assert Cell("ctpo", 3).name == "ctpo-s3"
    named = Cell("ctpo", 3, ("rl.lr=1e-3",)).name
    assert named.startswith("ctpo-s3-o") and named != Cell("ctpo", 3, ("rl.lr=3e-3",)).name


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_seeds("3-1"), "--seeds takes ranges"),
        (lambda: parse_seeds("a"), "--seeds takes ranges"),
        (lambda: parse_methods("grpo,ppo"), "unknown method 'ppo'; valid: all, grpo"),
        (lambda: parse_grid(["rl.lr"]), "is not key=value"),
    ],
)
def test_bad_grid_input_is_one_line(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def spec(**changes: object) -> SweepSpec:
    fields: dict[str, object] = {
        "backend": "local",
        "preset": "smoke",
        "model": None,
        "methods": ("grpo", "ctpo"),
        "seeds": (0, 1),
        "override_sets": ((),),
        "common": (),
        "samples": 2,
    }
    return SweepSpec(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_directory_holds_one_sweep(tmp_path: Path) -> None:
    SweepDir(tmp_path).open(spec())
    SweepDir(tmp_path).open(spec())  # the same sweep again: resumed
    with pytest.raises(ValueError, match="holds another sweep \\(differs in: seeds\\)"):
        SweepDir(tmp_path).open(spec(seeds=(0, 1, 2)))


# ---------------------------------------------------------------------------------------------
# the statistics


def problems(rates: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {"benchmark": "b", "problem_id": [f"p{i}" for i in range(len(rates))], "pass_rate": rates}
    )


def test_method_mean_has_the_t_interval_over_seeds() -> None:
    values = [0.20, 0.25, 0.32, 0.22, 0.28]
    runs = [aggregate.Evaluated("ctpo", s, v, problems([v])) for s, v in enumerate(values)]
    (row,) = aggregate.method_table(runs).itertuples()
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert (row.mean, row.ci_low, row.ci_high) == pytest.approx((np.mean(values), low, high))
    assert row.seeds == 5 and row.values == values


def test_pairs_are_paired_by_seed_and_problem() -> None:
    """Method a is b plus a per-seed offset on every problem; the seeds' problems differ in difficulty
    (and one problem of a seed is missing for b). The paired Δ is the mean of the per-seed offsets,
    its interval the t-interval of those offsets: the problems' difficulty cancels."""
    rng = np.random.default_rng(0)
    offsets = [0.05, 0.10, 0.02, 0.08]
    runs = []
    for seed, offset in enumerate(offsets):
        base = rng.uniform(0.1, 0.7, size=20)
        runs.append(
            aggregate.Evaluated("a", seed, float(np.mean(base + offset)), problems(list(base + offset)))
        )
        b_problems = problems(list(base)).iloc[1:] if seed == 0 else problems(list(base))
        runs.append(aggregate.Evaluated("b", seed, float(np.mean(base)), b_problems))
    (pair,) = aggregate.pair_table(runs).itertuples()
    assert (pair.a, pair.b, pair.seeds, pair.a_ahead) == ("a", "b", 4, 4)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(offsets), scale=stats.sem(offsets))
    assert (pair.delta, pair.ci_low, pair.ci_high) == pytest.approx((np.mean(offsets), low, high))
    assert pair.per_seed == pytest.approx(offsets)


def test_one_seed_pairs_over_problems() -> None:
    diffs = np.array([0.1, -0.2, 0.3, 0.0, 0.25])
    runs = [
        aggregate.Evaluated("a", 0, 0.5, problems(list(0.5 + diffs))),
        aggregate.Evaluated("b", 0, 0.5, problems([0.5] * 5)),
    ]
    (pair,) = aggregate.pair_table(runs).itertuples()
    half = 1.959963984540054 * diffs.std(ddof=1) / math.sqrt(5)
    assert (pair.delta, pair.ci_high - pair.delta) == pytest.approx((diffs.mean(), half))
    assert pair.basis == "1 seed (z, across problems)"


# ---------------------------------------------------------------------------------------------
# verl: Ray jobs


def job_args(entrypoint: str, cwd: Path) -> list[str]:
    """The command of a job's shell line, checking that it runs in ``cwd``, the sweep's directory."""
    cd, sep, command = entrypoint.partition(" && ")
    assert shlex.split(cd) == ["cd", str(cwd)] and sep
    return shlex.split(command)


def test_verl_jobs_run_ctpo_train_with_a_hugging_face_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job entrypoints are ``ctpo train`` commands into the cell's own runs directory; the one of
    the first cell composes with verl's own config files (``--dry-run``: verl's Hydra composition,
    nothing launched) and asks verl for Hugging Face checkpoints, which the eval job then loads."""
    monkeypatch.chdir(tmp_path)
    sweep = SweepDir(tmp_path / "sweep")
    grid = spec(backend="verl", model="tiny-cpu")
    cells = grid.cells
    entrypoints = [job_args(train_entrypoint(grid, sweep, cell), tmp_path) for cell in cells]
    ctpo = [sys.executable, "-m", "ctpo_cli.cli"]  # the sweep's own Python runs the job
    assert [e[:6] for e in entrypoints] == [[*ctpo, "train", "--method", c.method] for c in cells]
    first = entrypoints[0]
    assert first[first.index("--out") + 1] == str((tmp_path / "sweep" / "runs" / "grpo-s0").resolve())
    assert first[-1] == HF_CHECKPOINT
    result = subprocess.run(
        [*first, "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "- hf_model" in result.stdout
    run = tmp_path / "run"
    (run / "verl_checkpoints" / "global_step_4" / "actor" / "huggingface").mkdir(parents=True)
    (run / "verl_checkpoints" / "latest_checkpointed_iteration.txt").write_text("4")
    (run / "experiment.yaml").write_text("ctpo:\n  tir: ctpo\n  reward: strict\n")
    command = job_args(eval_entrypoint(run, 5), tmp_path)
    checkpoint = str(run / "verl_checkpoints/global_step_4/actor/huggingface")
    eval_args = ["--n", "5", "--tir", "ctpo", "--reward", "strict", "--out", str(run / "eval")]
    assert command == [*ctpo, "eval", "--model", checkpoint, *eval_args]


# ---------------------------------------------------------------------------------------------
# a real local sweep on Ray


def test_local_sweep_on_ray_reports_and_resumes(run_ctpo: RunCtpo, tmp_path: Path) -> None:
    args = ["sweep", "--methods", "grpo,ctpo", "--seeds", "0-1", "--preset", "smoke", "--samples", "2"]
    args += ["--out", "sw", "--workers", "2"]
    first = run_ctpo(*args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "sw" / "report"
    for name in ("methods.csv", "pairs.csv", "drift.csv", "comparison.png", "report.md"):
        assert (report / name).is_file(), name
    methods = pd.read_csv(report / "methods.csv")
    assert methods["method"].tolist() == ["start", "grpo", "ctpo"]
    assert (methods["seeds"] == 2).all()
    pairs = pd.read_csv(report / "pairs.csv")
    assert pairs[["a", "b", "seeds"]].values.tolist() == [["grpo", "ctpo", 2]]
    states = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "sw" / "cells").glob("*.json")}
    assert sorted(states) == ["ctpo-s0", "ctpo-s1", "grpo-s0", "grpo-s1"]
    assert all(s["status"] == "evaluated" and s["attempts"] == 1 for s in states.values()), states
    assert "held-out avg@k" in first.stdout
    runs_before = sorted(p.name for p in (tmp_path / "sw" / "runs").iterdir())

    second = run_ctpo(*args, cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 already evaluated" in second.stdout
    assert sorted(p.name for p in (tmp_path / "sw" / "runs").iterdir()) == runs_before

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctpo-sweep")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(states)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all("heldout/avg_at_k" in r.data.metrics and r.info.status == "FINISHED" for r in children)
