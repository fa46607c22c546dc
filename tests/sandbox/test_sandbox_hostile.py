"""Hostile programs and requests against one real service: each is contained, and afterwards the service is
healthy with no process left behind (the ``contained`` fixture checks both after every test)."""

from __future__ import annotations

import ast
import errno
import os
import signal
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from sandbox.client import RunResult, SandboxClient
from sandbox.config import SandboxConfig
from sandbox.executor import TRUNCATION_MARKER
from sandbox.server import Service

pytestmark = pytest.mark.usefixtures("contained")
LIMITS = SandboxConfig()


def run(
    client: SandboxClient, code: str, stdin: str = "", run_timeout: float = 5.0, memory_limit_mb: int = 1024
) -> RunResult:
    return client.run_code(textwrap.dedent(code), stdin, run_timeout, memory_limit_mb)


def finished(result: RunResult) -> str:
    """The program's stdout, after checking it ran to its own end with return code 0."""
    assert (result.status, result.return_code) == ("Finished", 0), result
    return result.stdout


# --- processes -----------------------------------------------------------------------------------------


def test_fork_bomb_is_capped_by_nproc(client: SandboxClient) -> None:
    out = finished(run(client, """
        import os, time
        forks = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                forks += 1
        except OSError as error:
            print(forks, error.errno)
    """))  # fmt: skip
    forks, code = map(int, out.split())
    assert forks < LIMITS.nproc and code == errno.EAGAIN


def test_recursive_fork_bomb_is_killed_at_the_timeout(client: SandboxClient) -> None:
    result = run(client, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, run_timeout=1.5)  # fmt: skip
    assert result.status == "TimeLimitExceeded"


def test_thread_bomb_is_capped_by_nproc(client: SandboxClient) -> None:
    out = finished(run(client, """
        import threading, time
        threads = []
        try:
            while True:
                thread = threading.Thread(target=time.sleep, args=(60,), daemon=True)
                thread.start()
                threads.append(thread)
        except RuntimeError:
            print(len(threads))
    """))  # fmt: skip
    assert int(out) < LIMITS.nproc


def test_subprocess_bomb_is_capped_by_nproc(client: SandboxClient) -> None:
    out = finished(run(client, """
        import subprocess
        children = []
        try:
            while True:
                children.append(subprocess.Popen(["sleep", "60"]))
        except OSError:
            print(len(children))
    """, run_timeout=10.0))  # fmt: skip
    assert 0 < int(out) < LIMITS.nproc


# --- memory --------------------------------------------------------------------------------------------


def test_memory_bomb_raises_memory_error(client: SandboxClient) -> None:
    result = run(client, "block = bytearray(4 * 1024**3)")
    assert result.status == "Finished" and result.return_code == 1 and "MemoryError" in result.stderr


def killed_out_of_memory(result: RunResult) -> None:
    assert (result.status, result.return_code) == ("Finished", 128 + signal.SIGKILL), result
    assert "out of memory" in result.message


def test_gradual_memory_bomb_stops_at_the_requested_limit(client: SandboxClient) -> None:
    result = run(client, """
        blocks = []
        while True:
            blocks.append(b"x" * 16 * 1024**2)
            print(16 * len(blocks))
    """, memory_limit_mb=256)  # fmt: skip
    killed_out_of_memory(result)
    assert 128 <= int(result.stdout.split()[-1]) < 256


def test_memory_limit_is_per_request(client: SandboxClient) -> None:
    code = "block = b'x' * (400 * 1024**2); print('ok')"
    killed_out_of_memory(run(client, code, memory_limit_mb=300))
    assert finished(run(client, code, memory_limit_mb=1024)) == "ok\n"


def test_memory_limit_bounds_all_processes_together(client: SandboxClient) -> None:
    """Six children of 100 MiB each under a 256 MiB limit: most are killed, the host never holds 600 MiB."""
    out = finished(run(client, """
        import os, time
        children = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                block = b"x" * (100 * 1024**2)
                time.sleep(1)
                os._exit(0)
            children.append(pid)
        print(sum(os.WIFSIGNALED(os.waitpid(pid, 0)[1]) for pid in children))
    """, run_timeout=20, memory_limit_mb=256))  # fmt: skip
    assert int(out) >= 4


@pytest.mark.parametrize(
    "allocate",
    [
        "fd = os.memfd_create('m'); os.write(fd, block); held.append(fd)",
        "open(f'{TMPFS[index % 3]}/f{index}', 'wb').write(block); held.append(1)",
    ],
    ids=["memfd", "tmpfs"],
)
def test_shared_memory_and_tmpfs_count_against_the_memory_limit(client: SandboxClient, allocate: str) -> None:
    """40 x 16 MiB in memfds, or in files spread over the three tmpfs (64 MiB each, 192 MiB in all), at a
    128 MiB limit: killed before 128 MiB are held."""
    result = run(client, f"""
        import os
        block, held = b"s" * 16 * 1024**2, []
        TMPFS = ["/workspace", "/tmp", "/dev/shm"]
        for index in range(40):
            try:
                {allocate}
            except OSError as error:
                print("refused", error.errno)
                break
            print(16 * len(held))
    """, memory_limit_mb=128, run_timeout=20)  # fmt: skip
    numbers = [int(line) for line in result.stdout.split("\n") if line.isdigit()]
    assert max(numbers) <= 128 and result.return_code != 0, result


def test_inode_flood_stops_at_the_tmpfs_inode_cap(client: SandboxClient) -> None:
    out = finished(run(client, """
        import os
        count = 0
        try:
            while True:
                os.close(os.open(f"f{count}", os.O_CREAT | os.O_WRONLY))
                count += 1
        except OSError as error:
            print(error.errno, count)
    """, run_timeout=20))  # fmt: skip
    code, created = map(int, out.split())
    assert code == errno.ENOSPC and created < LIMITS.tmpfs_inodes


def test_numpy_allocation_bomb_fails_cleanly(client: SandboxClient) -> None:
    result = run(client, "import numpy\nnumpy.ones(2**33)")
    assert result.return_code == 1 and "Unable to allocate" in result.stderr


# --- time ----------------------------------------------------------------------------------------------


def test_cpu_spin_is_killed_at_the_wall_clock_timeout(client: SandboxClient) -> None:
    result = run(client, "while True: pass", run_timeout=1.0)
    assert result.status == "TimeLimitExceeded" and result.return_code is None
    assert 1.0 <= result.execution_time < 4.0


def test_spinning_processes_are_all_killed(client: SandboxClient) -> None:
    result = run(client, """
        import os
        for _ in range(8):
            if os.fork() == 0:
                break
        while True:
            pass
    """, run_timeout=1.0)  # fmt: skip
    assert result.status == "TimeLimitExceeded"


def test_cpu_time_limit_counts_as_time_limit(client: SandboxClient) -> None:
    result = run(client, """
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (1, 2))
        while True:
            pass
    """, run_timeout=30.0)  # fmt: skip
    # SIGXCPU, not the wall clock (which leaves no return code), ended it.
    assert result.status == "TimeLimitExceeded" and result.return_code == 128 + signal.SIGXCPU


def test_partial_output_is_kept_on_timeout(client: SandboxClient) -> None:
    result = run(client, """
        import sys, time
        print("before the hang")
        print("on stderr too", file=sys.stderr)
        time.sleep(60)
    """, run_timeout=1.0)  # fmt: skip
    assert result.status == "TimeLimitExceeded"
    assert (result.stdout, result.stderr) == ("before the hang\n", "on stderr too\n")


def test_detached_children_die_at_the_timeout(client: SandboxClient) -> None:
    result = run(client, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    time.sleep(0.01)
            os._exit(0)
        print("parent sleeps")
        time.sleep(60)
    """, run_timeout=1.0)  # fmt: skip
    assert result.status == "TimeLimitExceeded" and result.stdout == "parent sleeps\n"


def test_daemon_outliving_the_program_does_not_delay_the_answer(client: SandboxClient) -> None:
    result = run(client, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        print("main done")
    """, run_timeout=30.0)  # fmt: skip
    assert finished(result) == "main done\n" and result.execution_time < 5.0


def test_ignoring_every_signal_does_not_survive_the_timeout(client: SandboxClient) -> None:
    result = run(client, """
        import signal, time
        for number in range(1, signal.NSIG):
            try:
                signal.signal(number, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
        time.sleep(60)
    """, run_timeout=1.0)  # fmt: skip
    assert result.status == "TimeLimitExceeded"


def test_stopped_program_is_killed_at_the_timeout(client: SandboxClient) -> None:
    result = run(
        client, "import os, signal\nprint('stopping')\nos.kill(os.getpid(), signal.SIGSTOP)", run_timeout=1.0
    )
    assert result.status == "TimeLimitExceeded" and result.stdout == "stopping\n"


# --- output --------------------------------------------------------------------------------------------


def test_stdout_flood_is_truncated_with_a_marker(client: SandboxClient) -> None:
    result = run(client, "import sys\nfor _ in range(200): sys.stdout.write('x' * 65536)")
    assert result.status == "Finished" and result.truncated
    assert result.stdout == "x" * LIMITS.output_limit + TRUNCATION_MARKER


def test_endless_stdout_flood_is_truncated_and_timed_out(client: SandboxClient) -> None:
    result = run(client, "while True: print('y' * 1000)", run_timeout=1.0)
    assert result.status == "TimeLimitExceeded" and result.truncated
    assert result.stdout.endswith(TRUNCATION_MARKER) and len(result.stdout) <= LIMITS.output_limit + 100


def test_stderr_flood_is_truncated(client: SandboxClient) -> None:
    result = run(client, "import sys\nsys.stderr.write('e' * 10**7)\nprint('out')")
    assert result.truncated and result.stdout == "out\n"
    assert result.stderr == "e" * LIMITS.output_limit + TRUNCATION_MARKER


def test_invalid_utf8_output_is_replaced(client: SandboxClient) -> None:
    result = run(
        client,
        "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\xc3')\nsys.stderr.buffer.write(b'\\x80')",
    )
    assert (result.stdout, result.stderr) == ("ok \ufffd\ufffd\ufffd", "\ufffd")


def test_character_cut_by_the_output_limit_is_dropped_whole(client: SandboxClient) -> None:
    result = run(client, f"print('a' + 'é' * {LIMITS.output_limit // 2 + 10})")  # the limit cuts an 'é'
    assert result.stdout == "a" + "é" * (LIMITS.output_limit // 2 - 1) + TRUNCATION_MARKER


def test_unread_huge_stdin_does_not_block(client: SandboxClient) -> None:
    result = run(client, "print('ignored stdin')", stdin="z" * (4 << 20))
    assert finished(result) == "ignored stdin\n" and result.execution_time < 5.0


# --- files and secrets ---------------------------------------------------------------------------------


def test_host_files_are_invisible(client: SandboxClient, host_secret_file: Path, tmp_path: Path) -> None:
    tmp_secret = tmp_path / "secret.txt"
    tmp_secret.write_text("also secret")
    paths = [
        host_secret_file, tmp_secret, Path(__file__), Path.cwd() / "pyproject.toml", Path("/etc/shadow"),
        Path("/etc/passwd"), Path.home() / ".ssh", Path.home() / ".bash_history", Path("/proc/1/root/etc/hostname"),
    ]  # fmt: skip
    out = finished(run(client, f"""
        import os
        for path in {[str(p) for p in paths]!r}:
            try:
                open(path).read()
                print("READ", path)
            except OSError as error:
                print("denied", path, error.errno)
        home = {str(Path.home())!r}
        print(sorted(os.listdir(home)) if os.path.isdir(home) else [])
    """))  # fmt: skip
    assert "READ" not in out
    assert out.splitlines()[-1] in ("[]", "['.pyenv']")  # only the interpreter is bound under a home


def test_service_environment_secrets_are_invisible(client: SandboxClient, secret: str) -> None:
    out = finished(run(client, """
        import os
        print(sorted(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    print(open(f"/proc/{pid}/environ", "rb").read())
                except OSError:
                    pass
    """))  # fmt: skip
    assert secret not in out
    assert ast.literal_eval(out.splitlines()[0]) == sorted(
        ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "PWD",
         "PYTHONUNBUFFERED", "USER"]
    )  # fmt: skip


def test_project_modules_are_not_importable(client: SandboxClient) -> None:
    out = finished(run(client, """
        for name in ("sandbox.executor", "ctpo_cli.cli"):
            try:
                __import__(name)
                print("IMPORTED", name)
            except ImportError:
                print("absent", name)
    """))  # fmt: skip
    assert out == "absent sandbox.executor\nabsent ctpo_cli.cli\n"


def test_writes_outside_the_workdir_fail(client: SandboxClient) -> None:
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    targets = ["/x", "/usr/x", "/etc/x", f"{sys.prefix}/x", f"{site_packages}/evil.pth", f"{Path.home()}/x"]
    out = finished(run(client, f"""
        for path in {targets!r}:
            try:
                open(path, "w").write("pwned")
                print("WROTE", path)
            except OSError as error:
                print("refused", path, error.errno)
    """))  # fmt: skip
    assert "WROTE" not in out and out.count("refused") == len(targets)
    assert not any(os.path.exists(target) for target in targets)


def test_sandbox_tmp_is_private(client: SandboxClient) -> None:
    name = f"ctpo-sandbox-private-{os.getpid()}"
    out = finished(
        run(client, f"open('/tmp/{name}', 'w').write('x'); import os; print(sorted(os.listdir('.')))")
    )
    assert out == "['main.py']\n" and not Path("/tmp", name).exists()


def test_file_size_limit(client: SandboxClient) -> None:
    out = finished(run(client, """
        import os
        try:
            with open("big", "wb") as handle:
                for _ in range(64):
                    handle.write(b"\\0" * 2**20)
        except OSError as error:
            print(error.errno, os.path.getsize("big"))
    """))  # fmt: skip
    assert out.split() == [str(errno.EFBIG), str(LIMITS.file_size_mb << 20)]


def test_filling_the_workdir_stops_at_the_tmpfs_size(client: SandboxClient) -> None:
    out = finished(run(client, """
        written = 0
        try:
            for index in range(100):
                with open(f"f{index}", "wb") as handle:
                    for _ in range(8):
                        handle.write(b"\\1" * 2**20)
                        written += 1
        except OSError as error:
            print(error.errno, written)
    """))  # fmt: skip
    code, written = map(int, out.split())
    assert code == errno.ENOSPC and written <= LIMITS.tmpfs_mb


def test_open_files_limit(client: SandboxClient) -> None:
    out = finished(run(client, """
        handles = []
        try:
            while True:
                handles.append(open("/dev/null"))
        except OSError as error:
            print(error.errno, len(handles))
    """))  # fmt: skip
    code, opened = map(int, out.split())
    assert code == errno.EMFILE and opened < LIMITS.open_files


def test_limits_are_in_force_inside(client: SandboxClient, service: Service) -> None:
    out = finished(run(client, """
        import resource
        for name in ("AS", "CPU", "NPROC", "FSIZE", "NOFILE", "CORE"):
            print(resource.getrlimit(getattr(resource, "RLIMIT_" + name))[0])
    """, run_timeout=7.0, memory_limit_mb=512))  # fmt: skip
    cgroups = httpx.get(f"{service.url}/health").json()["isolation_level"].startswith("cgroup")
    assert [int(v) for v in out.split()] == [
        (512 << 20) * (LIMITS.address_space_factor if cgroups else 1),
        8,
        LIMITS.nproc,
        LIMITS.file_size_mb << 20,
        LIMITS.open_files,
        0,
    ]


def test_raising_the_limits_is_refused(client: SandboxClient) -> None:
    out = finished(run(client, """
        import resource
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE):
            try:
                resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                print("RAISED", limit)
            except (ValueError, OSError):
                print("refused")
    """))  # fmt: skip
    assert out == "refused\n" * 3


# --- network -------------------------------------------------------------------------------------------


def test_loopback_cannot_reach_the_host_service(client: SandboxClient, service: Service) -> None:
    port = int(service.url.rsplit(":", 1)[1])
    out = finished(run(client, f"""
        import socket
        for host in ("127.0.0.1", "::1"):
            try:
                socket.create_connection((host, {port}), timeout=1).close()
                print("CONNECTED", host)
            except OSError as error:
                print("failed", host, error.errno)
        print(socket.if_nameindex())
    """))  # fmt: skip
    assert "CONNECTED" not in out and out.splitlines()[-1] == "[(1, 'lo')]"


def test_external_addresses_are_unreachable(client: SandboxClient) -> None:
    out = finished(run(client, """
        import socket
        tcp = socket.socket()
        tcp.settimeout(1)
        print(tcp.connect_ex(("192.0.2.1", 80)))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.sendto(b"x", ("192.0.2.1", 53))
        except OSError as error:
            print(error.errno)
    """))  # fmt: skip
    assert out.split() == [str(errno.ENETUNREACH)] * 2


def test_dns_resolution_fails(client: SandboxClient) -> None:
    out = finished(run(client, """
        import socket
        try:
            print(socket.getaddrinfo("example.com", 443))
        except socket.gaierror:
            print("no dns")
    """))  # fmt: skip
    assert out == "no dns\n"


# --- processes of the host and privileges ---------------------------------------------------------------


def test_only_the_sandbox_processes_are_visible(client: SandboxClient, service: Service) -> None:
    out = finished(
        run(client, "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    )
    pids = ast.literal_eval(out)
    assert service.process.pid not in pids and max(pids) < 10


def test_killing_the_service_from_inside_fails(client: SandboxClient, service: Service) -> None:
    out = finished(run(client, f"""
        import os, signal
        for pid in ({service.process.pid}, {os.getpid()}, os.getppid(), 1):
            try:
                os.kill(pid, signal.SIGKILL)
                print("sent", pid)
            except OSError as error:
                print("refused", pid, error.errno)
        print("alive")
    """))  # fmt: skip
    assert out.endswith("alive\n")
    assert f"refused {service.process.pid} {errno.ESRCH}" in out


def test_kill_everything_visible_only_hits_the_sandbox(client: SandboxClient) -> None:
    out = finished(run(client, """
        import os, signal, time
        children = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
        os.kill(-1, signal.SIGKILL)
        print("survived", sorted(os.waitpid(child, 0)[1] & 0x7F for child in children))
    """))  # fmt: skip
    assert out == f"survived {[int(signal.SIGKILL)] * 3}\n"


def test_killing_its_own_process_group(client: SandboxClient) -> None:
    result = run(client, "import os, signal\nos.killpg(0, signal.SIGKILL)")
    assert (result.status, result.return_code) == ("Finished", 128 + signal.SIGKILL)


def test_no_privileges_inside(client: SandboxClient) -> None:
    out = finished(run(client, """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            os.setuid(0)
            print("BECAME ROOT")
        except OSError:
            print("no setuid")
        if libc.mount(b"none", b"/usr", b"tmpfs", 0, None) == 0:
            print("MOUNTED")
        else:
            print("no mount", ctypes.get_errno())
        print(os.uname().nodename)
    """))  # fmt: skip
    assert out == f"no setuid\nno mount {errno.EPERM}\nsandbox\n"


# --- crashes -------------------------------------------------------------------------------------------


def test_interpreter_segfault(client: SandboxClient) -> None:
    result = run(client, "import ctypes\nctypes.string_at(0)")
    assert (result.status, result.return_code) == ("Finished", 128 + signal.SIGSEGV)


def test_abort(client: SandboxClient) -> None:
    result = run(client, "import os\nos.abort()")
    assert (result.status, result.return_code) == ("Finished", 128 + signal.SIGABRT)


def test_nul_bytes_in_code(client: SandboxClient) -> None:
    result = run(client, "print(1)\0\0")
    assert result.status == "Finished" and result.return_code == 1 and "null bytes" in result.stderr


# --- hostile requests ----------------------------------------------------------------------------------


def test_huge_code_payload_is_refused_with_413(service: Service) -> None:
    response = httpx.post(f"{service.url}/run_code", json={"code": "#" * (64 << 20), "language": "python"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_large_allowed_code_payload_runs(client: SandboxClient) -> None:
    code = "total = 0\n" + "total += 1\n" * 200_000 + "print(total)"
    assert finished(run(client, code, run_timeout=20.0)) == "200000\n"


def test_client_disconnecting_mid_run_kills_the_program(service: Service, client: SandboxClient) -> None:
    """The program would sleep 60 s; the ``contained`` check (10 s) finds no sandbox left, so it was killed."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{service.url}/run_code",
            json={"code": "import time; time.sleep(60)", "language": "python", "run_timeout": 60},
            timeout=1.0,
        )
    assert finished(run(client, "print('next')")) == "next\n"


# --- what a program sees of the system -------------------------------------------------------------------


def test_localhost_resolves_and_serves_inside(client: SandboxClient) -> None:
    out = finished(run(client, """
        import socket
        print(socket.gethostbyname("localhost"))
        server = socket.create_server(("localhost", 0))
        peer = socket.create_connection(("localhost", server.getsockname()[1]))
        peer.sendall(b"ping")
        print(server.accept()[0].recv(4).decode())
    """))  # fmt: skip
    assert out == "127.0.0.1\nping\n"


def test_no_host_paths_on_the_visible_command_lines(client: SandboxClient) -> None:
    out = finished(run(client, """
        import os
        for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
            print(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    """))  # fmt: skip
    assert "bwrap" not in out and "--ro-bind" not in out and str(Path.cwd()) not in out
    assert str(Path(__file__).parent) not in out


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"", 400, "malformed JSON"),
        (b"\xff\xfe\x00garbage", 400, "malformed JSON"),
        (b'{"code": "print(\\ud800)", "language": "python"}', 400, "malformed JSON"),
        (b"[1, 2]", 422, "Input should be an object"),
        (b'{"code": "print(1)", "language": "cpp"}', 422, "language: Input should be 'python'"),
        (b'{"language": "python"}', 422, "code: Field required"),
        (b'{"code": "print(1)"}', 422, "language: Field required"),
        (b'{"code": 5, "language": "python"}', 422, "code: Input should be a valid string"),
        (
            b'{"code": "", "language": "python", "run_timeout": -1}',
            422,
            "run_timeout: Input should be greater",
        ),
        (
            b'{"code": "", "language": "python", "run_timeout": "soon"}',
            422,
            "run_timeout: Input should be a valid",
        ),
        (b'{"code": "", "language": "python", "files": {"../a": "eA=="}}', 422, "must be a relative path"),
        (b'{"code": "", "language": "python", "files": {"/etc/a": "eA=="}}', 422, "must be a relative path"),
        (b'{"code": "", "language": "python", "files": {"a": "not base64!"}}', 422, "not valid base64"),
    ],
)
def test_malformed_requests_get_a_clear_4xx(service: Service, body: bytes, status: int, message: str) -> None:
    response = httpx.post(
        f"{service.url}/run_code", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status and message in response.json()["detail"], response.text


def test_wrong_method_and_path_are_json_errors(service: Service) -> None:
    assert httpx.get(f"{service.url}/run_code").json() == {"detail": "Method Not Allowed"}
    assert httpx.post(f"{service.url}/run", json={}).json() == {"detail": "Not Found"}
