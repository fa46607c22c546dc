"""The local engine's task as a verl experiment: ``ctpo.synthetic`` in an experiment file (the
``tiny-cpu`` preset, ``experiments/model/tiny-cpu.yaml``).

Model: the local engine's tiny Qwen3 after its supervised warm start (so rewards are not all zero),
from ``experiments/local/<local_preset>.yaml``, cached in ``runs/.warmstart/<key>`` as the local
engine caches it. Data: the synthetic counting problems (``ctpo_cli.train.local.task``) written as
verl parquet to ``runs/.synthetic/<key>/{train,val}.parquet``; validation uses the local engine's
held-out problems. Composition only names these paths (:func:`paths`, no training, so ``--dry-run``
stays instant); a launch builds what is missing (:func:`prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

SYNTHETIC_DIR = ".synthetic"


@dataclass
class SyntheticSection:
    """``ctpo.synthetic``: where a synthetic-task experiment's model and data come from."""

    local_preset: str | None = None
    """``experiments/local/<name>.yaml``: the tiny model, the task and the warm start (None: not synthetic)."""
    train_problems: int = 512
    """Training problems written to the train parquet (drawn from a stream disjoint from validation's)."""
    model_path: str = ""
    """Filled in: the warm-started checkpoint (``runs/.warmstart/<key>``)."""
    train_file: str = ""
    """Filled in: ``runs/.synthetic/<key>/train.parquet``."""
    val_file: str = ""
    """Filled in: ``runs/.synthetic/<key>/val.parquet`` (the held-out problems)."""


def paths(local_preset: str, train_problems: int, seed: int, runs_dir: Path) -> dict[str, str]:
    """The absolute checkpoint and data paths of a synthetic experiment (nothing is built):
    ``model_path``, ``train_file`` and ``val_file`` of :class:`SyntheticSection`."""
    from ctpo_cli.train.local.config import build_config
    from ctpo_cli.train.local.train import TINY, starting_checkpoint, warmstart_key

    config = build_config(local_preset)
    data = runs_dir / SYNTHETIC_DIR / f"{warmstart_key(config, seed, TINY)}-{train_problems}"
    return {
        "model_path": str(starting_checkpoint(config, None, seed, runs_dir).resolve()),
        "train_file": str((data / "train.parquet").resolve()),
        "val_file": str((data / "val.parquet").resolve()),
    }


def prepare(section: SyntheticSection, seed: int, runs_dir: Path, console: Console) -> None:
    """Build what :func:`paths` named and is missing: the warm start (minutes, once) and the parquet files."""
    from ctpo_cli.train.local.config import build_config
    from ctpo_cli.train.local.task import eval_problems, sample_problems, to_verl_frame
    from ctpo_cli.train.local.train import initial_policy
    from dataset.registry import write_parquet

    if section.local_preset is None:
        return
    config = build_config(section.local_preset)
    if not (Path(section.model_path) / "config.json").is_file():
        console.print(
            f"[bold]model:[/] warm-starting the tiny Qwen3 ({section.local_preset}), cached for later runs"
        )
        initial_policy(config, None, seed, runs_dir, "cpu", console)
    splits = {
        section.train_file: (
            "train",
            sample_problems(config.task, section.train_problems, np.random.default_rng([seed, 3])),
        ),
        section.val_file: ("test", eval_problems(config.task, seed)),
    }
    for path, (split, problems) in splits.items():
        if not Path(path).is_file():
            write_parquet(to_verl_frame(problems, split, config.task.system_prompt), Path(path))
