"""A synthetic, verifiable reasoning task whose responses are long enough for position to matter.

A problem asks how many numbers a count takes, ``Count from 4 by 3 to 40``. A worked solution
numbers every value it reaches and ends with the boxed count::

    1:4
    2:7
    ...
    13:40
    So \\boxed{13}

Each line follows from the previous one by two local rules (index + 1, value + step) and the run
stops when the value reaches the target, so with 8-14 lines a response is 60-100 model tokens (the
tokenizer is character-level) and one early slip propagates to every later line. Answers are
checked by :func:`ctpo_cli.tir.scoring.is_correct`, the scorer of ``ctpo eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctpo_cli.train.local.config import TaskConfig
from dataset.registry import write_parquet

DATA_SOURCE = "synthetic_count"


@dataclass(frozen=True)
class Problem:
    """Count from ``start`` by ``step``; the answer is the number of values up to ``target``."""

    start: int
    step: int
    count: int

    @property
    def target(self) -> int:
        return self.start + self.step * (self.count - 1)

    @property
    def question(self) -> str:
        return f"Count from {self.start} by {self.step} to {self.target}"

    @property
    def answer(self) -> int:
        return self.count

    def solution(self, careless: bool = False) -> str:
        """The worked solution: every numbered value, then the boxed count.

        A careless solution counts the same way but boxes the last value (the target) instead of
        how many values there are: the misreading RL has to unlearn (see ``WarmStartConfig``).
        """
        lines = [f"{i + 1}:{self.start + i * self.step}" for i in range(self.count)]
        return "\n".join([*lines, self.conclusion(self.target if careless else self.count)])

    @staticmethod
    def conclusion(value: int) -> str:
        """The last line of every solution: ``So \\boxed{value}``."""
        return f"So \\boxed{{{value}}}"

    @property
    def program(self) -> str:
        """A one-line Python program whose output is the answer."""
        return f"print(len(range({self.start}, {self.target + 1}, {self.step})))"

    def tool_solution(self) -> tuple[str, str]:
        """A tool-integrated solution (``ctpo_cli.tir.protocol``): a first turn that ends with a
        ```````python`` block computing the count, and, after the tool's output, a final boxed turn."""
        return f"```python\n{self.program}\n```", self.conclusion(self.count)

    def messages(self, system_prompt: str = "") -> list[dict[str, str]]:
        """The chat prompt (verl's ``prompt`` column), with a system message when one is given."""
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [*system, {"role": "user", "content": self.question}]


def sample_problems(config: TaskConfig, count: int, rng: np.random.Generator) -> list[Problem]:
    """``count`` problems: start in [1, 9], step in [2, 9], min_terms..max_terms values."""
    return [
        Problem(
            int(rng.integers(1, 10)),
            int(rng.integers(2, 10)),
            int(rng.integers(config.min_terms, config.max_terms + 1)),
        )
        for _ in range(count)
    ]


def eval_problems(config: TaskConfig, seed: int) -> list[Problem]:
    """Held-out problems, drawn from a stream disjoint from training's (seed offset)."""
    return sample_problems(config, config.num_eval_problems, np.random.default_rng([seed, 2]))


def to_verl_frame(problems: list[Problem], split: str, system_prompt: str = "") -> pd.DataFrame:
    """Problems in verl's parquet schema (the schema of ``ctpo eval`` benchmarks)."""
    return pd.DataFrame(
        {
            "id": [f"{DATA_SOURCE}-{split}-{i}" for i in range(len(problems))],
            "data_source": DATA_SOURCE,
            "prompt": [p.messages(system_prompt) for p in problems],
            "ability": "math",
            "reward_model": [{"ground_truth": str(p.answer), "style": "rule"} for p in problems],
            "extra_info": [{"index": i, "split": split} for i in range(len(problems))],
        }
    )


def write_eval_set(path: Path, config: TaskConfig, seed: int) -> Path:
    """Write the held-out problems as a verl-format parquet benchmark (atomically) and return its path."""
    write_parquet(to_verl_frame(eval_problems(config, seed), "test", config.system_prompt), path)
    return path
