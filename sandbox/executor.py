"""Run Python programs in the sandbox: each in a fresh process with its own namespaces, cgroups, working
directory and limits, a wall-clock timeout, and capped, decoded output.

A :class:`SandboxRunner` (one per service worker) starts the zygote (:mod:`sandbox.zygote`) once, inside
bubblewrap, and has it fork one process tree per program; the program then skips an interpreter start, which
is what makes the service as fast as a bare ``python -c``. What a program sees (``isolate=True``):

- namespaces: its own PID (it is PID 2, its init PID 1), network (nothing but its own loopback), IPC, UTS,
  mount and cgroup namespaces, and a user namespace of its own, without capabilities;
- files: /usr and the interpreter's installation (prefix and site-packages) read-only, wherever it lies (a
  virtualenv under /tmp too), a fresh /proc, minimal /dev, an /etc with only the loader cache, ``hosts``
  (localhost) and ``nsswitch.conf``; private size- and inode-capped tmpfs at /workspace (its working
  directory: main.py read-only, and the request's files), /tmp and /dev/shm. Nothing else of the host: no
  home, no project tree, no host /tmp, and no host path on any command line (/proc/1 is the zygote's fork);
- environment: a fixed, minimal set of variables (nothing inherited from the service);
- user: the service's own uid, or ``sandbox_uid`` (nobody) when the service runs as root;
- limits: the request's cgroups (:mod:`sandbox.cgroups`) and per-process rlimits (:mod:`sandbox.zygote`).

The wall-clock timeout, a disconnected client or a stopping service kill the program's init, and with it
every process of its PID namespace, detached or not; so does the program's own end. Output read before is
kept.
"""

from __future__ import annotations

import array
import asyncio
import codecs
import contextlib
import json
import logging
import math
import os
import signal
import site
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sandbox.cgroups import Cgroups, RequestCgroup
from sandbox.config import BWRAP_ENV, SandboxConfig

TRUNCATION_MARKER = "\n[... output truncated ...]"
"""Appended to stdout or stderr when the program wrote more than ``SandboxConfig.output_limit`` bytes."""

WORKDIR = "/workspace"
"""The program's private working directory inside the sandbox."""

OUTPUT_GRACE_S = 2.0
"""How long to keep reading output after the program ended (the pipes' last bytes)."""

START_TIMEOUT_S = 30.0
"""How long the zygote may take to answer a request before the sandbox counts as failed."""

KILL_GRACE_S = 10.0
"""How long the relay may take to report a killed program."""

ZYGOTE_SOURCE = Path(__file__).with_name("zygote.py").read_text()
HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
NSSWITCH = b"hosts: files\n"

logger = logging.getLogger("sandbox")


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


def _collect(fd: int, capture: _Capture) -> asyncio.Future[None]:
    """Read pipe ``fd`` into ``capture`` from the event loop until end of file; the future says when.
    The caller removes the reader (``loop.remove_reader``) if it stops reading earlier."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if chunk:
            capture.feed(chunk)
        else:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)

    loop.add_reader(fd, readable)
    return done


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _receive(sock: socket.socket) -> tuple[bytes, int | None]:
    """One message from a non-blocking SEQPACKET socket and the sender's pid (from SCM_CREDENTIALS)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            message, ancillary, _, _ = sock.recvmsg(1 << 12, socket.CMSG_SPACE(12))
            break
        except BlockingIOError:
            await _readable(loop, sock.fileno())
    pid = None
    for level, kind, data in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            pid = struct.unpack("3i", data[:12])[0]
    return message, pid


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    with open(fd, "wb", closefd=False) as handle:
        handle.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def pack_files(files: Mapping[str, bytes]) -> bytes:
    """Files for the zygote: per file its name's and content's sizes, name, content."""
    parts = []
    for name, content in files.items():
        encoded = name.encode()
        parts += [struct.pack("<IQ", len(encoded), len(content)), encoded, content]
    return b"".join(parts)


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


def _bwrap_command(config: SandboxConfig, etc: Mapping[str, int]) -> list[str]:
    """The outer sandbox of the zygote: namespaces, read-only system and interpreter, empty mount points.

    As root, bwrap makes no user namespace and keeps the capabilities the zygote needs to make each
    program's namespaces and mounts and to switch it to ``sandbox_uid``; otherwise the zygote is root of
    bwrap's user namespace, mapped to the service's user."""
    options = [config.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    options += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if _drops_root(config):
        for cap in ("SYS_ADMIN", "SETUID", "SETGID", "CHOWN", "NET_ADMIN"):
            options += ["--cap-add", f"CAP_{cap}"]
    else:
        options += ["--unshare-user", "--uid", "0", "--gid", "0", "--cap-add", "ALL"]
    options += ["--ro-bind", "/usr", "/usr", "--perms", "0755", "--dir", "/etc"]
    options += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path, fd in etc.items():
        options += ["--perms", "0444", "--ro-bind-data", str(fd), path]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            options += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            options += ["--ro-bind", top, top]
    options += ["--proc", "/proc", "--dev", "/dev"]
    for mount_point in (WORKDIR, "/tmp", "/dev/shm"):
        options += ["--perms", "1777", "--dir", mount_point]
    made: set[Path] = set()
    for root in interpreter_roots():
        for parent in reversed(Path(root).parents[:-1]):  # bwrap would create missing parents as 0700
            if parent not in made and str(parent) not in ("/tmp", "/dev", "/dev/shm"):
                options += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        options += ["--ro-bind", root, root]
    return [*options, "--remount-ro", "/", "--chdir", WORKDIR]


def _environment(home: str) -> dict[str, str]:
    """The program's whole environment: unbuffered output (kept on timeout), single-threaded BLAS."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "PWD": home,
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@dataclass
class Program:
    """One request: the code, its stdin and files, and its limits (already clamped to the service's)."""

    code: str
    stdin: str = ""
    files: Mapping[str, bytes] | None = None
    run_timeout: float = 10.0
    memory_mb: int = 0


class SandboxRunner:
    """The zygote of one service worker and the worker's cgroups; :meth:`run` runs one program.

    ``cgroups`` is None where none can be used (``cgroup_problem`` says why); memory is then bounded per
    process by RLIMIT_AS only.
    """

    def __init__(self, config: SandboxConfig, cgroups: Cgroups | None, cgroup_problem: str = "") -> None:
        self.config = config
        self.cgroups = cgroups
        self.cgroup_problem = cgroup_problem
        self._zygote: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    @classmethod
    def create(cls, config: SandboxConfig) -> SandboxRunner:
        """With the worker's cgroups when there are any (always without, unisolated); raises ValueError,
        one line, when there are none and ``config.without_cgroups`` is "refuse"."""
        if not config.isolate:
            return cls(config, None, "no isolation (--unsafe-no-isolation)")
        cgroups, problem = Cgroups.detect()
        if cgroups is None and config.without_cgroups == "refuse":
            raise ValueError(
                f"no cgroup can bound a request's memory and processes here ({problem}); run the service "
                "as root on a host with cgroup memory and pids controllers, or pass --without-cgroups warn"
            )
        return cls(config, cgroups, problem)

    @property
    def isolation_level(self) -> str:
        """ "cgroup v2", "cgroup v1" or "rlimits only" (per-process limits, no per-request bound)."""
        return f"cgroup {self.cgroups.version}" if self.cgroups else "rlimits only"

    def start(self) -> socket.socket:
        """The zygote's control socket, starting the zygote (again, if it died)."""
        if self._control is not None and self._zygote is not None and self._zygote.poll() is None:
            return self._control
        self.close_zygote()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        roots = interpreter_roots()
        settings = json.dumps({"isolate": self.config.isolate, "roots": roots})
        with contextlib.ExitStack() as opened:
            etc = {}
            if self.config.isolate:
                for path, data in (("/etc/hosts", HOSTS), ("/etc/nsswitch.conf", NSSWITCH)):
                    etc[path] = _memfd(path, data)
                    opened.callback(os.close, etc[path])
            command = _bwrap_command(self.config, etc) if self.config.isolate else []
            command += [sys.executable, "-c", ZYGOTE_SOURCE, str(theirs.fileno()), settings]
            self._zygote = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                cwd="/",
                env=_environment(WORKDIR if self.config.isolate else "/tmp"),
                pass_fds=[theirs.fileno(), *etc.values()],
                start_new_session=True,
            )
        theirs.close()
        self._control = ours
        return ours

    def close_zygote(self) -> None:
        """Stop the zygote (closing its control socket ends it; SIGKILL in case it does not)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._zygote is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._zygote.pid, signal.SIGKILL)
            self._zygote.wait()
            self._zygote = None

    def close(self) -> None:
        self.close_zygote()
        if self.cgroups is not None:
            self.cgroups.close()

    def _header(self, program: Program) -> dict[str, int]:
        config = self.config
        memory = (program.memory_mb if program.memory_mb > 0 else config.default_memory_mb) << 20
        return {
            "as": memory * (config.address_space_factor if self.cgroups else 1),
            "memory": memory,
            "cpu": math.ceil(program.run_timeout + config.cpu_grace),
            "nproc": config.nproc,
            "fsize": config.file_size_mb << 20,
            "nofile": config.open_files,
            "tmpfs": config.tmpfs_mb << 20,
            "inodes": config.tmpfs_inodes,
            "uid": config.sandbox_uid if _drops_root(config) else -1,
        }

    async def run(self, program: Program) -> RunResult:
        """Run ``program`` as ``python main.py`` in a fresh sandbox.

        Never raises for anything the program does; a sandbox that cannot start gives status "Error".
        Cancelling it (a disconnected client, a stopping service) kills the program's whole tree.
        """
        header = self._header(program)
        stdout, stderr = _Capture(self.config.output_limit), _Capture(self.config.output_limit)
        cgroup: RequestCgroup | None = None
        with contextlib.ExitStack() as cleanup:
            for _ in range(2):
                with contextlib.ExitStack() as handover:
                    ours, outputs, pid = await self._hand_over(handover, header, program, stdout, stderr)
                    if pid is not None:
                        cleanup.enter_context(handover.pop_all())
                        break
                self.close_zygote()  # it died since the last request: start a new one, try once more
            else:
                return RunResult("Error", message="the sandbox's zygote did not answer")
            if self.cgroups is not None:
                cgroup = self.cgroups.create(header["memory"], self.config.nproc + 2)
                cleanup.callback(self._remove_later, cgroup)
                cgroup.add(pid)
            ours.send(b"g")
            timed_out = False
            try:
                report, _ = await asyncio.wait_for(_receive(ours), program.run_timeout)
            except asyncio.TimeoutError:
                timed_out = True
                with contextlib.suppress(OSError):
                    ours.send(b"k")
                report, _ = await asyncio.wait_for(_receive(ours), KILL_GRACE_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*outputs), OUTPUT_GRACE_S)
            oom_kills = cgroup.oom_kills() if cgroup is not None else 0
        return self._result(report, timed_out, stdout, stderr, oom_kills, header["memory"])

    async def _hand_over(
        self,
        cleanup: contextlib.ExitStack,
        header: dict[str, int],
        program: Program,
        stdout: _Capture,
        stderr: _Capture,
    ) -> tuple[socket.socket, list[asyncio.Future[None]], int | None]:
        """Send the request to the zygote and wait for its relay: the request socket, the output readers
        and the relay's pid (None: the zygote did not answer). ``cleanup`` closes what was opened."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cleanup.callback(ours.close)  # first opened, last closed: the relay kills what is left
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        handed = [theirs.fileno()]
        handed += [_memfd("main.py", program.code.encode("utf-8", "surrogatepass"))]
        handed += [_memfd("stdin", program.stdin.encode("utf-8", "surrogatepass")), out_write, err_write]
        handed += [_memfd("files", pack_files(program.files or {}))]
        for fd in (out_read, err_read):
            cleanup.callback(os.close, fd)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", handed).tobytes())]
        try:
            self.start().sendmsg([json.dumps(header).encode()], rights)
        except OSError:  # the zygote is gone
            return ours, [], None
        finally:
            theirs.close()
            for fd in handed[1:]:
                os.close(fd)
        outputs = [_collect(out_read, stdout), _collect(err_read, stderr)]
        for fd in (out_read, err_read):  # before the descriptors are closed (last in, first out)
            cleanup.callback(asyncio.get_running_loop().remove_reader, fd)
        hello, pid = await asyncio.wait_for(_receive(ours), START_TIMEOUT_S)
        return ours, outputs, pid if hello == b"h" else None

    def _remove_later(self, cgroup: RequestCgroup, attempt: int = 0) -> None:
        """Remove a request's cgroups once its last process (the relay, exiting) is gone."""
        if not cgroup.remove():
            if attempt < 200:
                asyncio.get_running_loop().call_later(0.05, self._remove_later, cgroup, attempt + 1)
            else:
                logger.warning("could not remove cgroup %s: processes remain in it", cgroup.memory)

    def _result(
        self,
        report: bytes,
        timed_out: bool,
        stdout: _Capture,
        stderr: _Capture,
        oom_kills: int,
        memory: int,
    ) -> RunResult:
        if not report:
            return RunResult("Error", stdout.text(), stderr.text(), message="the sandbox's relay was lost")
        outcome = json.loads(report)
        code = outcome["code"]
        result = RunResult(
            status="Finished",
            stdout=stdout.text(),
            stderr=stderr.text(),
            return_code=code,
            execution_time=round(outcome["time"], 4),
            truncated=bool(stdout.dropped or stderr.dropped),
        )
        if timed_out:
            result.status, result.return_code = "TimeLimitExceeded", None
        elif not outcome["ready"]:
            result.status = "Error"
            reason = result.stderr.strip() or "no error message"
            result.message = f"the sandbox failed to start (exit code {code}): {reason}"
        elif code == 128 + signal.SIGXCPU:
            result.status = "TimeLimitExceeded"
        if oom_kills and result.status == "Finished":
            result.message = f"out of memory: the request's limit of {memory >> 20} MiB was reached"
        return result


def check_isolation(config: SandboxConfig) -> str:
    """Refuse to serve without a working sandbox: bwrap must exist and a trivial program must run in it.

    Returns the isolation level (see :attr:`SandboxRunner.isolation_level`). Raises FileNotFoundError (no bwrap)
    or ValueError (bwrap cannot sandbox here, or no cgroups and ``without_cgroups=refuse``), one line each.
    """
    if config.isolate and not os.access(config.bwrap, os.X_OK):
        raise FileNotFoundError(
            f"bubblewrap not found at {config.bwrap}: install it (apt-get install bubblewrap), set "
            f"${BWRAP_ENV} to its path, or pass --unsafe-no-isolation to run code WITHOUT isolation"
        )
    sandbox = SandboxRunner.create(config)
    try:
        result = asyncio.run(sandbox.run(Program("print('ok')", run_timeout=30)))
    finally:
        sandbox.close()
    if (result.status, result.stdout) != ("Finished", "ok\n"):
        detail = " | ".join((result.message or result.stderr or result.status).split("\n"))
        raise ValueError(
            f"bubblewrap at {config.bwrap} cannot run a sandbox on this host ({detail.strip()}); fix that, "
            "or pass --unsafe-no-isolation to run code WITHOUT isolation"
        )
    return sandbox.isolation_level if config.isolate else "none"
