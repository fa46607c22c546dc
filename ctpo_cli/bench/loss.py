"""``ctpo bench loss``: forward+backward time of every method, and of ctpo with the per-position
diagnostics fed (as in training), as a ratio to verl's ``vanilla``, timed in interleaved rounds."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from ctpo_cli.algo.losses import METHODS, get_policy_loss
from ctpo_cli.bench.timing import Call, Contestant, interleave, ratio_table
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


def loss_call(fn: Callable[..., Any], inputs: dict[str, torch.Tensor], config: Any) -> Call:
    """One forward+backward of ``fn`` on ``inputs`` (a fresh leaf each call; only the pass is timed)."""

    def call() -> float:
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
        return time.perf_counter() - start

    return call


def with_diagnostics(call: Call, out_dir: str) -> Call:
    """``call`` with a per-position accumulator active (as in training: ``ctpo_cli.algo.diagnostics``),
    flushed to nothing between calls (only the feeding is timed)."""
    from ctpo_cli.algo import diagnostics

    stats = diagnostics.PositionStats(out_dir)

    def diagnosed() -> float:
        diagnostics.activate(stats)
        try:
            return call()
        finally:
            diagnostics.activate(None)

    return diagnosed


def bench_losses(
    batch: int, length: int, rounds: int, calls: int, device: str, out: str | None, console: Console
) -> list[dict[str, Any]]:
    """Print (and optionally save as CSV) each method's time and its ratio to verl vanilla, timed in
    interleaved rounds (:mod:`ctpo_cli.bench.timing`)."""
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
        f"[bold]loss benchmark[/]: batch {batch} x {length} tokens, float32, {device}, "
        f"{rounds} interleaved rounds of {calls} forward+backward passes each"
    )
    baseline = Contestant("verl vanilla", loss_call(get_policy_loss_fn("vanilla"), inputs, config))
    contestants = [
        Contestant(f"ctpo {name}", loss_call(get_policy_loss(name), inputs, config)) for name in METHODS
    ]
    with tempfile.TemporaryDirectory() as scratch, Progress(console=console, transient=True) as progress:
        ctpo = loss_call(get_policy_loss("ctpo"), inputs, config)
        contestants.append(
            Contestant("ctpo ctpo + per-position diagnostics", with_diagnostics(ctpo, scratch))
        )
        result = interleave(baseline, contestants, rounds=rounds, calls=calls, warmup=2, progress=progress)
    console.print(ratio_table(result, "forward+backward time, ratio to verl vanilla (lower is faster)"))
    rows: list[dict[str, Any]] = [
        {
            "loss": timing.name,
            "best_ms": timing.best * 1e3,
            "median_ms": timing.median * 1e3,
            "ratio": result.ratio(timing),
            "round_ratio_min": min(timing.round_ratios),
            "round_ratio_max": max(timing.round_ratios),
        }
        for timing in [result.baseline, *result.contestants]
    ]
    if out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(out, index=False)
    return rows
