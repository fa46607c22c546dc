"""Configuration of the local backend: one structured OmegaConf config with documented fields, presets
as YAML in ``experiments/local/`` (as the verl presets are), and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import experiments
from ctpo_cli.algo.losses import AGG_MODES, METHODS
from ctpo_cli.errors import ConfigError


@dataclass
class ModelConfig:
    """The tiny Qwen3-architecture policy built from a config (random init) when no --model is given.

    The fields are ``transformers.Qwen3Config``'s of the same name; the vocabulary is the character-level
    tokenizer's (``ctpo_cli.train.local.model.build_tokenizer``), embeddings are tied.
    """

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of each MLP."""
    num_hidden_layers: int = 2
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads per block."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    head_dim: int = 32
    """Width of one attention head."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + response) in tokens; RoPE is set up for this length."""


@dataclass
class TaskConfig:
    """Synthetic counting problems, 'Count from 4 by 3 to 40'; the response numbers every value
    (``ctpo_cli.train.local.task``)."""

    min_terms: int = 8
    """Fewest values a problem's count has."""
    max_terms: int = 14
    """Most values a problem's count has (response length grows with it: ~6 tokens per value)."""
    num_eval_problems: int = 64
    """Held-out problems of the validation curve and of the quickstart's ``ctpo eval``."""
    system_prompt: str = ""
    """A system message before each problem ("": none). The verl engine's agent loop adds the long
    ``ctpo_cli.tir.protocol.SYSTEM_PROMPT`` to prompts without one, too long for a tiny model, so the
    tiny verl preset sets a short one here."""


@dataclass
class WarmStartConfig:
    """Supervised warm start on worked solutions (shared by all methods of a preset and seed).

    ``careless_frac`` of the demonstrations come from a careless solver who counts correctly but
    boxes the last value instead of how many values there are. The warm-started policy imitates
    both, so it starts with a real but fixable weakness: only the reward says which answer is
    right, which is what RL post-training is for (SFT on mixed-quality data, then RL).
    """

    steps: int = 800
    """Supervised optimizer steps (cached in ``runs/.warmstart/`` by config and seed)."""
    careless_frac: float = 0.5
    """Fraction of demonstrations that box the last value instead of the count, in [0, 1]."""
    tool_frac: float = 0.0
    """Fraction of demonstrations that solve the problem with one ```python block instead (a turn
    ending with the block, the tool's output, then the boxed count), in [0, 1]. Only the verl engine
    runs tools (its agent loop calls the sandbox); the local engine requires 0."""
    batch_size: int = 32
    """Demonstrations per supervised step."""
    lr: float = 1e-2
    """AdamW learning rate of the warm start."""
    seed: int = -1
    """Seed of the warm start (model init and demonstrations); -1: the run's seed. A fixed seed gives
    every run of a sweep the same starting policy, as the paper's runs all start from one base model."""


@dataclass
class RLConfig:
    """The RL phase, as verl runs it: G samples per prompt, several optimizer steps per rollout batch.

    Later mini-batches of a batch are off-policy (pi_theta != mu), which is where the IS ratio matters
    (docs/method.md, "Paper's experimental setup": 512 prompts / mini-batch 32 = 16 optimizer steps).
    """

    steps: int = 30
    """Training steps (one rollout batch each)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch."""
    samples_per_prompt: int = 8
    """G, responses per prompt: the group of the GRPO advantage (docs/method.md, "Notation")."""
    minibatches: int = 4
    """Optimizer steps per rollout batch; all but the first are off-policy."""
    lr: float = 1e-4
    """AdamW learning rate of the policy."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1.0: the policy's own distribution)."""
    max_new_tokens: int = 96
    """Response budget in tokens."""
    grad_clip: float = 1.0
    """Global gradient-norm clip per optimizer step."""
    loss_agg_mode: str = "token-mean"
    """verl's loss aggregation (docs/method.md, "Loss aggregation modes"); gspo always uses seq-mean-token-mean."""
    val_every: int = 10
    """Validation avg@k on the held-out problems every this many steps (and at the end)."""
    val_samples: int = 4
    """k of that validation avg@k."""
    checkpoint_every: int = 10
    """Checkpoint (policy, optimizer, RNG) every this many steps, for ``--resume``."""


@dataclass
class LocalConfig:
    """Everything a local run needs: ``experiments/local/<preset>.yaml`` over these defaults, then overrides.

    ``loss`` holds method hyperparameters (names and defaults: ``ctpo methods``, ``ctpo_cli.algo.defaults``).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    loss: dict[str, float] = field(default_factory=dict)


LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    **{f"model.{f.name}": (1, True) for f in dataclasses.fields(ModelConfig)},
    "task.min_terms": (1, True),
    "task.num_eval_problems": (1, True),
    "warmstart.steps": (0, True),
    "warmstart.batch_size": (1, True),
    "warmstart.lr": (0, False),
    "rl.steps": (1, True),
    "rl.prompts_per_step": (1, True),
    "rl.samples_per_prompt": (2, True),
    "rl.minibatches": (1, True),
    "rl.lr": (0, False),
    "rl.temperature": (0, False),
    "rl.max_new_tokens": (1, True),
    "rl.grad_clip": (0, False),
    "rl.val_every": (1, True),
    "rl.val_samples": (1, True),
    "rl.checkpoint_every": (1, True),
}
"""Each numeric field's lower bound and whether the bound itself is allowed (every value is finite);
rl.samples_per_prompt >= 2 because the group advantage divides by the group's std."""


def check_ranges(config: LocalConfig) -> None:
    """ConfigError naming the first field outside :data:`LOWER_BOUNDS` or its other constraints."""
    for key, (bound, closed) in LOWER_BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not (math.isfinite(value) and (value >= bound if closed else value > bound)):
            raise ConfigError(f"{key} must be a finite number {'>=' if closed else '>'} {bound}, got {value}")
    for key in ("careless_frac", "tool_frac"):
        value = getattr(config.warmstart, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"warmstart.{key} must be in [0, 1], got {value}")
    if config.warmstart.careless_frac + config.warmstart.tool_frac > 1.0:
        raise ConfigError(
            "warmstart.careless_frac + warmstart.tool_frac must be at most 1 (shares of one set)"
        )
    if config.task.max_terms < config.task.min_terms:
        raise ConfigError(
            f"task.max_terms ({config.task.max_terms}) must be >= task.min_terms ({config.task.min_terms})"
        )
    known = sorted({"clip_ratio", *(key for method in METHODS.values() for key in method.defaults)})
    unknown = sorted(set(config.loss) - set(known))
    if unknown:
        raise ConfigError(f"loss.{unknown[0]} is no method's hyperparameter; valid: {', '.join(known)}")
    if config.rl.loss_agg_mode not in AGG_MODES:
        raise ConfigError(
            f"rl.loss_agg_mode {config.rl.loss_agg_mode!r} is not one of {', '.join(AGG_MODES)}"
        )
    if config.rl.prompts_per_step * config.rl.samples_per_prompt % config.rl.minibatches:
        raise ConfigError("rl.prompts_per_step * rl.samples_per_prompt must be divisible by rl.minibatches")


def presets() -> dict[str, Path]:
    """The local presets: ``experiments/local/<name>.yaml``."""
    found = (experiments.directory() / "local").glob("*.yaml")
    return {path.stem: path for path in sorted(found, key=lambda path: path.stem)}


def build_config(preset: str = "tiny", overrides: list[str] | None = None) -> LocalConfig:
    """The preset merged with ``key=value`` overrides (e.g. ``rl.steps=50 loss.ctpo_power=0.4``).

    Raises ConfigError naming the bad override and the valid keys of its section, or a value out of range
    (:func:`check_ranges`).
    """
    files = presets()
    if preset not in files:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(files)}")
    schema = OmegaConf.structured(LocalConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.load(files[preset]))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{files[preset]}: {str(error).splitlines()[0]}") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. rl.steps=50)")
        section = key.split(".")[0]
        if section not in ("model", "task", "warmstart", "rl", "loss"):
            raise ConfigError(f"unknown override key {key!r}; sections: model, task, warmstart, rl, loss")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as error:
            valid = ", ".join(f"{section}.{k}" for k in getattr(LocalConfig(), section).__dict__)
            raise ConfigError(
                f"bad override {item!r} ({type(error).__name__}); valid keys: {valid}"
            ) from None
    config = OmegaConf.to_object(merged)
    assert isinstance(config, LocalConfig)
    check_ranges(config)
    return config


def flat_params(config: LocalConfig) -> dict[str, Any]:
    """The config as flat ``section.key`` params for MLflow."""
    container = dataclasses.asdict(config)
    return {f"{section}.{k!s}": v for section, values in container.items() for k, v in values.items()}
