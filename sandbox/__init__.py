"""An isolated Python execution service for tool-integrated reasoning, safe against hostile programs.

- :mod:`sandbox.server`: the service (``ctpo sandbox serve``), SandboxFusion-compatible ``POST /run_code`` and
  ``GET /health``; :func:`sandbox.server.running_service` runs one for the duration of a ``with`` block, and
  :func:`sandbox.server.given_or_started` is the rule ``ctpo train`` and ``ctpo eval`` share (a given URL or a
  service of their own).
- :mod:`sandbox.client`: :class:`~sandbox.client.SandboxClient`, :class:`~sandbox.client.RunResult`.
- :mod:`sandbox.executor`: one program in bubblewrap with limits, timeout and capped output.
- :mod:`sandbox.config`: every limit, :class:`~sandbox.config.SandboxConfig`.
- :mod:`sandbox.process`: stopping a child's whole process group (the one stopper, also used by ``ctpo train``).
- :mod:`sandbox.child`: the first code run inside the sandbox (limits, readiness, then the program).
- :mod:`sandbox.bench`: ``ctpo bench sandbox``.

Standalone: nothing here imports ``ctpo_cli``.
"""
