"""Shared, generic fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

RunCtpo = Callable[..., subprocess.CompletedProcess[str]]
ServeApp = Callable[[Any], str]


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


@pytest.fixture
def serve_app() -> Iterator[ServeApp]:
    """``serve_app(asgi_app)`` serves the app on 127.0.0.1 (a free port) in a uvicorn thread until the test
    ends, and returns its URL: a real HTTP server for a client under test."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(api: Any) -> str:
        server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            thread.join(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)
