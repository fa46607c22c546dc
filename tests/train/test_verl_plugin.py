"""The verl plugin against the installed verl 0.9.1: registry in Ray workers, verl's own worker-side
``ppo_loss`` running our losses with a real ActorConfig, per-position diagnostics written from that
path, the Hydra config route for our hyperparameters, and a loud failure when the plugin cannot import.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import ctpo_cli
from ctpo_cli.algo import diagnostics
from ctpo_cli.algo.losses import get_policy_loss, method_hparams
from ctpo_cli.train.verl import plugin as verl_plugin

DT = torch.float64
NAMES = ("grpo", "gspo", "ctpo", "ctpo-fixed", "seq-is")
LOUD_FAILURE = "ctpo: the verl plugin ctpo_cli.train.verl.plugin failed to import"


@pytest.fixture
def clean_plugin() -> Iterator[None]:
    """The plugin's process-wide state (active accumulator, optimizer hook) is reset around the test."""
    verl_plugin.reset_diagnostics()
    yield
    verl_plugin.reset_diagnostics()


# --------------------------------------------------------------------------------------------------
# The two slow checks each wait on a fresh process importing verl (seconds of CPU): both are started
# when the module's first test runs and collected by the last two tests, so they overlap the rest.


def broken_plugin_package(root: Path) -> Path:
    """A `ctpo_cli` package with the real plugin and losses but an algo/diagnostics.py that raises."""
    package = root / "ctpo_cli"
    real = Path(ctpo_cli.__file__).parent
    for name in (
        "__init__.py",
        "train/__init__.py",
        "train/verl/__init__.py",
        "train/verl/plugin.py",
        "train/verl/cpu/__init__.py",
        "algo/__init__.py",
        "algo/defaults.py",
        "algo/losses.py",
    ):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real / name, package / name)
    (package / "algo" / "diagnostics.py").write_text(
        'raise ImportError("simulated broken dependency of diagnostics")\n'
    )
    return package


@pytest.fixture(scope="module", autouse=True)
def slow_jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray

    def registry_in_ray_worker() -> tuple[int, bool, list[str]]:  # nested: pickled by value for the worker
        plugin_before = "ctpo_cli.train.verl.plugin" in sys.modules
        import verl  # noqa: F401 - the verl.plugins entry point is loaded here
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

        return os.getpid(), plugin_before, sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("ctpo/"))

    shadow = tmp_path_factory.mktemp("shadow")
    package = broken_plugin_package(shadow)
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])
    script = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as registry\n"
        "print(sorted(k for k in registry if k.startswith('ctpo/')))\n"
    )
    broken = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=shadow,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield {
            "package": package,
            "broken": broken,
            "ray_result": ray.remote(registry_in_ray_worker).remote(),
        }
    finally:
        if broken.poll() is None:
            broken.kill()
            broken.communicate()
        if started:
            ray.shutdown()


def test_registered_in_this_process() -> None:
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

    assert verl_plugin.registered_names() == [f"ctpo/{name}" for name in NAMES]
    assert sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("ctpo/")) == sorted(
        verl_plugin.registered_names()
    )
    # the registered function is ours
    assert get_policy_loss_fn("ctpo/ctpo").__doc__ == get_policy_loss("ctpo").__doc__


# --------------------------------------------------------------------------------------------------
# verl's worker-side ppo_loss


PROMPT_LENS = [3, 1, 2, 4]
RESPONSE_LENS = [7, 5, 9, 3]  # slots incl. tool output; the padded response length is 9


def micro_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = len(RESPONSE_LENS), max(RESPONSE_LENS)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i, n in enumerate(RESPONSE_LENS):
        mask[i, :n] = True
    mask[2, 3:6] = False  # a tool output inside response 2
    lp = -2.0 * torch.rand(rows, cols, generator=gen, dtype=DT)
    old = lp - 0.2 * torch.randn(rows, cols, generator=gen, dtype=DT)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2], dtype=DT)[:, None].expand(rows, cols).contiguous()
    return {"log_prob": lp, "old_log_prob": old, "advantages": adv, "response_mask": mask}


def verl_inputs(
    batch: dict[str, torch.Tensor], log_prob: torch.Tensor, num_tokens: int, num_seqs: int
) -> tuple[Any, Any]:
    """(model_output, data) as verl's FSDP engine hands them to ppo_loss for one micro-batch.

    The model's log-probs are one flat (total_nnz,) tensor over prompt + response tokens, where the
    log-prob of response token j of sequence i sits one slot before it (next-token prediction).
    """
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    rows, cols = log_prob.shape
    width = max(PROMPT_LENS)
    attention = torch.zeros(rows, width + cols, dtype=torch.long)
    flat = []
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS, strict=True)):
        attention[i, width - p : width + r] = 1
        flat += [torch.zeros(p - 1, dtype=DT), log_prob[i, :r], torch.zeros(1, dtype=DT)]
    data = TensorDict(
        {
            "prompts": torch.zeros(rows, width, dtype=torch.long),
            "responses": torch.zeros(rows, cols, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": batch["response_mask"].long(),
            "old_log_probs": batch["old_log_prob"],
            "advantages": batch["advantages"],
        },
        batch_size=[rows],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=num_tokens, global_batch_size=num_seqs)
    return {"log_probs": torch.cat(flat)}, data


HPARAMS: dict[str, dict[str, float]] = {
    "grpo": {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15, "clip_ratio_c": 2.0},
    "gspo": {"clip_ratio_low": 0.01, "clip_ratio_high": 0.02},
    "seq-is": {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15, "clip_ratio_c": 1.5},
    "ctpo": {"ctpo_clip_low": 0.03, "ctpo_clip_high": 0.07, "ctpo_clip_c": 0.09, "ctpo_power": 0.4},
    "ctpo-fixed": {"ctpo_clip_low": 0.1, "ctpo_clip_high": 0.2, "ctpo_clip_c": 0.3},
}


def actor_config(name: str, loss_agg_mode: str = "token-mean", **policy_loss: Any) -> Any:
    from verl.workers.config import ActorConfig

    ppo: dict[str, Any] = {k: v for k, v in HPARAMS[name].items() if k.startswith("clip_ratio")}
    ctpo: dict[str, Any] = {k: v for k, v in HPARAMS[name].items() if k.startswith("ctpo_")}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=8,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode=loss_agg_mode,
        policy_loss=verl_plugin.CTPOPolicyLossConfig(loss_mode=f"ctpo/{name}", **ctpo, **policy_loss),
        **ppo,
    )


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", NAMES)
def test_verl_ppo_loss_runs_our_loss(name: str, mode: str, clean_plugin: None) -> None:
    """verl's ppo_loss with a real ActorConfig computes exactly get_policy_loss(name) with the same
    hyperparameters and verl's global batch normalisation."""
    from verl.workers.utils.losses import ppo_loss

    batch = micro_batch()
    n_tokens, n_seqs = int(batch["response_mask"].sum()) * 2, 8  # this micro-batch is half of the mini-batch
    lp_verl = batch["log_prob"].clone().requires_grad_(True)
    model_output, data = verl_inputs(batch, lp_verl, n_tokens, n_seqs)
    loss, metrics = ppo_loss(actor_config(name, mode), model_output, data)
    loss.backward()

    lp_direct = batch["log_prob"].clone().requires_grad_(True)
    info = {"dp_size": 1, "batch_num_tokens": n_tokens, "global_batch_size": n_seqs}
    expected, _ = get_policy_loss(name)(
        batch["old_log_prob"],
        lp_direct,
        batch["advantages"],
        batch["response_mask"],
        mode,
        {**HPARAMS[name], "global_batch_info": info},
    )
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=0, atol=1e-12)
    assert lp_verl.grad is not None and lp_direct.grad is not None
    torch.testing.assert_close(lp_verl.grad, lp_direct.grad, rtol=0, atol=1e-12)
    assert "actor/pg_loss" in metrics and "ctpo/is_weight_mean" in metrics
    # the hyperparameters made it through verl's config: the defaults give another loss
    default_loss, _ = get_policy_loss(name)(
        batch["old_log_prob"],
        batch["log_prob"],
        batch["advantages"],
        batch["response_mask"],
        mode,
        {"global_batch_info": info},
    )
    assert abs(float(default_loss.detach()) - float(expected.detach())) > 1e-6
    assert diagnostics.active() is None  # no ctpo_diagnostics_dir: nothing activated


def test_diagnostics_written_from_the_verl_path(tmp_path: Path, clean_plugin: None) -> None:
    """Two mini-batches per training step, log-probs depending on a parameter updated by SGD: the file
    appears after the second optimizer step; its off-policy rows see the updated policy."""
    from verl.workers.utils.losses import ppo_loss

    batch = micro_batch(1)
    batch["old_log_prob"] = batch["log_prob"].clone()  # the rollout policy: pi == mu before the first step
    mask, adv = batch["response_mask"], batch["advantages"]
    n_tokens, lr = int(mask.sum()), 0.5
    theta = torch.nn.Parameter(torch.zeros_like(batch["log_prob"]))
    optimizer = torch.optim.SGD([theta], lr=lr)
    config = actor_config("ctpo", ctpo_diagnostics_dir=str(tmp_path), ctpo_minibatches_per_step=2)
    positions = tmp_path / "positions"
    assert diagnostics.active() is None
    for step in range(2):
        optimizer.zero_grad()
        model_output, data = verl_inputs(batch, batch["log_prob"] + theta, n_tokens, len(RESPONSE_LENS))
        loss, _ = ppo_loss(config, model_output, data)
        assert diagnostics.active() is not None  # activated by the plugin on its first loss call
        loss.backward()
        optimizer.step()
        if step == 0:
            assert not positions.exists() or not list(positions.iterdir())
    files = sorted(positions.glob("step_*.parquet"))
    assert [f.name.split(".")[0] for f in files] == ["step_000001"]
    frame = pd.read_parquet(files[0])
    on, off = frame[~frame["offpolicy"]], frame[frame["offpolicy"]]
    assert len(on) and len(off)
    # first mini-batch: on-policy, K = 0 everywhere
    assert (on["k_sum"] == 0).all()
    # after one SGD step from pi == mu (w = 1, nothing clipped): theta = lr * A / N on every model
    # token, so at model-token position t, K_t = t * lr * A / N
    expected: dict[int, tuple[int, float]] = {}
    for i in range(mask.shape[0]):
        t = 0
        for j in range(mask.shape[1]):
            if bool(mask[i, j]):
                t += 1
                n, k = expected.get(t, (0, 0.0))
                expected[t] = (n + 1, k + t * lr * float(adv[i, j]) / n_tokens)
    off = off.sort_values("position")
    assert off["position"].tolist() == sorted(expected)
    assert off["n"].tolist() == [expected[t][0] for t in sorted(expected)]
    assert off["k_sum"].tolist() == pytest.approx([expected[t][1] for t in sorted(expected)], abs=1e-12)
    assert math.isclose(float(on["n"].sum()), n_tokens)
    # the accumulator was reset by the flush; after reset_diagnostics the hook is gone
    verl_plugin.reset_diagnostics()
    for _ in range(2):
        optimizer.step()
    assert sorted(positions.glob("step_*.parquet")) == files
    assert diagnostics.active() is None


def test_hydra_config_route() -> None:
    """ppo_trainer config + overrides -> FSDPActorConfig whose policy_loss carries our hyperparameters."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    values = {"ctpo_clip_low": 0.03, "ctpo_clip_high": 0.07, "ctpo_clip_c": 0.11, "ctpo_power": 0.4}
    overrides = [
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.policy_loss._target_=ctpo_cli.train.verl.plugin.CTPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=ctpo/ctpo",
        *(f"+actor_rollout_ref.actor.policy_loss.{k}={v}" for k, v in values.items()),
        "+actor_rollout_ref.actor.policy_loss.ctpo_minibatches_per_step=16",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, verl_plugin.CTPOPolicyLossConfig)
    assert actor.policy_loss.loss_mode == "ctpo/ctpo"
    assert actor.policy_loss.ctpo_minibatches_per_step == 16
    assert method_hparams("ctpo", actor) == pytest.approx(values)
    # the composed OmegaConf node itself works as a config too
    assert method_hparams("ctpo", cfg.actor_rollout_ref.actor) == pytest.approx(values)


def test_ray_worker_sees_registered_losses(slow_jobs: dict[str, Any]) -> None:
    """A real Ray worker process: `import verl` there registers the ctpo/* losses."""
    import ray

    pid, plugin_before, names = ray.get(slow_jobs["ray_result"], timeout=180)
    assert pid != os.getpid()
    assert not plugin_before  # a fresh worker: it was `import verl` that brought the plugin in
    assert names == sorted(f"ctpo/{name}" for name in NAMES)


def test_plugin_import_failure_is_loud(slow_jobs: dict[str, Any]) -> None:
    """A plugin that fails to import is logged by verl at DEBUG only; ours prints to stderr.

    A `ctpo_cli` package first on PYTHONPATH holds the real verl_plugin.py and losses.py but a
    diagnostics.py that raises ImportError; `import verl` loads the entry point from there."""
    stdout, stderr = slow_jobs["broken"].communicate(timeout=180)
    assert slow_jobs["broken"].returncode == 0, stderr  # verl swallows the exception ...
    assert stdout.strip().splitlines()[-1] == "[]"  # ... and the losses are missing
    assert LOUD_FAILURE in stderr  # ... but the plugin said so, with the cause
    assert "simulated broken dependency of diagnostics" in stderr
    assert str(slow_jobs["package"] / "train" / "verl" / "plugin.py") in stderr
