"""The work of a local-backend sweep, one function per Ray task. Each runs in a Ray worker, writes its
console output to a log file of the sweep and returns plain paths; the driver keeps the sweep's state.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ctpo_cli.sweep.grid import RUNS_DIR, Cell
from ctpo_cli.sweep.heldout import evaluate_heldout, heldout_benchmark
from ctpo_cli.train.local.config import build_config

START = "start"
"""The method name of the starting (warm-started) policy in a sweep's report."""
START_DIR = "start"
"""Under the sweep directory: per seed (and override set), the held-out problems and the starting
policy's eval."""
CELL_EVAL = Path("eval") / "heldout"
"""Where a cell's held-out eval goes inside its run directory."""


def _console(log: Path) -> Console:
    log.parent.mkdir(parents=True, exist_ok=True)
    return Console(file=open(log, "a"), width=120, force_terminal=False)


def start_of(cell: Cell) -> Cell:
    """The pseudo-cell of the starting policy that ``cell``'s run begins from (method ``start``)."""
    return Cell(START, cell.seed, cell.overrides)


def start_dir(root: Path, cell: Cell) -> Path:
    """``<root>/start/<start cell>/``: the held-out problems of ``cell``'s seed and its start's eval."""
    return root / START_DIR / start_of(cell).name


def start_eval(root: Path, cell: Cell) -> Path:
    """The eval directory of ``cell``'s starting policy."""
    return start_dir(root, cell) / "eval"


def start_policy(cell: Cell, preset: str, model: str | None, root: Path, samples: int, log: Path) -> str:
    """Warm-start the starting policy of ``cell`` (cached under ``<root>/runs/.warmstart`` by config and
    seed, shared by every method) and evaluate it on the seed's held-out problems; returns the eval
    directory. Run once per start before the cells, so that no two workers warm-start the same policy."""
    from ctpo_cli.train.local.train import initial_policy, starting_checkpoint

    console = _console(log)
    config = build_config(preset, list(cell.overrides))
    runs = root / RUNS_DIR
    initial_policy(config, model, cell.seed, runs, "cpu", console)
    here = start_dir(root, cell)
    benchmark = heldout_benchmark(here, config, cell.seed)
    checkpoint = starting_checkpoint(config, model, cell.seed, runs)
    return str(
        evaluate_heldout(checkpoint, benchmark, config, samples, cell.seed, start_eval(root, cell), console)
    )


def train(cell: Cell, preset: str, model: str | None, root: Path, log: Path) -> str:
    """Train the cell's run under ``<root>/runs``; returns its run directory."""
    from ctpo_cli.train.local.train import train_local

    run = train_local(
        cell.method,
        model=model,
        seed=cell.seed,
        preset=preset,
        overrides=list(cell.overrides),
        runs_dir=root / RUNS_DIR,
        console=_console(log),
    )
    return str(run)


def evaluate(cell: Cell, preset: str, run_dir: Path, root: Path, samples: int, log: Path) -> str:
    """The run's checkpoint on its seed's held-out problems; returns the eval directory."""
    from ctpo_cli.runs.rundir import CHECKPOINT_DIR

    config = build_config(preset, list(cell.overrides))
    benchmark = heldout_benchmark(start_dir(root, cell), config, cell.seed)
    out = run_dir / CELL_EVAL
    return str(
        evaluate_heldout(run_dir / CHECKPOINT_DIR, benchmark, config, samples, cell.seed, out, _console(log))
    )
