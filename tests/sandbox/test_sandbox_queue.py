"""Hostile load against a service with one slot and a queue of two: a flood gets 429 with Retry-After before
its bodies are read, and requests abandoned by their clients while queued never run."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox.client import SandboxClient
from sandbox.server import Service, _free_port

pytestmark = pytest.mark.usefixtures("contained")
SERVICE_OPTIONS = {"max_concurrency": 1, "settings": ["max_queue=2"]}


def health(service: Service) -> dict[str, int]:
    return httpx.get(f"{service.url}/health").json()


def wait_for(service: Service, **load: int) -> None:
    deadline = time.monotonic() + 20
    while {key: health(service)[key] for key in load} != load:
        assert time.monotonic() < deadline, f"load never reached {load}: {health(service)}"
        time.sleep(0.05)


@contextlib.contextmanager
def sleeping(service: Service, count: int, seconds: float) -> Iterator[None]:
    """``count`` clients each running a program that sleeps ``seconds``, for the duration of the block."""

    def client() -> None:
        with SandboxClient(service.url, timeout=120) as session:
            session.run_code(f"import time; time.sleep({seconds})", run_timeout=60)

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join()


def test_a_flood_gets_429_with_retry_after_without_its_bodies_being_read(service: Service) -> None:
    with sleeping(service, 3, 3.0):
        wait_for(service, running=1, waiting=2)
        big = "#" * (7 << 20)
        start = time.monotonic()
        for _ in range(10):
            response = httpx.post(f"{service.url}/run_code", json={"code": big, "language": "python"})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert "queue is full" in response.json()["detail"]
        assert time.monotonic() - start < 3.0  # answered while the slot was still busy
    assert SandboxClient(service.url).run_code("print('after')").stdout == "after\n"


def test_requests_abandoned_while_queued_never_run(service: Service) -> None:
    with sleeping(service, 1, 4.0):
        wait_for(service, running=1, waiting=0)
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{service.url}/run_code",
                    json={"code": "import time; time.sleep(30)", "language": "python", "run_timeout": 30},
                    timeout=0.5,
                )
        wait_for(service, running=1, waiting=0)  # dropped from the queue while the slot is still busy
    wait_for(service, running=0, waiting=0)  # and they did not run afterwards (contained: nothing left)


@pytest.fixture
def venv_under_tmp() -> Iterator[Path]:
    """A virtualenv of this interpreter in /tmp itself (whatever TMPDIR says), removed afterwards."""
    venv = Path(tempfile.mkdtemp(prefix="ctpo-venv-", dir="/tmp"))
    yield venv
    shutil.rmtree(venv)


def test_a_virtualenv_under_tmp_serves(venv_under_tmp: Path) -> None:
    """The interpreter under /tmp, where each program gets a private tmpfs: it is bound back, read-only."""
    venv = venv_under_tmp
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    port = _free_port("127.0.0.1")
    command = [str(venv / "bin" / "python"), "-m", "ctpo_cli.cli", "sandbox", "serve", "--port", str(port)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with SandboxClient(f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 60
            while not client.health():
                assert server.poll() is None and time.monotonic() < deadline, "the service did not start"
                time.sleep(0.1)
            code = "import sys, os; print(sys.prefix); open('/tmp/x', 'w'); print(os.access(sys.prefix, os.W_OK))"
            result = client.run_code(code)
        assert (result.status, result.stdout) == ("Finished", f"{venv}\nFalse\n"), result
    finally:
        server.terminate()
        server.communicate(timeout=30)
