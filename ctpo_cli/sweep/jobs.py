"""A verl sweep: every cell is a Ray job on the cluster at ``--address`` running ``ctpo train``, then one
running ``ctpo eval`` on the run's last checkpoint (verl writes it in Hugging Face format too: the
train job asks for ``hf_model`` in the checkpoint contents).

The sweep directory must be on a filesystem the cluster's nodes share: each cell trains into
``<sweep>/runs/<cell>/`` (so that its one run directory is found there afterwards). Jobs are named
``<sweep>-<cell>-<train|eval>-<attempt>``, so a rerun of the sweep finds the jobs it already submitted:
succeeded ones are not run again, running ones are waited for, and a failed job is submitted once more.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from rich.console import Console

from ctpo_cli.errors import ConfigError, InputFileError
from ctpo_cli.runs import rundir, tracking
from ctpo_cli.sweep.grid import MAX_ATTEMPTS, Cell, SweepDir, SweepSpec, open_child

HF_CHECKPOINT = "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
"""The override that makes verl also save each checkpoint in Hugging Face format (what ``ctpo eval`` loads)."""
EVAL_N = 32
"""avg@32 on the paper's benchmarks, as its Table 2."""
POLL_S = 15.0
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def cell_runs_dir(sweep: SweepDir, cell: Cell) -> Path:
    """Where the cell's training job puts its run directory."""
    return sweep.runs.resolve() / cell.name


def train_entrypoint(spec: SweepSpec, sweep: SweepDir, cell: Cell) -> str:
    """``ctpo train`` of the cell on verl (the command a Ray job runs)."""
    model = ["--model", spec.model] if spec.model else []
    args = ["ctpo", "train", "--method", cell.method, *model, "--seed", str(cell.seed)]
    return shlex.join([*args, "--out", str(cell_runs_dir(sweep, cell)), *cell.overrides, HF_CHECKPOINT])


def hf_checkpoint(run_dir: Path) -> Path:
    """The Hugging Face export of the run's last verl checkpoint."""
    from ctpo_cli.train.launcher import VERL_CHECKPOINT_DIR, verl_checkpoint_step

    step = verl_checkpoint_step(run_dir)
    if not step:
        raise InputFileError(f"{run_dir} has no verl checkpoint")
    return run_dir / VERL_CHECKPOINT_DIR / f"global_step_{step}" / "actor" / "huggingface"


def eval_entrypoint(run_dir: Path) -> str:
    """``ctpo eval`` of the run's last checkpoint on the paper's benchmarks, into ``<run>/eval/``."""
    return shlex.join(
        [
            "ctpo",
            "eval",
            "--model",
            str(hf_checkpoint(run_dir)),
            "--n",
            str(EVAL_N),
            "--out",
            str(run_dir / "eval"),
        ]
    )


def job_id(sweep: SweepDir, cell: Cell, kind: str, attempt: int) -> str:
    return f"{sweep.root.resolve().name}-{cell.name}-{kind}-{attempt}"


def run_jobs(spec: SweepSpec, sweep: SweepDir, parent: str, address: str, console: Console) -> None:
    """Submit (or find) each cell's train job, then its eval job; wait for all (module docstring)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not address:
        raise ConfigError(
            "--backend verl submits Ray jobs: give the cluster's --address (e.g. http://head:8265)"
        )
    client = JobSubmissionClient(address)
    known = {job.submission_id for job in client.list_jobs()}
    states = {c: sweep.state(c).status for c in spec.cells}
    todo = {
        c: "eval" if status == "trained" else "train" for c, status in states.items() if status != "evaluated"
    }
    attempts = dict.fromkeys(todo, 1)
    console.print(f"[bold]sweep[/] {sweep.root}: {len(todo)} of {len(spec.cells)} cells to run on {address}")
    while todo:
        for cell, kind in list(todo.items()):
            state = sweep.state(cell)
            submission = job_id(sweep, cell, kind, attempts[cell])
            if submission not in known:
                open_child(cell, state, parent)
                entry = (
                    train_entrypoint(spec, sweep, cell)
                    if kind == "train"
                    else eval_entrypoint(Path(str(state.run_dir)))
                )
                client.submit_job(entrypoint=entry, submission_id=submission)
                known.add(submission)
                state.status = "training" if kind == "train" else "trained"
                sweep.write_state(cell, state)
                console.print(f"{cell.name}: submitted {submission}")
                continue
            status = client.get_job_status(submission)
            if status not in FINAL:
                continue
            if status == JobStatus.SUCCEEDED:
                if kind == "train":
                    (state.run_dir,) = [str(p) for p in rundir.find_runs(cell_runs_dir(sweep, cell))]
                    state.status, todo[cell] = "trained", "eval"
                else:
                    state.status, state.eval_dir = "evaluated", str(Path(str(state.run_dir)) / "eval")
                    tracking.end_run(str(state.child_run_id), "finished")
                    del todo[cell]
                sweep.write_state(cell, state)
                console.print(f"{cell.name}: {kind} job succeeded")
            elif attempts[cell] < MAX_ATTEMPTS:
                attempts[cell] += 1
                console.print(f"[yellow]{cell.name}: {kind} job {submission} {status}; retrying")
            else:
                state.status, state.error = "failed", f"{kind} job {submission} {status}"
                sweep.write_state(cell, state)
                tracking.end_run(str(state.child_run_id), "failed")
                del todo[cell]
        if todo:
            time.sleep(POLL_S)
