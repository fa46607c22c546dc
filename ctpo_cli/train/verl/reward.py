"""verl's reward for ctpo runs: the outcome reward of the paper under one of two named rules, scored
exactly as ``ctpo eval`` scores them (``ctpo_cli.tir.scoring.REWARDS``).

Wired in through verl's custom reward function setting, chosen by ``ctpo.reward``
(``experiments/reward/<rule>.yaml``)::

    reward.custom_reward_function.path=pkg://ctpo_cli.train.verl.reward
    reward.custom_reward_function.name=authors_score    # or strict_score

verl's reward loop calls the function once per response, from worker threads (``run_in_executor``),
with the response decoded without special tokens (tool messages included, as the chat template
renders them). Scoring goes through :func:`ctpo_cli.tir.scoring.score_batch`, which runs the checks
in a process pool where math-verify's SIGALRM timeouts work; the authors' release called math-verify
in threads, where the timeout raises and answers such as ``025`` vs ``25`` silently scored 0
(docs/method.md, "Known defects").
"""

from __future__ import annotations

import re
from typing import Any

from ctpo_cli.tir.scoring import AUTHORS, STRICT, score_batch

TOOL_RESPONSE = re.compile(r"<tool_response>.*?(?:</tool_response>|\Z)", re.DOTALL)
"""A tool message as Qwen3's chat template renders it inside the response tokens."""


def assistant_text(solution_str: str) -> str:
    """The response without its tool messages: the strict answer is looked for in what the model wrote
    only (``ctpo_cli.tir.protocol``: tool output never counts as a strict answer)."""
    return TOOL_RESPONSE.sub("", solution_str)


def authors_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """1.0 if any of verl's math_reward, math_dapo or math_verify accepts the whole response, else 0.0.

    ``data_source`` and ``extra_info`` are accepted as verl passes them; every data source is scored
    the same way (theirs too). Thread-safe.
    """
    return 1.0 if score_batch([solution_str], [ground_truth], rule=AUTHORS)[0] else 0.0


def strict_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """1.0 if the assistant text's final ``\\boxed{}`` answer equals ``ground_truth``, else 0.0. Thread-safe."""
    return 1.0 if score_batch([assistant_text(solution_str)], [ground_truth], rule=STRICT)[0] else 0.0
