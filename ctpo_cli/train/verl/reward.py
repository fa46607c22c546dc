"""verl's reward for ctpo runs: the outcome reward of the paper, scored exactly as ``ctpo eval`` scores.

Wired in through verl's custom reward function setting (``experiments/base.yaml``)::

    reward.custom_reward_function.path=pkg://ctpo_cli.train.verl.reward
    reward.custom_reward_function.name=compute_score

verl's reward loop calls :func:`compute_score` once per response, from worker threads
(``run_in_executor``). Scoring goes through :func:`ctpo_cli.tir.scoring.is_correct`, which runs
math-verify in a process pool where its SIGALRM timeouts work; the authors' release called
math-verify in threads, where the timeout raises and answers such as ``025`` vs ``25`` silently
scored 0 (docs/method.md, "Known defects").
"""

from __future__ import annotations

import re
from typing import Any

from ctpo_cli.tir.scoring import is_correct

TOOL_RESPONSE = re.compile(r"<tool_response>.*?(?:</tool_response>|\Z)", re.DOTALL)
"""A tool message as Qwen3's chat template renders it inside the response tokens."""


def assistant_text(solution_str: str) -> str:
    """The response without its tool messages: the answer is looked for in what the model wrote only
    (``ctpo_cli.tir.protocol``: tool output never counts as an answer)."""
    return TOOL_RESPONSE.sub("", solution_str)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """1.0 if the response's final ``\\boxed{}`` answer equals ``ground_truth``, else 0.0. Thread-safe.

    ``data_source`` and ``extra_info`` are accepted as verl passes them; every data source is scored
    the same way (math answers).
    """
    return 1.0 if is_correct(assistant_text(solution_str), ground_truth) else 0.0
