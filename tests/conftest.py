"""Shared, generic fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def no_active_diagnostics() -> Iterator[None]:
    """No per-position accumulator is active before or after the test (the losses feed a process global)."""
    from ctpo_cli.algo import diagnostics

    diagnostics.activate(None)
    yield
    diagnostics.activate(None)
