"""A verl sweep: every cell is a Ray job on the cluster at ``--address`` (its job server, e.g.
``http://head:8265``) running ``ctpo train``, then one running ``ctpo eval`` on the run's last
checkpoint (verl writes it in Hugging Face format too: the train job asks for ``hf_model`` in the
checkpoint contents) with ``--n`` the sweep's ``--samples``, the run's tool protocol and reward.

The jobs run this sweep's Python (``sys.executable -m ctpo_cli.cli``) in the sweep's working directory
with its ``PYTHONPATH`` and MLflow tracking URI, so the cluster's nodes must share this machine's
filesystem and environment: each cell trains into ``<sweep>/runs/<cell>/`` (its warm start and data
cached there too) and its newest finished run directory is found there afterwards. The cluster must offer what the runs ask of Ray:
for the ``tiny-cpu`` model, logical GPUs (``ray start --head --num-gpus 1 --num-cpus 16``; see
``experiments/model/tiny-cpu.yaml``); inside the job ``ctpo train`` joins the cluster
(``ctpo_cli.train.launcher.join_cluster_overrides``).

Jobs are named ``<sweep>-<path hash>-<cell>-<train|eval>-<n>``, numbered on from the cell's last job
of that kind on the cluster, so a rerun of the sweep finds the jobs it already submitted: succeeded
ones are not run again, pending and running ones are waited for, and a failed one is submitted again
(each invocation tries every job twice). When a job ends its log is copied to
``<sweep>/logs/<cell>-<kind>-<n>.log``; while it runs, ``ray job logs -f --address <address> <job>``
follows it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console

from ctpo_cli.errors import BackendUnavailable, ConfigError, InputFileError
from ctpo_cli.runs import rundir, tracking
from ctpo_cli.sweep.grid import LOGS_DIR, MAX_ATTEMPTS, Cell, SweepDir, SweepSpec, open_child
from ctpo_cli.sweep.run import close_child, progress_bar

HF_CHECKPOINT = "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
"""The override that makes verl also save each checkpoint in Hugging Face format (what ``ctpo eval`` loads)."""
POLL_S = 10.0
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CTPO = [sys.executable, "-m", "ctpo_cli.cli"]
"""How a job runs ctpo: this sweep's Python (module docstring)."""


def job_command(args: list[str]) -> str:
    """A job's shell command: ``ctpo ARGS`` with this sweep's Python, in the directory the sweep was
    started from, so that what a job resolves against its working directory lands where it would for
    the sweep (MLflow's default artifact root ``./mlruns`` beside ``./mlflow.db``, ``data/``), not in
    the directory the cluster was started from."""
    return f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join([*CTPO, *args])}"


def cell_runs_dir(sweep: SweepDir, cell: Cell) -> Path:
    """Where the cell's training job puts its run directory."""
    return sweep.runs.resolve() / cell.name


def train_entrypoint(spec: SweepSpec, sweep: SweepDir, cell: Cell) -> str:
    """``ctpo train`` of the cell on verl (the command a Ray job runs)."""
    model = ["--model", spec.model] if spec.model else []
    args = ["train", "--method", cell.method, *model, "--seed", str(cell.seed)]
    return job_command([*args, "--out", str(cell_runs_dir(sweep, cell)), *cell.overrides, HF_CHECKPOINT])


def hf_checkpoint(run_dir: Path) -> Path:
    """The Hugging Face export of the run's last verl checkpoint."""
    from ctpo_cli.train.launcher import VERL_CHECKPOINT_DIR, verl_checkpoint_step

    step = verl_checkpoint_step(run_dir)
    if not step:
        raise InputFileError(f"{run_dir} has no verl checkpoint")
    return run_dir / VERL_CHECKPOINT_DIR / f"global_step_{step}" / "actor" / "huggingface"


def eval_entrypoint(run_dir: Path, samples: int) -> str:
    """``ctpo eval`` of the run's last checkpoint on the paper's benchmarks (avg@``samples``), with the
    tool protocol and reward the run trained with, into ``<run>/eval/``."""
    from ctpo_cli.train.launcher import EXPERIMENT_FILE

    trained = OmegaConf.load(run_dir / EXPERIMENT_FILE).ctpo
    args = ["eval", "--model", str(hf_checkpoint(run_dir)), "--n", str(samples)]
    args += ["--tir", str(trained.tir), "--reward", str(trained.reward), "--out", str(run_dir / "eval")]
    return job_command(args)


def finished_run(sweep: SweepDir, cell: Cell) -> Path:
    """The cell's newest finished run (an attempt that failed left its own run directory)."""
    runs = [
        r
        for r in rundir.find_runs(cell_runs_dir(sweep, cell))
        if rundir.read_run_info(r).get("status") == "finished"
    ]
    if not runs:
        raise InputFileError(f"the train job succeeded but {cell_runs_dir(sweep, cell)} has no finished run")
    return runs[-1]


def sweep_key(sweep: SweepDir) -> str:
    """``<directory name>-<8 hex digits of its absolute path>``: two sweeps' jobs never share a name."""
    root = sweep.root.resolve()
    return f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def job_id(sweep: SweepDir, cell: Cell, kind: str, number: int) -> str:
    return f"{sweep_key(sweep)}-{cell.name}-{kind}-{number}"


def job_env() -> dict[str, str]:
    """The environment a job adds to the cluster's: this sweep's MLflow store and ``PYTHONPATH``."""
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def failure_line(log: str) -> str:
    """What went wrong, from a failed job's log: its last exception line (``ValueError: ...``), else
    the last ``error:`` line ctpo printed, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    exceptions = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt): ", line)]
    errors = [line for line in lines if line.startswith("error:")]
    return (exceptions or errors or lines or ["the job wrote no log"])[-1]


def connect(address: str) -> Any:
    """The job server's client; one line when there is no address or it cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise ConfigError(
            "--backend verl submits Ray jobs: give the cluster's --address (e.g. http://head:8265)"
        )
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise BackendUnavailable(
            f"the Ray job server at --address {address} asks for its token ({tracking.first_line(error)}): "
            "set RAY_AUTH_MODE=token, with the token in ~/.ray/auth_token or $RAY_AUTH_TOKEN"
        ) from None
    except Exception as error:  # refused, not a job server, a bad URL: the user's cluster, not a bug
        raise BackendUnavailable(
            f"cannot reach the Ray job server at --address {address}: {tracking.first_line(error)}"
        ) from None


class JobSweep:
    """The sweep's jobs on the cluster (module docstring): ``todo`` maps each unfinished cell to the kind
    of job it waits for, ``current`` to that job, ``tries`` to the jobs of that kind this invocation
    started or adopted."""

    def __init__(
        self, spec: SweepSpec, sweep: SweepDir, parent: str, client: Any, address: str, console: Console
    ) -> None:
        self.spec, self.sweep, self.parent, self.address, self.console = spec, sweep, parent, address, console
        self.client = client
        self.status = {
            str(j.submission_id): str(j.status) for j in self.client.list_jobs() if j.submission_id
        }
        self.todo: dict[Cell, str] = {}
        self.current: dict[Cell, str] = {}
        self.tries: dict[Cell, int] = {}

    def run(self) -> None:
        """Start every unfinished cell's next job, then poll until every cell is evaluated or failed."""
        cells = self.spec.cells
        states = {c: self.sweep.state(c) for c in cells}
        self.todo = {
            c: "eval" if s.status == "trained" else "train"
            for c, s in states.items()
            if s.status != "evaluated"
        }
        done = len(cells) - len(self.todo)
        self.console.print(
            f"[bold]sweep[/] {self.sweep.root}: {len(cells)} cells, {done} already evaluated; Ray jobs on {self.address}"
        )
        with progress_bar(self.console) as bar:
            task = bar.add_task("cells (trained and evaluated)", total=len(cells), completed=done)
            for cell, kind in self.todo.items():
                self.start(cell, kind)
            while self.todo:
                for cell in list(self.todo):
                    status = self.poll(self.current[cell])
                    if status in FINAL and self.ended(cell, status, bar.console):
                        bar.advance(task)
                if self.todo:
                    time.sleep(POLL_S)

    def start(self, cell: Cell, kind: str) -> None:
        """Adopt the cell's last job of ``kind`` on the cluster, unless there is none or it failed: then
        submit the next one."""
        state = self.sweep.state(cell)
        open_child(cell, state, self.parent)
        number = self.latest(cell, kind)
        if not number or self.status[job_id(self.sweep, cell, kind, number)] in {"FAILED", "STOPPED"}:
            number += 1
            run_dir = Path(str(state.run_dir))
            entry = (
                train_entrypoint(self.spec, self.sweep, cell)
                if kind == "train"
                else eval_entrypoint(run_dir, self.spec.samples)
            )
            self.submit(job_id(self.sweep, cell, kind, number), entry)
        self.todo[cell], self.current[cell] = kind, job_id(self.sweep, cell, kind, number)
        self.tries[cell] = self.tries.get(cell, 0) + 1
        state.status, state.attempts = ("training" if kind == "train" else "trained"), self.tries[cell]
        self.sweep.write_state(cell, state)

    def ended(self, cell: Cell, status: str, console: Console) -> bool:
        """Record the cell's ended job and start its next one; whether the cell is done (evaluated, or
        failed twice: a failed training leaves it ``failed``, a failed evaluation ``trained``)."""
        submission, kind = self.current[cell], self.todo[cell]
        log = self.save_log(cell, submission, status)
        state = self.sweep.state(cell)
        state.history.append(f"{submission} {status}")
        if status == "SUCCEEDED" and kind == "train":
            state.status, state.run_dir, state.error = "trained", str(finished_run(self.sweep, cell)), None
            self.sweep.write_state(cell, state)
            self.tries[cell] = 0
            self.start(cell, "eval")
            return False
        if status == "SUCCEEDED":
            state.status, state.error = "evaluated", None
            state.eval_dir = str(Path(str(state.run_dir)) / "eval")
            self.sweep.write_state(cell, state)
            close_child(state, "eval")
            console.print(f"{cell.name}: trained and evaluated ({state.eval_dir})", highlight=False)
            del self.todo[cell]
            return True
        state.error = f"{kind} job {submission} {status} ({failure_line(log.read_text())}); its log: {log}"
        self.sweep.write_state(cell, state)
        if self.tries[cell] < MAX_ATTEMPTS:
            console.print(f"[yellow]{cell.name}: {state.error}; retrying", highlight=False)
            self.start(cell, kind)
            return False
        state.status = "failed" if kind == "train" else "trained"
        self.sweep.write_state(cell, state)
        tracking.end_run(str(state.child_run_id), "failed")
        console.print(f"[red]{cell.name}: {state.error}", highlight=False)
        del self.todo[cell]
        return True

    def latest(self, cell: Cell, kind: str) -> int:
        """The number of the cell's last job of ``kind`` on the cluster (0: none)."""
        prefix = job_id(self.sweep, cell, kind, 0).removesuffix("0")
        tails = [j.removeprefix(prefix) for j in self.status if j.startswith(prefix)]
        return max((int(t) for t in tails if t.isdigit()), default=0)

    def submit(self, submission: str, entrypoint: str) -> None:
        self.client.submit_job(
            entrypoint=entrypoint, submission_id=submission, runtime_env={"env_vars": job_env()}
        )
        self.status[submission] = "PENDING"
        self.console.print(
            f"submitted {submission} (follow: ray job logs -f --address {self.address} {submission})",
            highlight=False,
        )

    def poll(self, submission: str) -> str:
        """The job's status, asked of the server until it is final; a change is printed."""
        before = self.status[submission]
        if before not in FINAL:
            self.status[submission] = str(self.client.get_job_status(submission))
            if self.status[submission] != before:
                self.console.print(f"{submission}: {self.status[submission]}", highlight=False)
        return self.status[submission]

    def save_log(self, cell: Cell, submission: str, status: str) -> Path:
        """The ended job's log, copied to ``<sweep>/logs/<cell>-<kind>-<n>.log`` and appended to the cell's log."""
        text = self.client.get_job_logs(submission)
        path = self.sweep.root / LOGS_DIR / f"{submission.removeprefix(sweep_key(self.sweep) + '-')}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        with open(self.sweep.log(cell), "a") as log:
            log.write(f"===== {submission}: {status}\n{text}\n")
        return path


def run_jobs(
    spec: SweepSpec, sweep: SweepDir, parent: str, client: Any, address: str, console: Console
) -> None:
    """The verl backend's grid as Ray jobs on the job server ``client`` (:func:`connect`) at ``address``
    (module docstring)."""
    JobSweep(spec, sweep, parent, client, address, console).run()
