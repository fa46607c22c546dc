"""Run one Python program in a bubblewrap sandbox: limits, a wall-clock timeout, capped and decoded output.

What a program sees (``isolate=True``):

- namespaces: its own PID, network (nothing but its own loopback), IPC, UTS and cgroup namespaces, and a
  user namespace: bwrap's, or when the service runs as root the child's (child.py), made after dropping root;
- files: /usr and the interpreter's installation (prefix and site-packages) read-only, a fresh /proc and
  minimal /dev, private size-capped tmpfs at /workspace (its working directory, holding main.py read-only),
  /tmp and /dev/shm; nothing else of the host: no home, no project tree, no /etc but the loader cache, no host /tmp;
- environment: a fixed, minimal set of variables (nothing inherited from the service);
- user: the service's own uid, or ``sandbox_uid`` (nobody) when the service runs as root;
- limits: see :mod:`sandbox.child` and :class:`sandbox.config.SandboxConfig`.

The wall-clock timeout SIGKILLs bwrap's whole process group; the sandbox's PID 1 dying takes every process
of the PID namespace with it, detached or not. The same happens when the program's main process exits, so a
run never leaves anything behind. Output read before the kill is kept.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
import os
import signal
import site
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sandbox.config import BWRAP_ENV, SandboxConfig

TRUNCATION_MARKER = "\n[... output truncated ...]"
"""Appended to stdout or stderr when the program wrote more than ``SandboxConfig.output_limit`` bytes."""

WORKDIR = "/workspace"
"""The program's private working directory inside the sandbox."""

OUTPUT_GRACE_S = 2.0
"""How long to keep reading output after the program ended (the pipes' last bytes)."""

CHILD_SOURCE = Path(__file__).with_name("child.py").read_text()


@dataclass
class RunResult:
    """The outcome of one program: SandboxFusion's ``run_result``, plus ``truncated`` and ``message``.

    ``status`` is "Finished" (the program ended by itself, any return code), "TimeLimitExceeded" (killed at
    the wall-clock timeout, or by the CPU-time limit) or "Error" (the sandbox failed; ``message`` says why).
    A program killed by signal N has return code 128 + N; one killed at the timeout has none.
    """

    status: str
    stdout: str = ""
    stderr: str = ""
    return_code: int | None = None
    execution_time: float = 0.0
    truncated: bool = False
    message: str = ""


class _Capture:
    """The first ``limit`` bytes of a stream; later bytes are counted and dropped."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        """UTF-8 text, undecodable bytes as U+FFFD; a character cut by the limit is dropped, not mangled."""
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(
            bytes(self.data), final=not self.dropped
        )
        return text + TRUNCATION_MARKER if self.dropped else text


async def _pump(stream: asyncio.StreamReader | None, capture: _Capture) -> None:
    assert stream is not None
    while chunk := await stream.read(1 << 16):
        capture.feed(chunk)


async def _feed(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    """Write stdin and close it; a program that exits without reading it is not an error."""
    assert stream is not None
    try:
        stream.write(data)
        await stream.drain()
        stream.close()
    except (BrokenPipeError, ConnectionResetError):
        pass


def _drops_root(config: SandboxConfig) -> bool:
    return config.isolate and os.geteuid() == 0


def interpreter_roots() -> list[str]:
    """Directories of this interpreter and its packages that the sandbox binds read-only, outermost only.

    Only prefixes and site-packages directories: for a Python under a home directory (pyenv) the rest of
    that home stays invisible. Anything under /usr is bound anyway.
    """
    candidates = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, *site.getsitepackages()}
    roots: list[str] = ["/usr"]
    for path in sorted(os.path.abspath(p) for p in candidates if os.path.isdir(p)):
        if not any(path == root or path.startswith(root + "/") for root in roots):
            roots.append(path)
    return roots[1:]


@cache
def _bwrap_options(config: SandboxConfig) -> tuple[str, ...]:
    """The bwrap command up to the per-run part: namespaces, read-only system, private tmpfs."""
    options = [config.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    options += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    # As root, bwrap needs no user namespace; it lets the child (child.py) switch to sandbox_uid, then drops all caps.
    options += (
        ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if _drops_root(config) else ["--unshare-user"]
    )
    options += ["--ro-bind", "/usr", "/usr", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            options += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            options += ["--ro-bind", top, top]
    made: set[Path] = set()
    for root in interpreter_roots():
        for parent in reversed(Path(root).parents[:-1]):  # bwrap would create missing parents as 0700
            if parent not in made:
                options += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        options += ["--ro-bind", root, root]
    options += ["--proc", "/proc", "--dev", "/dev"]
    for tmpfs in (WORKDIR, "/tmp", "/dev/shm"):
        options += ["--perms", "1777", "--size", str(config.tmpfs_mb << 20), "--tmpfs", tmpfs]
    return (*options, "--remount-ro", "/", "--chdir", WORKDIR)


def _environment(home: str) -> dict[str, str]:
    """The program's whole environment: unbuffered output (kept on timeout), single-threaded BLAS."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _launch(
    config: SandboxConfig, ready_fd: int, run_timeout: float, memory_mb: int, script: str
) -> list[str]:
    """The sandboxed child's command line: this interpreter, the limits, then ``python script``."""
    limits = (
        ready_fd,
        memory_mb << 20,
        math.ceil(run_timeout + config.cpu_grace),
        config.nproc,
        config.file_size_mb << 20,
        config.open_files,
        config.sandbox_uid if _drops_root(config) else -1,
    )
    return [sys.executable, "-I", "-S", "-c", CHILD_SOURCE, *map(str, limits), sys.executable, script]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


async def execute(
    config: SandboxConfig, code: str, stdin: str = "", run_timeout: float = 10.0, memory_mb: int = 0
) -> RunResult:
    """Run ``code`` as ``python main.py`` in a fresh sandbox; ``memory_mb <= 0`` means the default limit.

    Never raises for anything the program does; a sandbox that cannot start gives status "Error". Isolated,
    the program reaches the sandbox through an anonymous in-memory file, so nothing lands on the host's
    disk, even if the service is killed mid-run.
    """
    memory_mb = memory_mb if memory_mb > 0 else config.default_memory_mb
    # surrogatepass: a lone surrogate from JSON reaches Python's own decoder and its clear SyntaxError.
    source = code.encode("utf-8", "surrogatepass")
    with contextlib.ExitStack() as cleanup:
        ready_read, ready_write = os.pipe()
        cleanup.callback(os.close, ready_read)
        cleanup.callback(os.close, ready_write)
        handed = [ready_write]  # descriptors the child inherits
        if config.isolate:
            program = os.memfd_create("main.py")
            cleanup.callback(os.close, program)
            handed.append(program)
            with open(program, "wb", closefd=False) as handle:
                handle.write(source)
            os.lseek(program, 0, os.SEEK_SET)
            workdir, cwd = WORKDIR, "/"
            script = f"{WORKDIR}/main.py"
            command = [*_bwrap_options(config), "--perms", "0444", "--ro-bind-data", str(program), script]
        else:
            workdir = cwd = cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="ctpo-sandbox-", ignore_cleanup_errors=True)
            )
            script = f"{workdir}/main.py"
            Path(script).write_bytes(source)
            command = []
        command += _launch(config, ready_write, run_timeout, memory_mb, script)
        pipe = asyncio.subprocess.PIPE
        start = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=pipe,
                stdout=pipe,
                stderr=pipe,
                cwd=cwd,
                env=_environment(workdir),
                pass_fds=handed,
                start_new_session=True,
            )
        except OSError as error:
            return RunResult("Error", message=f"could not start the sandbox: {error}")
        return await _supervise(config, process, start, stdin, run_timeout, ready_read)


async def _supervise(
    config: SandboxConfig,
    process: asyncio.subprocess.Process,
    start: float,
    stdin: str,
    run_timeout: float,
    ready_read: int,
) -> RunResult:
    """Feed stdin, collect capped output, enforce the timeout, and classify the outcome."""
    stdout, stderr = _Capture(config.output_limit), _Capture(config.output_limit)
    io = asyncio.gather(
        _pump(process.stdout, stdout),
        _pump(process.stderr, stderr),
        _feed(process.stdin, stdin.encode("utf-8", "surrogatepass")),
    )
    timed_out = False
    try:
        await asyncio.wait_for(process.wait(), run_timeout)
    except asyncio.TimeoutError:
        timed_out = True
    finally:  # also when cancelled (the service stops): never leave a sandbox behind
        if process.returncode is None or not config.isolate:  # unisolated: its lingering children too
            _kill_group(process.pid)
        code = await process.wait()
    elapsed = time.monotonic() - start
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(io, OUTPUT_GRACE_S)
    code = 128 - code if code < 0 else code
    result = RunResult(
        status="Finished",
        stdout=stdout.text(),
        stderr=stderr.text(),
        return_code=code,
        execution_time=round(elapsed, 4),
        truncated=bool(stdout.dropped or stderr.dropped),
    )
    if timed_out:
        result.status, result.return_code = "TimeLimitExceeded", None
    elif not _launched(ready_read):
        result.status = "Error"
        reason = result.stderr.strip() or "no error message"
        result.message = f"the sandbox failed to start (exit code {code}): {reason}"
    elif code == 128 + signal.SIGXCPU:
        result.status = "TimeLimitExceeded"
    return result


def _launched(ready_read: int) -> bool:
    """Whether the child reported the sandbox ready (read once everything holding the pipe is gone)."""
    os.set_blocking(ready_read, False)
    try:
        return os.read(ready_read, 1) == b"1"
    except BlockingIOError:
        return False


def check_isolation(config: SandboxConfig) -> None:
    """Refuse to serve without a working sandbox: bwrap must exist and a trivial program must run in it.

    Raises FileNotFoundError (no bwrap) or ValueError (bwrap cannot sandbox here), one line each.
    """
    if not config.isolate:
        return
    if not os.access(config.bwrap, os.X_OK):
        raise FileNotFoundError(
            f"bubblewrap not found at {config.bwrap}: install it (apt-get install bubblewrap), set "
            f"${BWRAP_ENV} to its path, or pass --unsafe-no-isolation to run code WITHOUT isolation"
        )
    result = asyncio.run(execute(config, "print('ok')", run_timeout=30))
    if (result.status, result.stdout) != ("Finished", "ok\n"):
        detail = " | ".join((result.message or result.stderr or result.status).split("\n"))
        raise ValueError(
            f"bubblewrap at {config.bwrap} cannot run a sandbox on this host ({detail.strip()}); fix that, "
            "or pass --unsafe-no-isolation to run code WITHOUT isolation"
        )
