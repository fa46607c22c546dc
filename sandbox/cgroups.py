"""Per-request control groups: one memory bound for every process, shared memory and tmpfs page of a request,
and one process cap.

Each service worker makes one group ``ctpo-sandbox-<pid>`` directly below its own cgroup (never elsewhere),
and one child ``r<n>`` per request, removed when the request ends. Where the host offers them:

- **cgroup v2**, when the worker's own cgroup lists the ``memory`` and ``pids`` controllers and they can be
  enabled below it: ``memory.max`` (and ``memory.swap.max`` 0), ``pids.max``;
- else **cgroup v1**, when the ``memory`` and ``pids`` hierarchies are mounted and writable (as root):
  ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes``, ``pids.max``;
- else **none**: :meth:`Cgroups.detect` says why, and the service warns or refuses (``SandboxConfig.cgroups``).

The memory counter of a cgroup holds anonymous memory, page cache, shared memory (memfd, /dev/shm, tmpfs
pages) and kernel memory (inodes, dentries) of its processes; beyond the limit the kernel's OOM killer ends
a process of the request (the program first: it has the highest ``oom_score_adj``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ctpo-sandbox-"
_NAMES = itertools.count()
"""Request group numbers, unique in this process (a worker may make its base group more than once)."""


def _own_cgroups() -> dict[str, str]:
    """The calling process's cgroup path per hierarchy: v1 controllers by name, v2 as ``""``."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, file system type, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        after = fields.index("-")
        kind, options = fields[after + 1], fields[after + 3].split(",")
        if kind in ("cgroup", "cgroup2"):
            found.append((fields[4], kind, options))
    return found


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _remove_tree(path: Path) -> None:
    """Remove an (empty of processes) cgroup and its children, deepest first; missing ones are fine."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _remove_tree(child)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def _remove_stale(parent: Path) -> None:
    """Groups left by workers that died without cleaning up (their pid is gone)."""
    for stale in parent.glob(PREFIX + "*"):
        pid = stale.name.removeprefix(PREFIX)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                _remove_tree(stale)


@dataclass
class RequestCgroup:
    """One request's groups (one directory in v2, one per controller in v1)."""

    version: str
    memory: Path
    pids: Path

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and its future children) into the request's groups."""
        for group in dict.fromkeys((self.memory, self.pids)):
            _write(group / "cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        """Processes of the request the kernel's OOM killer ended so far."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in (self.memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> bool:
        """Remove the groups; False while a process is still in them (try again later)."""
        try:
            for group in dict.fromkeys((self.memory, self.pids)):
                with contextlib.suppress(FileNotFoundError):
                    group.rmdir()
        except OSError:
            return False
        return True


@dataclass
class Cgroups:
    """The worker's cgroup base directories; :meth:`create` makes one request's groups below them."""

    version: str
    memory_base: Path
    pids_base: Path

    @classmethod
    def detect(cls) -> tuple[Cgroups | None, str]:
        """The usable cgroups of this process (v2, else v1), or None and one line saying why none is."""
        try:
            own, mounts = _own_cgroups(), _mounts()
        except OSError as error:
            return None, f"cannot read this process's cgroups ({error})"
        reasons = []
        for attempt in (cls._v2, cls._v1):
            try:
                return attempt(own, mounts), ""
            except (OSError, LookupError) as error:
                reasons.append(str(error))
        return None, "; ".join(reasons)

    @classmethod
    def _v2(cls, own: dict[str, str], mounts: list[tuple[str, str, list[str]]]) -> Cgroups:
        point = next((p for p, kind, _ in mounts if kind == "cgroup2"), None)
        if point is None or "" not in own:
            raise LookupError("cgroup v2: not mounted")
        mine = Path(point + own[""])
        available = (mine / "cgroup.controllers").read_text().split()
        if not {"memory", "pids"} <= set(available):
            raise LookupError(
                f"cgroup v2: no memory and pids controllers at {mine} (has: {available or 'none'})"
            )
        if not {"memory", "pids"} <= set((mine / "cgroup.subtree_control").read_text().split()):
            _write(mine / "cgroup.subtree_control", "+memory +pids")
        _remove_stale(mine)
        base = mine / f"{PREFIX}{os.getpid()}"
        base.mkdir(exist_ok=True)
        _write(base / "cgroup.subtree_control", "+memory +pids")
        return cls("v2", base, base)

    @classmethod
    def _v1(cls, own: dict[str, str], mounts: list[tuple[str, str, list[str]]]) -> Cgroups:
        bases = []
        for controller in ("memory", "pids"):
            point = next((p for p, kind, opts in mounts if kind == "cgroup" and controller in opts), None)
            if point is None or controller not in own:
                raise LookupError(f"cgroup v1: no {controller} hierarchy mounted")
            mine = Path(point + own[controller])
            if not os.access(mine, os.W_OK):
                raise PermissionError(f"cgroup v1: {mine} is not writable (run the service as root)")
            _remove_stale(mine)
            base = mine / f"{PREFIX}{os.getpid()}"
            base.mkdir(exist_ok=True)
            bases.append(base)
        return cls("v1", bases[0], bases[1])

    def create(self, memory_bytes: int, processes: int) -> RequestCgroup:
        """A request's groups with its memory bound (no swap) and process cap."""
        name = f"r{next(_NAMES)}"
        group = RequestCgroup(self.version, self.memory_base / name, self.pids_base / name)
        group.memory.mkdir()
        if self.version == "v2":
            _write(group.memory / "memory.max", str(memory_bytes))
            with contextlib.suppress(FileNotFoundError):
                _write(group.memory / "memory.swap.max", "0")
        else:
            group.pids.mkdir()
            _write(group.memory / "memory.limit_in_bytes", str(memory_bytes))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: then no swap limit needed
                _write(group.memory / "memory.memsw.limit_in_bytes", str(memory_bytes))
        _write(group.pids / "pids.max", str(processes))
        return group

    def close(self, within: float = 5.0) -> None:
        """Remove the worker's base groups, waiting up to ``within`` seconds for the last relays to exit."""
        deadline = time.monotonic() + within
        for base in dict.fromkeys((self.memory_base, self.pids_base)):
            while True:
                try:
                    _remove_tree(base)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
