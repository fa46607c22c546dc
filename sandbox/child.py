"""First code to run inside the sandbox: apply the resource limits, report readiness, exec the program.

The executor runs it as ``python -I -S -c <this source> READY_FD AS CPU NPROC FSIZE NOFILE UID PROGRAM...`` in
the sandbox's interpreter: isolated mode, no site, so it imports only the standard library, nothing from this
package and nothing from the program's directory.

- AS: RLIMIT_AS, address space in bytes (the request's ``memory_limit_MB``). Exceeding it makes allocations
  fail (``MemoryError`` in Python) instead of growing the host's memory.
- CPU: RLIMIT_CPU in seconds; SIGXCPU at the soft limit, SIGKILL one second later.
- NPROC: RLIMIT_NPROC, processes and threads alive at once; ``fork`` and thread creation fail beyond it.
- FSIZE: RLIMIT_FSIZE, the largest file the program may write, in bytes (writes beyond fail with EFBIG).
- NOFILE: RLIMIT_NOFILE, open file descriptors.
- UID: -1 to keep the current user. Otherwise (the service runs as root) become this user and enter a new user
  namespace first: the kernel never enforces RLIMIT_NPROC for root, and the fresh namespace makes it count this
  sandbox's processes only, not every process of that user on the host.

One byte on READY_FD tells the executor that the sandbox was set up and the program is about to start; its
absence means a set-up failure (reported as status ``Error``, never blamed on the program).
"""

import os
import resource
import sys

CLONE_NEWUSER = 0x10000000


def become(uid: int) -> None:
    """Drop root for ``uid`` (no supplementary groups), then unshare a user namespace owned by it."""
    import ctypes

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER) failed")


def main(argv: list[str]) -> None:
    ready_fd, address_space, cpu_seconds, nproc, file_size, open_files, uid = map(int, argv[1:8])
    if uid >= 0:
        become(uid)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    os.execv(argv[8], argv[8:])


if __name__ == "__main__":
    main(sys.argv)
