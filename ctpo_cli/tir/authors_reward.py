"""The authors' reward: a response is correct if any of verl's ``math_reward``, ``math_dapo`` or
``math_verify`` scorers accepts the whole decoded response (tool output included).

This is their ``verl/utils/reward_score/__init__.py`` ``default_compute_score`` (horizon-llm/CTPO), run
with the scorers of the installed verl 0.9.1 (not their modified copies: theirs adds gold-answer
normalisation candidates to ``math_verify``, 0.9.1's ``math_dapo`` adds a ``\\boxed{}`` fallback; see
docs/reproduce.md). Called only inside a scoring worker's main thread (``ctpo_cli.tir.scoring``), where
math-verify's SIGALRM timeouts work, so verl's own ``math_verify`` process pool is not needed: its
worker function is called here directly.

The three scorer files are self-contained (they import only ``re`` and math-verify), so they are
loaded from the installed verl by path, without importing the verl package (6-8 s, torch, the plugins):
``ctpo eval`` stays independent of verl's trainer, and a scoring worker is ready in milliseconds.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

SCORERS = ("math_reward", "math_dapo", "math_verify")
"""verl's scorer modules (``verl/utils/reward_score/<name>.py``) the authors' reward ORs together."""


@cache
def verl_scorer(name: str) -> ModuleType:
    """verl's ``verl/utils/reward_score/<name>.py``, loaded by path (verl itself is not imported)."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the authors' reward uses verl's scorers: pip install 'ctpo[verl]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "reward_score" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"ctpo_verl_reward_score_{name}", path)
    if module_spec is None or module_spec.loader is None:
        raise RuntimeError(f"verl's scorer {path} is missing")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _hit(result: Any) -> bool:
    """verl's binary hit: a dict's ``score``, a number, or a tuple's first item, > 0."""
    if isinstance(result, dict):
        return float(result.get("score", 0.0)) > 0
    if isinstance(result, int | float | bool):
        return float(result) > 0
    return float(result[0]) > 0


def scorers() -> list[Callable[[str, str], Any]]:
    """The three scorers, as ``f(response, ground_truth)``."""
    math_reward, math_dapo, verl_math_verify = (verl_scorer(name) for name in SCORERS)

    def math_verify(response: str, truth: str) -> float:
        # what verl's math_verify.compute_score submits to its process pool, run in this main thread
        return float(verl_math_verify._verify_in_subprocess("\\boxed{" + truth + "}", response))

    return [math_reward.compute_score, math_dapo.compute_score, math_verify]


def accepts(response: str, ground_truth: str) -> bool:
    """Whether any scorer accepts ``response``; a scorer that raises counts as a miss (as theirs)."""
    for scorer in scorers():
        try:
            if _hit(scorer(response, ground_truth)):
                return True
        except Exception:
            continue
    return False
