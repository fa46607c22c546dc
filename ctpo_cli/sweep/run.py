"""The sweep driver: the grid on Ray, its MLflow parent and child runs, its state, then the report.

Local backend: a local Ray is started for the sweep (``--workers`` CPUs, default all of them) unless
``--address`` names a cluster; each task takes one CPU. First one task per starting policy (the
warm start every method of a seed shares, and its held-out eval), then one training task per cell,
each followed by its evaluation task. verl backend: every cell is a Ray job submitted to the
cluster (:mod:`ctpo_cli.sweep.jobs`).

MLflow: one parent run (experiment ``ctpo-sweep``), one child run per cell (tagged with
``mlflow.parentRunId``, the cell, its training run and run directory; its eval's avg@k as metrics,
``heldout/*`` for local cells, ``eval/*`` for verl's). The training and eval runs themselves keep their
own experiments (``ctpo-local`` or ``ctpo-verl-<model>``, ``ctpo-eval``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ctpo_cli.errors import ConfigError
from ctpo_cli.runs import tracking
from ctpo_cli.sweep import local
from ctpo_cli.sweep.grid import EXPERIMENT, MAX_ATTEMPTS, Cell, CellState, SweepDir, SweepSpec, open_child


class SweepFailed(RuntimeError):
    """Some cells failed twice: the sweep ends without a report (the command says which, in one line)."""


def run_sweep(spec: SweepSpec, out: Path, address: str | None, workers: int | None, console: Console) -> Path:
    """Run (or continue) the sweep in ``out``; returns the report directory."""
    from ctpo_cli.sweep.report import write_report

    check(spec)
    if spec.backend == "verl":
        from ctpo_cli.sweep.jobs import connect, run_jobs

        jobs_client = connect(address or "")  # before anything is written: an unreachable server is one line
    sweep = SweepDir(out)
    record = sweep.open(spec)
    cells = spec.cells
    params = {k: v for k, v in asdict(spec).items() if k != "override_sets"} | {"cells": len(cells)}
    tags = {"sweep_dir": str(Path(out).resolve()), "backend": spec.backend}
    with tracking.mlflow_run(
        EXPERIMENT, Path(out).resolve().name, params, tags, record["parent_run_id"]
    ) as parent:
        record["parent_run_id"] = parent
        sweep.save(record)
        if spec.backend == "verl":
            run_jobs(spec, sweep, parent, jobs_client, str(address), console)
        else:
            _run_local(spec, sweep, parent, address, workers, console)
        failed = [c.name for c in cells if sweep.state(c).status != "evaluated"]
        if failed:
            raise SweepFailed(
                f"{len(failed)} of {len(cells)} cells failed twice ({', '.join(failed)}); logs in {out}/logs/. "
                "Rerun the same command to retry them."
            )
        paths = write_report(sweep, spec, console)
        tracking.log_artifacts(parent, paths, "report")
    return sweep.report


def _run_local(
    spec: SweepSpec, sweep: SweepDir, parent: str, address: str | None, workers: int | None, console: Console
) -> None:
    """The local backend's grid as Ray tasks (module docstring)."""
    import ray

    from analysis.report import is_eval_dir

    root = sweep.root.resolve()
    cells = spec.cells
    todo = [c for c in cells if sweep.state(c).status != "evaluated"]
    starts = [
        s
        for s in dict.fromkeys(local.start_of(c) for c in cells)
        if not is_eval_dir(local.start_eval(root, s))
    ]
    console.print(
        f"[bold]sweep[/] {sweep.root}: {len(cells)} cells, {len(cells) - len(todo)} already evaluated"
    )
    if not todo and not starts:
        return
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        cpus = workers or os.cpu_count() or 1
        ray.init(num_cpus=cpus, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
    console.print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs")
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)
        tasks: list[Any] = [remote(f) for f in (local.start_policy, local.train, local.evaluate)]
        start_task, train_task, eval_task = tasks
        with progress_bar(console) as progress:
            bar = progress.add_task("starting policies", total=len(starts))
            pending: dict[Any, tuple[str, Cell]] = {}
            for start in starts:
                ref = start_task.remote(start, spec.preset, spec.model, root, spec.samples, sweep.log(start))
                pending[ref] = ("start", start)
            _drain(pending, lambda kind, cell, result, error: _started(progress, bar, cell, result, error))
            bar = progress.add_task(
                "cells (trained and evaluated)", total=len(cells), completed=len(cells) - len(todo)
            )
            for cell in todo:
                _reset_attempts(sweep, cell)
                pending.update(_submit(cell, sweep, spec, parent, root, train_task, eval_task))

            def finished(kind: str, cell: Cell, result: str | None, error: str | None) -> None:
                state = sweep.state(cell)
                if error is not None:
                    state.error = error
                    state.history.append(f"{kind} failed: {error}")
                    if state.attempts < MAX_ATTEMPTS:
                        progress.console.print(f"[yellow]{cell.name}: {kind} failed ({error}); retrying")
                        sweep.write_state(cell, state)
                        pending.update(_submit(cell, sweep, spec, parent, root, train_task, eval_task))
                        return
                    state.status = "failed"
                    sweep.write_state(cell, state)
                    tracking.end_run(state.child_run_id or "", "failed")
                    progress.console.print(
                        f"[red]{cell.name}: {kind} failed twice ({error}); see {sweep.log(cell)}"
                    )
                    progress.advance(bar)
                    return
                assert result is not None
                if kind == "train":
                    state.status, state.run_dir, state.error = "trained", result, None
                    sweep.write_state(cell, state)
                    ref = eval_task.remote(
                        cell, spec.preset, Path(result), root, spec.samples, sweep.log(cell)
                    )
                    pending[ref] = ("eval", cell)
                    return
                state.status, state.eval_dir, state.error = "evaluated", result, None
                sweep.write_state(cell, state)
                close_child(state, "heldout")
                progress.console.print(f"{cell.name}: {_heldout_text(Path(result))}", highlight=False)
                progress.advance(bar)

            _drain(pending, finished)
    finally:
        ray.shutdown()


def _reset_attempts(sweep: SweepDir, cell: Cell) -> None:
    """Each invocation of a sweep retries a failing cell once (a rerun tries failed cells again)."""
    state = sweep.state(cell)
    if state.attempts:
        state.attempts = 0
        sweep.write_state(cell, state)


def _submit(
    cell: Cell, sweep: SweepDir, spec: SweepSpec, parent: str, root: Path, train_task: Any, eval_task: Any
) -> dict[Any, tuple[str, Cell]]:
    """The cell's next task: its evaluation when it is trained, else its training (a new attempt)."""
    state = sweep.state(cell)
    open_child(cell, state, parent)
    state.attempts += 1  # an attempt: the training, or the evaluation of a run that trained
    if state.status == "trained" and state.run_dir:
        sweep.write_state(cell, state)
        ref = eval_task.remote(cell, spec.preset, Path(state.run_dir), root, spec.samples, sweep.log(cell))
        return {ref: ("eval", cell)}
    state.status = "training"
    sweep.write_state(cell, state)
    return {train_task.remote(cell, spec.preset, spec.model, root, sweep.log(cell)): ("train", cell)}


def _drain(
    pending: dict[Any, tuple[str, Cell]], done: Callable[[str, Cell, str | None, str | None], None]
) -> None:
    """Wait for every pending task (including those ``done`` adds), calling ``done`` on each result."""
    import ray

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        kind, cell = pending.pop(ready[0])
        try:
            result, error = ray.get(ready[0]), None
        except ray.exceptions.RayError as failure:
            result, error = None, tracking.first_line(getattr(failure, "cause", None) or failure)
        done(kind, cell, result, error)


def _started(progress: Progress, bar: Any, cell: Cell, result: str | None, error: str | None) -> None:
    if error is not None:
        raise RuntimeError(f"the starting policy {cell.name} failed: {error}")
    assert result is not None
    progress.console.print(f"{cell.name}: {_heldout_text(Path(result))}", highlight=False)
    progress.advance(bar)


def close_child(state: CellState, prefix: str) -> None:
    """Tag the child run with its training run and log its evaluation's avg@k (``<prefix>/avg_at_k``,
    ``<prefix>/stderr``), then end it."""
    from analysis.report import overall_row, read_eval
    from ctpo_cli.runs.rundir import read_run_info

    assert state.child_run_id and state.run_dir and state.eval_dir
    info = read_run_info(Path(state.run_dir))
    tracking.set_tags(
        state.child_run_id, {"run_dir": state.run_dir, "train_run_id": info.get("mlflow_run_id", "")}
    )
    row = overall_row(read_eval(Path(state.eval_dir)).summary)
    if row is not None:
        tracking.log_metrics(
            state.child_run_id,
            {f"{prefix}/avg_at_k": float(row["avg_at_k"]), f"{prefix}/stderr": float(row["stderr"])},
        )
    tracking.end_run(state.child_run_id, "finished")


def _heldout_text(eval_dir: Path) -> str:
    from analysis.report import overall_row, read_eval

    row = overall_row(read_eval(eval_dir).summary)
    return "evaluated" if row is None else f"held-out avg@k {float(row['avg_at_k']):.1%} ({eval_dir})"


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def check(spec: SweepSpec) -> None:
    """Refuse a grid that cannot run, naming the bad preset, model or override: every override set is
    composed now, before anything starts (verl: with verl's own config and checks, as ``ctpo train
    --dry-run``, so that a typo is one line here rather than two failed jobs per cell)."""
    override_sets = dict.fromkeys(c.overrides for c in spec.cells)
    if spec.backend == "local":
        from ctpo_cli.train.local.config import build_config

        for overrides in override_sets:
            build_config(spec.preset, list(overrides))
    else:
        from ctpo_cli.sweep.jobs import HF_CHECKPOINT
        from ctpo_cli.train.experiments import build_job, compose_experiment

        for overrides in override_sets:
            for method in spec.methods:
                experiment = compose_experiment(method, spec.model, 0, [], [*overrides, HF_CHECKPOINT])
                build_job(experiment)
    if spec.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {spec.samples}")


def print_grid(spec: SweepSpec, out: Path, console: Console) -> None:
    """The cells of the sweep (verl: with the command of each cell's training job)."""
    from rich.markup import escape
    from rich.table import Table

    from ctpo_cli.sweep.jobs import train_entrypoint

    check(spec)
    sweep = SweepDir(out)
    table = Table(
        "cell", "method", "seed", "overrides", "status", title=f"sweep {out}: {len(spec.cells)} cells"
    )
    if spec.backend == "verl":
        table.add_column("Ray job entrypoint", overflow="fold")
    for cell in spec.cells:
        row = [cell.name, cell.method, str(cell.seed), " ".join(cell.overrides), sweep.state(cell).status]
        if spec.backend == "verl":
            row.append(train_entrypoint(spec, sweep, cell))
        table.add_row(*map(escape, row))
    console.print(table)
