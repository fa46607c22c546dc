"""Data: the benchmark and training-set registry, its preparation, and the competition sets shipped here.

* :mod:`dataset.registry`: every known dataset (hub id, columns), the verl parquet schema
  (``data_source``, ``prompt``, ``ability``, ``reward_model``, ``extra_info``) and
  :func:`~dataset.registry.load_benchmark`.
* :mod:`dataset.prepare`: ``ctpo data prepare`` (hub or local file -> verl parquet).
* ``*.parquet`` beside this file: the five small competition sets, already in verl's schema, so that
  ``ctpo eval --benchmarks aime25`` works offline on a fresh install (sources and licences: README.md).

Two places hold data, and :func:`~dataset.registry.load_benchmark` looks in this order:
``DATA_DIR`` in the working directory (what ``ctpo data prepare`` wrote, e.g. DeepScaleR), then the
shipped sets (:func:`shipped_dir`, found through package resources, so it works from a wheel).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DATA_DIR = Path("dataset")
"""Where ``ctpo data prepare`` writes, relative to the working directory (the authors' scripts read ``dataset/`` too)."""


def shipped_dir() -> Path:
    """The folder of the shipped competition sets (this package's own directory, from any install)."""
    return Path(str(resources.files(__name__)))


def shipped_file(stem: str) -> Path | None:
    """``<stem>.parquet`` among the shipped sets, or None."""
    path = shipped_dir() / f"{stem}.parquet"
    return path if path.is_file() else None
