"""One real sandbox service (real bwrap) per test module, and the checks that nothing escaped it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.client import SandboxClient
from sandbox.server import Service, running_service

SECRET_ENV = "CTPO_SANDBOX_TEST_SECRET"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


IDLE: dict[int, set[int]] = {}
"""Per service process: its processes when idle (bubblewrap and the zygote), recorded when it started."""


def assert_contained(service: Service, within: float = 10.0) -> None:
    """The service is healthy and, within ``within`` seconds, runs no process but those it ran when idle
    (the same zygote: no sandbox left, and the zygote neither died nor was replaced)."""
    with SandboxClient(service.url) as client:
        assert client.health(), "service unhealthy"
    deadline = time.monotonic() + within
    while (running := set(descendants(service.process.pid))) != IDLE[service.process.pid]:
        assert time.monotonic() < deadline, (
            f"processes left behind by the sandbox: {running - IDLE[service.process.pid]}, "
            f"idle processes gone: {IDLE[service.process.pid] - running}"
        )
        time.sleep(0.05)


@pytest.fixture
def contained(service: Service) -> Iterator[None]:
    """After the test: the module's service is healthy and no sandboxed process survived."""
    yield
    assert_contained(service)


@pytest.fixture
def process_tree() -> Callable[[int], list[int]]:
    """:func:`descendants`, for tests that follow processes themselves."""
    return descendants


@pytest.fixture(scope="module")
def secret() -> str:
    """A secret in the service's environment, which programs must never see."""
    return "ctpo-secret-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, secret: str) -> Iterator[Service]:
    """The module's service; a module may set ``SERVICE_OPTIONS`` (keyword arguments of running_service)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_ENV, secret)
        with running_service(**getattr(request.module, "SERVICE_OPTIONS", {})) as started:
            with SandboxClient(started.url) as client:  # the zygote answered: it is up
                assert client.run_code("pass").status == "Finished"
            IDLE[started.process.pid] = set()
            while IDLE[started.process.pid] != (now := set(descendants(started.process.pid))):
                IDLE[started.process.pid] = now  # until the warm-up request's processes are gone
                time.sleep(0.5)
            yield started


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[SandboxClient]:
    with SandboxClient(service.url) as started:
        yield started


@pytest.fixture
def host_secret_file() -> Iterator[Path]:
    """A fake secret in the host user's home directory, removed afterwards."""
    path = Path.home() / f".ctpo-sandbox-test-secret-{secrets.token_hex(4)}"
    path.write_text("top secret")
    yield path
    path.unlink()
