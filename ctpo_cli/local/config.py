"""Configuration of the local backend: one structured OmegaConf config, presets, ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    """The tiny Qwen3-architecture policy built from a config (random init) when no --model is given."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256


@dataclass
class TaskConfig:
    """Synthetic counting problems, 'Count from 4 by 3 to 40'; the response numbers every value."""

    min_terms: int = 8
    max_terms: int = 14
    num_eval_problems: int = 64


@dataclass
class WarmStartConfig:
    """Supervised warm start on worked solutions (shared by all methods of a preset and seed).

    ``careless_frac`` of the demonstrations come from a careless solver who counts correctly but
    boxes the last value instead of how many values there are. The warm-started policy imitates
    both, so it starts with a real but fixable weakness: only the reward says which answer is
    right, which is what RL post-training is for (SFT on mixed-quality data, then RL).
    """

    steps: int = 800
    careless_frac: float = 0.5
    batch_size: int = 32
    lr: float = 1e-2


@dataclass
class RLConfig:
    """The RL phase, as verl runs it: G samples per prompt, several optimizer steps per rollout batch.

    Later mini-batches of a batch are off-policy (pi_theta != mu), which is where the IS ratio matters.
    """

    steps: int = 30
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    minibatches: int = 4
    lr: float = 1e-4
    temperature: float = 1.0
    max_new_tokens: int = 96
    grad_clip: float = 1.0
    loss_agg_mode: str = "token-mean"
    val_every: int = 10
    val_samples: int = 4
    checkpoint_every: int = 10


@dataclass
class LocalConfig:
    """Everything a local run needs; ``loss`` holds method hyperparameters (see ``ctpo methods``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    loss: dict[str, float] = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # A seconds-long run for tests and smoke checks.
    "smoke": {
        "model": {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16},
        "task": {"min_terms": 4, "max_terms": 6, "num_eval_problems": 8},
        "warmstart": {"steps": 20},
        "rl": {
            "steps": 3,
            "prompts_per_step": 4,
            "samples_per_prompt": 4,
            "minibatches": 2,
            "max_new_tokens": 48,
            "val_every": 2,
            "val_samples": 2,
            "checkpoint_every": 2,
        },
    },
}


def build_config(preset: str = "tiny", overrides: list[str] | None = None) -> LocalConfig:
    """The preset merged with ``key=value`` overrides (e.g. ``rl.steps=50 loss.ctpo_power=0.4``).

    Raises ValueError naming the bad override and the valid keys of its section.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    schema = OmegaConf.structured(LocalConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create(PRESETS[preset]))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. rl.steps=50)")
        section = key.split(".")[0]
        if section not in ("model", "task", "warmstart", "rl", "loss"):
            raise ValueError(f"unknown override key {key!r}; sections: model, task, warmstart, rl, loss")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as error:
            valid = ", ".join(f"{section}.{k}" for k in getattr(LocalConfig(), section).__dict__)
            raise ValueError(f"bad override {item!r} ({type(error).__name__}); valid keys: {valid}") from None
    config = OmegaConf.to_object(merged)
    assert isinstance(config, LocalConfig)
    if not 0.0 <= config.warmstart.careless_frac <= 1.0:
        raise ValueError(f"warmstart.careless_frac must be in [0, 1], got {config.warmstart.careless_frac}")
    if config.rl.prompts_per_step * config.rl.samples_per_prompt % config.rl.minibatches:
        raise ValueError("rl.prompts_per_step * rl.samples_per_prompt must be divisible by rl.minibatches")
    return config


def flat_params(config: LocalConfig) -> dict[str, Any]:
    """The config as flat ``section.key`` params for MLflow."""
    container = dataclasses.asdict(config)
    return {f"{section}.{k!s}": v for section, values in container.items() for k, v in values.items()}
