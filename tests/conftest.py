"""Shared, generic fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

RunCtpo = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def no_active_diagnostics() -> Iterator[None]:
    """No per-position accumulator is active before or after the test (the losses feed a process global)."""
    from ctpo_cli.algo import diagnostics

    diagnostics.activate(None)
    yield
    diagnostics.activate(None)


@pytest.fixture(scope="session")
def run_ctpo() -> RunCtpo:
    """``ctpo ARGS`` as a user runs it in ``cwd``: a new process, the MLflow store ``cwd/mlflow.db``
    (``mlflow ui``'s default there), no platform chosen from outside."""

    def run(*args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
        return subprocess.run(
            [sys.executable, "-m", "ctpo_cli.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
