"""The sandbox service: SandboxFusion-compatible ``POST /run_code`` and ``GET /health`` (FastAPI + uvicorn).

Bad requests get a 4xx JSON ``{"detail": "<what is wrong>"}``, never a 500: malformed JSON (400), a body over
``max_request_mb`` (413), unknown fields, languages or out-of-range limits (422). Whatever a program does,
the answer is 200 with SandboxFusion's ``status`` (Success, Failed or SandboxError) and ``run_result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sandbox.client import SandboxClient, SandboxUnavailable
from sandbox.config import SandboxConfig
from sandbox.executor import RunResult, check_isolation, execute
from sandbox.process import dies_with_parent, stop_process_group

CONFIG_ENV = "CTPO_SANDBOX_CONFIG"
"""Carries the service's settings (JSON) from ``serve`` to uvicorn's worker processes."""

UNSAFE_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: --unsafe-no-isolation: the sandbox runs programs WITHOUT ISOLATION, as this user, on this host.
!!  They can read your files and secrets, reach the network and leave processes behind. Only the timeout and
!!  the resource limits apply (as root, not even the process limit). Use it on disposable machines only.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""

logger = logging.getLogger("sandbox")


class RunCodeRequest(BaseModel):
    """SandboxFusion's ``/run_code`` request, Python only. ``compile_timeout`` is accepted and unused."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="the program, run as `python main.py` in an empty working directory")
    language: Literal["python"] = Field(description="only python")
    stdin: str | None = Field(None, description="text fed to the program's standard input")
    run_timeout: float = Field(10.0, gt=0, description="wall-clock limit in seconds")
    memory_limit_MB: int = Field(-1, description="address-space limit in MiB; <= 0 means the service default")
    compile_timeout: float = 10.0
    files: dict[str, str | None] = Field(default_factory=dict, description="must be empty: not supported")
    fetch_files: list[str] = Field(default_factory=list, description="must be empty: not supported")
    args: list[str] = Field(default_factory=list, description="must be empty: not supported")

    @field_validator("files", "fetch_files", "args")
    @classmethod
    def _only_empty(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported by this sandbox; send an empty value or leave it out")
        return value


class CommandRunResult(BaseModel):
    status: Literal["Finished", "TimeLimitExceeded", "Error"]
    execution_time: float
    return_code: int | None
    stdout: str
    stderr: str
    truncated: bool = Field(description="stdout or stderr exceeded the output limit and was cut")


class RunCodeResponse(BaseModel):
    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


def to_response(result: RunResult) -> RunCodeResponse:
    """SandboxFusion's verdict: Success only for a finished run with return code 0."""
    run = CommandRunResult(**{k: v for k, v in dataclasses.asdict(result).items() if k != "message"})
    if result.status == "Error":
        return RunCodeResponse(status="SandboxError", message=result.message, run_result=run)
    success = result.status == "Finished" and result.return_code == 0
    return RunCodeResponse(status="Success" if success else "Failed", message=result.message, run_result=run)


def describe(error: ValidationError) -> HTTPException:
    """One line naming every problem of a request, with the valid choices where there are some."""
    problems = error.errors()
    if any(p["type"] == "json_invalid" for p in problems):
        return HTTPException(400, f"malformed JSON: {problems[0]['msg']}")
    parts = []
    for problem in problems:
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        hint = (
            f" (valid fields: {', '.join(RunCodeRequest.model_fields)})"
            if problem["type"] == "extra_forbidden"
            else ""
        )
        parts.append(f"{where}: {problem['msg']}{hint}")
    return HTTPException(422, "invalid request: " + "; ".join(parts))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = HTTPException(413, f"request body exceeds the service's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(config: SandboxConfig) -> FastAPI:
    """The service for one worker process; at most ``config.max_concurrency`` programs run at once."""
    app = FastAPI(title="ctpo sandbox", description=__doc__)
    slots = asyncio.Semaphore(config.max_concurrency)
    load = {"running": 0, "waiting": 0}
    if not config.isolate:
        logger.warning("UNSAFE: this worker runs programs WITHOUT ISOLATION (--unsafe-no-isolation)")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        isolation = "bubblewrap" if config.isolate else "NONE (unsafe: --unsafe-no-isolation)"
        return {"status": "ok", "isolation": isolation, "max_concurrency": config.max_concurrency, **load}

    @app.post(
        "/run_code",
        response_model=RunCodeResponse,
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": RunCodeRequest.model_json_schema()}}}
        },
    )
    async def run_code(request: Request) -> RunCodeResponse:
        try:
            payload = RunCodeRequest.model_validate_json(
                await read_body(request, config.max_request_mb << 20)
            )
        except ValidationError as error:
            raise describe(error) from None
        if payload.run_timeout > config.max_run_timeout:
            raise HTTPException(
                422, f"run_timeout: at most {config.max_run_timeout:g} s, got {payload.run_timeout:g}"
            )
        if payload.memory_limit_MB > config.max_memory_mb:
            raise HTTPException(
                422, f"memory_limit_MB: at most {config.max_memory_mb}, got {payload.memory_limit_MB}"
            )
        load["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            load["waiting"] -= 1
        load["running"] += 1
        try:
            result = await execute(
                config, payload.code, payload.stdin or "", payload.run_timeout, payload.memory_limit_MB
            )
        except Exception as error:  # a bug of ours must still answer in the protocol, and be logged
            logger.exception("sandbox execution failed")
            result = RunResult("Error", message=f"internal sandbox error: {error!r}")
        finally:
            load["running"] -= 1
            slots.release()
        return to_response(result)

    return app


def app_from_environment() -> FastAPI:
    """uvicorn's app factory in each worker: the settings ``serve`` put in the environment."""
    return create_app(SandboxConfig.from_json(os.environ[CONFIG_ENV]))


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    max_concurrency: int | None = None,
    unsafe_no_isolation: bool = False,
    settings: Sequence[str] = (),
    log_level: str = "info",
) -> None:
    """Run the service in the foreground until interrupted; ``settings`` are ``NAME=VALUE`` overrides of
    :class:`~sandbox.config.SandboxConfig` (limits).

    Refuses to start (FileNotFoundError or ValueError, one line) when bubblewrap is missing or cannot create a
    sandbox here, unless ``unsafe_no_isolation``, which it then announces loudly on stderr.
    """
    import uvicorn

    if workers < 1 or not 0 <= port <= 65535:
        raise ValueError(f"need workers >= 1 and a port in 0..65535, got workers={workers}, port={port}")
    config = SandboxConfig(isolate=not unsafe_no_isolation).with_settings(settings)
    if max_concurrency is not None:
        config = dataclasses.replace(config, max_concurrency=max_concurrency)
    if unsafe_no_isolation:
        print(UNSAFE_BANNER, file=sys.stderr, flush=True)
    check_isolation(config)
    os.environ[CONFIG_ENV] = config.to_json()
    uvicorn.run(
        "sandbox.server:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )


@dataclass
class Service:
    """A service started by :func:`running_service`: its base ``url``, process and log."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the service wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_service(
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 1,
    max_concurrency: int | None = None,
    unsafe_no_isolation: bool = False,
    settings: Sequence[str] = (),
    startup_timeout: float = 60.0,
) -> Iterator[Service]:
    """Run :func:`serve` in a child process (its own process group) for the duration of a ``with`` block.

    Arguments as :func:`serve`'s; ``port=0`` picks a free port. Waits until ``/health`` answers; raises SandboxUnavailable with the
    service's last log line if it exits or stays unhealthy for ``startup_timeout`` seconds. On exit stops
    exactly that process group.
    """
    port = port or _free_port(host)
    arguments = dict(
        host=host,
        port=port,
        workers=workers,
        max_concurrency=max_concurrency,
        unsafe_no_isolation=unsafe_no_isolation,
        settings=list(settings),
        log_level="warning",
    )
    code = f"from sandbox.server import serve; serve(**{arguments!r})"
    fd, log_name = tempfile.mkstemp(prefix="ctpo-sandbox-service-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=dies_with_parent(),  # gone with this command, even after a SIGKILL
        )
    url_host = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
    service = Service(f"http://{url_host}:{port}", process, log_path)
    try:
        _wait_until_healthy(service, startup_timeout)
        yield service
    finally:
        stop_process_group(process)  # SIGTERM: uvicorn drains for up to 5 s; SIGKILL after 15 s
        log_path.unlink(missing_ok=True)


@dataclass
class Sandbox:
    """The service a command uses: its URL and, when the command started it, a liveness check."""

    url: str
    alive: Callable[[], bool] | None = None


@contextlib.contextmanager
def given_or_started(url: str | None) -> Iterator[Sandbox]:
    """The service at ``url`` (it must answer ``/health``), or, with no URL, one started now by
    :func:`running_service` and stopped (exactly its process group) on exit. Both ``ctpo train`` and
    ``ctpo eval`` get their sandbox here. SandboxUnavailable, one line, when neither works."""
    if url:
        with SandboxClient(url) as client:
            if not client.health():
                raise SandboxUnavailable(
                    f"the sandbox service at {url} does not answer /health; give the URL of a running "
                    "service (e.g. `ctpo sandbox serve`), or none to start one"
                )
        yield Sandbox(url)
        return
    with contextlib.ExitStack() as stack:
        try:
            service = stack.enter_context(running_service())
        except SandboxUnavailable as error:
            raise SandboxUnavailable(
                f"cannot start the sandbox service ({error}); or give the URL of a running one"
            ) from None
        yield Sandbox(service.url, alive=lambda: service.process.poll() is None)


def _wait_until_healthy(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with SandboxClient(service.url) as client:
        while not client.health():
            code = service.process.poll()
            if code is not None or time.monotonic() > deadline:
                state = f"exited with code {code}" if code is not None else f"not healthy after {timeout:g} s"
                last = ([line for line in service.log().splitlines() if line.strip()] or ["no output"])[-1]
                raise SandboxUnavailable(f"sandbox service {state}: {last}")
            time.sleep(0.05)
