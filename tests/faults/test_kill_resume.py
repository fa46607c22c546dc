"""kill -9 in the middle of a local training, then --resume: nothing lost, nothing duplicated, in
metrics.jsonl, positions/ and MLflow (a real process, a real store)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ctpo_cli.algo.diagnostics import POSITIONS_DIR
from ctpo_cli.runs import rundir

RunCtpo = Callable[..., subprocess.CompletedProcess[str]]
TRAIN = ["train", "--method", "ctpo", "--backend", "local", "--preset", "smoke", "warmstart.steps=4"]


def logged_steps(run: Path) -> list[int]:
    """The steps of metrics.jsonl's rows, in file order (repeats included)."""
    lines = (run / rundir.METRICS_FILE).read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_sigkill_between_checkpoints_then_resume(tmp_path: Path, run_ctpo: RunCtpo) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One step after the step-5 checkpoint; the next is at 10, so a late kill still lands in between.
    kill_after = 6
    process = subprocess.Popen(
        [sys.executable, "-m", "ctpo_cli.cli", *TRAIN, "rl.steps=40", "rl.checkpoint_every=5"],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, run = time.monotonic() + 300, None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(tmp_path.glob("runs/ctpo-*/metrics.jsonl"))
        if found and logged_steps(found[0].parent)[-1:] >= [kill_after]:
            run = found[0].parent
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert run is not None, "the run never reached the step to kill at"
    info = rundir.read_run_info(run)
    first_id = info["mlflow_run_id"]
    checkpoint = torch.load(run / rundir.CHECKPOINT_DIR / "trainer_state.pt", weights_only=False)["step"]
    killed_at = logged_steps(run)[-1]
    assert checkpoint < killed_at  # steps were logged after the checkpoint: the case under test

    total = killed_at + 2
    result = run_ctpo(*TRAIN, "--resume", f"rl.steps={total}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    assert logged_steps(run) == list(range(total + 1))  # each step exactly once, in order
    positions = sorted(int(p.stem.split("_")[1]) for p in (run / POSITIONS_DIR).glob("step_*.parquet"))
    assert positions == list(range(1, total + 1))
    info = rundir.read_run_info(run)
    assert info["status"] == "finished"
    client = MlflowClient(uri)
    resumed = client.get_run(info["mlflow_run_id"])
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["ctpo.resumed_from_run"] == first_id
    assert resumed.data.tags["ctpo.resumed_from_step"] == str(checkpoint)
    history = [m.step for m in client.get_metric_history(resumed.info.run_id, "reward/mean")]
    assert history == list(range(1, total + 1))
    # The file and MLflow agree on every value.
    kept = rundir.read_metric_steps(run)
    by_step = {m.step: m.value for m in client.get_metric_history(resumed.info.run_id, "reward/mean")}
    assert by_step == pytest.approx({step: row["reward/mean"] for step, row in kept.items() if step > 0})
    old = client.get_run(first_id)
    assert old.info.status == "KILLED" and old.data.tags["ctpo.superseded_by"] == resumed.info.run_id
