"""Tests of ctpo_cli.algo.losses (issue 2).

Two independent oracles:

* verl 0.9.1's own built-in losses (``vanilla`` for grpo, ``gspo`` for gspo), on the same tensors;
* a deliberately naive reference written from docs/method.md (Python loops over tokens, one 0-dim
  tensor per token, the gradient flowing only where method.md puts it). It shares no code with
  ctpo_cli.algo.losses: the hyperparameter defaults below are typed in from method.md too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctpo_cli.algo import diagnostics
from ctpo_cli.algo.losses import get_policy_loss, method_hparams

DT = torch.float64
METHOD_NAMES = ("grpo", "gspo", "ctpo", "ctpo-fixed", "seq-is")
AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# Defaults, from method.md (not from the code under test).
MD_DEFAULTS: dict[str, dict[str, float]] = {
    "grpo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0},
    "seq-is": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0},
    "gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},
    "ctpo": {"ctpo_clip_low": 0.025, "ctpo_clip_high": 0.05, "ctpo_clip_c": 0.05, "ctpo_power": 0.5},
    # the ablation's fixed window: ratio [0.5, 5], dual clip at the upper bound, p = 0
    "ctpo-fixed": {
        "ctpo_clip_low": math.log(2.0),
        "ctpo_clip_high": math.log(5.0),
        "ctpo_clip_c": math.log(5.0),
        "ctpo_power": 0.0,
    },
}
CUSTOM: dict[str, dict[str, float]] = {
    "grpo": {"clip_ratio_low": 0.15, "clip_ratio_high": 0.28, "clip_ratio_c": 2.5},
    "seq-is": {"clip_ratio_low": 0.3, "clip_ratio_high": 0.5, "clip_ratio_c": 2.0},
    "gspo": {"clip_ratio_low": 0.05, "clip_ratio_high": 0.08},
    "ctpo": {"ctpo_clip_low": 0.04, "ctpo_clip_high": 0.07, "ctpo_clip_c": 0.09, "ctpo_power": 0.4},
    "ctpo-fixed": {"ctpo_clip_low": 0.2, "ctpo_clip_high": 0.3, "ctpo_clip_c": 0.5},
}
VERL_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


def const(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=DT)


def num(value: torch.Tensor) -> float:
    return float(value.detach())


# --------------------------------------------------------------------------------------------------
# The naive reference, from method.md


def reference_token_losses(
    method: str,
    old: torch.Tensor,
    lp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    hp: Mapping[str, float],
) -> dict[tuple[int, int], torch.Tensor]:
    """{(i, j): l_t} for every model token (mask 1), one token at a time.

    d_t = clamp(lp - old, -20, 20); t counts mask-1 tokens; K_t = sum of d over mask-1 tokens up to t.
    grpo: log w = d_t (gradient through lp, none where the clamp is active).
    others: log w = sg[X] + lp - sg[lp] with X = K_|y|/|y| (gspo), K_|y| (seq-is), K_t (ctpo),
    then log w := min(log w, 10) (constant when capped).
    Clip: PPO methods clip w in ratio space to [1 - eps_low, 1 + eps_high]; CTPO clips log w to
    [-a_low t^p, a_high t^p]. l = max(-A w, -A w~); if dual clip and A < 0: l = min(l, -A cap).
    A clipped or capped weight is a constant: no gradient.
    """
    losses: dict[tuple[int, int], torch.Tensor] = {}
    values = lp.detach()  # plain numbers for the bookkeeping; lp itself carries the gradient
    rows, cols = lp.shape
    for i in range(rows):
        d: dict[int, float] = {}
        for j in range(cols):
            if bool(mask[i, j]):
                d[j] = min(max(float(values[i, j]) - float(old[i, j]), -20.0), 20.0)
        length = len(d)
        k_total = sum(d.values())
        k_t = 0.0
        t = 0
        for j in range(cols):
            if not bool(mask[i, j]):
                continue
            t += 1
            k_t += d[j]
            a = float(adv[i, j])
            x = lp[i, j]
            dual: float | None
            if method == "grpo":
                raw = float(values[i, j]) - float(old[i, j])
                log_w = x - old[i, j] if -20.0 < raw < 20.0 else const(d[j])
            else:
                seq_value = {"gspo": k_total / length, "seq-is": k_total}.get(method, k_t)
                log_w = seq_value + x - x.detach()
                if num(log_w) > 10.0:
                    log_w = const(10.0)
            w = torch.exp(log_w)
            if method in ("ctpo", "ctpo-fixed"):
                scale = float(t) ** hp["ctpo_power"]
                lo, hi = -hp["ctpo_clip_low"] * scale, hp["ctpo_clip_high"] * scale
                if num(log_w) < lo:
                    w_clip = const(math.exp(lo))
                elif num(log_w) > hi:
                    w_clip = const(math.exp(hi))
                else:
                    w_clip = w
                dual = math.exp(hp["ctpo_clip_c"] * scale)
            else:
                r_lo, r_hi = 1.0 - hp["clip_ratio_low"], 1.0 + hp["clip_ratio_high"]
                if num(w) < r_lo:
                    w_clip = const(r_lo)
                elif num(w) > r_hi:
                    w_clip = const(r_hi)
                else:
                    w_clip = w
                dual = None if method == "gspo" else hp["clip_ratio_c"]
            l_unclipped = -a * w
            l_clipped = -a * w_clip
            loss = l_unclipped if num(l_unclipped) >= num(l_clipped) else l_clipped
            if dual is not None and a < 0 and num(loss) > -a * dual:
                loss = const(-a * dual)
            losses[(i, j)] = loss
    return losses


def reference_aggregate(
    token_losses: Mapping[tuple[int, int], torch.Tensor],
    mask: torch.Tensor,
    mode: str,
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """verl's aggregation modes, written out: global counts when given, local ones otherwise."""
    info = dict(global_batch_info or {})
    dp = info.get("dp_size", 1)
    rows, cols = mask.shape
    per_row: list[list[torch.Tensor]] = []
    for i in range(rows):
        row = []
        for j in range(cols):
            if bool(mask[i, j]):
                value = token_losses[(i, j)]
                if rollout_is_weights is not None:
                    value = value * rollout_is_weights[i, j]
                row.append(value)
        per_row.append(row)
    tokens = [v for row in per_row for v in row]
    if mode == "token-mean":
        n_tokens = info.get("batch_num_tokens") or len(tokens)
        return sum(tokens, const(0.0)) / n_tokens * dp
    if mode == "token-sum":
        return sum(tokens, const(0.0)) * dp
    nonempty = [row for row in per_row if row]
    n_seqs = info.get("global_batch_size") or len(nonempty)
    if mode == "seq-mean-token-mean":
        per_seq = [sum(row, const(0.0)) / len(row) for row in nonempty]
    else:
        per_seq = [sum(row, const(0.0)) for row in nonempty]
    loss = sum(per_seq, const(0.0)) / n_seqs * dp
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (info.get("loss_scale_factor") or cols)
    return loss


def reference(
    method: str,
    batch: Mapping[str, torch.Tensor],
    mode: str,
    hp: Mapping[str, float],
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d log_prob) of the naive reference."""
    lp = batch["log_prob"].detach().clone().requires_grad_(True)
    tokens = reference_token_losses(
        method, batch["old_log_prob"], lp, batch["advantages"], batch["response_mask"], hp
    )
    if method == "gspo":
        mode = "seq-mean-token-mean"  # method.md: GSPO always aggregates seq-mean-token-mean
    loss = reference_aggregate(tokens, batch["response_mask"], mode, rollout_is_weights, global_batch_info)
    loss.backward()
    assert lp.grad is not None
    return loss.detach(), lp.grad


def run_loss(
    name: str,
    batch: Mapping[str, torch.Tensor],
    mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    fn: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(loss, d loss / d log_prob, metrics) of ``fn`` (default: our ``get_policy_loss(name)``)."""
    lp = batch["log_prob"].detach().clone().requires_grad_(True)
    loss_fn = fn or get_policy_loss(name)
    loss, metrics = loss_fn(
        old_log_prob=batch["old_log_prob"],
        log_prob=lp,
        advantages=batch["advantages"],
        response_mask=batch["response_mask"],
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    loss.backward()
    assert lp.grad is not None
    return loss.detach(), lp.grad, metrics


def close(actual: torch.Tensor, expected: torch.Tensor, mode: str = "token-mean") -> None:
    # verl (and so ours) divides a sequence's token sum by (n + 1e-8) in seq-mean-token-mean: relative 1e-8/n.
    rtol = 1e-7 if mode == "seq-mean-token-mean" else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Test data


def make_batch(
    seed: int = 0, rows: int = 6, cols: int = 40, scale: float = 0.08, big_token: bool = True
) -> dict[str, torch.Tensor]:
    """Ragged responses, tool-output spans (mask 0) inside responses carrying large garbage log ratios,
    per-response advantages of both signs, and (optionally) one token whose log ratio exceeds the clamp."""
    gen = torch.Generator().manual_seed(seed)
    lp = -3.0 * torch.rand(rows, cols, generator=gen, dtype=DT)
    d = scale * torch.randn(rows, cols, generator=gen, dtype=DT)
    lengths = [cols, cols - 5, 30, 17, cols, 9][:rows]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    mask[0, 10:15] = False  # tool output inside response 0
    mask[4, 3:9] = False  # two tool outputs inside response 4
    mask[4, 20:22] = False
    d[~mask] = 7.0  # garbage: must not enter K_t
    if big_token:
        d[3, 2] = 25.0  # beyond the +-20 clamp on d_t
        d[3, 3] = -24.0
    adv_rows = torch.tensor([1.0, -0.7, 0.5, -1.3, -0.4, 0.9][:rows], dtype=DT)
    return {
        "old_log_prob": lp - d,
        "log_prob": lp,
        "advantages": adv_rows[:, None].expand(rows, cols).contiguous(),
        "response_mask": mask,
    }


def rollout_weights(batch: Mapping[str, torch.Tensor], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(batch["log_prob"].shape, generator=gen, dtype=DT)


def global_info(batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """As if this micro-batch were part of a larger global batch on 2 data-parallel ranks."""
    mask = batch["response_mask"]
    return {
        "dp_size": 2,
        "batch_num_tokens": int(mask.sum()) * 3 + 1,
        "global_batch_size": mask.shape[0] * 3,
        "loss_scale_factor": 64,
    }


def verl_actor_config(**kwargs: Any) -> Any:
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(
        strategy="fsdp",
        rollout_n=8,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode="vanilla"),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Signature


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_signature_is_verls(name: str) -> None:
    """Same parameter names, order and defaults as verl's registered policy losses."""
    import inspect

    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    ours = inspect.signature(get_policy_loss(name)).parameters
    theirs = inspect.signature(get_policy_loss_fn("vanilla")).parameters
    assert (
        list(ours)
        == list(theirs)
        == [
            "old_log_prob",
            "log_prob",
            "advantages",
            "response_mask",
            "loss_agg_mode",
            "config",
            "rollout_is_weights",
        ]
    )
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


# --------------------------------------------------------------------------------------------------
# Against the installed verl


@pytest.mark.parametrize("gbi", [False, True], ids=["local", "global_batch_info"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is_weights", "is_weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_grpo_equals_verl_vanilla(mode: str, with_weights: bool, gbi: bool) -> None:
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = make_batch(seed=3, scale=0.6)
    ratio = torch.exp((batch["log_prob"] - batch["old_log_prob"]).clamp(-20, 20))
    mask, adv = batch["response_mask"], batch["advantages"]
    # the data exercise both clip bounds, the dual clip and the +-20 clamp
    assert bool((mask & (ratio < 1 - 0.15) & (adv < 0)).any())
    assert bool((mask & (ratio > 1 + 0.28) & (adv > 0)).any())
    assert bool((mask & (ratio > 2.5) & (adv < 0)).any())
    assert bool((mask & ((batch["log_prob"] - batch["old_log_prob"]).abs() > 20)).any())

    weights = rollout_weights(batch) if with_weights else None
    info = global_info(batch) if gbi else {}
    verl_config = verl_actor_config(clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=2.5)
    verl_config.global_batch_info.update(info)
    expected, expected_grad, verl_metrics = run_loss(
        "vanilla", batch, mode, verl_config, weights, fn=get_policy_loss_fn("vanilla")
    )
    # our loss with verl's ActorConfig, and with a plain dict carrying the same values
    dict_config = {**CUSTOM["grpo"], "global_batch_info": info}
    for config in (verl_config, dict_config):
        loss, grad, metrics = run_loss("grpo", batch, mode, config, weights)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
        for key in VERL_METRICS:
            assert float(metrics[key]) == pytest.approx(verl_metrics[key], abs=1e-6), (
                key
            )  # verl: float32 fractions
    assert expected_grad.abs().sum() > 0


@pytest.mark.parametrize("gbi", [False, True], ids=["local", "global_batch_info"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is_weights", "is_weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_gspo_equals_verl_gspo(mode: str, with_weights: bool, gbi: bool) -> None:
    """Ours always aggregates seq-mean-token-mean, whatever mode it is given."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = make_batch(seed=4, scale=0.01, big_token=False)
    mask = batch["response_mask"]
    # set each response's mean log ratio: inside and outside the window [1 - 3e-4, 1 + 4e-4], both signs of A
    d = batch["log_prob"] - batch["old_log_prob"]
    # A = [1, -0.7, 0.5, -1.3, -0.4, 0.9]: rows 0 and 1 are clipped, 3 and 5 outside but unclipped
    targets = torch.tensor([1e-3, -1e-3, 2e-4, 1e-3, -1e-4, -2e-3], dtype=DT)
    for i in range(mask.shape[0]):
        row = mask[i]
        d[i, row] += targets[i] - d[i, row].mean()
    batch["old_log_prob"] = batch["log_prob"] - d
    weights = rollout_weights(batch) if with_weights else None
    info = global_info(batch) if gbi else {}

    verl_config = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    verl_config.global_batch_info.update(info)
    expected, expected_grad, verl_metrics = run_loss(
        "gspo", batch, "seq-mean-token-mean", verl_config, weights, fn=get_policy_loss_fn("gspo")
    )
    for config in (verl_config, {"global_batch_info": info}):  # the dict relies on gspo's defaults
        loss, grad, metrics = run_loss("gspo", batch, mode, config, weights)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
        for key in VERL_METRICS:
            assert float(metrics[key]) == pytest.approx(verl_metrics[key], abs=1e-6), (
                key
            )  # verl: float32 fractions
    # some responses are clipped (zero gradient), others are not
    row_grad = expected_grad.abs().sum(dim=1)
    assert bool((row_grad == 0).any()) and bool((row_grad > 0).any())


# --------------------------------------------------------------------------------------------------
# Against the naive reference from method.md


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "is_weights+global_batch_info"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_matches_reference_with_defaults(name: str, mode: str, extras: bool) -> None:
    batch = make_batch(seed=5)
    weights = rollout_weights(batch) if extras else None
    info = global_info(batch) if extras else None
    config = {"global_batch_info": info} if info else None
    expected, expected_grad = reference(name, batch, mode, MD_DEFAULTS[name], weights, info)
    loss, grad, _ = run_loss(name, batch, mode, config, weights)
    agg = "seq-mean-token-mean" if name == "gspo" else mode
    close(loss, expected, agg)
    close(grad, expected_grad, agg)
    assert expected_grad.abs().sum() > 0


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_matches_reference_with_custom_hyperparameters(name: str) -> None:
    from omegaconf import OmegaConf

    batch = make_batch(seed=6, scale=0.15)
    hp = dict(CUSTOM[name])
    if name == "ctpo-fixed":
        hp["ctpo_power"] = 0.0
    expected, expected_grad = reference(name, batch, "token-mean", hp)
    # top-level keys, keys under policy_loss (verl's layout), and an OmegaConf mapping
    for config in (CUSTOM[name], {"policy_loss": CUSTOM[name]}, OmegaConf.create(CUSTOM[name])):
        loss, grad, _ = run_loss(name, batch, "token-mean", config)
        close(loss, expected, "seq-mean-token-mean" if name == "gspo" else "token-mean")
        close(grad, expected_grad, "seq-mean-token-mean" if name == "gspo" else "token-mean")
    # and the custom values matter
    default_loss, _, _ = run_loss(name, batch, "token-mean", None)
    assert abs(float(default_loss) - float(expected)) > 1e-6


def cumulative(batch: Mapping[str, torch.Tensor]) -> tuple[list[list[float]], list[list[int]]]:
    """K_t and t at every token (t = 0 and K = running value on masked tokens), by Python loops."""
    d = (batch["log_prob"] - batch["old_log_prob"]).tolist()
    mask = batch["response_mask"].tolist()
    ks, ts = [], []
    for row_d, row_m in zip(d, mask, strict=True):
        k, t, row_k, row_t = 0.0, 0, [], []
        for value, m in zip(row_d, row_m, strict=True):
            if m:
                t += 1
                k += min(max(value, -20.0), 20.0)
            row_k.append(k)
            row_t.append(t if m else 0)
        ks.append(row_k)
        ts.append(row_t)
    return ks, ts


def test_ctpo_gradient_structure() -> None:
    """d loss / d log_prob_t = -A w_t / N on tokens whose unclipped branch is active, 0 elsewhere (token-mean)."""
    batch = make_batch(seed=7, scale=0.1)
    _, grad, _ = run_loss("ctpo", batch, "token-mean")
    ks, ts = cumulative(batch)
    mask, adv = batch["response_mask"], batch["advantages"]
    n_tokens = int(mask.sum())
    seen: set[str] = set()
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            a, k, t = float(adv[i, j]), ks[i][j], ts[i][j]
            if not bool(mask[i, j]):
                assert float(grad[i, j]) == 0.0
                continue
            lo, hi, cap = 0.025 * math.sqrt(t), 0.05 * math.sqrt(t), 0.05 * math.sqrt(t)
            if a > 0:
                kind = (
                    "A>0 above window (clipped)"
                    if k > hi
                    else ("A>0 below window" if k < -lo else "A>0 inside")
                )
                active = k <= hi
            else:
                kind = (
                    "A<0 below window (clipped)"
                    if k < -lo
                    else ("A<0 above dual clip (capped)" if k > cap else "A<0 inside")
                )
                active = -lo <= k <= cap
            seen.add(kind)
            expected = -a * math.exp(min(k, 10.0)) / n_tokens if active else 0.0
            assert float(grad[i, j]) == pytest.approx(expected, abs=1e-12), (i, j, kind)
    assert len(seen) == 6, seen  # every case occurs in the data


def test_masked_span_does_not_advance_t() -> None:
    """K = 0.12 at model token 4, right after a 20-token tool output: the window at t = 4 is
    [-0.05, 0.1] (clipped, no gradient for A > 0); had the span advanced t to 24 it would be
    [-0.12, 0.245] (unclipped)."""
    cols = 30
    d = torch.zeros(1, cols, dtype=DT)
    d[0, 23] = 0.12
    mask = torch.zeros(1, cols, dtype=torch.bool)
    mask[0, :3] = True
    mask[0, 23:25] = True
    lp = torch.full((1, cols), -1.0, dtype=DT)
    batch = {
        "old_log_prob": lp - d,
        "log_prob": lp,
        "advantages": torch.ones(1, cols, dtype=DT),
        "response_mask": mask,
    }
    _, grad, _ = run_loss("ctpo", batch)
    assert float(grad[0, 23]) == 0.0
    # t = 5 (K = 0.12, window upper bound 0.05 sqrt(5) = 0.112): still clipped
    assert float(grad[0, 24]) == 0.0
    assert float(grad[0, 2]) == pytest.approx(-1.0 / 5, abs=1e-12)


def test_masked_span_does_not_enter_k() -> None:
    """Garbage log ratios (d = 3) on a tool output do not enter K_t."""
    cols = 12
    d = torch.zeros(1, cols, dtype=DT)
    d[0, 2:8] = 3.0  # tool output
    d[0, 8] = 0.01
    mask = torch.ones(1, cols, dtype=torch.bool)
    mask[0, 2:8] = False
    lp = torch.full((1, cols), -2.0, dtype=DT)
    batch = {
        "old_log_prob": lp - d,
        "log_prob": lp,
        "advantages": torch.ones(1, cols, dtype=DT),
        "response_mask": mask,
    }
    _, grad, _ = run_loss("ctpo", batch)
    n = int(mask.sum())
    assert float(grad[0, 8]) == pytest.approx(-math.exp(0.01) / n, abs=1e-12)
    assert torch.all(grad[0, 2:8] == 0)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_masked_span_equals_span_removed(name: str) -> None:
    """A response with tool-output spans gives the loss and gradient of the same response with the spans cut out."""
    batch = make_batch(seed=8, scale=0.1, big_token=False)
    row = 4  # has spans at 3:9 and 20:22
    keep = batch["response_mask"][row]
    cut = {}
    for key, value in batch.items():
        kept = value[row][keep]
        pad = torch.zeros(int((~keep).sum()), dtype=value.dtype)
        cut[key] = torch.cat([kept, pad])[None]
    with_spans = {key: value[row : row + 1] for key, value in batch.items()}
    loss_a, grad_a, _ = run_loss(name, with_spans, "token-mean")
    loss_b, grad_b, _ = run_loss(name, cut, "token-mean")
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    n = int(keep.sum())
    torch.testing.assert_close(grad_a[0][keep], grad_b[0, :n], rtol=0, atol=1e-12)
    assert torch.all(grad_a[0][~keep] == 0)


@pytest.mark.parametrize(
    ("name", "config"),
    [("ctpo", {"ctpo_clip_high": 20.0, "ctpo_clip_c": 20.0}), ("seq-is", {"clip_ratio_high": 1e6})],
)
def test_log_weight_clamped_at_10(name: str, config: dict[str, float]) -> None:
    """log w = 12 is capped at 10 (value e^10, no gradient); with a window wide enough not to clip."""
    d = (
        torch.tensor([[6.0, 6.0, 0.0]], dtype=DT)
        if name == "seq-is"
        else torch.tensor([[12.0, -2.5, 0.0]], dtype=DT)
    )
    mask = torch.tensor([[True, True, False]])
    lp = torch.tensor([[-0.5, -1.0, -1.0]], dtype=DT)
    batch = {
        "old_log_prob": lp - d,
        "log_prob": lp,
        "advantages": torch.ones(1, 3, dtype=DT),
        "response_mask": mask,
    }
    loss, grad, metrics = run_loss(name, batch, "token-mean", config)
    if name == "ctpo":  # K = 12 then 9.5
        assert float(loss) == pytest.approx(-(math.exp(10.0) + math.exp(9.5)) / 2, rel=1e-12)
        assert grad[0].tolist() == pytest.approx([0.0, -math.exp(9.5) / 2, 0.0], rel=1e-12)
    else:  # R = e^12 at both tokens
        assert float(loss) == pytest.approx(-math.exp(10.0), rel=1e-12)
        assert grad.tolist() == [[0.0, 0.0, 0.0]]
    assert float(metrics["ctpo/is_weight_microbatch_peak"]) == pytest.approx(math.exp(10.0), rel=1e-12)


def test_log_ratio_clamped_at_20() -> None:
    """d = 25 then -24: K_1 = 20 and K_2 = 20 - 20 = 0 (unclipped at t = 2); without the clamp K_2 = 1 (clipped)."""
    d = torch.tensor([[25.0, -24.0]], dtype=DT)
    lp = torch.tensor([[-0.5, -1.0]], dtype=DT)
    batch = {
        "old_log_prob": lp - d,
        "log_prob": lp,
        "advantages": torch.ones(1, 2, dtype=DT),
        "response_mask": torch.ones(1, 2, dtype=torch.bool),
    }
    _, grad, _ = run_loss("ctpo", batch)
    assert grad[0].tolist() == pytest.approx([0.0, -1.0 / 2], abs=1e-12)


@pytest.mark.parametrize("power", [0, 0.0])
def test_ctpo_power_zero(power: float) -> None:
    """p = 0 (the authors' code crashes there): a fixed log-space window, identical to ctpo-fixed."""
    batch = make_batch(seed=9, scale=0.1)
    window = {"ctpo_clip_low": 0.1, "ctpo_clip_high": 0.15, "ctpo_clip_c": 0.3}
    expected, expected_grad = reference("ctpo", batch, "token-mean", {**window, "ctpo_power": 0.0})
    loss, grad, _ = run_loss("ctpo", batch, "token-mean", {**window, "ctpo_power": power})
    close(loss, expected)
    close(grad, expected_grad)
    fixed_loss, fixed_grad, _ = run_loss("ctpo-fixed", batch, "token-mean", window)
    close(fixed_loss, expected)
    close(fixed_grad, expected_grad)
    # p = 0 differs from the sqrt(t) window on these data
    sqrt_loss, _, _ = run_loss("ctpo", batch, "token-mean", {**window, "ctpo_power": 0.5})
    assert abs(float(sqrt_loss) - float(expected)) > 1e-6


def test_ctpo_fixed_default_window() -> None:
    """ctpo-fixed defaults: ratio window [0.5, 5], dual clip 5, p = 0; checked at t = 50."""
    assert method_hparams("ctpo-fixed") == pytest.approx(MD_DEFAULTS["ctpo-fixed"])
    ln2, ln5 = math.log(2.0), math.log(5.0)
    cases = [  # (K at t = 50, A, gradient active?)
        (ln5 - 0.01, 1.0, True),
        (ln5 + 0.01, 1.0, False),  # above the window
        (-ln2 + 0.01, -1.0, True),
        (-ln2 - 0.01, -1.0, False),  # below the window
        (ln5 - 0.01, -1.0, True),  # under the dual clip
        (ln5 + 0.3, -1.0, False),  # dual clip: l = -A * 5
    ]
    cols = 50
    d = torch.zeros(len(cases), cols, dtype=DT)
    d[:, -1] = torch.tensor([k for k, _, _ in cases], dtype=DT)
    adv = torch.tensor([a for _, a, _ in cases], dtype=DT)[:, None].expand(-1, cols).contiguous()
    lp = torch.full((len(cases), cols), -1.0, dtype=DT)
    mask = torch.ones(len(cases), cols, dtype=torch.bool)
    batch = {"old_log_prob": lp - d, "log_prob": lp, "advantages": adv, "response_mask": mask}
    loss, grad, _ = run_loss("ctpo-fixed", batch, "token-sum")
    expected_loss = 0.0
    for i, (k, a, active) in enumerate(cases):
        w = math.exp(k)
        assert float(grad[i, -1]) == pytest.approx(-a * w if active else 0.0, abs=1e-12), cases[i]
        if i == 1:
            expected_loss += -a * 5.0
        elif i == 3:
            expected_loss += -a * 0.5
        elif i == 5:
            expected_loss += -a * 5.0
        else:
            expected_loss += -a * w
    expected_loss += float(-adv[:, :-1].sum())  # K = 0 earlier: w = 1
    assert float(loss) == pytest.approx(expected_loss, abs=1e-10)


def test_seq_is_uses_full_sequence_ratio() -> None:
    """seq-is: every token of a response carries R = exp(K_|y|) (gradient -A R / N when unclipped)."""
    d = torch.tensor([[0.05, -0.02, 0.04, 0.0], [0.5, 0.0, 0.0, 0.0]], dtype=DT)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    lp = torch.full((2, 4), -1.0, dtype=DT)
    adv = torch.tensor([[1.0] * 4, [1.0] * 4], dtype=DT)
    batch = {"old_log_prob": lp - d, "log_prob": lp, "advantages": adv, "response_mask": mask}
    _, grad, _ = run_loss("seq-is", batch, "token-mean")
    r0 = math.exp(0.07)  # in [0.8, 1.2]: unclipped
    assert grad[0].tolist() == pytest.approx([-r0 / 5, -r0 / 5, -r0 / 5, 0.0], abs=1e-12)
    assert grad[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # R = e^0.5 > 1.2 with A > 0: clipped


# --------------------------------------------------------------------------------------------------
# Hyperparameters and validation


def test_method_hparams_defaults_and_overrides() -> None:
    for name in METHOD_NAMES:
        assert method_hparams(name) == pytest.approx(MD_DEFAULTS[name]), name
        assert method_hparams(name, {}) == pytest.approx(MD_DEFAULTS[name]), name
    # partial override: missing keys keep the defaults
    assert method_hparams("ctpo", {"ctpo_clip_high": 0.1}) == pytest.approx(
        {**MD_DEFAULTS["ctpo"], "ctpo_clip_high": 0.1}
    )
    assert method_hparams("ctpo", {"policy_loss": {"ctpo_power": 0.3}}) == pytest.approx(
        {**MD_DEFAULTS["ctpo"], "ctpo_power": 0.3}
    )
    # verl's clip_ratio fallback for unset low/high
    assert method_hparams("grpo", {"clip_ratio": 0.1, "clip_ratio_high": 0.28}) == pytest.approx(
        {"clip_ratio_low": 0.1, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    )


def test_method_hparams_from_verl_actor_config() -> None:
    from verl.workers.config import ActorConfig

    from ctpo_cli.train.verl.plugin import CTPOPolicyLossConfig

    config = ActorConfig(
        strategy="fsdp",
        rollout_n=8,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=0.1,
        clip_ratio_high=0.3,
        clip_ratio_c=4.0,
        policy_loss=CTPOPolicyLossConfig(loss_mode="ctpo/ctpo", ctpo_clip_low=0.03, ctpo_power=0.25),
    )
    assert method_hparams("ctpo", config) == pytest.approx(
        {"ctpo_clip_low": 0.03, "ctpo_clip_high": 0.05, "ctpo_clip_c": 0.05, "ctpo_power": 0.25}
    )
    assert method_hparams("grpo", config) == pytest.approx(
        {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 4.0}
    )


INVALID_HPARAMS = [
    ("grpo", {"clip_ratio_low": -0.1}, "clip_ratio_low"),
    ("grpo", {"clip_ratio_high": -0.2}, "clip_ratio_high"),
    ("grpo", {"clip_ratio_low": 1.0}, "clip_ratio_low"),
    ("grpo", {"clip_ratio_c": 1.0}, "clip_ratio_c"),
    ("grpo", {"clip_ratio_c": 0.5}, "clip_ratio_c"),
    ("seq-is", {"clip_ratio_c": 0.9}, "clip_ratio_c"),
    ("gspo", {"clip_ratio_high": -1e-4}, "clip_ratio_high"),
    ("ctpo", {"ctpo_clip_low": -0.025}, "ctpo_clip_low"),
    ("ctpo", {"ctpo_clip_high": -0.05}, "ctpo_clip_high"),
    ("ctpo", {"ctpo_clip_c": 0.0}, "ctpo_clip_c"),
    ("ctpo", {"ctpo_power": -0.5}, "ctpo_power"),
    ("ctpo", {"ctpo_clip_low": float("nan")}, "ctpo_clip_low"),
    ("ctpo", {"ctpo_clip_high": float("inf")}, "ctpo_clip_high"),
    ("ctpo-fixed", {"ctpo_power": 0.5}, "ctpo_power"),
]


@pytest.mark.parametrize(("name", "config", "named"), INVALID_HPARAMS)
def test_invalid_hyperparameters(name: str, config: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        method_hparams(name, config)
    with pytest.raises(ValueError, match=named):
        run_loss(name, make_batch(), "token-mean", config)


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'ctpo2'.*ctpo-fixed"):
        get_policy_loss("ctpo2")
    with pytest.raises(ValueError, match="unknown method 'GRPO'"):
        method_hparams("GRPO")


def bad_inputs() -> list[tuple[str, dict[str, Any], str]]:
    batch = make_batch()
    rows, cols = batch["log_prob"].shape
    nan_lp = batch["log_prob"].clone()
    nan_lp[1, 3] = float("nan")
    inf_old = batch["old_log_prob"].clone()
    inf_old[0, 0] = -float("inf")
    nan_adv = batch["advantages"].clone()
    nan_adv[2, 5] = float("nan")
    one_d = {"log_prob": batch["log_prob"][0], "old_log_prob": batch["old_log_prob"][0]}
    return [
        ("unknown_agg_mode", {"loss_agg_mode": "token-avg"}, r"loss_agg_mode 'token-avg'"),
        ("advantages_shape", {"advantages": batch["advantages"][:, :-1]}, r"advantages has shape"),
        ("mask_shape", {"response_mask": batch["response_mask"][:-1]}, r"response_mask has shape"),
        ("log_prob_1d", one_d, r"log_prob must be 2-D"),
        (
            "weights_shape",
            {"rollout_is_weights": torch.ones(rows, cols + 1, dtype=DT)},
            r"rollout_is_weights has shape",
        ),
        ("nan_log_prob", {"log_prob": nan_lp}, r"^log_prob contains NaN or inf"),
        ("inf_old_log_prob", {"old_log_prob": inf_old}, r"^old_log_prob contains NaN or inf"),
        ("nan_advantages", {"advantages": nan_adv}, r"^advantages contains NaN or inf"),
        (
            "int_log_prob",
            {"log_prob": batch["log_prob"].long()},
            r"^log_prob must be a floating-point tensor",
        ),
        (
            "int_advantages",
            {"advantages": torch.ones(rows, cols, dtype=torch.int64)},
            r"^advantages must be a floating",
        ),
    ]


BAD_INPUTS = bad_inputs()


@pytest.mark.parametrize(("override", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_invalid_inputs(name: str, override: dict[str, Any], message: str) -> None:
    inputs: dict[str, Any] = {**make_batch(), "loss_agg_mode": "token-mean", **override}
    with pytest.raises(ValueError, match=message):
        get_policy_loss(name)(**inputs)


# --------------------------------------------------------------------------------------------------
# No host synchronisation


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_metrics_are_0dim_tensors(name: str) -> None:
    _, _, metrics = run_loss(name, make_batch(), "token-mean")
    assert set(VERL_METRICS) <= set(metrics)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key


class ScalarReads(TorchDispatchMode):
    """Records every aten._local_scalar_dense (what .item(), bool(), float() on a tensor dispatch to)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def loss_and_backward(name: str, device: str, batch: Mapping[str, torch.Tensor], stats: Any) -> torch.Tensor:
    lp = batch["log_prob"].detach().clone().to(device).requires_grad_(True)
    diagnostics.activate(stats)
    try:
        loss, metrics = get_policy_loss(name)(
            batch["old_log_prob"].to(device),
            lp,
            batch["advantages"].to(device),
            batch["response_mask"].to(device),
            "seq-mean-token-mean",
            {"global_batch_info": {"dp_size": 1, "global_batch_size": 6}},
            rollout_is_weights=torch.ones_like(lp),
        )
        loss.backward()
    finally:
        diagnostics.activate(None)
    assert all(v.device.type == device for v in metrics.values())
    return loss


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_host_sync_off_cpu(name: str, tmp_path: Any, no_active_diagnostics: None) -> None:
    """On a non-CPU device (``meta``: no data, so any read of a value would fail) the loss, its backward
    and the diagnostics feed make no _local_scalar_dense call. On CPU the documented finiteness check
    does read values: the recorder sees those, which shows it would see a sync."""
    batch = make_batch()
    with ScalarReads() as reads:
        loss = loss_and_backward(name, "meta", batch, diagnostics.PositionStats(tmp_path))
    assert loss.device.type == "meta"
    assert reads.count == 0
    with ScalarReads() as cpu_reads:
        loss_and_backward(name, "cpu", batch, diagnostics.PositionStats(tmp_path))
    assert cpu_reads.count > 0


# --------------------------------------------------------------------------------------------------
# ctpo bench loss


def test_bench_loss_cli() -> None:
    from typer.testing import CliRunner

    from ctpo_cli.cli import app

    result = CliRunner().invoke(
        app,
        ["bench", "loss", "--batch", "4", "--length", "256", "--rounds", "2", "--calls", "1"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"verl vanilla \(baseline\)\s.*\b1\.00\b", result.output), result.output
    for name in METHOD_NAMES:
        assert re.search(rf"ctpo {re.escape(name)}\s.*\d+\.\d+\s.*\d+\.\d\d", result.output), (
            name,
            result.output,
        )
