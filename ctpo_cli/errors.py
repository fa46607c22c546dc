"""The errors a user can cause: each is shown by ``ctpo`` as one line (naming the file, key or value and
the valid choices), never a traceback. Any other exception is a bug in ctpo and is shown with its
traceback (``ctpo_cli.cli.main``).

Each class also derives from the built-in exception it refines (ValueError, FileNotFoundError), so a
caller that handles those keeps working; only ``UserError`` marks an error as the user's.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with what the user asked for or gave; one line, no traceback."""


class ConfigError(UserError, ValueError):
    """A bad option, override, config key or value."""


class InputFileError(UserError, FileNotFoundError):
    """A file or directory the command needs is missing."""


class DataError(UserError, ValueError):
    """A file the user gave (or a run left) exists but its content cannot be used."""


class BackendUnavailable(UserError, RuntimeError):
    """A service, library or store the command needs is not there (a server, vLLM, verl, MLflow)."""


def warn_damaged(path: object, problem: str) -> None:
    """One line on stderr about a damaged file that a reader skips instead of failing (a run left
    half-written by a crash must not block commands about the other runs)."""
    print(f"warning: skipping {path}: {problem}", file=sys.stderr, flush=True)
