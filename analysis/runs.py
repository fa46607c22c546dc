"""Find the runs the user means and load what they recorded, from run directories or MLflow.

A RUN argument is, in this order: a run directory (with run.json), a run name under ``runs/``, an
MLflow run id, or an MLflow run name (the newest of that name). With no argument: the latest run of
each method under ``runs/``, plus the latest MLflow run of each method not found there.

Local-backend runs write everything to their directory; verl runs write run.json and positions/ to
theirs and their metrics to MLflow (verl's names, ``@`` logged as ``_at_``), which is read when a
run has no metrics.jsonl. A run found in MLflow whose ``run_dir`` tag/param names an existing run
directory is read from that directory.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from analysis.style import METHOD_COLORS
from ctpo_cli.algo.diagnostics import POSITIONS_DIR, read_positions
from ctpo_cli.errors import ConfigError, InputFileError
from ctpo_cli.runs import tracking
from ctpo_cli.runs.rundir import (
    METRICS_FILE,
    RUN_FILE,
    RUNS_DIR,
    latest_run_per_method,
    read_metrics,
    read_run_info,
)
from ctpo_cli.runs.tracking import tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run as MlflowRun

HOW_TO_MAKE_A_RUN = "make one with `ctpo quickstart` or `ctpo train --backend local`"
VERL_LOSS_PARAM = "actor_rollout_ref.actor.policy_loss.loss_mode"


@dataclass(frozen=True)
class Run:
    """One training run, wherever its records are."""

    name: str
    method: str
    seed: int | None = None
    model: str = ""
    backend: str = ""
    run_dir: Path | None = None
    mlflow_run_id: str | None = None

    @property
    def label(self) -> str:
        """``<method> s<seed>`` (``<method> <name>`` when the seed is unknown)."""
        return f"{self.method} s{self.seed}" if self.seed is not None else f"{self.method} {self.name}"

    @property
    def source(self) -> str:
        """Where the run's records are, for messages."""
        if self.run_dir is not None:
            return str(self.run_dir)
        return f"MLflow run {self.mlflow_run_id}"


def resolve_runs(args: Sequence[str], base: Path = RUNS_DIR) -> list[Run]:
    """The runs named by ``args``, or the latest run of each method when ``args`` is empty; in
    :func:`run_order` (so every figure and table lists methods the same way)."""
    runs = [resolve_run(arg, base) for arg in args] if args else latest_runs(base)
    return sorted(runs, key=run_order)


def run_order(run: Run) -> tuple[int, str, int, str]:
    """Sort key: methods in the registry's order (grpo, gspo, ctpo, ...; unknown ones last, by
    name), then seed, then name."""
    known = list(METHOD_COLORS)
    rank = known.index(run.method) if run.method in known else len(known)
    return rank, run.method, -1 if run.seed is None else run.seed, run.name


def resolve_run(arg: str, base: Path = RUNS_DIR) -> Run:
    """One RUN argument (see the module docstring)."""
    for candidate in (Path(arg), Path(base) / arg):
        if (candidate / RUN_FILE).is_file():
            return run_from_dir(candidate)
    if Path(arg).is_dir():
        raise InputFileError(f"{arg} is a directory but not a ctpo run directory (no {RUN_FILE})")
    found = find_mlflow_run(arg)
    if found is None:
        raise ConfigError(
            f"{arg!r} is neither a run directory nor a run id or name in the MLflow store {tracking_uri()}"
        )
    return run_from_mlflow(found)


def run_from_dir(run_dir: Path, mlflow_run_id: str | None = None) -> Run:
    """A run from its directory's run.json."""
    info = read_run_info(run_dir)
    seed = info.get("seed")
    return Run(
        name=Path(run_dir).name,
        method=str(info.get("method", "unknown")),
        seed=int(seed) if seed is not None else None,
        model=str(info.get("model", "")),
        backend=str(info.get("backend", "")),
        run_dir=Path(run_dir),
        mlflow_run_id=info.get("mlflow_run_id") or mlflow_run_id,
    )


def run_from_mlflow(run: MlflowRun) -> Run:
    """A run from its MLflow record (its run directory when a ``run_dir`` tag/param names one here)."""
    value = _mlflow_value(run, "run_dir")
    if value and (Path(value) / RUN_FILE).is_file():
        return run_from_dir(Path(value), run.info.run_id)
    seed = _mlflow_value(run, "seed")
    return Run(
        name=run.info.run_name or run.info.run_id,
        method=mlflow_method(run) or "unknown",
        seed=int(seed) if seed and seed.lstrip("-").isdigit() else None,
        model=_mlflow_value(run, "model") or "",
        backend=_mlflow_value(run, "backend") or "",
        mlflow_run_id=run.info.run_id,
    )


def _mlflow_value(run: MlflowRun, key: str) -> str | None:
    """A tag, else a param, of an MLflow run."""
    value = run.data.tags.get(key) or run.data.params.get(key)
    return str(value) if value is not None else None


def mlflow_method(run: MlflowRun) -> str | None:
    """The method of an MLflow run: its ``method`` tag/param, or verl's ``ctpo/<method>`` loss mode."""
    method = _mlflow_value(run, "method")
    if method:
        return method
    loss_mode = _mlflow_value(run, VERL_LOSS_PARAM) or ""
    return loss_mode.removeprefix("ctpo/") if loss_mode.startswith("ctpo/") else None


def _experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def find_mlflow_run(key: str) -> MlflowRun | None:
    """The MLflow run with this id, else the newest run with this name, else None."""
    from mlflow.exceptions import MlflowException

    client = tracking.existing_client()
    if client is None:
        return None
    if re.fullmatch(r"[0-9a-f]{32}", key):
        try:
            return client.get_run(key)
        except MlflowException:
            pass
    if "'" in key:
        return None
    runs = client.search_runs(
        _experiment_ids(client),
        filter_string=f"attributes.run_name = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def latest_runs(base: Path = RUNS_DIR) -> list[Run]:
    """Latest run of each method under ``base``, plus MLflow's latest of methods not found there."""
    runs = {method: run_from_dir(path) for method, path in latest_run_per_method(base).items()}
    client = tracking.existing_client()
    if client is not None:
        for record in client.search_runs(_experiment_ids(client), order_by=["attributes.start_time DESC"]):
            method = mlflow_method(record)
            if method and method not in runs:
                runs[method] = run_from_mlflow(record)
    if not runs:
        raise InputFileError(
            f"no runs found under {base}/ or in the MLflow store {tracking_uri()}; {HOW_TO_MAKE_A_RUN}"
        )
    return list(runs.values())


def load_metrics(run: Run, keys: Sequence[re.Pattern[str]] = ()) -> pd.DataFrame:
    """Per-step metrics, one row per step (column ``step``), from metrics.jsonl or MLflow history.

    ``keys``: for MLflow, fetch only metrics whose name matches one of these (all when empty).
    """
    if run.run_dir is not None and (run.run_dir / METRICS_FILE).is_file():
        return read_metrics(run.run_dir)
    client = tracking.existing_client() if run.mlflow_run_id else None
    if client is None or run.mlflow_run_id is None:
        raise InputFileError(f"run {run.label}: no {METRICS_FILE} in {run.source} and no MLflow run")
    names = [
        k
        for k in client.get_run(run.mlflow_run_id).data.metrics
        if not keys or any(p.fullmatch(k) for p in keys)
    ]
    rows = [
        {"step": m.step, "key": name, "value": m.value, "timestamp": m.timestamp}
        for name in names
        for m in client.get_metric_history(run.mlflow_run_id, name)
    ]
    if not rows:
        return pd.DataFrame({"step": pd.Series(dtype=int)})
    history = pd.DataFrame(rows).sort_values("timestamp")
    wide = history.pivot_table(index="step", columns="key", values="value", aggfunc="last")
    return wide.reset_index().rename_axis(columns=None)


def load_positions(run: Run) -> pd.DataFrame:
    """The run's per-position statistics (:func:`ctpo_cli.algo.diagnostics.read_positions`), from its
    directory or from ``positions/`` artifacts of its MLflow run."""
    if run.run_dir is not None and any((run.run_dir / POSITIONS_DIR).glob("step_*.parquet")):
        return read_positions(run.run_dir)
    client = tracking.existing_client() if run.mlflow_run_id else None
    if client is not None and run.mlflow_run_id and client.list_artifacts(run.mlflow_run_id, POSITIONS_DIR):
        with tempfile.TemporaryDirectory() as tmp:
            client.download_artifacts(run.mlflow_run_id, POSITIONS_DIR, tmp)
            return read_positions(tmp)
    raise InputFileError(
        f"run {run.label} ({run.source}) has no per-position diagnostics ({POSITIONS_DIR}/step_*.parquet)"
    )


def log_artifacts(runs: Sequence[Run], paths: Sequence[Path], artifact_path: str) -> list[str]:
    """Log ``paths`` to every run's MLflow record under ``artifact_path``; one message per run."""
    client = tracking.existing_client()
    messages = []
    for run_id, run in {r.mlflow_run_id: r for r in runs if r.mlflow_run_id}.items():
        if client is None:
            messages.append(f"{run.label}: not logged to MLflow (no store at {tracking_uri()})")
            continue
        try:
            tracking.log_artifacts(run_id, paths, artifact_path)
        except Exception as error:  # MLflow raises many types (store, REST, OS errors)
            messages.append(f"{run.label}: not logged to MLflow run {run_id}: {tracking.first_line(error)}")
        else:
            messages.append(f"{run.label}: logged to MLflow run {run_id} under {artifact_path}/")
    return messages
