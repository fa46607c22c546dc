"""The verl launcher's process handling, with a small Python program in verl's place (verl itself needs
GPUs): output streamed to the console and train.log, a real sandbox service started for the run and
stopped after it (success or failure), the MLflow run and run.json with the final status, verl's
per-step metrics copied into metrics.jsonl, and the child's whole process group stopped."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctpo_cli.runs import rundir
from ctpo_cli.train.launcher import LOG_FILE, launch, stream_process
from sandbox.client import SandboxClient, SandboxUnavailable

CHILD = r"""
import json, os, sys
from sandbox.client import SandboxClient

print("hello from the child", flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
print("sandbox healthy:", SandboxClient(os.environ["CTPO_SANDBOX_URL"]).health(), flush=True)
with open(os.environ["VERL_FILE_LOGGER_PATH"], "w") as log:  # what verl's file logger writes
    log.write(json.dumps({"step": 1, "data": {"critic/score/mean": 0.5, "note": "text"}}) + "\n")
    log.write(json.dumps({"step": 1, "data": {"val-core/acc": 0.25}}) + "\n")
    log.write(json.dumps({"step": 2, "data": {"critic/score/mean": 0.75}}) + "\n")
print("mlflow run", os.environ["MLFLOW_RUN_ID"], flush=True)
sys.exit(int(sys.argv[1]))
"""

INFO = {"method": "ctpo", "backend": "verl", "model": "tiny", "seed": 0, "hparams": {"ctpo_power": 0.5}}


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow store for the module (creating its schema takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def mlflow_run(uri: str, run_id: str) -> object:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id)


@pytest.mark.parametrize(
    ("exit_code", "status", "mlflow_status"), [(0, "finished", "FINISHED"), (3, "failed", "FAILED")]
)
def test_launch_streams_records_and_stops_its_sandbox(
    tmp_path: Path,
    mlflow_db: str,
    capfd: pytest.CaptureFixture[str],
    exit_code: int,
    status: str,
    mlflow_status: str,
) -> None:
    run_dir = tmp_path / "runs" / "ctpo-tiny-s0"
    code = launch(
        [sys.executable, "-c", CHILD, str(exit_code)],
        run_dir,
        INFO,
        mlflow_experiment="ctpo-test",
        files={"x.yaml": "a: 1\n"},
    )
    assert code == exit_code
    console = capfd.readouterr().out
    log = (run_dir / LOG_FILE).read_text()
    for text in ("hello from the child", "a line on stderr", "sandbox healthy: True"):
        assert text in console and text in log

    info = rundir.read_run_info(run_dir)
    assert (
        info["status"] == status and info["method"] == "ctpo" and (run_dir / "x.yaml").read_text() == "a: 1\n"
    )
    assert not SandboxClient(info["sandbox_url"]).health()  # the service it started is gone

    run = mlflow_run(mlflow_db, info["mlflow_run_id"])
    assert f"mlflow run {info['mlflow_run_id']}" in log  # verl's logger would attach to this run
    assert run.info.status == mlflow_status and run.info.run_name == run_dir.name  # type: ignore[attr-defined]
    assert run.data.tags["method"] == "ctpo" and run.data.params["loss.ctpo_power"] == "0.5"  # type: ignore[attr-defined]

    metrics = rundir.read_metrics(run_dir)
    assert metrics["step"].tolist() == [1, 2]
    assert metrics["critic/score/mean"].tolist() == [0.5, 0.75] and metrics["val-core/acc"].iloc[0] == 0.25


def test_an_existing_sandbox_is_used_and_left_alone(tmp_path: Path, mlflow_db: str) -> None:
    from sandbox.server import running_service

    with running_service() as service:
        launch([sys.executable, "-c", CHILD, "0"], tmp_path / "run", INFO, sandbox_url=service.url)
        assert "sandbox healthy: True" in (tmp_path / "run" / LOG_FILE).read_text()
        assert SandboxClient(service.url).health()
        assert rundir.read_run_info(tmp_path / "run")["sandbox_url"] == service.url


def test_a_sandbox_url_that_does_not_answer_is_one_error(tmp_path: Path, mlflow_db: str) -> None:
    with pytest.raises(
        SandboxUnavailable, match=r"sandbox service at http://127\.0\.0\.1:9 does not answer /health"
    ):
        launch(
            [sys.executable, "-c", "print('never')"], tmp_path / "run", INFO, sandbox_url="http://127.0.0.1:9"
        )
    assert rundir.read_run_info(tmp_path / "run")["status"] == "failed"
    assert not (tmp_path / "run" / LOG_FILE).exists()


GROUP = r"""
import subprocess, sys, time
sleeper = subprocess.Popen(["sleep", "60"])
print("sleeper", sleeper.pid, flush=True)
time.sleep(60)
"""


def test_training_stops_when_its_sandbox_dies(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The child's whole process group (a grandchild included) is stopped, and only it."""
    checks = iter([True, True, False])
    started = time.monotonic()
    code = stream_process(
        [sys.executable, "-c", GROUP], tmp_path / "log", dict(os.environ), lambda: next(checks)
    )
    assert code == 1 and time.monotonic() - started < 30
    log = (tmp_path / "log").read_text()
    assert "the sandbox service stopped; stopping training" in log
    sleeper = int(log.split("sleeper", 1)[1].split()[0])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{sleeper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        not Path(f"/proc/{sleeper}").exists() or "Z" in Path(f"/proc/{sleeper}/stat").read_text().split()[2]
    )
    assert "stopping training" in capfd.readouterr().out  # on the console as well


ARGV_CHILD = "import json, os, sys; print('ARGV', json.dumps(sys.argv[1:]), os.environ.get('RAY_OVERRIDE_JOB_RUNTIME_ENV'))"


def test_inside_a_ray_job_verl_joins_the_cluster_with_the_runs_environment(
    tmp_path: Path, mlflow_db: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``$RAY_ADDRESS`` set (as in a Ray job) the command's extra overrides, composed by verl's Hydra
    after the ``tiny-cpu`` experiment's, leave ``ray.init`` none of the arguments it refuses when joining
    a cluster and hand the run's environment (string values) to the cluster's workers; without it,
    the command is unchanged."""
    from omegaconf import OmegaConf

    from ctpo_cli.train.experiments import build_job, compose_experiment, compose_verl

    job = build_job(compose_experiment("ctpo", "tiny-cpu", 0, [], [], tmp_path / "runs"))
    composed = OmegaConf.to_container(job.config.ray_kwargs.ray_init)
    assert isinstance(composed, dict)
    ray_init = {str(key): value for key, value in composed.items()}
    assert ray_init["num_cpus"] and ray_init["num_gpus"]  # tiny-cpu sizes the local Ray verl starts

    def launched(run: str) -> tuple[list[str], str]:
        child = [sys.executable, "-c", ARGV_CHILD]
        assert (
            launch(child, tmp_path / run, INFO, platform_env={"VERL_PLATFORM": "cpu"}, ray_init=ray_init) == 0
        )
        line = next(x for x in capfd.readouterr().out.splitlines() if x.startswith("ARGV "))
        argv, _, override = line.removeprefix("ARGV ").rpartition(" ")
        return json.loads(argv), override

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launched("local") == ([], "None")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    extra, override = launched("joined")
    assert override == "1"  # these values win over a Ray job's runtime env where both set a variable
    joined = OmegaConf.to_container(compose_verl([*job.overrides, *extra]).ray_kwargs.ray_init)
    assert isinstance(joined, dict) and not {"num_cpus", "num_gpus"} & set(joined)
    env = joined["runtime_env"]["env_vars"]
    info = rundir.read_run_info(tmp_path / "joined")
    assert env["MLFLOW_RUN_ID"] == info["mlflow_run_id"] and env["MLFLOW_TRACKING_URI"] == mlflow_db
    assert env["VERL_PLATFORM"] == "cpu" and env["CTPO_SANDBOX_URL"] == info["sandbox_url"]
    assert env["VERL_FILE_LOGGER_PATH"] == str(tmp_path / "joined" / "verl_metrics.jsonl")
    assert all(isinstance(value, str) for value in env.values())
