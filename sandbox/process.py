"""Stopping a child process and everything it started: the one process-group stopper of the project.

Every long-lived child that ctpo starts (the sandbox service, a verl training run) is started in a new
session (``start_new_session=True``), so its process id is also the id of its process group and
signalling the group reaches its whole tree and nothing else. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

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
