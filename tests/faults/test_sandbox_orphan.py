"""The sandbox service a command starts dies with that command, even when the command is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

COMMAND = """
import time
from sandbox.server import running_service
with running_service(unsafe_no_isolation=True) as service:
    print(service.process.pid, flush=True)
    time.sleep(600)
"""


def test_service_dies_with_a_sigkilled_command() -> None:
    command = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True)
    assert command.stdout is not None
    service = psutil.Process(int(command.stdout.readline()))
    assert service.is_running() and service.ppid() == command.pid
    os.kill(command.pid, signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and service.is_running() and service.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    alive = service.is_running() and service.status() != psutil.STATUS_ZOMBIE
    if alive:
        service.kill()
    assert not alive, "the sandbox service outlived the command that started it"
