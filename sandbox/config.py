"""Settings of the sandbox service: every limit a program runs under, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

BWRAP_ENV = "CTPO_SANDBOX_BWRAP"
"""Environment variable naming the bubblewrap executable (default: ``bwrap`` on PATH, else /usr/bin/bwrap)."""


def default_bwrap() -> str:
    """The bubblewrap executable to use; whether it exists is checked when the service starts."""
    return os.environ.get(BWRAP_ENV) or shutil.which("bwrap") or "/usr/bin/bwrap"


class WithoutCgroups(str, Enum):
    """What a worker does where no cgroup can be used: ``SandboxConfig.without_cgroups``."""

    warn = "warn"
    refuse = "refuse"


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and switches of the sandbox. Each program gets its own copy of every per-program limit.

    Attributes:
        isolate: run programs under bubblewrap; False only for ``--unsafe-no-isolation``.
        bwrap: path of the bubblewrap executable.
        max_concurrency: programs running at once per worker; further requests wait their turn.
        default_memory_mb: memory of a request (MiB) when it gives memory_limit_MB <= 0, as SandboxFusion's
            default of -1 does. With cgroups a request's memory_limit_MB bounds all its processes together
            (anonymous and shared memory, tmpfs files, kernel memory); the address space of each process
            (RLIMIT_AS) is ``address_space_factor`` times that, so thread stacks and malloc arenas, which
            reserve address space without using memory, do not count (64 threads start at 1 GiB) while one
            absurd allocation still fails with MemoryError. Without cgroups RLIMIT_AS is the only bound.
        address_space_factor: RLIMIT_AS over the memory limit when cgroups bound memory (see above).
        max_memory_mb: the largest memory_limit_MB a request may have; a larger one is clamped to it (the
            response's message says so), as is a run_timeout above max_run_timeout.
        max_run_timeout: the largest run_timeout (seconds) a request may ask for.
        cpu_grace: CPU-time limit (RLIMIT_CPU) is ceil(run_timeout + cpu_grace) seconds: one single-threaded
            program never reaches it before its wall-clock timeout, a multi-threaded one may.
        nproc: processes and threads a program may have at once (RLIMIT_NPROC, and the request's pids cgroup,
            which also counts the sandbox's own two processes), so fork bombs fizzle.
        file_size_mb: the largest file a program may write (RLIMIT_FSIZE, MiB).
        open_files: open file descriptors per process (RLIMIT_NOFILE).
        tmpfs_mb: size of each private writable tmpfs (/workspace, /tmp, /dev/shm), MiB; RAM-backed, freed
            when the program ends.
        tmpfs_inodes: files and directories each private tmpfs may hold (its ``nr_inodes``).
        output_limit: bytes of stdout and of stderr kept per program; the rest is dropped and the text ends
            with a truncation marker. As large as the largest request body: SandboxFusion itself keeps all
            output, and verl compares a test case's whole stdout with its expected output, which may be as
            long as its input.
        max_queue: requests that may wait for a free slot per worker; beyond, 429 with Retry-After before the
            body is read (so at most max_concurrency + max_queue bodies are held). verl's client sends up to
            max(32, 5 x CPUs) requests at once and retries only 504, so keep this above that.
        without_cgroups: what a worker does where no cgroup can be used (see sandbox.cgroups): "warn" (log
            it loudly, report it in /health, bound memory per process with RLIMIT_AS) or "refuse" (do not start).
        max_request_mb: the largest request body (code plus stdin) the service accepts, MiB.
        sandbox_uid: the unprivileged user programs run as when the service runs as root (65534, nobody).
    """

    isolate: bool = True
    bwrap: str = field(default_factory=default_bwrap)
    max_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    default_memory_mb: int = 1024
    address_space_factor: int = 4
    max_memory_mb: int = 8192
    max_run_timeout: float = 300.0
    cpu_grace: float = 1.0
    nproc: int = 64
    file_size_mb: int = 16
    open_files: int = 64
    tmpfs_mb: int = 64
    tmpfs_inodes: int = 4096
    output_limit: int = 8 << 20
    max_request_mb: int = 8
    max_queue: int = 256
    without_cgroups: WithoutCgroups = WithoutCgroups.warn
    sandbox_uid: int = 65534

    def __post_init__(self) -> None:
        for name in (
            "max_concurrency",
            "default_memory_mb",
            "address_space_factor",
            "max_memory_mb",
            "max_run_timeout",
            "nproc",
            "file_size_mb",
            "open_files",
            "tmpfs_mb",
            "tmpfs_inodes",
            "output_limit",
            "max_request_mb",
            "max_queue",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox setting {name} must be positive, got {getattr(self, name)}")
        if self.cpu_grace < 0 or self.sandbox_uid < 0:
            raise ValueError("sandbox settings cpu_grace and sandbox_uid must not be negative")
        try:
            object.__setattr__(self, "without_cgroups", WithoutCgroups(self.without_cgroups))
        except ValueError:
            raise ValueError(
                f"sandbox setting without_cgroups must be one of {', '.join(WithoutCgroups)}, "
                f"got {self.without_cgroups!r}"
            ) from None

    def with_settings(self, settings: Iterable[str]) -> SandboxConfig:
        """A copy with ``NAME=VALUE`` settings applied (``ctpo sandbox serve --set nproc=128``).

        Raises ValueError, one line, for an unknown name, a value of the wrong type, or ``isolate`` (only
        ``--unsafe-no-isolation`` turns isolation off).
        """
        names = [f.name for f in dataclasses.fields(self) if f.name != "isolate"]
        changes: dict[str, Any] = {}
        for setting in settings:
            name, _, text = setting.partition("=")
            if name not in names or not text:
                raise ValueError(
                    f"sandbox setting must be NAME=VALUE with NAME one of {', '.join(names)}; got {setting!r}"
                )
            kind = type(getattr(self, name))
            try:
                changes[name] = kind(text)
            except ValueError:
                wanted = f"one of {', '.join(kind)}" if issubclass(kind, Enum) else f"a {kind.__name__}"
                raise ValueError(f"sandbox setting {name} needs {wanted}, got {text!r}") from None
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """Serialise, to hand the settings to the service's worker processes."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SandboxConfig:
        return cls(**json.loads(text))
