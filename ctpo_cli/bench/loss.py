"""``ctpo bench loss``: forward+backward time of every method, as a ratio to verl's ``vanilla``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ctpo_cli.algo.losses import METHODS, get_policy_loss
from ctpo_cli.errors import BackendUnavailable


def synthetic_batch(batch: int, length: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Off-policy log-probs (d_t ~ N(0, 0.05^2)), per-response advantages, ragged response lengths."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen) * 3
    log_prob = old + 0.05 * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(length // 4, length + 1, (batch, 1), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < lengths
    advantages = torch.randn(batch, 1, generator=gen).expand(batch, length).contiguous()
    tensors = {"old_log_prob": old, "log_prob": log_prob, "advantages": advantages, "response_mask": mask}
    return {k: v.to(device) for k, v in tensors.items()}


def time_loss(fn: Callable[..., Any], inputs: dict[str, torch.Tensor], config: Any, repeats: int) -> float:
    """Median seconds of one forward+backward (one untimed warm-up first)."""
    times = []
    for i in range(repeats + 1):
        log_prob = inputs["log_prob"].detach().clone().requires_grad_(True)
        if log_prob.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = fn(
            old_log_prob=inputs["old_log_prob"],
            log_prob=log_prob,
            advantages=inputs["advantages"],
            response_mask=inputs["response_mask"],
            loss_agg_mode="token-mean",
            config=config,
        )
        loss.backward()
        if log_prob.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_losses(
    batch: int, length: int, repeats: int, device: str, out: str | None, console: Console
) -> list[dict[str, Any]]:
    """Print (and optionally save as CSV) each method's time and its ratio to verl vanilla."""
    try:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        from verl.workers.config import ActorConfig, PolicyLossConfig
    except ImportError as error:
        raise BackendUnavailable(
            f"the baseline needs verl ({error}); install it with: pip install 'ctpo[verl]'"
        ) from error
    inputs = synthetic_batch(batch, length, device)
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=8,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode="vanilla"),
    )
    console.print(
        f"[bold]loss benchmark[/]: batch {batch} x {length} tokens, float32, {device}, median of {repeats}"
    )
    baseline = time_loss(get_policy_loss_fn("vanilla"), inputs, config, repeats)
    rows: list[dict[str, Any]] = [{"loss": "verl vanilla (baseline)", "ms": baseline * 1e3, "ratio": 1.0}]
    for name in METHODS:
        seconds = time_loss(get_policy_loss(name), inputs, config, repeats)
        rows.append({"loss": f"ctpo {name}", "ms": seconds * 1e3, "ratio": seconds / baseline})
    table = Table(title="forward+backward time, ratio to verl vanilla (lower is faster)")
    table.add_column("loss")
    table.add_column("ms", justify="right")
    table.add_column("x vanilla", justify="right")
    for row in rows:
        table.add_row(row["loss"], f"{row['ms']:.1f}", f"{row['ratio']:.2f}")
    console.print(table)
    if out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(out, index=False)
    return rows
