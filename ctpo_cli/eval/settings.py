"""What ``ctpo eval`` is asked to do (:class:`EvalSettings`) and the names of the files it writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dataset import DATA_DIR
from dataset.registry import PAPER_BENCHMARKS

BACKENDS = ("auto", "hf", "vllm", "openai")
SUMMARY_FILE, SUMMARY_MD, PER_PROBLEM_FILE, CONFIG_FILE = (
    "summary.csv",
    "summary.md",
    "per_problem.csv",
    "eval_config.json",
)
GENERATIONS_DIR = "generations"
RESUME_KEYS = (
    "model",
    "temperature",
    "top_p",
    "max_turns",
    "max_tokens",
    "tools",
    "tir",
    "seed",
    "prompt_as_is",
)
"""Settings that must match for a rerun to add samples to an existing output directory."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything ``ctpo eval`` was asked to do."""

    model: str
    benchmarks: tuple[str, ...] = PAPER_BENCHMARKS
    n: int = 32
    temperature: float = 0.7
    top_p: float = 1.0
    max_turns: int = 5
    max_tokens: int = 8000
    tools: bool = True
    tir: str = "authors"  # tool protocol (ctpo_cli.tir.protocol.TIR_PROTOCOLS): the authors' run, or ctpo
    reward: str = "authors"  # the headline reward (avg@k, CI, pass@k); both are always reported
    backend: str = "auto"
    out: Path | None = None
    base_url: str | None = None
    sandbox_url: str | None = None
    data_dir: str = str(DATA_DIR)
    seed: int = 0
    batch_size: int = 0  # trajectories advanced together; 0: the backend's default
    rescore: bool = False
    prompt_as_is: bool = False  # the benchmark's messages unchanged: no system prompt added or replaced
