"""`ctpo quickstart` end to end (smoke preset, two methods): training, the starting policy's and each
method's held-out eval, the gain table, figures and report, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


def test_quickstart_compares_methods_with_their_starting_policy(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "COLUMNS": "200"}
    args = [
        "--preset",
        "smoke",
        "--methods",
        "grpo,ctpo",
        "--samples",
        "2",
        "rl.steps=2",
        "warmstart.steps=4",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "ctpo_cli.cli", "quickstart", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "start (warm start)" in result.stdout and "gain over start" in result.stdout

    table = pd.read_csv(tmp_path / "figures" / "quickstart_comparison.csv")
    assert list(table["method"]) == ["start", "grpo", "ctpo"]
    start = pd.read_csv(tmp_path / "runs" / "quickstart" / "start-policy-eval" / "summary.csv")
    assert table["heldout_avg_at_k"].iloc[0] == pytest.approx(start["avg_at_k"].iloc[0])
    for row in table.iloc[1:].itertuples():
        summary = pd.read_csv(tmp_path / row.run / "eval" / "quickstart" / "summary.csv")
        # same problems, so the paired gain is the difference of the two avg@k
        assert row.gain == pytest.approx(summary["avg_at_k"].iloc[0] - start["avg_at_k"].iloc[0])
        assert row.gain_ci95_low <= row.gain <= row.gain_ci95_high
        assert summary["n_samples"].iloc[0] == 2 * summary["n_problems"].iloc[0]

    for name in ("std_growth.png", "clip_rate.png", "curves.png", "report.md"):
        assert (tmp_path / "figures" / name).stat().st_size > 0
    assert "base" in (tmp_path / "figures" / "report.md").read_text()  # the starting policy's row
