"""`ctpo sweep --backend verl` end to end: Ray jobs on a real Ray cluster (started for the test) run verl's
trainer on the CPU (``tiny-cpu``) and ``ctpo eval`` on its Hugging Face checkpoint; then the report, the
MLflow parent and child runs, and a rerun that submits nothing."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from ray.job_submission import JobSubmissionClient

RunCtpo = Callable[..., subprocess.CompletedProcess[str]]
TIMEOUT_S = 1200


def test_verl_sweep_runs_as_ray_jobs_and_resumes(run_ctpo: RunCtpo, ray_cluster: str, tmp_path: Path) -> None:
    args = ["sweep", "--backend", "verl", "--model", "tiny-cpu", "--methods", "ctpo", "--seeds", "0"]
    args += ["--samples", "2", "--address", ray_cluster, "--out", "sw"]
    args += ["trainer.total_training_steps=1", "trainer.val_before_train=false"]
    first = run_ctpo(*args, cwd=tmp_path, timeout=TIMEOUT_S)
    logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "sw" / "logs").glob("*.log"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + logs

    jobs = JobSubmissionClient(ray_cluster).list_jobs()
    kinds = sorted(str(job.submission_id).rsplit("-", 2)[1] for job in jobs)
    assert kinds == ["eval", "train"] and {str(job.status) for job in jobs} == {"SUCCEEDED"}
    (state_file,) = (tmp_path / "sw" / "cells").glob("*.json")
    state = json.loads(state_file.read_text())
    assert state["status"] == "evaluated"
    run = Path(state["run_dir"])
    assert (run / "verl_checkpoints" / "global_step_1" / "actor" / "huggingface" / "config.json").is_file()
    summary = pd.read_csv(Path(state["eval_dir"]) / "summary.csv")
    assert {"aime25", "aime26", "hmmt_nov_2025", "brumo_2025"} <= set(summary["benchmark"])
    assert sorted(p.name for p in (tmp_path / "sw" / "logs").glob(f"{state_file.stem}-*.log")) == [
        f"{state_file.stem}-eval-1.log",
        f"{state_file.stem}-train-1.log",
    ]
    report = tmp_path / "sw" / "report"
    methods = pd.read_csv(report / "methods.csv")
    assert methods["method"].tolist() == ["ctpo"] and methods["seeds"].tolist() == [1]
    assert pd.read_csv(report / "drift.csv")["method"].tolist() == ["ctpo"]
    assert (report / "comparison.png").is_file() and (report / "report.md").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctpo-sweep")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["run_dir"] == str(run) and "eval/avg_at_k" in child.data.metrics
    trained = client.get_run(child.data.tags["train_run_id"])  # the verl run, logged from inside the job
    assert trained.info.status == "FINISHED" and "actor/ctpo/is_weight_mean" in trained.data.metrics
    evaluations = client.get_experiment_by_name("ctpo-eval")
    assert evaluations is not None
    (evaluation,) = client.search_runs([evaluations.experiment_id])
    artifacts = Path(evaluation.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path) and (artifacts / "summary.csv").is_file()  # not in Ray's cwd

    second = run_ctpo(*args, cwd=tmp_path, timeout=TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 already evaluated" in second.stdout and "submitted" not in second.stdout
    assert len(JobSubmissionClient(ray_cluster).list_jobs()) == 2
