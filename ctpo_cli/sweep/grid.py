"""The grid of a sweep and its record on disk: which cells there are and where each one stands.

A cell is one (method, seed, overrides) run. Its state lives in ``<sweep>/cells/<cell>.json``,
rewritten atomically by the driver only (Ray workers return results, they write no state), so a
killed sweep restarted with the same command continues from what finished:

* ``evaluated``: trained and evaluated, skipped on a rerun;
* ``trained``: the run finished but its evaluation did not, so only the evaluation runs again;
* ``failed`` (after a second failed attempt) or anything else: trained (again) from the start.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctpo_cli.algo.losses import METHODS
from ctpo_cli.errors import ConfigError
from ctpo_cli.runs import atomic

EXPERIMENT = "ctpo-sweep"
"""The MLflow experiment of sweeps: a parent run per sweep, a child run per cell."""
SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"
LOGS_DIR = "logs"
RUNS_DIR = "runs"
REPORT_DIR = "report"
MAX_ATTEMPTS = 2
"""A failed cell is retried once."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``<method>-s<seed>``, then ``-<overrides_key>`` when there are overrides."""
        key = overrides_key(self.overrides)
        return f"{self.method}-s{self.seed}" + (f"-{key}" if key else "")


def overrides_key(overrides: Sequence[str]) -> str:
    """``o<8 hex digits>`` naming a set of overrides ("" for none)."""
    return "o" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8] if overrides else ""


@dataclass
class CellState:
    """Where a cell stands (module docstring); ``run_dir`` and ``eval_dir`` once they exist."""

    status: str = "pending"
    attempts: int = 0
    run_dir: str | None = None
    eval_dir: str | None = None
    child_run_id: str | None = None
    error: str | None = None
    history: list[str] = field(default_factory=list)


def parse_methods(text: str) -> list[str]:
    """``all`` or comma-separated method names; ValueError naming a bad one and the valid choices."""
    if text.strip() == "all":
        return list(METHODS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"--methods: unknown method {name!r}; valid: all, {', '.join(METHODS)}")
    if not names:
        raise ConfigError(f"--methods is empty; valid: all, {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parse_seeds(text: str) -> list[int]:
    """``0-4`` (inclusive), ``0,3,7`` or a mix such as ``0-2,9``."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(f"--seeds takes ranges and lists such as 0-4 or 0,3,7; got {text!r}")
        low = int(match[1])
        seeds.extend(range(low, int(match[2] or low) + 1))
    return list(dict.fromkeys(seeds))


def parse_grid(grid: Sequence[str]) -> list[tuple[str, ...]]:
    """Override sets: every combination of ``key=v1,v2`` options (one ``()`` when there are none).

    ``--grid rl.lr=1e-3,3e-3 --grid rl.minibatches=4,16`` gives four override sets.
    """
    sets: list[tuple[str, ...]] = [()]
    for item in grid:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise ConfigError(f"--grid {item!r} is not key=value[,value...] (e.g. rl.lr=1e-3,3e-3)")
        sets = [(*base, f"{key}={value}") for base in sets for value in choices]
    return sets


def cells(
    methods: Sequence[str], seeds: Sequence[int], override_sets: Sequence[tuple[str, ...]]
) -> list[Cell]:
    """The grid, seed-major (all methods of seed 0 first), so that early results already pair up."""
    return [Cell(m, s, o) for s in seeds for o in override_sets for m in methods]


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep was asked to do; a rerun in the same directory must ask the same."""

    backend: str
    preset: str
    model: str | None
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    override_sets: tuple[tuple[str, ...], ...]
    common: tuple[str, ...]
    samples: int

    @property
    def cells(self) -> list[Cell]:
        return cells(self.methods, self.seeds, [(*self.common, *o) for o in self.override_sets])


class SweepDir:
    """``<out>/``: sweep.json (the spec and the MLflow parent run), cells/, logs/, runs/, report/."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def runs(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    def log(self, cell: Cell) -> Path:
        return self.root / LOGS_DIR / f"{cell.name}.log"

    def open(self, spec: SweepSpec) -> dict[str, Any]:
        """The sweep's record, created on first use; ValueError when the directory holds another sweep."""
        path = self.root / SWEEP_FILE
        wanted = json.loads(json.dumps(asdict(spec)))
        if path.is_file():
            record: dict[str, Any] = json.loads(path.read_text())
            if record["spec"] != wanted:
                changed = [k for k in wanted if record["spec"].get(k) != wanted[k]]
                raise ConfigError(
                    f"{path} holds another sweep (differs in: {', '.join(changed)}); "
                    "rerun it with the same options or choose another --out"
                )
            return record
        for folder in (CELLS_DIR, LOGS_DIR, RUNS_DIR):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        record = {"spec": wanted, "parent_run_id": None}
        self.save(record)
        return record

    def save(self, record: dict[str, Any]) -> None:
        _write_json(self.root / SWEEP_FILE, record)

    def state(self, cell: Cell) -> CellState:
        path = self.root / CELLS_DIR / f"{cell.name}.json"
        return CellState(**json.loads(path.read_text())) if path.is_file() else CellState()

    def write_state(self, cell: Cell, state: CellState) -> None:
        _write_json(self.root / CELLS_DIR / f"{cell.name}.json", asdict(state))


def open_child(cell: Cell, state: CellState, parent: str) -> None:
    """The cell's MLflow child run of ``parent``: created on first use, reopened when continued."""
    from ctpo_cli.runs import tracking

    if state.child_run_id is None:
        params = {"method": cell.method, "seed": cell.seed, "overrides": " ".join(cell.overrides)}
        tags = {tracking.PARENT_TAG: parent, "cell": cell.name}
        state.child_run_id = tracking.create_run(EXPERIMENT, cell.name, params, tags)
    else:
        tracking.reopen_run(state.child_run_id)


def _write_json(path: Path, data: Any) -> None:
    """The sweep's state files, written atomically (:mod:`ctpo_cli.runs.atomic`)."""
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True))
