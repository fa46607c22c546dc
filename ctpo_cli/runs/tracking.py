"""MLflow tracking: the one place a ctpo run is created, logged to and ended in MLflow.

Default store: ``sqlite:///mlflow.db`` in the working directory, the store a plain ``mlflow ui``
started there opens by default (MLflow 3's file store is deprecated). ``MLFLOW_TRACKING_URI``
overrides it (verl's MLflow logger reads the same variable).

Lifecycle, the same for every run (local training, ``ctpo eval``, a verl launch):

* :func:`create_run` makes the run (experiment created on first use), with tags and params, and
  :func:`reopen_run` continues an ended one (a resumed training);
* :func:`log_metrics` / :func:`log_artifacts` add to it by run id (no global "active run");
* :func:`end_run` records FINISHED, FAILED or KILLED.

Parallel ``ctpo`` commands in one directory share the store safely: creating (migrating) the SQLite
store and creating an experiment happen under a file lock (``mlflow.db.lock``), and every run is
created in its experiment by id (never through MLflow's "active experiment"). Each run carries its
owner process (``ctpo.pid``, ``ctpo.host``, ``ctpo.process_start``); a run still RUNNING whose owner
on this host is gone (a SIGKILLed command) is marked KILLED when the next run is created
(:func:`end_orphaned_runs`). SIGTERM reaches a command as KeyboardInterrupt (``ctpo_cli.cli``), so a
terminated run ends KILLED itself.

:func:`mlflow_run` is that lifecycle around a ``with`` block (KILLED on Ctrl-C, FAILED on any other
exception). A verl launch calls :func:`create_run` / :func:`end_run` itself, because verl's own logger
writes the metrics in between (it is handed the run id through ``MLFLOW_RUN_ID``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctpo_cli.errors import BackendUnavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

DB_FILE = "mlflow.db"
STATUSES = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
"""ctpo's run statuses (``run.json``) and MLflow's."""
MAX_PARAM_CHARS = 6000
PARENT_TAG = "mlflow.parentRunId"
"""The tag that makes a run the child of another (a sweep's cells under the sweep's run)."""
MAX_BATCH = 1000
"""Metrics per ``log_batch`` call (MLflow's limit)."""
OWNER_TAGS = ("ctpo.pid", "ctpo.host", "ctpo.process_start")
"""Tags naming the process that owns a run (:func:`owner_tags`)."""


def tracking_uri(workdir: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI for ``<workdir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(workdir or Path.cwd()).resolve() / DB_FILE}"


def git_commit() -> str:
    """The project's git commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def store_lock() -> AbstractContextManager[object]:
    """A file lock next to the SQLite store (``mlflow.db.lock``), held while the store is created or
    migrated and while an experiment is created; nothing for other stores (a server serialises them)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


def client() -> MlflowClient:
    """A client of the tracking store (created, or migrated, on first use under :func:`store_lock`)."""
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with store_lock():
        return MlflowClient(tracking_uri())


def existing_client() -> MlflowClient | None:
    """A client of the tracking store, or None when the default SQLite store does not exist (so that
    reading runs never creates an empty ``mlflow.db``)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return client()


def create_run(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None
) -> str:
    """A new run of ``experiment`` (created if needed) with ``tags`` and ``params``; its id.

    ValueError (one line, naming the store) when the store cannot be used.
    """
    try:
        mlflow = client()
        end_orphaned_runs()
        with store_lock():
            found = mlflow.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)
        all_tags = {**{k: str(v) for k, v in (tags or {}).items()}, **owner_tags()}
        run = mlflow.create_run(experiment_id, run_name=run_name, tags=all_tags)
        log_params(run.info.run_id, params)
    except Exception as error:  # MLflow raises many types (store, REST, OS errors)
        raise BackendUnavailable(
            f"cannot create the MLflow run at {tracking_uri()}: {first_line(error)}"
        ) from None
    return str(run.info.run_id)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Params not yet on the run (a resumed run keeps the ones it was started with)."""
    mlflow = client()
    existing = set(mlflow.get_run(run_id).data.params)
    for key, value in params.items():
        if key not in existing:
            text = str(value)
            mlflow.log_param(
                run_id, key, text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 10] + "..."
            )


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """The finite values of ``metrics`` (at ``step``, if given)."""
    log_history(run_id, {step or 0: metrics})


def log_history(run_id: str, steps: Mapping[int, Mapping[str, float | None]]) -> None:
    """The finite values of many steps' metrics ({step: {name: value}}; nulls skipped), in batches of
    the size MLflow accepts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, step)
        for step, values in sorted(steps.items())
        for k, v in values.items()
        if v is not None and math.isfinite(float(v))
    ]
    mlflow = client()
    for start in range(0, len(metrics), MAX_BATCH):
        mlflow.log_batch(run_id, metrics=metrics[start : start + MAX_BATCH])


def log_artifacts(run_id: str, paths: Sequence[Path], artifact_path: str | None = None) -> None:
    """Files (and whole folders) as artifacts, under ``artifact_path`` (or a folder's own name)."""
    mlflow = client()
    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            mlflow.log_artifact(run_id, str(path), artifact_path)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags learnt after the run was created (e.g. the training run behind a sweep's cell)."""
    mlflow = client()
    for key, value in tags.items():
        mlflow.set_tag(run_id, key, str(value))


def reopen_run(run_id: str) -> None:
    """Mark an ended run RUNNING again: it is being continued (a resumed training) by this process."""
    client().update_run(run_id, status="RUNNING")
    set_tags(run_id, owner_tags())


def owner_tags() -> dict[str, str]:
    """This process as a run's owner: pid, host name and the process's start time (a pid is reused)."""
    return {
        "ctpo.pid": str(os.getpid()),
        "ctpo.host": socket.gethostname(),
        "ctpo.process_start": _started(os.getpid()),
    }


def _started(pid: int) -> str:
    """A process's start time (seconds since the epoch, as psutil gives it), or "" when it is gone."""
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def end_orphaned_runs() -> list[str]:
    """Mark KILLED every RUNNING run whose owner process (:func:`owner_tags`) ran on this host and is
    gone (a command killed by SIGKILL or a crash could not end its run); their ids."""
    mlflow = client()
    host = socket.gethostname()
    ended = []
    for run in mlflow.search_runs(
        [e.experiment_id for e in mlflow.search_experiments()],
        filter_string=f"attributes.status = 'RUNNING' and tags.`ctpo.host` = '{host}'",
    ):
        tags = run.data.tags
        if (
            all(k in tags for k in OWNER_TAGS)
            and _started(int(tags["ctpo.pid"])) != tags["ctpo.process_start"]
        ):
            mlflow.set_tag(run.info.run_id, "ctpo.ended_by", "a later ctpo command: its process was gone")
            mlflow.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def end_run(run_id: str, status: str) -> None:
    """Record the run's final status: ``finished``, ``failed`` or ``killed`` (MLflow's names)."""
    client().set_terminated(run_id, status=STATUSES[status])


@contextmanager
def mlflow_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[str]:
    """The lifecycle around a ``with`` block: a new run (or ``run_id`` resumed, adding only new params),
    ended FINISHED, KILLED (Ctrl-C) or FAILED (any other exception). Yields the run id."""
    if run_id is None:
        run_id = create_run(experiment, run_name, params, tags)
    else:
        log_params(run_id, params)
        reopen_run(run_id)
    try:
        yield run_id
    except KeyboardInterrupt:
        end_run(run_id, "killed")
        raise
    except BaseException:
        end_run(run_id, "failed")
        raise
    end_run(run_id, "finished")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (MLflow's run to many lines), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
