"""The run directory: the files every backend writes and the analysis module reads.

    runs/<name>/
      run.json          method, backend, model, seed, hyperparameters, MLflow run id, status
      metrics.jsonl     one JSON object per training step: {"step": k, "<metric>": value, ...}
      positions/        per-position K_t statistics, one parquet per step (ctpo_cli.algo.diagnostics)
      checkpoint/       the latest policy (Hugging Face format) and trainer state
      eval/             `ctpo eval` results for this run's checkpoint

Writes are append-only or atomic (write then rename), so an interrupted run loses nothing it wrote.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ctpo_cli.errors import DataError, InputFileError, warn_damaged
from ctpo_cli.runs import atomic

RUNS_DIR = Path("runs")
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"


def run_name(method: str, model: str, seed: int) -> str:
    """``<method>-<model>-s<seed>-<YYYYmmdd-HHMMSS>`` (model reduced to its last path part)."""
    short = Path(model).name or model
    return f"{method}-{short}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_run_dir(runs_dir: Path, name: str) -> Path:
    """Create ``runs_dir/name`` and return it; ``name-2``, ``name-3``, ... when that is taken (two runs
    started in the same second must not share a directory)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path, suffix = runs_dir / name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1
            path = runs_dir / f"{name}-{suffix}"


def write_run_info(run_dir: Path, info: Mapping[str, Any]) -> None:
    """Atomically (re)write ``run.json``."""
    atomic.write_text(run_dir / RUN_FILE, json.dumps(dict(info), indent=2, sort_keys=True, default=str))


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """The run's ``run.json``; InputFileError naming the directory when it is not a run, DataError naming
    the file when it is damaged (not a JSON object)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise InputFileError(f"{run_dir} is not a ctpo run directory (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is damaged ({error})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path} is damaged (not a JSON object)")
    return info


def append_metrics(run_dir: Path, step: int, metrics: Mapping[str, float]) -> None:
    """Append one step's metrics as a JSON line (non-finite values become null)."""
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(_metrics_row(step, metrics)) + "\n")


def _metrics_row(step: int, metrics: Mapping[str, float | None]) -> dict[str, Any]:
    """``{"step": k, name: value}``, non-finite values (and nulls read back) as null."""
    return {
        "step": step,
        **{k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()},
    }


def write_metrics(run_dir: Path, steps: Mapping[int, Mapping[str, float | None]]) -> None:
    """Atomically (re)write ``metrics.jsonl`` with one row per step, in step order."""
    rows = [_metrics_row(step, metrics) for step, metrics in sorted(steps.items())]
    atomic.write_text(run_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def read_metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` as written (none when there is no file); a damaged line (a row torn
    by a crash) is skipped with a warning."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = {}
        if row is not None and not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            warn_damaged(f"{path}:{number}", "not a metrics row")
        elif row is not None:
            rows.append(row)
    return rows


def read_metric_steps(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` as {step: metrics}, the last record of a step winning."""
    return {int(row.pop("step")): row for row in read_metric_rows(run_dir)}


def keep_steps_through(run_dir: Path, step: int) -> list[int]:
    """Drop the rows of steps after ``step`` from ``metrics.jsonl`` (a run resumed from its step-``step``
    checkpoint trains them again); the steps dropped."""
    steps = read_metric_steps(run_dir)
    later = sorted(k for k in steps if k > step)
    if later:
        write_metrics(run_dir, {k: row for k, row in steps.items() if k <= step})
    return later


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """All logged steps as a DataFrame; the last record wins when a resumed run repeated a step."""
    if not (Path(run_dir) / METRICS_FILE).is_file():
        raise InputFileError(f"no {METRICS_FILE} in {run_dir}")
    frame = pd.DataFrame(read_metric_rows(run_dir))
    return frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def find_runs(base: Path = RUNS_DIR) -> list[Path]:
    """Run directories under ``base``, oldest first (by the time their run.json was started); a run
    whose run.json is damaged is skipped with a warning."""
    started = {}
    for path in Path(base).glob(f"*/{RUN_FILE}"):
        try:
            started[path.parent] = str(read_run_info(path.parent).get("started", ""))
        except DataError as error:
            warn_damaged(path.parent, str(error))
    return sorted(started, key=lambda p: (started[p], p.name))


def latest_run_per_method(base: Path = RUNS_DIR) -> dict[str, Path]:
    """The most recent run of each method under ``base``."""
    latest: dict[str, Path] = {}
    for run in find_runs(base):
        method = read_run_info(run).get("method")
        if method:
            latest[str(method)] = run
    return latest


def latest_checkpoint(base: Path = RUNS_DIR) -> Path | None:
    """The checkpoint directory of the most recent run that has one, or None."""
    for run in reversed(find_runs(base)):
        checkpoint = run / CHECKPOINT_DIR
        if (checkpoint / "config.json").is_file():
            return checkpoint
    return None
