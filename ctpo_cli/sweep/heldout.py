"""The held-out evaluation of a local run: ``ctpo eval``'s machinery on the run's own task.

Every method of a (preset, seed) is judged on the same held-out problems
(:func:`ctpo_cli.train.local.task.eval_problems`), written once per seed as a verl-format benchmark,
with the sampling settings the policy was trained with and its own prompts (no system prompt).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ctpo_cli.eval.runner import run_eval
from ctpo_cli.eval.settings import EvalSettings
from ctpo_cli.train.local.config import LocalConfig
from ctpo_cli.train.local.task import DATA_SOURCE, write_eval_set


def heldout_benchmark(directory: Path, config: LocalConfig, seed: int) -> Path:
    """``<directory>/synthetic_count.parquet``: the seed's held-out problems (one directory per seed,
    so that the benchmark has the same name for every seed)."""
    return write_eval_set(Path(directory) / f"{DATA_SOURCE}.parquet", config.task, seed)


def evaluate_heldout(
    model: Path, benchmark: Path, config: LocalConfig, samples: int, seed: int, out: Path, console: Console
) -> Path:
    """avg@``samples`` of ``model`` on ``benchmark``, written to ``out`` (resumable, see ``ctpo eval``)."""
    settings = EvalSettings(
        model=str(model),
        benchmarks=(str(benchmark),),
        n=samples,
        temperature=config.rl.temperature,
        max_tokens=config.rl.max_new_tokens,
        tools=False,
        prompt_as_is=True,  # the prompts the policy was trained on, no system prompt
        reward="strict",  # the reward the local engine trains with
        backend="hf",
        out=out,
        seed=seed,
    )
    run_eval(settings, console)
    return out
