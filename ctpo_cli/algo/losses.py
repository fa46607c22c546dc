"""Policy-gradient losses that differ only in their importance-sampling (IS) weight and its clip.

Every method here turns the same inputs into a per-token loss through one shared surrogate, so the
comparison between them is a comparison of IS weights and nothing else. Notation (method.md):

    d_t   = clamp(log pi_theta(y_t) - log mu(y_t), -20, 20)      per-token log ratio
    t     = number of model tokens up to and including y_t       (tool-output tokens, mask 0, do not count)
    K_t   = sum_{s <= t, mask_s = 1} d_s                          cumulative log ratio

Each method supplies a log-weight ``log w_t`` and a clip window ``[lo_t, hi_t]`` in *ratio* space
(plus, optionally, a dual-clip constant ``c_t`` applied when A < 0). The shared surrogate is

    w_t  = exp(log w_t),   w~_t = clamp(w_t, lo_t, hi_t)
    l_t  = max(-A w_t, -A w~_t);   if dual clip and A < 0:  l_t = min(l_t, -A c_t)

then aggregated with :func:`agg_loss` (verl's modes and global-batch normalisation). Clamping the
ratio to ``[exp(-a), exp(b)]`` equals clipping ``log w`` to ``[-a, b]`` and exponentiating, so the
log-space windows of CTPO are expressed the same way as PPO's ratio windows.

Sequence-level and cumulative weights use the stop-gradient construction

    log w_t = sg[X] + log pi_theta(y_t) - sg[log pi_theta(y_t)],   clamped at 10 before exp,

whose value is exp(X) and whose gradient is w_t * grad log pi_theta(y_t).

Methods (``get_policy_loss(name)``):

* ``grpo``: token ratio r_t = exp(d_t), PPO clip [1 - eps_low, 1 + eps_high], dual clip c
  (Shao et al. 2024, DeepSeekMath; dual clip: Ye et al. 2020). Equals verl's ``vanilla``.
* ``gspo``: geometric-mean sequence ratio g_i = exp(K_|y| / |y|), clip [1 - eps_low, 1 + eps_high],
  no dual clip, always seq-mean-token-mean (Zheng et al. 2025). Equals verl's ``gspo``.
* ``ctpo``: cumulative ratio rho_t = exp(K_t), log-space window [-a_low t^p, a_high t^p], dual clip
  exp(a_c t^p) (Zhang et al. 2026, arXiv 2605.07331).
* ``ctpo-fixed``: CTPO with p = 0 (the paper's fixed-window ablation; default window ratio [0.5, 5]).
* ``seq-is``: full sequence ratio R_i = exp(K_|y|) with PPO clip and dual clip (the unbiased,
  high-variance end of the spectrum).

The loss itself never synchronises with the host: its metrics come back as 0-dim tensors on the device.
(verl does synchronise afterwards: its metric collection calls ``.item()`` on every metric of every
micro-batch, ``verl.utils.metric.Metric.append``, and averages them over micro-batches and ranks, so each
metric is a mean of per-micro-batch values; ``ctpo/is_weight_microbatch_peak`` is the mean of the
micro-batches' largest weights, not the step's maximum.) When a
:class:`~ctpo_cli.algo.diagnostics.PositionStats` accumulator is active, the loss feeds it per-position
statistics of K_t (see :mod:`ctpo_cli.algo.diagnostics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ctpo_cli.algo import defaults, diagnostics
from ctpo_cli.errors import ConfigError

LOG_RATIO_CLAMP = 20.0
"""|d_t| is clamped to this before use (as verl's vanilla loss)."""
LOG_WEIGHT_MAX = 10.0
"""Sequence-level and cumulative log-weights are clamped above at this before exp (as verl's gspo)."""

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")

Metrics = dict[str, torch.Tensor]


class PolicyLossFn(Protocol):
    """verl's policy-loss signature."""

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Metrics]: ...


@dataclass(frozen=True)
class Window:
    """A method's weight and clip window at every token, all shaped like the log-probs.

    ``log_weight`` carries the gradient; ``low``/``high`` are ratio-space bounds (floats or tensors);
    ``dual_clip`` is the ratio cap applied when A < 0, or None for no dual clip.
    """

    log_weight: torch.Tensor
    low: torch.Tensor | float
    high: torch.Tensor | float
    dual_clip: torch.Tensor | float | None


@dataclass(frozen=True)
class TokenTerms:
    """What every method's weighting function is given."""

    log_prob: torch.Tensor  # log pi_theta(y_t), carries the gradient
    log_ratio: torch.Tensor  # d_t, clamped, carries the gradient
    cum_log_ratio: torch.Tensor  # K_t, carries the gradient
    position: torch.Tensor  # t, counted over model tokens (float, >= 1 on model tokens)
    mask: torch.Tensor  # float 0/1
    length: torch.Tensor  # |y_i| (number of model tokens), shape (B, 1), >= 1


WeightFn = Callable[[TokenTerms, Mapping[str, float]], Window]


@dataclass(frozen=True)
class Method:
    """One entry of the registry: how a method weights and clips, and where it comes from."""

    name: str
    weight: WeightFn
    defaults: Mapping[str, float]
    ratio: str
    clip_rule: str
    paper: str
    fixed_agg_mode: str | None = None


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    defaults: Mapping[str, float],
    ratio: str,
    clip_rule: str,
    paper: str,
    fixed_agg_mode: str | None = None,
) -> Callable[[WeightFn], WeightFn]:
    """Decorator: register a weighting function under ``name`` (verl ``register_policy_loss`` style)."""

    def decorator(fn: WeightFn) -> WeightFn:
        METHODS[name] = Method(name, fn, dict(defaults), ratio, clip_rule, paper, fixed_agg_mode)
        return fn

    return decorator


def sequence_weight(log_prob: torch.Tensor, log_value: torch.Tensor) -> torch.Tensor:
    """log w_t = min(sg[log_value] + log pi(y_t) - sg[log pi(y_t)], 10): value exp(log_value), grad through y_t."""
    return torch.clamp(log_value.detach() + log_prob - log_prob.detach(), max=LOG_WEIGHT_MAX)


@register_method(
    "grpo",
    defaults=defaults.PPO,
    ratio="token r_t = pi/mu",
    clip_rule="PPO [1-eps_low, 1+eps_high], dual clip c (A<0)",
    paper="Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300)",
)
def grpo_weight(terms: TokenTerms, hp: Mapping[str, float]) -> Window:
    """r_t = exp(d_t); window [1 - eps_low, 1 + eps_high]; dual clip c for A < 0."""
    return Window(terms.log_ratio, 1 - hp["clip_ratio_low"], 1 + hp["clip_ratio_high"], hp["clip_ratio_c"])


@register_method(
    "gspo",
    defaults=defaults.GSPO,
    ratio="geometric mean g_i = exp(K_|y| / |y|)",
    clip_rule="[1-eps_low, 1+eps_high] on g_i, no dual clip, seq-mean-token-mean",
    paper="Zheng et al. 2025 (GSPO, arXiv 2507.18071)",
    fixed_agg_mode="seq-mean-token-mean",
)
def gspo_weight(terms: TokenTerms, hp: Mapping[str, float]) -> Window:
    """w_t = sg[g_i] pi/sg[pi] with g_i = exp(K_|y| / |y|); window [1 - eps_low, 1 + eps_high]."""
    mean_log_ratio = terms.cum_log_ratio[:, -1:] / terms.length
    return Window(
        sequence_weight(terms.log_prob, mean_log_ratio),
        1 - hp["clip_ratio_low"],
        1 + hp["clip_ratio_high"],
        None,
    )


def ctpo_window(terms: TokenTerms, hp: Mapping[str, float]) -> Window:
    """rho_t = exp(K_t); log-space window [-a_low t^p, a_high t^p]; dual clip exp(a_c t^p) for A < 0."""
    scale = terms.position.clamp(min=1.0) ** hp["ctpo_power"]
    return Window(
        sequence_weight(terms.log_prob, terms.cum_log_ratio),
        torch.exp(-hp["ctpo_clip_low"] * scale),
        torch.exp(hp["ctpo_clip_high"] * scale),
        torch.exp(hp["ctpo_clip_c"] * scale),
    )


register_method(
    "ctpo",
    defaults=defaults.CTPO,
    ratio="cumulative rho_t = exp(K_t)",
    clip_rule="log-space [-a_low t^p, a_high t^p] (p=0.5), dual clip exp(a_c t^p)",
    paper="Zhang et al. 2026 (CTPO, arXiv 2605.07331)",
)(ctpo_window)
register_method(
    "ctpo-fixed",
    defaults=defaults.CTPO_FIXED,
    ratio="cumulative rho_t = exp(K_t)",
    clip_rule="fixed log-space [-ln 2, ln 5] (p=0), dual clip 5",
    paper="Zhang et al. 2026 (CTPO ablation, arXiv 2605.07331)",
)(ctpo_window)


@register_method(
    "seq-is",
    defaults=defaults.PPO,
    ratio="full sequence R_i = exp(K_|y|)",
    clip_rule="PPO [1-eps_low, 1+eps_high] on R_i, dual clip c",
    paper="Zhang et al. 2026, Table 1 (full-sequence IS)",
)
def sequence_is_weight(terms: TokenTerms, hp: Mapping[str, float]) -> Window:
    """w_t = sg[R_i] pi/sg[pi] with R_i = exp(K_|y|); PPO window and dual clip."""
    return Window(
        sequence_weight(terms.log_prob, terms.cum_log_ratio[:, -1:]),
        1 - hp["clip_ratio_low"],
        1 + hp["clip_ratio_high"],
        hp["clip_ratio_c"],
    )


# --------------------------------------------------------------------------------------------------
# Hyperparameters


def _lookup(config: Any, key: str) -> Any:
    """``config[key]``, else ``config.policy_loss[key]``, else None (dict, OmegaConf or verl config)."""
    if config is None:
        return None
    value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
    if value is not None:
        return value
    policy_loss = config.get("policy_loss", None) if hasattr(config, "get") else None
    if policy_loss is not None and hasattr(policy_loss, "get"):
        return policy_loss.get(key, None)
    return None


def method_hparams(name: str, config: Any = None) -> dict[str, float]:
    """The method's hyperparameters: the method's defaults overridden by whatever ``config`` sets.

    ``clip_ratio_low``/``clip_ratio_high`` fall back to ``clip_ratio`` when unset, as in verl.
    Raises ValueError for values outside their valid range.
    """
    method = get_method(name)
    hp: dict[str, float] = {}
    for key, default in method.defaults.items():
        value = _lookup(config, key)
        if value is None and key in ("clip_ratio_low", "clip_ratio_high"):
            value = _lookup(config, "clip_ratio")
        hp[key] = float(default if value is None else value)
    _validate_hparams(name, hp, explicit_power=_lookup(config, "ctpo_power"))
    return hp


def _validate_hparams(name: str, hp: Mapping[str, float], explicit_power: Any) -> None:
    for key, value in hp.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: {key} must be a finite number >= 0, got {value}")
    if "clip_ratio_low" in hp and hp["clip_ratio_low"] >= 1:
        raise ConfigError(
            f"{name}: clip_ratio_low must be in [0, 1) (window 1 - eps_low > 0), got {hp['clip_ratio_low']}"
        )
    if "clip_ratio_c" in hp and hp["clip_ratio_c"] <= 1:
        raise ConfigError(f"{name}: clip_ratio_c (dual clip) must be > 1, got {hp['clip_ratio_c']}")
    if "ctpo_clip_c" in hp and hp["ctpo_clip_c"] <= 0:
        raise ConfigError(
            f"{name}: ctpo_clip_c must be > 0 (dual clip exp(c t^p) > 1), got {hp['ctpo_clip_c']}"
        )
    if name == "ctpo-fixed" and explicit_power is not None and float(explicit_power) != 0.0:
        raise ConfigError(
            f"ctpo-fixed has ctpo_power = 0 by definition, got {explicit_power}; use method 'ctpo'"
        )


def get_method(name: str) -> Method:
    """The registered method called ``name``; ValueError naming the valid choices otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------------------------------
# Aggregation (verl's agg_loss semantics, without importing verl)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask), with values outside the mask (possibly NaN) replaced by 0."""
    valid = torch.where(mask.bool(), values, 0.0) * mask
    return valid.sum() if dim is None else valid.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_sum / (count + 1e-8), as verl."""
    return masked_sum(values, mask) / (mask.sum() + 1e-8)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Aggregate a (B, L) loss matrix into a scalar, invariant to data-parallel/micro-batch splitting.

    token-mean:              sum_{i,t} l / N_tokens(global) * dp
    token-sum:               sum_{i,t} l * dp
    seq-mean-token-sum:      sum_i (sum_t l) / N_seq(global) * dp
    seq-mean-token-sum-norm: the above / loss_scale_factor (default: L; Dr.GRPO)
    seq-mean-token-mean:     sum_i (mean_t l) / N_seq(global) * dp
    Local counts stand in for the global ones when those are not given and dp_size == 1.
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            _require_single_rank(dp_size, "batch_num_tokens")
            batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        tokens_per_seq = loss_mask.sum(dim=-1)
        seq_losses = (loss_mat * loss_mask).sum(dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_losses = seq_losses / (tokens_per_seq + 1e-8)
        seq_mask = (tokens_per_seq > 0).float()
        if global_batch_size is None:
            _require_single_rank(dp_size, "global_batch_size")
            global_batch_size = seq_mask.sum()
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    raise ConfigError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid modes: {', '.join(AGG_MODES)}")


def _require_single_rank(dp_size: int, key: str) -> None:
    if dp_size > 1:
        raise ValueError(f"global_batch_info.{key} is required when dp_size > 1")


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = getattr(config, "global_batch_info", None)
    if info is None and isinstance(config, Mapping):
        info = config.get("global_batch_info", None)
    return {k: v for k, v in (info or {}).items() if k in GLOBAL_BATCH_KEYS}


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    rollout_is_weights: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and (on CPU, where it costs no device sync) finiteness of the inputs."""
    if loss_agg_mode not in AGG_MODES:
        raise ConfigError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid modes: {', '.join(AGG_MODES)}")
    named = {"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages}
    if rollout_is_weights is not None:
        named["rollout_is_weights"] = rollout_is_weights
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be 2-D (batch, response_length), got shape {tuple(log_prob.shape)}")
    for key, tensor in {**named, "response_mask": response_mask}.items():
        if tensor.shape != log_prob.shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)}, expected {tuple(log_prob.shape)} like log_prob"
            )
    for key, tensor in named.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{key} must be a floating-point tensor, got dtype {tensor.dtype}")
    if log_prob.device.type == "cpu":
        # a NaN or inf at an unmasked token makes the masked sum of all inputs non-finite: one cheap
        # reduction when all is well; only then (or on a float overflow of the sum) each input is checked
        model = response_mask.bool()
        first, *rest = (t.detach() for t in named.values())
        total = torch.where(model, first + sum(rest), 0.0).sum()
        if not bool(torch.isfinite(total)):
            for key, tensor in named.items():
                if not bool((torch.isfinite(tensor.detach()) | ~model).all()):
                    raise ValueError(f"{key} contains NaN or inf at unmasked tokens")


# --------------------------------------------------------------------------------------------------
# The shared surrogate


def token_terms(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor
) -> TokenTerms:
    """d_t, K_t, t and |y| for a (B, L) batch; masked tokens neither advance t nor enter K_t."""
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_ratio = torch.where(response_mask.bool(), log_ratio, 0.0)
    # t in at least float32 so that it stays exact (to 2^24) when the log-probs are bf16/fp16
    position = torch.cumsum(mask.to(torch.promote_types(mask.dtype, torch.float32)), dim=-1)
    return TokenTerms(
        log_prob=log_prob,
        log_ratio=log_ratio,
        cum_log_ratio=torch.cumsum(log_ratio, dim=-1),
        position=position,
        mask=mask,
        length=position[:, -1:].clamp(min=1.0).to(log_prob.dtype),
    )


def tool_spans(terms: TokenTerms) -> Metrics:
    """What the loss was given between model tokens, per sequence (mean over the micro-batch):
    ``ctpo/tool_spans``, runs of masked tokens followed by more model tokens (tool calls in a
    tool-integrated response), and ``ctpo/tool_tokens``, their tokens. Both are 0 for a single turn;
    such tokens neither advance t nor enter K_t (method.md (2), (3))."""
    inside = (terms.mask == 0) & (terms.position > 0) & (terms.position < terms.length)
    starts = inside[:, 1:] & (terms.mask[:, :-1] > 0)
    return {
        "ctpo/tool_spans": torch.count_nonzero(starts, dim=-1).float().mean(),
        "ctpo/tool_tokens": torch.count_nonzero(inside, dim=-1).float().mean(),
    }


class ClippedSurrogate(torch.autograd.Function):
    """The shared surrogate of every method (module docstring) with its gradient computed in the
    forward pass, so that the backward pass is one multiplication.

    Per token, with U = -A w and C = -A clamp(w, lo, hi):  l = max(U, C), and with a dual clip c,
    l = min(l, -A c) where A < 0; then l r when rollout weights r are given. Its derivative in
    log w is dl/dlog w = U r where the unclipped branch is taken (C > U false: w inside the window,
    or outside on the side where the clip does not bind) and the dual clip does not bind, else 0:
    the derivative autograd gives through ``max``/``clamp``/``min``, which at an exact tie l = -A c
    would take half of it.

    Returns (l, w, clipped = C > U, dual_hit = the dual clip binds, or None); only l has a gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        log_weight: torch.Tensor,
        advantages: torch.Tensor,
        low: torch.Tensor,
        high: torch.Tensor,
        dual_clip: torch.Tensor | float | None,
        rollout_is_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        weight = torch.exp(log_weight)
        negative = -advantages
        unclipped = negative * weight
        clipped_loss = negative * torch.clamp(weight, min=low, max=high)
        clipped = torch.gt(clipped_loss, unclipped)
        loss = torch.maximum(unclipped, clipped_loss)
        cut = clipped
        dual_hit = None
        if dual_clip is not None:
            dual = negative * dual_clip
            dual_hit = torch.gt(loss, dual) & (advantages < 0)
            loss = torch.where(dual_hit, dual, loss)
            cut = clipped | dual_hit
        grad = torch.where(cut, 0.0, unclipped)
        if rollout_is_weights is not None:
            loss = loss * rollout_is_weights
            grad = grad * rollout_is_weights
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(weight, clipped, *([] if dual_hit is None else [dual_hit]))
        return loss, weight, clipped, dual_hit

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *unused: Any) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None, None, None


def get_policy_loss(name: str, on_call: Callable[[Any], None] | None = None) -> PolicyLossFn:
    """A function with verl's policy-loss signature computing method ``name``'s loss.

    ``config`` may be verl's ActorConfig, an OmegaConf mapping or a plain dict (or None): method
    hyperparameters are read from it (top level, then ``policy_loss``), missing ones take the
    method's defaults; ``global_batch_info`` is honoured when present. ``on_call(config)`` runs
    first at every call (the verl plugin starts the per-position diagnostics there).
    """
    get_method(name)  # fail early on an unknown name

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Metrics]:
        if on_call is not None:
            on_call(config)
        method = get_method(name)
        hp = method_hparams(name, config)
        _check_inputs(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, rollout_is_weights)
        terms = token_terms(old_log_prob, log_prob, response_mask)
        window = method.weight(terms, hp)
        mask = terms.mask

        low, high = (
            torch.as_tensor(b, dtype=log_prob.dtype, device=log_prob.device)
            for b in (window.low, window.high)
        )
        loss, weight, clipped, dual_hit = ClippedSurrogate.apply(
            window.log_weight, advantages, low, high, window.dual_clip, rollout_is_weights
        )
        model = response_mask.bool()
        count = mask.sum() + 1e-8  # the denominator of every masked mean, as verl's
        metrics: Metrics = {
            "actor/pg_clipfrac": torch.count_nonzero(clipped & model) / count,
            "actor/pg_clipfrac_lower": torch.zeros((), device=log_prob.device)
            if dual_hit is None
            else torch.count_nonzero(dual_hit & model) / count,
        }

        agg_mode = method.fixed_agg_mode or loss_agg_mode
        pg_loss = agg_loss(loss, response_mask, agg_mode, **_global_batch_info(config))

        with torch.no_grad():
            below = (weight < low) & model
            above = (weight > high) & model
            # d_t is 0 and K_t finite off the mask (token_terms), so these masked means need no where
            metrics["actor/ppo_kl"] = -terms.log_ratio.sum() / count
            metrics["ctpo/is_weight_mean"] = masked_mean(weight, mask)
            # this micro-batch's largest weight; verl averages it over micro-batches and ranks (no "max"
            # in the name: verl's legacy reduce_metrics would take the maximum of such a key instead)
            metrics["ctpo/is_weight_microbatch_peak"] = torch.where(model, weight, 0.0).max()
            metrics["ctpo/clip_low_frac"] = torch.count_nonzero(below) / count
            metrics["ctpo/clip_high_frac"] = torch.count_nonzero(above) / count
            metrics["ctpo/cum_log_ratio_abs_mean"] = (terms.cum_log_ratio.abs() * mask).sum() / count
            metrics.update(tool_spans(terms))
            accumulator = diagnostics.active()
            if accumulator is not None:
                accumulator.record(terms.cum_log_ratio, terms.log_ratio, terms.position, mask, below, above)
        return pg_loss, {k: v.detach() for k, v in metrics.items()}

    policy_loss.__name__ = f"policy_loss_{name.replace('-', '_')}"
    policy_loss.__doc__ = f"{name}: {METHODS[name].ratio}; {METHODS[name].clip_rule}."
    return policy_loss
