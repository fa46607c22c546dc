"""A real Ray cluster with its job server, for the verl sweep's Ray jobs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

STARTUP_S = 120.0
STOP_GRACE_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """The job server URL of a Ray head started for the test: ``ray start --head --block`` in a session
    of its own, with its own temp dir (so no ``ray.init()`` elsewhere on the machine finds it) and free
    ports, token authentication off. It advertises what the ``tiny-cpu`` preset asks of Ray (logical:
    16 CPUs, 1 GPU). Stopped by signalling ``ray start`` (then, if need be, its session's process group
    and any process still naming its temp dir): never ``ray stop``, which stops every Ray here."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    dashboard = free_port()
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--temp-dir",
        str(temp),
        "--port",
        str(free_port()),
    ]
    command += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]
    command += [
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
    ]
    command += ["--num-cpus", "16", "--num-gpus", "1", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    with open(temp / "ray-start.log", "w") as log:
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for(url, head, temp)
        yield url
    finally:
        _stop(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(url: str, head: subprocess.Popen[bytes], temp: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited: {(temp / 'ray-start.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray job server at {url} did not answer within {STARTUP_S:.0f} s")


def _stop(head: subprocess.Popen[bytes], temp: Path) -> None:
    head.terminate()  # ray start --block drains the node, then stops the processes it started (~5 s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    left = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(temp) in part for part in process.info["cmdline"] or []):
            left.append(process)
    for process in left:
        process.kill()
    psutil.wait_procs(left, timeout=10)
