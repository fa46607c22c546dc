"""The pre-initialised interpreter inside the sandbox that forks one fresh, isolated process per program.

The executor starts it once per service worker, inside bubblewrap (the outer sandbox: read-only system,
no network, no host files), as ``python -c <this source> CONTROL_FD SETTINGS_JSON``. It imports only the
standard library, nothing of this package. For each request the service sends, over the control socket, a
small JSON header and the request's descriptors (SCM_RIGHTS): a request socket, the program (an in-memory
file), its stdin (an in-memory file), the write ends of its stdout and stderr pipes and its files (an
in-memory file). It never reads any of them itself, so nothing of one request stays in the memory that the
next request's process inherits. Then, per request, three processes:

- **relay** (forked from the zygote, in a session of its own): tells the service its process id (SCM_CREDENTIALS, which the kernel
  translates into the service's view), waits until the service has moved it into the request's cgroups,
  enters new mount, PID, network, IPC, UTS and cgroup namespaces and forks the init. It reports the init's
  exit code and whether the program started to the service, and kills the init when the service says so
  (``k``, the timeout or a disconnected client) or goes away.
- **init** (PID 1 of the new PID namespace): mounts a fresh /proc, private tmpfs at /workspace, /tmp and
  /dev/shm (size and inode caps; interpreter directories under them are bound back, read-only), brings up the
  loopback, writes main.py (read-only) and the request's files, forks the program and reaps every process
  until the program ends, then exits with its code: the kernel then kills whatever else is left in the
  namespace, detached or not.
- **program**: its stdin, stdout and stderr, then (the service runs as root) it becomes ``uid`` and enters a
  user namespace of its own, or (it does not) leaves the outer user namespace for one of its own: either way
  without any capability over the sandbox. Then resource limits (below), no new privileges, readiness (one
  byte to the relay) and ``python /workspace/main.py`` emulated in this already initialised interpreter: a
  fresh ``__main__``, ``sys.argv``, ``sys.path[0]``, the zygote's own modules dropped from ``sys.modules``,
  the script's exit code, traceback, atexit handlers and non-daemon threads as the interpreter's own.

Limits of the program (header keys): ``as`` RLIMIT_AS bytes, ``cpu`` RLIMIT_CPU seconds, ``nproc``
RLIMIT_NPROC, ``fsize`` RLIMIT_FSIZE bytes, ``nofile`` RLIMIT_NOFILE, core dumps off; the cgroups (set by the
service) bound the memory and processes of the whole request. One difference from a fresh interpreter: the
string hash seed is the zygote's, shared by every program (set iteration order is stable across runs).
"""

import sys

STARTUP_MODULES = frozenset(sys.modules)

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x20000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIOCSIFFLAGS, IFF_UP = 0x8914, 1
WORKDIR = "/workspace"
TMPFS = (WORKDIR, "/tmp", "/dev/shm")
SETUP_FAILED = 125
"""Exit code of an init whose set-up failed (the relay then reports the program as not started)."""

libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def mount(source, target, kind, flags, data=None):
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    check(libc.mount(encode(source), encode(target), encode(kind), flags, encode(data)), f"mount {target}")


def unshare(flags):
    check(libc.unshare(flags), "unshare")


def make_dirs(path):
    """Create ``path`` and missing parents, 0755."""
    if not os.path.isdir(path):
        make_dirs(os.path.dirname(path))
        os.mkdir(path, 0o755)


def set_up_filesystem(settings, header, program_fd, files_fd):
    """The init's mounts, hostname, loopback, main.py and files."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    hidden = [root for root in settings["roots"] if any(root.startswith(t + "/") for t in TMPFS)]
    kept = {root: os.open(root, os.O_PATH | os.O_DIRECTORY) for root in hidden}
    options = f"size={header['tmpfs']},nr_inodes={header['inodes']},mode=1777"
    for path in TMPFS:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for root, fd in kept.items():  # an interpreter under /tmp or /dev/shm: bound back, read-only
        make_dirs(root)
        mount(f"/proc/self/fd/{fd}", root, None, MS_BIND | MS_REC)
        mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    socket.sethostname("sandbox")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP))
    write_files(header, program_fd, files_fd, WORKDIR)


def write_files(header, program_fd, files_fd, workdir):
    """The request's files (owned by the program's user), then main.py (read-only, owned by the init: a
    file of that name among the request's files does not replace the program)."""
    with open(files_fd, "rb") as blob:
        data = blob.read()
    offset, owner = 0, header["uid"]
    while offset < len(data):
        name_size, size = struct.unpack_from("<IQ", data, offset)
        offset += 12
        name = data[offset : offset + name_size].decode()
        offset += name_size
        path = os.path.join(workdir, name)
        make_dirs(os.path.dirname(path))
        with open(path, "wb") as handle:
            handle.write(data[offset : offset + size])
        offset += size
        if owner >= 0:
            for created in (path, *parents_below(os.path.dirname(path), workdir)):
                os.chown(created, owner, owner)
    with open(program_fd, "rb") as source, open(os.path.join(workdir, "main.py"), "wb") as target:
        target.write(source.read())
        os.fchmod(target.fileno(), 0o444)


def parents_below(path, top):
    while path != top and path.startswith(top + "/"):
        yield path
        path = os.path.dirname(path)


def drop_privileges(settings, header):
    """Leave every capability over the sandbox behind: as ``uid`` (service is root) in a user namespace of
    its own, or in a fresh user namespace (service is not root); then no new privileges ever."""
    uid = header["uid"]
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if settings["isolate"]:
        unshare(CLONE_NEWUSER)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")


def set_limits(header):
    with open("/proc/self/oom_score_adj", "w") as adj:  # the program before its init and relay
        adj.write("1000")
    resource.setrlimit(resource.RLIMIT_AS, (header["as"], header["as"]))
    resource.setrlimit(resource.RLIMIT_CPU, (header["cpu"], header["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (header["nproc"], header["nproc"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (header["fsize"], header["fsize"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (header["nofile"], header["nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(settings, header, workdir, ready_fd):
    """The program's process: never returns."""
    status = 1
    try:
        os.chdir(workdir)
        set_limits(header)
        drop_privileges(settings, header)
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        status = run_main(os.path.join(workdir, "main.py"))
    finally:
        os._exit(status)


def run_main(path):
    """``python path`` in this interpreter: its exit code (traceback and exit semantics as the interpreter's)."""
    import builtins
    import types

    for name in set(sys.modules) - STARTUP_MODULES - {"builtins", "types"}:
        del sys.modules[name]
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None)
    sys.modules["__main__"] = main
    sys.argv, sys.orig_argv = [path], [sys.executable, path]
    sys.path[0] = os.path.dirname(path)
    try:
        with open(path, "rb") as handle:
            source = handle.read()
        exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)
        status = 0
    except SystemExit as exit:
        status = exit_status(exit)
    except BaseException as error:
        error.__traceback__ = error.__traceback__ and error.__traceback__.tb_next  # the program's frames
        sys.excepthook(type(error), error, error.__traceback__)
        status = 1
    return finish(status)


def exit_status(exit):
    """The exit code ``raise SystemExit(code)`` gives: None 0, an int itself, anything else printed, 1."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code & 0xFF
    print(exit.code, file=sys.stderr)
    return 1


def finish(status):
    """What the interpreter does at exit: wait for non-daemon threads, atexit handlers, flush."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except SystemExit as exit:
        status = exit_status(exit)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status


def init(settings, header, fds, ready_fd):
    """The request's init: set up, fork the program, reap until it ends, exit with its code. Never returns."""
    program_fd, stdin_fd, stdout_fd, stderr_fd, files_fd = fds
    for source, target in ((stdin_fd, 0), (stdout_fd, 1), (stderr_fd, 2)):
        os.dup2(source, target)
        os.close(source)
    try:
        if settings["isolate"]:
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            set_up_filesystem(settings, header, program_fd, files_fd)
            workdir = WORKDIR
        else:
            import tempfile

            workdir = tempfile.mkdtemp(prefix="ctpo-sandbox-")
            write_files(header, program_fd, files_fd, workdir)
        child = os.fork()
    except BaseException as error:
        os.write(2, f"sandbox set-up failed: {error}\n".encode())
        os._exit(SETUP_FAILED)
    if child == 0:
        if not settings["isolate"]:
            os.setpgid(0, 0)
        run_program(settings, header, workdir, ready_fd)
    os.close(ready_fd)
    if not settings["isolate"]:  # no PID namespace: the relay's SIGTERM ends the program's process group
        with contextlib.suppress(OSError):
            os.setpgid(child, child)
        signal.signal(signal.SIGTERM, lambda *_: os.killpg(child, signal.SIGKILL))
    while True:
        pid, status = os.wait()
        if pid == child:
            break
    if not settings["isolate"]:  # no PID namespace: end the program's process group, remove its directory
        import shutil

        with contextlib.suppress(OSError):
            os.killpg(child, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


def relay(settings, header, request, fds):
    """Between the service and one program (see the module docstring). Never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()  # a session, so a scheduling group (autogroup), per request: as a separate sandbox would be
    try:
        credentials = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
        request.sendmsg([b"h"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials)])
        if request.recv(1) != b"g":
            os._exit(0)
        if settings["isolate"]:
            unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP)
        ready_read, ready_write = os.pipe()
        start = time.monotonic()
        child = os.fork()
        if child == 0:
            request.close()
            os.close(ready_read)
            init(settings, header, fds, ready_write)
        for fd in (*fds, ready_write):
            os.close(fd)
        watch = select.poll()
        pidfd = os.pidfd_open(child)
        watch.register(pidfd, select.POLLIN)
        watch.register(request, select.POLLIN)
        ended = False
        while not ended:
            for fd, _ in watch.poll():
                if fd == pidfd:
                    ended = True
                else:  # "k", or the service went away (read, so that closing our end resets nothing)
                    request.recv(1)
                    os.kill(child, signal.SIGKILL if settings["isolate"] else signal.SIGTERM)
                    watch.unregister(request)
        _, status = os.waitpid(child, 0)
        elapsed = time.monotonic() - start
        os.set_blocking(ready_read, False)
        try:
            ready = os.read(ready_read, 1) == b"1"
        except BlockingIOError:
            ready = False
        code = os.waitstatus_to_exitcode(status)
        report = {"code": 128 - code if code < 0 else code, "time": elapsed, "ready": ready}
        request.send(json.dumps(report).encode())
    except OSError:  # the service went away: nothing to report to
        pass
    os._exit(0)


def main():
    control = socket.socket(fileno=int(sys.argv[1]))
    settings = json.loads(sys.argv[2])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # relays are reaped by the kernel
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    while True:
        message, ancillary, _, _ = control.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
        if not message:
            return  # the service closed the control socket
        fds: list[int] = []
        for level, kind, data in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
        header = json.loads(message)
        if os.fork() == 0:
            control.close()
            relay(settings, header, socket.socket(fileno=fds[0]), fds[1:])
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    main()
