"""32 concurrent clients against one service: every answer arrives, and each belongs to its own request;
afterwards the service is healthy and idle (the ``contained`` fixture)."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox.client import RunResult, SandboxClient
from sandbox.server import Service

pytestmark = pytest.mark.usefixtures("contained")
SERVICE_OPTIONS = {"max_concurrency": 32}
CLIENTS = 32
REQUESTS_PER_CLIENT = 4

PROGRAM = """
import random, sys, time
token = sys.stdin.read()
time.sleep(random.random() / 10)
print(token)
print("{token}", file=sys.stderr)
"""


def test_32_concurrent_clients_lose_and_mix_up_nothing(service: Service) -> None:
    start = threading.Barrier(CLIENTS)

    def client_session(index: int) -> list[tuple[str, RunResult]]:
        answers = []
        with SandboxClient(service.url, timeout=120) as client:
            start.wait()
            for _ in range(REQUESTS_PER_CLIENT):
                token = f"client{index}-{uuid.uuid4().hex}"
                code = PROGRAM.replace(
                    "{token}", token
                )  # the token reaches the program twice: code and stdin
                answers.append((token, client.run_code(code, stdin=token, run_timeout=60)))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        sessions = list(pool.map(client_session, range(CLIENTS)))
    answers = [answer for session in sessions for answer in session]
    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    for token, result in answers:
        assert (result.status, result.return_code) == ("Finished", 0), result
        assert (result.stdout, result.stderr) == (f"{token}\n", f"{token}\n")
    assert len({token for token, _ in answers}) == len(answers)
