"""The local backend: a real tiny Qwen3, real scorer, real MLflow store, real Ctrl-C.

Runs use the ``smoke`` preset (a few seconds of training) in a temporary working directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from ctpo_cli.algo.diagnostics import POSITIONS_DIR, STAT_COLUMNS
from ctpo_cli.runs import rundir
from ctpo_cli.tir.scoring import is_correct
from ctpo_cli.train.local.config import build_config
from ctpo_cli.train.local.task import Problem
from ctpo_cli.train.local.train import train_local

SMOKE = ["rl.steps=2", "warmstart.steps=4"]


RunCtpo = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_run_writes_metrics_positions_checkpoint_and_mlflow(workdir: Path) -> None:
    run = train_local("ctpo", preset="smoke", overrides=SMOKE, runs_dir=workdir / "runs")
    info = rundir.read_run_info(run)
    assert info["status"] == "finished" and info["method"] == "ctpo" and info["backend"] == "local"

    metrics = rundir.read_metrics(run)
    assert metrics["step"].tolist() == [0, 1, 2]
    for key in (
        "reward/mean",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "response_length/mean",
        "perf/tokens_per_s",
    ):
        assert metrics[key].iloc[1:].notna().all(), key
    assert metrics["val/avg_at_k"].notna().sum() >= 2  # before RL and at the end

    files = sorted((run / POSITIONS_DIR).glob("step_*.parquet"))
    assert [f.name for f in files] == ["step_000001.parquet", "step_000002.parquet"]
    positions = pd.read_parquet(files[0])
    assert set(STAT_COLUMNS) <= set(positions.columns)
    assert positions["offpolicy"].any() and not positions["offpolicy"].all()  # 2 mini-batches
    # every response token of the step is counted once per mini-batch that saw it
    config = build_config("smoke", SMOKE)
    responses = config.rl.prompts_per_step * config.rl.samples_per_prompt
    assert positions.loc[positions["position"] == 1, "n"].sum() == responses

    assert (run / rundir.CHECKPOINT_DIR / "config.json").is_file()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    record = client.get_run(info["mlflow_run_id"])
    assert record.info.status == "FINISHED"
    assert record.data.params["method"] == "ctpo"
    assert record.data.params["loss.ctpo_power"] == "0.5"
    assert "git_commit" in record.data.params and record.data.params["seed"] == "0"
    assert [m.step for m in client.get_metric_history(record.info.run_id, "reward/mean")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id)}
    assert {POSITIONS_DIR, rundir.CHECKPOINT_DIR, rundir.METRICS_FILE} <= artifacts


def test_same_seed_same_run(workdir: Path) -> None:
    runs = [
        train_local("grpo", preset="smoke", overrides=SMOKE, runs_dir=workdir / f"r{i}") for i in range(2)
    ]
    first, second = (rundir.read_metrics(r) for r in runs)
    timings = [c for c in first.columns if c.startswith("perf/")]
    pd.testing.assert_frame_equal(first.drop(columns=timings), second.drop(columns=timings))


def test_ctrl_c_leaves_checkpoint_and_killed_run_then_resume(workdir: Path, run_ctpo: RunCtpo) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctpo_cli.cli",
            "train",
            "--method",
            "gspo",
            "--backend",
            "local",
            "--preset",
            "smoke",
            "rl.steps=200",
            "warmstart.steps=4",
        ],
        cwd=workdir,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    metrics_files: list[Path] = []
    while time.monotonic() < deadline:
        metrics_files = list(workdir.glob("runs/gspo-*/metrics.jsonl"))
        if metrics_files and len(metrics_files[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    assert "--resume" in output

    run = metrics_files[0].parent
    info = rundir.read_run_info(run)
    assert info["status"] == "killed"
    assert (
        MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(info["mlflow_run_id"]).info.status == "KILLED"
    )
    done = torch.load(run / rundir.CHECKPOINT_DIR / "trainer_state.pt", weights_only=False)["step"]
    # Ctrl-C may land after step 2 was logged but before it counted as done: then the checkpoint holds
    # step 1 and the resume drops step 2's line and trains it again.
    assert done >= 1

    result = run_ctpo(
        "train", "--method", "gspo", "--backend", "local", "--resume", f"rl.steps={done + 1}", cwd=workdir
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert rundir.read_run_info(run)["status"] == "finished"
    steps = rundir.read_metrics(run)["step"].tolist()
    assert steps == list(range(done + 2))  # 0 (validation) .. done + 1, nothing lost or repeated
    assert (
        MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(info["mlflow_run_id"]).info.status
        == "FINISHED"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "ppo"], "unknown method 'ppo'; valid methods: grpo, gspo, ctpo, ctpo-fixed, seq-is"),
        (
            ["--method", "ctpo", "--preset", "huge"],
            "unknown preset 'huge'; valid presets: drift, smoke, tiny, tiny-tools",
        ),
        (["--method", "ctpo", "rl.stepz=3"], "valid keys: rl.steps"),
        (["--method", "ctpo", "optim.lr=3"], "unknown override key 'optim.lr'"),
        (["--method", "ctpo", "loss.ctpo_clip_low=-1"], "ctpo_clip_low must be a finite number >= 0"),
        (["--method", "ctpo", "--resume"], "no interrupted local run of 'ctpo'"),
        (["--method", "ctpo", "warmstart.careless_frac=1.5"], "careless_frac must be in [0, 1], got 1.5"),
    ],
)
def test_bad_input_is_one_line(workdir: Path, run_ctpo: RunCtpo, args: list[str], message: str) -> None:
    result = run_ctpo("train", "--backend", "local", *args, cwd=workdir)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_careless_demonstration_counts_right_but_boxes_the_target() -> None:
    problem = Problem(start=4, step=3, count=13)  # 4, 7, ..., 40
    careful, careless = problem.solution(), problem.solution(careless=True)
    assert careful.splitlines()[:-1] == careless.splitlines()[:-1]
    assert careful.splitlines()[-2:] == ["13:40", "So \\boxed{13}"]
    assert careless.splitlines()[-1] == "So \\boxed{40}"
    assert is_correct(careful, "13") and not is_correct(careless, "13")


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    name = rundir.run_name("ctpo", "tiny-qwen3", 0)
    first, second = rundir.claim_run_dir(tmp_path, name), rundir.claim_run_dir(tmp_path, name)
    assert first.is_dir() and second.is_dir() and second.name == f"{first.name}-2"
