"""Parallel ``ctpo`` processes sharing one MLflow store (real processes, a real SQLite store), and a
SIGKILLed one whose run a later process ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow

# Each process waits for the start file, then creates its run in experiment "shared" of a store that does
# not exist yet (so all four race to create and migrate it, and to create the experiment).
WORKER = """
import sys, time
from pathlib import Path
from ctpo_cli.runs import tracking
start = Path(sys.argv[1])
while not start.exists():
    time.sleep(0.01)
with tracking.mlflow_run("shared", sys.argv[2], {"worker": sys.argv[2]}) as run_id:
    tracking.log_metrics(run_id, {"x": 1.0}, step=1)
    if sys.argv[3] == "hang":
        print(run_id, flush=True)
        time.sleep(600)
"""


def worker(tmp_path: Path, name: str, mode: str = "end") -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "start"), name, mode],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def runs(tmp_path: Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = client.search_experiments()
    return list(client.search_runs([e.experiment_id for e in experiments]))


def test_four_parallel_processes_leave_a_sound_store(tmp_path: Path) -> None:
    processes = [worker(tmp_path, f"w{i}") for i in range(4)]
    time.sleep(3)  # all four have imported and are polling
    (tmp_path / "start").touch()
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in processes]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    found = runs(tmp_path)
    assert sorted(r.info.run_name for r in found) == ["w0", "w1", "w2", "w3"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (shared,) = [e for e in client.search_experiments() if e.name == "shared"]
    assert {r.info.experiment_id for r in found} == {shared.experiment_id}
    assert {r.info.status for r in found} == {"FINISHED"}
    # The store still works: another process creates a run in it.
    assert worker(tmp_path, "after").wait(timeout=120) == 0
    assert len(runs(tmp_path)) == 5


def test_a_sigkilled_run_is_marked_killed_by_the_next_one(tmp_path: Path) -> None:
    (tmp_path / "start").touch()
    victim = worker(tmp_path, "victim", "hang")
    assert victim.stdout is not None
    victim_id = victim.stdout.readline().strip()
    alive = worker(tmp_path, "alive", "hang")
    assert alive.stdout is not None
    alive_id = alive.stdout.readline().strip()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    try:
        assert worker(tmp_path, "next").wait(timeout=120) == 0
        status = {r.info.run_id: r for r in runs(tmp_path)}
        assert status[victim_id].info.status == "KILLED"
        assert "gone" in status[victim_id].data.tags["ctpo.ended_by"]
        assert status[alive_id].info.status == "RUNNING"  # its owner still runs
    finally:
        alive.kill()
        alive.wait()


def test_four_ctpo_evals_at_once_in_an_empty_directory(tmp_path: Path) -> None:
    """The issue's case: four `ctpo eval` (re-scoring saved samples) started together where no mlflow.db
    exists yet; each succeeds and its run is FINISHED in the ctpo-eval experiment."""
    record = {"ground_truth": "42", "answer": None, "correct": False, "num_turns": 1, "tool_calls": 0}
    record |= {"tool_errors": 0, "response_tokens": 5, "stop_reason": "stop", "error": None}
    record |= {"turns": [{"text": "so \\boxed{42}"}], "sample": 0}
    for i in range(4):
        folder = tmp_path / f"out{i}" / "generations"
        folder.mkdir(parents=True)
        lines = [json.dumps(record | {"problem_id": f"p{p}"}) + "\n" for p in range(3)]
        (folder / "bench.jsonl").write_text("".join(lines))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, "-m", "ctpo_cli.cli", "eval", "--model", "m", "--benchmarks", "bench"]
    evals = [
        subprocess.Popen(
            [*command, "--n", "1", "--rescore", "--out", f"out{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in evals]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    found = runs(tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {r.info.experiment_id for r in found} == {client.get_experiment_by_name("ctpo-eval").experiment_id}
    assert [r.info.status for r in found] == ["FINISHED"] * 4
