"""The service around the sandbox: start-up refusals, the unsafe mode, the protocol, the client, shutdown,
several workers and the benchmark."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from ctpo_cli.bench.sandbox import bench_sandbox
from sandbox.client import SandboxClient, SandboxUnavailable
from sandbox.config import BWRAP_ENV
from sandbox.executor import TRUNCATION_MARKER
from sandbox.server import Service, _free_port, running_service


def ctpo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ctpo_cli.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize(
    ("bwrap", "reason"),
    [
        ("/nonexistent/bwrap", "bubblewrap not found at /nonexistent/bwrap"),
        ("/bin/false", "cannot run a sandbox"),
    ],
)
def test_serve_refuses_to_start_without_working_bwrap(bwrap: str, reason: str) -> None:
    done = ctpo("sandbox", "serve", "--port", "0", env={BWRAP_ENV: bwrap})
    assert done.returncode == 2 and reason in done.stderr and "--unsafe-no-isolation" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cli_serve_starts_with_its_options_and_stops_on_sigterm() -> None:
    port = _free_port("127.0.0.1")
    options = ["--port", str(port), "--max-concurrency", "3", "--set", "nproc=8", "--set", "output_limit=10"]
    command = [sys.executable, "-m", "ctpo_cli.cli", "sandbox", "serve", *options]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        with SandboxClient(f"http://127.0.0.1:{port}") as client:
            while not client.health():
                assert server.poll() is None and time.monotonic() < deadline, (
                    "ctpo sandbox serve did not start"
                )
                time.sleep(0.05)
            assert httpx.get(f"http://127.0.0.1:{port}/health").json()["max_concurrency"] == 3
            result = client.run_code(
                "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC)[0], 'x' * 20)"
            )
            assert (result.stdout, result.truncated) == ("8 " + "x" * 8 + TRUNCATION_MARKER, True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode in (0, -signal.SIGTERM) and b"Application shutdown complete" in stderr, stderr
    assert b"sandbox isolation: bubblewrap, per-request limits: " in stderr


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("bogus=1", "NAME one of bwrap, max_concurrency"),
        ("isolate=0", "NAME one of"),
        ("nproc", "NAME=VALUE"),
        ("nproc=many", "nproc needs a int, got 'many'"),
        ("nproc=0", "nproc must be positive"),
        ("without_cgroups=maybe", "without_cgroups needs one of warn, refuse, got 'maybe'"),
    ],
)
def test_serve_rejects_bad_settings(setting: str, reason: str) -> None:
    done = ctpo("sandbox", "serve", "--set", setting, env={})
    assert done.returncode == 2 and reason in done.stderr, done.stderr


def test_running_service_says_why_it_did_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="bubblewrap not found"), running_service():
        pass


def test_unsafe_no_isolation_is_loud_and_really_unisolated(
    monkeypatch: pytest.MonkeyPatch, host_secret_file: Path
) -> None:
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    with running_service(unsafe_no_isolation=True) as service, SandboxClient(service.url) as client:
        assert "WITHOUT ISOLATION" in service.log()
        assert "NONE" in httpx.get(f"{service.url}/health").json()["isolation"]
        assert client.run_code(f"print(open({str(host_secret_file)!r}).read())").stdout == "top secret\n"
        result = client.run_code("print('limits still apply'); import time; time.sleep(60)", run_timeout=1)
        assert (result.status, result.stdout) == ("TimeLimitExceeded", "limits still apply\n")


def test_response_follows_the_sandboxfusion_schema(service: Service) -> None:
    def post(code: str, run_timeout: float = 5) -> dict[str, Any]:
        request = {  # the payload verl's SandboxFusion client sends
            "compile_timeout": 10,
            "run_timeout": run_timeout,
            "code": code,
            "stdin": "",
            "memory_limit_MB": 1024,
            "language": "python",
            "files": {},
            "fetch_files": [],
        }
        response = httpx.post(f"{service.url}/run_code", json=request, timeout=30)
        assert response.status_code == 200
        return response.json()

    body = post("print('hi')")
    assert set(body) == {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    run = body["run_result"]
    assert set(run) == {"status", "execution_time", "return_code", "stdout", "stderr", "truncated"}
    assert (body["status"], run["status"], run["return_code"], run["stdout"]) == (
        "Success",
        "Finished",
        0,
        "hi\n",
    )
    failed = post("raise SystemExit(3)")
    assert (failed["status"], failed["run_result"]["return_code"]) == ("Failed", 3)
    slow = post("while True: pass", run_timeout=0.5)
    assert (slow["status"], slow["run_result"]["status"]) == ("Failed", "TimeLimitExceeded")


def test_health_reports_isolation_and_load(service: Service) -> None:
    expected_level = "cgroup v1" if Path("/sys/fs/cgroup/memory").is_dir() and os.geteuid() == 0 else None
    health = httpx.get(f"{service.url}/health").json()
    assert health == {
        "status": "ok",
        "isolation": "bubblewrap",
        "isolation_level": expected_level or health["isolation_level"],
        "max_concurrency": os.cpu_count(),
        "max_queue": 256,
        "admitted": 0,
        "running": 0,
        "waiting": 0,
    }
    assert health["isolation_level"] in ("cgroup v2", "cgroup v1", "rlimits only")


def test_math_libraries_work_inside(client: SandboxClient) -> None:
    code = (
        "import numpy, scipy.special, sympy\nprint(numpy.linalg.det(numpy.eye(3)), scipy.special.gamma(5))\n"
    )
    code += "print(sympy.integrate(sympy.Symbol('x') ** 2, (sympy.Symbol('x'), 0, 3)))"
    result = client.run_code(code, run_timeout=30)
    assert (result.status, result.stdout) == ("Finished", "1.0 24.0\n9\n"), result


def test_client_errors() -> None:
    unreachable = SandboxClient(f"http://127.0.0.1:{_free_port('127.0.0.1')}")
    assert not unreachable.health()
    with pytest.raises(SandboxUnavailable, match="unreachable"):
        unreachable.run_code("print(1)")


def test_client_reports_a_rejected_request(client: SandboxClient) -> None:
    with pytest.raises(ValueError, match="run_timeout: Input should be greater than 0"):
        client.run_code("print(1)", run_timeout=-1)


def test_stopping_the_service_kills_its_running_programs(process_tree: Callable[[int], list[int]]) -> None:
    def run_forever(url: str) -> None:
        with contextlib.suppress(SandboxUnavailable):
            SandboxClient(url).run_code("import time; time.sleep(120)", run_timeout=120)

    with running_service() as service:
        threading.Thread(target=run_forever, args=(service.url,), daemon=True).start()
        deadline = time.monotonic() + 30
        while not (sandbox := process_tree(service.process.pid)):
            assert time.monotonic() < deadline, "the program never started"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while alive := [pid for pid in sandbox if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"sandbox processes survived the service: {alive}"
        time.sleep(0.05)


def test_several_workers() -> None:
    with running_service(workers=2) as service, SandboxClient(service.url) as client:
        for index in range(6):
            assert client.run_code(f"print({index})").stdout == f"{index}\n"


def test_bench_sandbox_measures_both_runners(tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    rows = bench_sandbox(
        requests=4, concurrencies=[1, 2], rounds=2, out=str(out), console=Console(file=io.StringIO())
    )
    assert [(row["concurrency"], row["runner"]) for row in rows] == [
        (1, "python -c"),
        (1, "sandbox"),
        (2, "python -c"),
        (2, "sandbox"),
    ]
    for row in rows:
        assert row["executions_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    for bare, boxed in (rows[0:2], rows[2:4]):
        assert boxed["throughput_ratio"] == pytest.approx(
            boxed["executions_per_s"] / bare["executions_per_s"]
        )
        assert bare["throughput_ratio"] == 1.0
    with out.open() as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_bench_cli_rejects_a_bad_concurrency_list() -> None:
    done = ctpo("bench", "sandbox", "--concurrency", "1,lots", env={})
    assert done.returncode == 2 and "--concurrency must be comma-separated integers" in done.stderr


def test_a_dead_zygote_is_replaced(process_tree: Callable[[int], list[int]]) -> None:
    with running_service() as service, SandboxClient(service.url) as client:
        assert client.run_code("print(1)").stdout == "1\n"
        zygote = process_tree(service.process.pid)  # bubblewrap and the zygote, started by the service
        for pid in zygote:
            with contextlib.suppress(ProcessLookupError):  # gone with its parent already
                os.kill(pid, signal.SIGKILL)
        assert client.run_code("print(2)").stdout == "2\n"
        assert not set(process_tree(service.process.pid)) & set(zygote)  # a new one (the old one reaped)
