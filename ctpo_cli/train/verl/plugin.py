"""The one place verl reaches ctpo: registers our losses in verl's policy-loss registry.

verl imports every module of the ``verl.plugins`` entry-point group on ``import verl``, in every
process (driver and Ray workers), so this module runs wherever a verl actor computes a loss.

* Each method of :mod:`ctpo_cli.algo.losses` is registered as ``ctpo/<name>`` (``ctpo/grpo``,
  ``ctpo/gspo``, ``ctpo/ctpo``, ``ctpo/ctpo-fixed``, ``ctpo/seq-is``): select one with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=ctpo/ctpo``.
* Hyperparameters reach the worker through :class:`CTPOPolicyLossConfig`, a subclass of verl's
  frozen ``PolicyLossConfig`` with our fields. Route (verified against verl 0.9.1)::

      actor_rollout_ref.actor.policy_loss._target_=ctpo_cli.train.verl.plugin.CTPOPolicyLossConfig
      +actor_rollout_ref.actor.policy_loss.ctpo_clip_low=0.025   # ... and the other ctpo_* fields

  verl's ``omega_conf_to_dataclass`` then builds the subclass, and the loss reads
  ``config.policy_loss.ctpo_*``. PPO bounds stay verl's own ``actor.clip_ratio_low/high/c``.
* Per-position diagnostics: when ``policy_loss.ctpo_diagnostics_dir`` is set, the first loss call
  in a worker activates a :class:`~ctpo_cli.algo.diagnostics.PositionStats` there; a process-wide
  optimizer-step hook (``torch.optim.Optimizer`` global post hook) marks mini-batch ends and flushes
  a file every ``ctpo_minibatches_per_step`` optimizer steps, i.e. once per training step.

* The CPU platform (:mod:`ctpo_cli.train.verl.cpu`) is registered only when ``VERL_PLATFORM=cpu``;
  a GPU run imports none of it.

verl logs a plugin that fails to import at DEBUG level only; this module instead prints the error
to stderr with its traceback before re-raising (and the launcher's config validation fails early in
the driver when the chosen loss mode is not registered).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from typing import Any

PREFIX = "ctpo/"

try:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from verl.trainer.ppo.core_algos import register_policy_loss
    from verl.workers.config.actor import PolicyLossConfig

    from ctpo_cli.algo import diagnostics
    from ctpo_cli.algo.losses import METHODS, get_policy_loss
    from ctpo_cli.train.verl import cpu

    if cpu.selected():  # VERL_PLATFORM=cpu (the tiny-cpu preset): verl on this machine's CPU
        cpu.register()
except Exception:  # pragma: no cover - exercised by the loud-failure test in a subprocess
    sys.stderr.write(
        "ctpo: the verl plugin ctpo_cli.train.verl.plugin failed to import; ctpo/* losses are NOT registered:\n"
        + traceback.format_exc()
    )
    raise


@dataclass
class CTPOPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus ctpo's fields (None = the method's default, see ``ctpo methods``).

    Args:
        ctpo_clip_low: a_low, log-space lower bound base: log w_t >= -a_low t^p (paper: 0.025).
        ctpo_clip_high: a_high, log-space upper bound base: log w_t <= a_high t^p (paper: 0.05).
        ctpo_clip_c: a_c, dual clip for A < 0 caps the weight at exp(a_c t^p) (paper: 0.05).
        ctpo_power: p, the position exponent (paper: 0.5; 0 gives the fixed-window ablation).
        ctpo_diagnostics_dir: run directory where per-position statistics are written (None: off).
        ctpo_minibatches_per_step: optimizer steps per training step (epochs x batch / mini-batch);
            the diagnostics are flushed after this many optimizer steps.
        ctpo_start_step: training steps done before this process started (a resumed run): the first
            flush is step ``ctpo_start_step + 1``.
    """

    ctpo_clip_low: float | None = None
    ctpo_clip_high: float | None = None
    ctpo_clip_c: float | None = None
    ctpo_power: float | None = None
    ctpo_diagnostics_dir: str | None = None
    ctpo_minibatches_per_step: int = 1
    ctpo_start_step: int = 0


class StepFlusher:
    """Optimizer-step hook: one mini-batch per optimizer step, a flush every ``per_step`` of them."""

    def __init__(self, stats: diagnostics.PositionStats, per_step: int, start_step: int = 0) -> None:
        self.stats = stats
        self.per_step = max(1, per_step)
        self.step = start_step

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.stats.end_minibatch()
        if self.stats.minibatch >= self.per_step:
            self.step += 1
            self.stats.flush(self.step)


_STEP_HOOK: torch.utils.hooks.RemovableHandle | None = None
"""Handle of the optimizer-step hook registered by :func:`_ensure_diagnostics`, for :func:`reset_diagnostics`."""


def reset_diagnostics() -> None:
    """Stop per-position diagnostics in this process: remove the optimizer-step hook, deactivate the accumulator.

    The next loss call with ``ctpo_diagnostics_dir`` set starts afresh.
    """
    global _STEP_HOOK
    if _STEP_HOOK is not None:
        _STEP_HOOK.remove()
        _STEP_HOOK = None
    diagnostics.activate(None)


def _ensure_diagnostics(config: Any) -> None:
    """Activate the per-position accumulator in this process on the first loss call, if configured."""
    global _STEP_HOOK
    if diagnostics.active() is not None or config is None:
        return
    policy_loss = config.get("policy_loss", None) if hasattr(config, "get") else None
    if policy_loss is None or not policy_loss.get("ctpo_diagnostics_dir", None):
        return
    out_dir = policy_loss.get("ctpo_diagnostics_dir")
    stats = diagnostics.PositionStats(out_dir)
    diagnostics.activate(stats)
    per_step = int(policy_loss.get("ctpo_minibatches_per_step", 1) or 1)
    # the accumulator was deactivated elsewhere: replace its flusher, never stack two
    if _STEP_HOOK is not None:
        _STEP_HOOK.remove()
    start = int(policy_loss.get("ctpo_start_step", 0) or 0)
    _STEP_HOOK = register_optimizer_step_post_hook(StepFlusher(stats, per_step, start))


def registered_names() -> list[str]:
    """The verl loss-mode names this plugin provides."""
    return [PREFIX + name for name in METHODS]


for _name in METHODS:
    register_policy_loss(PREFIX + _name)(get_policy_loss(_name, on_call=_ensure_diagnostics))
