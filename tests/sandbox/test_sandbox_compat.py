"""Clients written for SandboxFusion work unchanged: verl 0.9.1's own sandbox-fusion client, unmodified, and
SandboxFusion's python runner cases (sandbox/tests/runners/test_python.py) sent over HTTP."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from sandbox.server import Service

pytestmark = pytest.mark.usefixtures("contained")


def post(service: Service, **request: Any) -> dict[str, Any]:
    """A request as SandboxFusion's RunCodeRequest.model_dump() sends it (every field present)."""
    body = {
        "compile_timeout": 10,
        "run_timeout": 10,
        "memory_limit_MB": -1,
        "stdin": None,
        "files": {},
        "fetch_files": [],
        **request,
    }
    response = httpx.post(f"{service.url}/run_code", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# --- SandboxFusion's python cases -------------------------------------------------------------------------


def test_python_print(service: Service) -> None:
    result = post(service, language="python", code="print(123)", run_timeout=5)
    assert result["status"] == "Success" and result["run_result"]["stdout"].strip() == "123"


def test_python_timeout(service: Service) -> None:
    result = post(service, language="python", code="import time; time.sleep(0.2)", run_timeout=0.1)
    assert result["status"] == "Failed" and result["run_result"]["status"] == "TimeLimitExceeded"


def test_python_assertion_error(service: Service) -> None:
    result = post(service, language="python", code="assert 1 == 2", run_timeout=5)
    assert (result["status"], result["run_result"]["status"]) == ("Failed", "Finished")
    assert "AssertionError" in result["run_result"]["stderr"]


def test_python_syntax_error(service: Service) -> None:
    result = post(service, language="python", code="int a = 1", run_timeout=5)
    assert (result["status"], result["run_result"]["status"]) == ("Failed", "Finished")
    assert "SyntaxError: invalid syntax" in result["run_result"]["stderr"]


def test_python_file_read(service: Service) -> None:
    result = post(
        service,
        language="python",
        code='print(open("dir1/dir2/dir3/secret_flag").read())',
        run_timeout=5,
        files={"dir1/dir2/dir3/secret_flag": "ImhlbGxvLCB0aGlzIGlzIGEgdGVzdCI="},
    )
    assert (result["status"], result["run_result"]["status"]) == ("Success", "Finished")
    assert "hello, this is a test" in result["run_result"]["stdout"]


def test_python_stdin(service: Service) -> None:
    result = post(service, language="python", code="print(int(input()))", run_timeout=5, stdin="65535")
    assert result["status"] == "Success" and result["run_result"]["stdout"] == "65535\n"


def test_python_fetch_files_is_a_clear_sandbox_error(service: Service) -> None:
    """SandboxFusion's test_python_fetch_files: returning the program's files is not supported here."""
    result = post(
        service,
        language="python",
        code='open("a.txt", "w").write("secret")',
        run_timeout=5,
        fetch_files=["a.txt"],
    )
    assert result["status"] == "SandboxError" and "fetch_files is not supported" in result["message"]


def test_null_file_and_unknown_fields_are_accepted(service: Service) -> None:
    """SandboxFusion's own compatibility test sends ``{"a.txt": null}`` (skipped), and clients send fields
    we do not know (ignored)."""
    encoded = base64.b64encode(b"data").decode()
    result = post(
        service,
        language="python",
        code="import os; print(sorted(os.listdir('.')), open('b.bin').read())",
        files={"a.txt": None, "b.bin": encoded},
        some_future_field={"x": 1},
    )
    assert result["status"] == "Success", result
    assert result["run_result"]["stdout"] == "['b.bin', 'main.py'] data\n"


def test_files_are_the_programs_but_main_py_stays_the_program(service: Service) -> None:
    files = {"main.py": base64.b64encode(b"print('impostor')").decode(), "d/e/f.txt": ""}
    code = "import os; open('d/e/f.txt', 'w').write('mine'); os.remove('d/e/f.txt'); print('program')"
    result = post(service, language="python", code=code, files=files)
    assert (result["status"], result["run_result"]["stdout"]) == ("Success", "program\n"), result


def test_limits_above_ours_are_clamped_and_reported(service: Service) -> None:
    result = post(
        service,
        language="python",
        code="import resource; print(resource.getrlimit(resource.RLIMIT_CPU)[0])",
        run_timeout=10_000,
        memory_limit_MB=10**6,
    )
    assert result["status"] == "Success", result
    assert (
        "run_timeout clamped to 300 s" in result["message"] and "memory_limit_MB clamped" in result["message"]
    )
    assert result["run_result"]["stdout"] == "301\n"  # RLIMIT_CPU: ceil(300 s + cpu_grace of 1 s)


# --- verl's client, unmodified -----------------------------------------------------------------------------


def test_verl_sandbox_fusion_client_scores_right_and_wrong_programs(service: Service) -> None:
    from verl.utils.reward_score.sandbox_fusion.utils import check_correctness

    long_output = 200_000  # beyond the old 64 KiB output cap: verl compares the whole stdout
    in_outs = {
        "inputs": ["3 4\n", "10 20\n", f"{long_output} 0\n"],
        "outputs": ["7\n", "30\n", "x" * long_output + "\n"],
    }
    right = "a, b = map(int, input().split())\nprint('x' * a if b == 0 else a + b)"
    results, metadata = check_correctness(f"{service.url}/run_code", in_outs, right, timeout=10)
    assert results == [True, True, True], metadata
    wrong = "a, b = map(int, input().split())\nprint(a * b)"
    results, _ = check_correctness(f"{service.url}/run_code", in_outs, wrong, timeout=10)
    assert results == [False, False, False]
    crash = "raise SystemExit(1)"
    results, metadata = check_correctness(f"{service.url}/run_code", in_outs, crash, timeout=10)
    assert results == [-2] * 3 and {m["status"] for m in metadata} == {"runtime_error"}, metadata


def test_verl_client_gets_twenty_threads_at_its_default_memory(service: Service) -> None:
    """verl sends memory_limit_MB=1024; a program starting 32 threads must run (one that allocates in each)."""
    from verl.utils.reward_score.sandbox_fusion.utils import call_sandbox_api

    code = """
import threading
results = []
def work(i):
    results.append(sum(bytearray(1 << 20)) + i)
threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
for t in threads: t.start()
for t in threads: t.join()
print(len(results))
"""
    response, error = call_sandbox_api(f"{service.url}/run_code", code, None, 10, 10, 1024)
    assert error is None and response is not None
    assert (response["status"], response["run_result"]["stdout"]) == ("Success", "32\n"), response
