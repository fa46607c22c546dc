"""Damaged files (a torn run.json, a torn metrics line, a corrupt generations line) and a full disk:
one damaged run is skipped with a one-line warning naming it, never blocking the other runs; a full
disk is one line naming the path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo_cli import cli
from ctpo_cli.eval.store import GenerationStore
from ctpo_cli.runs import rundir

METRICS = ("reward/mean", "actor/pg_clipfrac", "actor/ppo_kl", "response_length/mean")


def ctpo(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ctpo", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """runs/good (10 steps, its last line torn by a crash) and runs/torn (run.json cut short)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    good = tmp_path / "runs" / "good"
    rundir.write_run_info(good, {"method": "ctpo", "seed": 0, "started": "2026-01-01", "status": "killed"})
    for step in range(1, 11):
        rundir.append_metrics(good, step, {name: 0.1 * step for name in METRICS})
    with open(good / rundir.METRICS_FILE, "a") as f:
        f.write('{"step": 11, "reward/me')
    torn = tmp_path / "runs" / "torn"
    torn.mkdir()
    (torn / rundir.RUN_FILE).write_text(json.dumps({"method": "grpo", "started": "2026-01-02"})[:20])
    return tmp_path / "runs"


def test_a_damaged_run_does_not_block_the_others(
    runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rundir.find_runs(runs) == [runs / "good"]
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"warning: skipping {runs / 'torn'}: {runs / 'torn' / 'run.json'} is damaged (")
    assert list(rundir.read_metric_steps(runs / "good")) == list(range(1, 11))
    assert (
        capsys.readouterr().err.strip()
        == f"warning: skipping {runs / 'good' / 'metrics.jsonl'}:11: not a metrics row"
    )

    code, err = ctpo(["plot", "curves", "--no-mlflow", "--out", "figs"], monkeypatch, capsys)
    assert code == 0, err
    assert (runs.parent / "figs").is_dir() and any((runs.parent / "figs").glob("*.png"))
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # one warning per damaged file
    code, err = ctpo(["train", "--method", "grpo", "--backend", "local", "--resume"], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: no interrupted local run of 'grpo'")


def test_a_corrupt_generations_line_is_generated_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = GenerationStore(tmp_path / "bench.jsonl")
    store.append([{"problem_id": "p", "sample": s, "correct": True} for s in range(3)])
    lines = store.path.read_text().splitlines()
    store.path.write_text(
        "\n".join([lines[0], lines[1][:15] + "\x00garbage", lines[2]]) + "\n" + lines[0][:9]
    )
    assert sorted(store.load()) == [("p", 0), ("p", 2)]  # sample 1 is missing: it is generated again
    assert (
        capsys.readouterr().err.strip()
        == f"warning: skipping {store.path}:2: not a saved sample (it will be generated again)"
    )
    assert store.path.read_text().endswith("\n")  # the torn last line was cut before the next append


def test_a_full_disk_is_one_line(tmp_path: Path, run_ctpo: object) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = run_ctpo(  # type: ignore[operator]
            "train",
            "--method",
            "ctpo",
            "--backend",
            "local",
            "--preset",
            "smoke",
            "warmstart.steps=2",
            "rl.steps=2",
            "--out",
            str(disk / "runs"),
            cwd=tmp_path,
        )
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot use {disk / 'runs'}") and line.endswith(": the disk is full")
