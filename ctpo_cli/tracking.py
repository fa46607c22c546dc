"""MLflow tracking shared by training, evaluation and analysis.

Default store: ``sqlite:///mlflow.db`` in the working directory, the store a plain ``mlflow ui``
started there opens by default (MLflow 3's file store is deprecated). ``MLFLOW_TRACKING_URI``
overrides it. Runs end FINISHED, FAILED (an exception) or KILLED (Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DB_FILE = "mlflow.db"


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


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def mlflow_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """An active MLflow run (resumed when ``run_id`` is given), closed with the right status.

    Yields the ``mlflow`` module's active run. Params are logged once (on resume only new keys).
    """
    import mlflow

    _quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=dict(tags or {}))
    try:
        existing = set(run.data.params) if run_id else set()
        new = {k: _param(v) for k, v in params.items() if k not in existing}
        if new:
            mlflow.log_params(new)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5990] + "..."
