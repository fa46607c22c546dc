"""`ctpo bench scoring` on the interleaved harness: both contestants timed, the ratio reported, the
pool's verdicts checked against math-verify in-process on every answer set both scored."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from ctpo_cli.cli import app


def test_bench_scoring_cli(tmp_path: Path) -> None:
    out = tmp_path / "scoring.csv"
    result = CliRunner().invoke(
        app,
        ["bench", "scoring", "--answers", "16", "--rounds", "2", "--out", str(out)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"math-verify in-process \(baseline\)\s.*\b1\.00\b", result.output), result.output
    assert re.search(r"score_batch \(2-worker pool\)\s.*\d+\.\d\d\s.*\d+\.\d\d-\d+\.\d\d", result.output)
    assert "2 interleaved rounds" in result.output
    rows = pd.read_csv(out)
    assert rows["ratio"].iloc[0] == 1.0 and rows["ratio"].iloc[1] > 0
    assert (rows["answers_per_s"] > 0).all()
