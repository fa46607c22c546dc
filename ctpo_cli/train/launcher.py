"""``ctpo train`` on verl: compose the experiment, check it with verl, then run ``verl.trainer.main_ppo``.

:func:`train_verl` is the command. A launch (:func:`launch`):

1. creates ``runs/<name>/`` with ``run.json`` (status ``running``), the resolved experiment
   (``experiment.yaml``) and verl's composed config (``verl_config.yaml``);
2. starts the sandbox service (``sandbox.server.given_or_started``: a child process group on a free
   port, ready once ``/health`` answers) unless a URL was given (``--sandbox-url``, ``$CTPO_SANDBOX_URL``
   or ``ctpo.sandbox.url``);
3. creates the MLflow run (tracking URI as everywhere in ctpo: ``ctpo_cli.runs.tracking.tracking_uri``;
   experiment ``ctpo-verl-<model>``, run ``<method>-<model>-s<seed>-<time>``) and hands it to verl's
   MLflow logger through ``MLFLOW_RUN_ID``, so that the run is tagged with method, model and seed and
   ends FAILED or KILLED when training does (verl's logger always ends it FINISHED);
4. runs verl as a child process in its own process group, streaming its output to the console and to
   ``runs/<name>/train.log``; stops early if the sandbox it started dies. When verl will join an
   existing Ray cluster (``$RAY_ADDRESS``, as inside a Ray job, or ``ray_kwargs.ray_init.address``),
   the command also drops the ``ray.init`` arguments that only a new local Ray takes and hands the
   environment of steps 2-3 to the cluster's workers (:func:`join_cluster_overrides`);
5. whatever happens (failure, Ctrl-C): stops the child's process group and the sandbox it started,
   copies verl's per-step metrics into ``metrics.jsonl`` and records the final status.

Only processes this module started are ever signalled, by process group id; nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console

from ctpo_cli.algo.diagnostics import discard_positions_after
from ctpo_cli.errors import BackendUnavailable, ConfigError, InputFileError
from ctpo_cli.runs import rundir, tracking
from ctpo_cli.tir.protocol import get_protocol
from ctpo_cli.tir.scoring import REWARD_SUMMARIES
from ctpo_cli.train import synthetic
from ctpo_cli.train.experiments import (
    DATA_PATH_KEYS,
    Experiment,
    VerlJob,
    build_job,
    compose_experiment,
)
from ctpo_cli.train.verl.cpu import ENV as CPU_ENV
from ctpo_cli.train.verl.cpu import PLATFORM as CPU_PLATFORM
from sandbox.process import TERMINATE_GRACE_S, stop_process_group

LOG_FILE = "train.log"
VERL_METRICS_FILE = "verl_metrics.jsonl"
EXPERIMENT_FILE = "experiment.yaml"
VERL_CONFIG_FILE = "verl_config.yaml"
VERL_CHECKPOINT_DIR = "verl_checkpoints"
"""``trainer.default_local_dir`` of every preset (experiments/base.yaml)."""
SANDBOX_ENV = "CTPO_SANDBOX_URL"
INTERRUPT_GRACE_S = 60.0
"""After Ctrl-C, how long verl gets to shut Ray down cleanly before its process group is terminated."""


class TrainingFailed(RuntimeError):
    """verl (or the sandbox it needed) failed; ``code`` is the exit code to pass on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def train_verl(
    method: str,
    model: str | None = None,
    seed: int | None = None,
    experiment_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    runs_dir: str | Path = rundir.RUNS_DIR,
    dry_run: bool = False,
    sandbox_url: str | None = None,
    resume: bool = False,
    explain: bool = False,
) -> Path | None:
    """Compose, validate and (unless ``dry_run``) launch a verl training run; returns its run directory.

    ``resume`` continues the latest verl run of ``method`` that has a verl checkpoint
    (:func:`resumable_run`), in its own run directory and MLflow run: verl (``trainer.resume_mode``
    ``auto``) loads the checkpoint and goes on with the next step, e.g. to a larger
    ``trainer.total_training_steps``.

    ``dry_run`` prints verl's composed config and the exact command, and launches nothing; with
    ``explain`` also the reproduction manifest (``ctpo_cli.train.manifest``). Without GPUs
    or verl a real launch stops at once with one line naming ``--backend local`` and ``--dry-run``.
    Raises TrainingFailed when verl exits with an error (after recording the run as failed).
    """
    previous = resumable_run(Path(runs_dir), method) if resume else None
    experiment = compose_experiment(
        method,
        model,
        seed,
        experiment_files,
        overrides,
        runs_dir,
        run_name=previous.name if previous else None,
        resume_step=verl_checkpoint_step(previous) if previous else 0,
    )
    if not dry_run:
        require_backend(
            experiment.ctpo.platform,
            int(experiment.verl["trainer"]["n_gpus_per_node"]),
            int(experiment.verl["trainer"]["nnodes"]),
        )
    job = build_job(experiment)
    if dry_run:
        print_dry_run(job, sandbox_url or experiment.ctpo.sandbox.url)
        if explain:
            from ctpo_cli.train.manifest import print_explain

            print_explain(job)
        return None
    synthetic.prepare(experiment.ctpo.synthetic, experiment.ctpo.seed, Path(runs_dir), Console())
    missing = missing_data_files(experiment)
    if missing:
        raise InputFileError(
            f"{missing[0]} not found: run `ctpo data prepare` first, or set {' / '.join(DATA_PATH_KEYS)}"
        )
    run_dir = experiment.run_dir
    code = launch(
        job.command,
        run_dir,
        run_info(job, list(overrides)),
        sandbox_url=sandbox_url or experiment.ctpo.sandbox.url,
        mlflow_experiment=str(job.config.trainer.project_name),
        files={EXPERIMENT_FILE: experiment_yaml(experiment), VERL_CONFIG_FILE: OmegaConf.to_yaml(job.config)},
        platform_env=platform_env(experiment.ctpo.platform),
        resume=previous is not None,
        ray_init=OmegaConf.to_container(job.config.ray_kwargs.ray_init),  # type: ignore[arg-type]
    )
    if code != 0:
        raise TrainingFailed(f"verl exited with code {code}; see {run_dir / LOG_FILE}", code)
    return run_dir


def resumable_run(runs_dir: Path, method: str) -> Path:
    """The latest verl run of ``method`` under ``runs_dir`` with a verl checkpoint; FileNotFoundError
    (one line) when there is none."""
    for run in reversed(rundir.find_runs(runs_dir)):
        info = rundir.read_run_info(run)
        if info.get("backend") == "verl" and info.get("method") == method and verl_checkpoint_step(run):
            return run
    raise InputFileError(
        f"no verl run of {method!r} with a checkpoint under {runs_dir}; start one without --resume"
    )


def verl_checkpoint_step(run_dir: Path) -> int:
    """The step of the run's latest verl checkpoint (verl's ``latest_checkpointed_iteration.txt``), or 0."""
    tracker = run_dir / VERL_CHECKPOINT_DIR / "latest_checkpointed_iteration.txt"
    with contextlib.suppress(OSError, ValueError):
        return int(tracker.read_text().strip())
    return 0


# --------------------------------------------------------------------------------------------------
# Checks before a launch


def require_backend(platform: str, n_gpus: int, nnodes: int = 1) -> None:
    """One-line BackendUnavailable unless verl, vLLM and enough CUDA GPUs are here (issue 9); on the
    ``cpu`` platform, verl alone."""
    if platform == CPU_PLATFORM:
        if find_spec("verl") is None:
            raise BackendUnavailable("this run needs verl (pip install 'ctpo[verl]'); it needs no GPU")
        return
    problems = [f"{name} is not installed" for name in ("verl", "vllm") if find_spec(name) is None]
    visible = _cuda_devices()
    if visible == 0:
        problems.append("no CUDA GPU is visible")
    elif nnodes == 1 and visible < n_gpus:
        problems.append(f"the experiment needs {n_gpus} GPUs (trainer.n_gpus_per_node), {visible} visible")
    if problems:
        raise BackendUnavailable(
            f"this run needs GPUs and verl with vLLM ({'; '.join(problems)}); "
            "on this machine, run verl's trainer on the CPU with --model tiny-cpu or the local engine with "
            "--backend local, or print the verl command with --dry-run"
        )


def _cuda_devices() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def missing_data_files(experiment: Experiment) -> list[str]:
    """Train/validation files the experiment names that do not exist."""
    data = experiment.verl.get("data", {})
    paths: list[str] = []
    for key in DATA_PATH_KEYS:
        value = data.get(key.rpartition(".")[2])
        paths += value if isinstance(value, list) else [value] if value else []
    return [p for p in paths if not Path(p).exists()]


# --------------------------------------------------------------------------------------------------
# Dry run


def print_dry_run(job: VerlJob, sandbox_url: str | None) -> None:
    """verl's composed config, then the exact command with the environment a launch gives it."""
    experiment = job.experiment
    sources = ", ".join(str(f) for f in experiment.files)
    print(f"# verl config composed from {sources} and the command line (python -m verl.trainer.main_ppo)")
    print(f"# tool protocol ctpo.tir={experiment.ctpo.tir}: {get_protocol(experiment.ctpo.tir).summary}")
    print(f"# reward ctpo.reward={experiment.ctpo.reward}: {REWARD_SUMMARIES[experiment.ctpo.reward]}")
    print(OmegaConf.to_yaml(job.config, resolve=True))
    env = launch_env(
        experiment.run_dir, sandbox_url or "<sandbox started by ctpo train>", "<created by ctpo train>"
    ) | platform_env(experiment.ctpo.platform)
    print("# command, run by `ctpo train` with this environment:")
    for key, value in env.items():
        print(f"#   {key}={value}")
    print(format_command(job.command))
    missing = missing_data_files(experiment)
    if missing:
        how = (
            "a launch builds them with the tiny model (train.synthetic)"
            if experiment.ctpo.synthetic.local_preset
            else "run `ctpo data prepare`"
        )
        print(
            f"note: {len(missing)} data file(s) do not exist yet, e.g. {missing[0]}: {how}", file=sys.stderr
        )


def format_command(command: Sequence[str]) -> str:
    """The command as one copy-pasteable shell line, continued over one line per override."""
    import shlex

    program = " ".join(shlex.quote(part) for part in command[:3])
    return " \\\n    ".join([program, *(shlex.quote(part) for part in command[3:])])


def experiment_yaml(experiment: Experiment) -> str:
    """The resolved experiment (ctpo section and verl keys) as YAML."""
    return OmegaConf.to_yaml({"ctpo": asdict(experiment.ctpo), **experiment.verl})


# --------------------------------------------------------------------------------------------------
# Launch


def run_info(job: VerlJob, overrides: list[str]) -> dict[str, Any]:
    """``run.json`` of a verl run (same keys as the local backend's where they mean the same)."""
    experiment = job.experiment
    return {
        "method": experiment.ctpo.method,
        "backend": "verl",
        "model": experiment.ctpo.model,
        "model_path": str(job.config.actor_rollout_ref.model.path),
        "seed": experiment.ctpo.seed,
        "overrides": overrides,
        "experiment_files": [str(f) for f in experiment.files],
        "hparams": job.hparams,
        "verl_command": job.command,
        "git_commit": tracking.git_commit(),
    }


def platform_env(platform: str) -> dict[str, str]:
    """What the platform adds to verl's environment: the CPU platform's selection and settings
    (``ctpo_cli.train.verl.cpu.ENV``), nothing for GPUs."""
    return dict(CPU_ENV) if platform == CPU_PLATFORM else {}


def launch_env(run_dir: Path, sandbox_url: str, mlflow_run_id: str) -> dict[str, str]:
    """Environment of the verl process (inherited by the Ray cluster it starts, workers included)."""
    return {
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
        "MLFLOW_RUN_ID": mlflow_run_id,
        SANDBOX_ENV: sandbox_url,
        "VERL_FILE_LOGGER_PATH": str(run_dir / VERL_METRICS_FILE),
    }


LOCAL_RAY_ONLY = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory")
"""``ray.init`` arguments that size a new local Ray; ``ray.init`` refuses them when it joins a cluster."""
RAY_INIT = "ray_kwargs.ray_init"


def ray_cluster(ray_init: Mapping[str, Any]) -> str | None:
    """The existing Ray cluster that verl's ``ray.init(**ray_kwargs.ray_init)`` joins: its ``address``,
    else ``$RAY_ADDRESS`` (set inside a Ray job); None when verl starts a local Ray of its own."""
    address = ray_init.get("address") or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else str(address)


def join_cluster_overrides(ray_init: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """verl overrides for joining an existing Ray cluster: drop the :data:`LOCAL_RAY_ONLY` arguments the
    experiment sets (``tiny-cpu`` sizes its local Ray), and give ``env`` to every Ray process of the run
    through ``ray.init``'s runtime env, since a cluster's workers do not inherit this process's
    environment (a local Ray's do). Inside a Ray job the job's runtime env is merged in as well;
    ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1`` (:func:`launch`) lets these values win where both set a variable."""
    drop = [f"~{RAY_INIT}.{key}" for key in LOCAL_RAY_ONLY if ray_init.get(key) is not None]
    return drop + [
        f"++{RAY_INIT}.runtime_env.env_vars.{key}={_hydra_str(value)}" for key, value in env.items()
    ]


def _hydra_str(value: str) -> str:
    """``value`` as a quoted Hydra override value (a string even when it looks like a number)."""
    return "'" + value.replace("'", "\\'") + "'"


def mlflow_tags(info: Mapping[str, Any]) -> dict[str, str]:
    """Tags that ``ctpo plot``/``report`` find runs by."""
    return {key: str(info[key]) for key in ("method", "model", "seed", "backend", "run_dir") if key in info}


def mlflow_params(info: Mapping[str, Any]) -> dict[str, Any]:
    """Method, seed, commit and the loss hyperparameters (``loss.<name>``)."""
    params = {key: info.get(key) for key in ("method", "seed", "git_commit")}
    params.update({f"loss.{k}": v for k, v in dict(info.get("hparams", {})).items()})
    return params


def launch(
    command: Sequence[str],
    run_dir: Path,
    info: Mapping[str, Any],
    sandbox_url: str | None = None,
    mlflow_experiment: str = "ctpo-verl",
    files: Mapping[str, str] | None = None,
    platform_env: Mapping[str, str] | None = None,
    resume: bool = False,
    ray_init: Mapping[str, Any] | None = None,
) -> int:
    """Run ``command`` as the training process of ``run_dir`` (see the module docstring); its exit code.
    ``platform_env`` is added to its environment (:func:`platform_env`). ``resume``: ``run_dir`` is an
    earlier run, continued (verl resumes from its checkpoints there) in the same MLflow run.
    ``ray_init``: verl's ``ray_kwargs.ray_init``; when it joins a cluster (:func:`ray_cluster`) the
    command gets :func:`join_cluster_overrides`.

    KeyboardInterrupt is re-raised after the run is recorded as killed.
    """
    previous = rundir.read_run_info(run_dir) if resume else {}
    if resume:
        same_config = (run_dir / VERL_CONFIG_FILE).read_text() == (files or {}).get(VERL_CONFIG_FILE)
        keep_before_resume(run_dir)
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ConfigError(
                f"run directory {run_dir} already exists; start the run again for a new name"
            ) from None
    for name, text in (files or {}).items():
        (run_dir / name).write_text(text)
    record = {
        **previous,
        **info,
        "run_dir": str(run_dir),
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "status": "starting",
    }
    if resume:
        record["resumed"] = [*previous.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")]
    rundir.write_run_info(run_dir, record)
    status = "failed"
    from sandbox.server import given_or_started  # (FastAPI: imported only for a launch)

    try:
        with given_or_started(sandbox_url) as sandbox:
            if resume and same_config and "mlflow_run_id" in previous:
                run_id = str(previous["mlflow_run_id"])
                tracking.reopen_run(run_id)
            else:  # verl's MLflow logger would refuse the run if one of its params changed
                tags = mlflow_tags(record)
                if "mlflow_run_id" in previous:
                    tags["mlflow.parentRunId"] = str(previous["mlflow_run_id"])
                run_id = tracking.create_run(mlflow_experiment, run_dir.name, mlflow_params(record), tags)
            env = {**launch_env(run_dir, sandbox.url, run_id), **(platform_env or {})}
            if ray_init is not None and ray_cluster(ray_init):
                forwarded = {**env, **{k: os.environ[k] for k in ("PYTHONPATH",) if os.environ.get(k)}}
                command = [*command, *join_cluster_overrides(ray_init, forwarded)]
                env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
            record.update(status="running", mlflow_run_id=run_id, mlflow_experiment=mlflow_experiment)
            record["sandbox_url"] = sandbox.url
            rundir.write_run_info(run_dir, record)
            code = stream_process(command, run_dir / LOG_FILE, {**os.environ, **env}, sandbox.alive)
        status = "finished" if code == 0 else "failed"
        record["return_code"] = code
        return code
    except KeyboardInterrupt:
        status = "killed"
        raise
    finally:
        record.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rundir.write_run_info(run_dir, record)
        import_verl_metrics(run_dir)
        if "mlflow_run_id" in record:
            with contextlib.suppress(Exception):  # the run dir already says how it ended
                tracking.end_run(str(record["mlflow_run_id"]), status)


def stream_process(
    command: Sequence[str], log_path: Path, env: Mapping[str, str], alive: Callable[[], bool] | None = None
) -> int:
    """Run ``command`` in its own process group; copy its output (stdout and stderr) to our stdout and
    ``log_path`` as it comes. Stops it when ``alive()`` turns False (returns 1) or on Ctrl-C (re-raised)."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
        assert process.stdout is not None
        try:
            while True:
                ready, _, _ = select.select([process.stdout], [], [], 1.0)
                chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
                if ready and not chunk:
                    return process.wait()
                _copy(chunk, log)
                if alive is not None and not alive():
                    _copy(b"\nctpo: the sandbox service stopped; stopping training\n", log)
                    stop_process_group(process, interrupt_grace=TERMINATE_GRACE_S)
                    return 1
        except KeyboardInterrupt:
            _copy(b"\nctpo: interrupted; stopping verl (Ray shuts down first)\n", log)
            raise
        finally:
            if process.poll() is None:
                stop_process_group(process, interrupt_grace=INTERRUPT_GRACE_S)
            process.stdout.close()


def _copy(chunk: bytes, log: Any) -> None:
    if not chunk:
        return
    log.write(chunk)
    log.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        out.write(chunk)
    else:
        sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# MLflow and metrics


def keep_before_resume(run_dir: Path) -> None:
    """Before verl continues ``run_dir`` from its checkpoint: its metrics so far go into ``metrics.jsonl``
    (verl's file logger starts its file afresh), and steps after the checkpoint, which verl will train
    again, are dropped there and from ``positions/``, so that no step is lost or counted twice."""
    step = verl_checkpoint_step(run_dir)
    merged = merged_metrics(run_dir)
    rundir.write_metrics(run_dir, {k: row for k, row in merged.items() if k <= step})
    (run_dir / VERL_METRICS_FILE).unlink(missing_ok=True)
    discard_positions_after(run_dir, step)


def import_verl_metrics(run_dir: Path) -> None:
    """Merge verl's file-logger records into ``metrics.jsonl`` (:func:`merged_metrics`)."""
    if (run_dir / VERL_METRICS_FILE).is_file():
        rundir.write_metrics(run_dir, merged_metrics(run_dir))


def merged_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` with verl's file-logger records (``{"step": k, "data": {...}}``) merged in: one
    row per step, records of the same step merged (the later wins, as after a resume that validated
    again), numbers only, the steps already there kept."""
    merged = rundir.read_metric_steps(run_dir)
    source = run_dir / VERL_METRICS_FILE
    for line in source.read_text().splitlines() if source.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            record = json.loads(line)
            numbers = {
                key: float(value)
                for key, value in record["data"].items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
            merged.setdefault(int(record["step"]), {}).update(numbers)
    return merged
