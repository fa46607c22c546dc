"""An isolated Python execution service for tool-integrated reasoning, safe against hostile programs.

- :mod:`sandbox.server`: the service (``ctpo sandbox serve``), SandboxFusion-compatible ``POST /run_code`` and
  ``GET /health``; :func:`sandbox.server.running_service` runs one for the duration of a ``with`` block, and
  :func:`sandbox.server.given_or_started` is the rule ``ctpo train`` and ``ctpo eval`` share (a given URL or a
  service of their own).
- :mod:`sandbox.client`: :class:`~sandbox.client.SandboxClient`, :class:`~sandbox.client.RunResult`.
- :mod:`sandbox.executor`: :class:`~sandbox.executor.SandboxRunner`, one program at a time in its own fresh
  sandbox with limits, timeout and capped output.
- :mod:`sandbox.zygote`: the pre-initialised interpreter inside bubblewrap that forks each program into new
  namespaces.
- :mod:`sandbox.cgroups`: per-request cgroups (v2, else v1) bounding memory and processes.
- :mod:`sandbox.config`: every limit, :class:`~sandbox.config.SandboxConfig`.
- :mod:`sandbox.process`: stopping a child's whole process group (the one stopper, also used by ``ctpo train``).

``ctpo bench sandbox`` (:mod:`ctpo_cli.bench.sandbox`) measures the service against bare ``python -c``.

Standalone: nothing here imports ``ctpo_cli``.
"""
