"""The sandbox service: SandboxFusion-compatible ``POST /run_code`` and ``GET /health`` (FastAPI + uvicorn).

Bad requests get a 4xx JSON ``{"detail": "<what is wrong>"}``, never a 500: malformed JSON (400), a body over
``max_request_mb`` (413), a wrong type, language or file name (422), a full queue (429, with Retry-After).
As SandboxFusion, unknown fields are ignored; limits above the service's are clamped (the response's
``message`` says so); ``fetch_files`` (returning files the program wrote) is not supported and answers
SandboxError. Whatever a program does, the answer is 200 with SandboxFusion's ``status`` (Success, Failed or
SandboxError) and ``run_result``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sandbox.client import SandboxClient, SandboxUnavailable
from sandbox.config import SandboxConfig
from sandbox.executor import Program, RunResult, SandboxRunner, check_isolation
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

NO_CGROUPS_BANNER = """
!!  WARNING: no cgroups: a request's memory is bounded per process (RLIMIT_AS), not for all its processes
!!  together, and tmpfs and shared memory are not bounded by it. Run the service as root on a host with
!!  cgroup memory and pids controllers, or pass --without-cgroups refuse to refuse to start without.
"""

logger = logging.getLogger("sandbox")


class RunCodeRequest(BaseModel):
    """SandboxFusion's ``/run_code`` request, Python only; fields it does not know are ignored, as
    SandboxFusion does. ``compile_timeout`` is accepted and unused."""

    model_config = ConfigDict(extra="ignore")

    code: str = Field(description="the program, run as `python main.py` in its own working directory")
    language: Literal["python"] = Field(description="only python")
    stdin: str | None = Field(None, description="text fed to the program's standard input")
    run_timeout: float = Field(10.0, gt=0, description="wall-clock limit in seconds (clamped to the maximum)")
    memory_limit_MB: int = Field(-1, description="memory limit in MiB (clamped); <= 0: the service default")
    compile_timeout: float = 10.0
    files: dict[str, str | None] = Field(
        default_factory=dict,
        description="relative path -> base64 content, written to the working directory first; null: skipped",
    )
    fetch_files: list[str] = Field(default_factory=list, description="must be empty: not supported")

    @field_validator("files")
    @classmethod
    def _relative_base64(cls, files: dict[str, str | None]) -> dict[str, str | None]:
        for name, content in files.items():
            parts = name.split("/")
            if not name or name.startswith("/") or ".." in parts or "" in parts or "\0" in name:
                raise ValueError(f"{name!r} must be a relative path without '..' or empty parts")
            if content is not None:
                try:
                    base64.b64decode(content, validate=True)
                except binascii.Error:
                    raise ValueError(f"{name!r}: content is not valid base64") from None
        return files

    def decoded_files(self) -> dict[str, bytes]:
        """The files to write: decoded, null ones left out (as SandboxFusion does)."""
        return {name: base64.b64decode(data) for name, data in self.files.items() if data is not None}


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
        parts.append(f"{where}: {problem['msg']}")
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


def clamp(payload: RunCodeRequest, config: SandboxConfig) -> tuple[Program, str]:
    """The program to run, limits above the service's clamped to them, and a note saying which were."""
    notes = []
    run_timeout, memory_mb = payload.run_timeout, payload.memory_limit_MB
    if run_timeout > config.max_run_timeout:
        notes.append(f"run_timeout clamped to {config.max_run_timeout:g} s (asked {run_timeout:g})")
        run_timeout = config.max_run_timeout
    if memory_mb > config.max_memory_mb:
        notes.append(f"memory_limit_MB clamped to {config.max_memory_mb} (asked {memory_mb})")
        memory_mb = config.max_memory_mb
    program = Program(payload.code, payload.stdin or "", payload.decoded_files(), run_timeout, memory_mb)
    return program, "; ".join(notes)


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone away (uvicorn reports it once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(config: SandboxConfig) -> FastAPI:
    """The service for one worker process: at most ``config.max_concurrency`` programs run at once and at
    most ``config.max_queue`` requests wait; more get 429. A request whose client disconnects is dropped
    from the queue, or its program killed."""
    slots = asyncio.Semaphore(config.max_concurrency)
    load = {"admitted": 0, "running": 0, "waiting": 0}  # admitted: reading its body, waiting or running
    sandbox = SandboxRunner.create(config)
    if not config.isolate:
        logger.warning("UNSAFE: this worker runs programs WITHOUT ISOLATION (--unsafe-no-isolation)")
    elif sandbox.cgroups is None:
        logger.warning(
            "NO CGROUPS: a request's memory is bounded per process only (RLIMIT_AS), its processes by "
            "RLIMIT_NPROC only (%s)",
            sandbox.cgroup_problem,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sandbox.start()  # the zygote, ahead of the first request
        try:
            yield
        finally:
            sandbox.close()

    app = FastAPI(title="ctpo sandbox", description=__doc__, lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        isolation = "bubblewrap" if config.isolate else "NONE (unsafe: --unsafe-no-isolation)"
        level = sandbox.isolation_level if config.isolate else "none"
        return {
            "status": "ok",
            "isolation": isolation,
            "isolation_level": level,
            "max_concurrency": config.max_concurrency,
            "max_queue": config.max_queue,
            **load,
        }

    async def queued(program: Program) -> RunResult:
        load["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            load["waiting"] -= 1
        load["running"] += 1
        try:
            return await sandbox.run(program)
        except Exception as error:  # a bug of ours must still answer in the protocol, and be logged
            logger.exception("sandbox execution failed")
            return RunResult("Error", message=f"internal sandbox error: {error!r}")
        finally:
            load["running"] -= 1
            slots.release()

    @app.post(
        "/run_code",
        response_model=RunCodeResponse,
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": RunCodeRequest.model_json_schema()}}}
        },
        responses={429: {"description": "the queue is full; retry after the Retry-After seconds"}},
    )
    async def run_code(request: Request) -> Any:
        if load["admitted"] >= config.max_concurrency + config.max_queue:  # before reading the body
            return JSONResponse(
                {"detail": f"the service's queue is full ({config.max_queue} waiting); retry later"},
                status_code=429,
                headers={"Retry-After": "1"},
            )
        load["admitted"] += 1  # from here on its body may be held: at most max_concurrency + max_queue
        try:
            return await admitted(request)
        finally:
            load["admitted"] -= 1

    async def admitted(request: Request) -> Any:
        try:
            payload = RunCodeRequest.model_validate_json(
                await read_body(request, config.max_request_mb << 20)
            )
        except ValidationError as error:
            raise describe(error) from None
        if payload.fetch_files:
            return RunCodeResponse(
                status="SandboxError",
                message="fetch_files is not supported by this sandbox: programs' files are not returned",
            )
        program, note = clamp(payload, config)
        work = asyncio.ensure_future(queued(program))
        gone = asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: drop the request, or kill its program
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        gone.cancel()
        response = to_response(work.result())
        response.message = "; ".join(part for part in (response.message, note) if part)
        return response

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
    level = check_isolation(config)
    if config.isolate and level == "rlimits only":
        print(NO_CGROUPS_BANNER, file=sys.stderr, flush=True)
    isolation = f"bubblewrap, per-request limits: {level}" if config.isolate else "NONE"
    print(f"sandbox isolation: {isolation}", file=sys.stderr, flush=True)
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
