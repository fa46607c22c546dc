"""Stopping a child process and everything it started: the one process-group stopper of the project.

Every long-lived child that ctpo starts (the sandbox service, a verl training run) is started in a new
session (``start_new_session=True``), so its process id is also the id of its process group and
signalling the group reaches its whole tree and nothing else. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

TERMINATE_GRACE_S = 15.0
"""How long a process group gets after SIGTERM before SIGKILL."""


def stop_process_group(
    process: subprocess.Popen[bytes],
    interrupt_grace: float | None = None,
    terminate_grace: float = TERMINATE_GRACE_S,
) -> None:
    """Stop ``process``'s group: SIGINT first when ``interrupt_grace`` is given (a clean shutdown, e.g.
    Ray's) and wait that long, then SIGTERM and wait ``terminate_grace``, then SIGKILL. Returns once the
    process has exited."""
    steps: list[tuple[signal.Signals, float | None]] = [
        (signal.SIGTERM, terminate_grace),
        (signal.SIGKILL, None),
    ]
    if interrupt_grace is not None:
        steps.insert(0, (signal.SIGINT, interrupt_grace))
    for sig, grace in steps:
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal a process gets when its parent dies."""


def dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: Linux sends the child SIGTERM when this process dies,
    even by SIGKILL (which runs no cleanup of ours), so a service a command started never outlives it.
    None off Linux. (The death signal follows the thread that starts the child: start it from the
    main thread.)"""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def arrange() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call above
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange
