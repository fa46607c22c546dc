"""The user's card, end to end, as a newcomer types it in a fresh directory (issue 9).

train locally (a shortened quickstart run) -> `ctpo eval` with no --model on a local benchmark file
-> `ctpo plot clip-rate` and `ctpo report` with no run given -> the MLflow store `mlflow ui` reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient


def test_train_eval_plot_report_mlflow(tmp_path: Path) -> None:
    # the default store (./mlflow.db); a wide terminal, so Rich tables do not elide run names
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"COLUMNS": "200"}

    def ctpo(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "ctpo_cli.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"ctpo {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    ctpo(
        "train",
        "--method",
        "ctpo",
        "--backend",
        "local",
        "--preset",
        "smoke",
        "rl.steps=2",
        "warmstart.steps=4",
    )
    (run,) = (tmp_path / "runs").glob("ctpo-*")

    problems = [("Count from 2 by 3 to 14", "5"), ("Count from 1 by 2 to 9", "5")]
    pd.DataFrame(
        {
            "id": ["p0", "p1"],
            "data_source": "handmade",
            "prompt": [[{"role": "user", "content": q}] for q, _ in problems],
            "ability": "math",
            "reward_model": [{"ground_truth": a, "style": "rule"} for _, a in problems],
            "extra_info": [{"index": i, "split": "test"} for i in range(2)],
        }
    ).to_parquet(tmp_path / "handmade.parquet")
    out = ctpo(
        "eval",
        "--benchmarks",
        "handmade.parquet",
        "--n",
        "2",
        "--no-tools",
        "--backend",
        "hf",
        "--max-tokens",
        "32",
    )
    assert run.name in out  # says which checkpoint it evaluated
    summary = pd.read_csv(run / "eval" / "summary.csv")
    assert summary["n_samples"].iloc[0] == 4

    out = ctpo("plot", "clip-rate")
    assert run.name in out and "clip_rate.png" in out
    assert (tmp_path / "figures" / "clip_rate.png").stat().st_size > 10_000
    out = ctpo("report")
    assert run.name in out
    assert any((tmp_path / "figures").glob("report*"))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_experiment = {
        e.name: client.search_runs([e.experiment_id])
        for e in client.search_experiments()
        if e.name != "Default"
    }
    (training,) = by_experiment["ctpo-local"]
    (evaluation,) = by_experiment["ctpo-eval"]
    assert training.data.params["method"] == "ctpo" and "reward/mean" in training.data.metrics
    assert any(k.endswith("avg_at_k") for k in evaluation.data.metrics)
    logged = {a.path for a in client.list_artifacts(training.info.run_id, "figures")}
    assert "figures/clip_rate.png" in logged
