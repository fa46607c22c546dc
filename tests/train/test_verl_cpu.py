"""verl's own trainer on this CPU (issue 14): `ctpo train --model tiny-cpu` runs `python -m
verl.trainer.main_ppo` (Ray, the PPO trainer, the agent loop with our sandbox tool, an FSDP actor with
our loss) end to end; the CPU platform's pieces one by one; and a GPU run imports none of them.

The end-to-end runs share one working directory, so the tiny model's warm start is built once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from ctpo_cli.algo.losses import METHODS
from ctpo_cli.runs import rundir
from ctpo_cli.train.verl.cpu import internals

RUN_TIMEOUT_S = 900


Train = Callable[..., Path]
RunCtpo = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verl-cpu")


@pytest.fixture(scope="module")
def train(workdir: Path, run_ctpo: RunCtpo) -> Train:
    """``ctpo train --model tiny-cpu ARGS`` in the shared directory; the run directory it wrote last."""

    def run(*args: str) -> Path:
        result = run_ctpo("train", "--model", "tiny-cpu", *args, cwd=workdir, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return max(
            rundir.find_runs(workdir / "runs"), key=lambda run: (run / rundir.RUN_FILE).stat().st_mtime
        )

    return run


@pytest.fixture(scope="module")
def two_step_run(train: Train) -> Path:
    """The issue's command: 2 ctpo steps (validation before and after, a checkpoint at step 2)."""
    return train("--method", "ctpo", "trainer.total_training_steps=2")


def test_a_two_step_ctpo_run_with_tool_calls(workdir: Path, two_step_run: Path) -> None:
    run = two_step_run
    metrics = {row["step"]: row for row in rundir.read_metric_rows(run)}
    assert sorted(metrics) == [0, 1, 2]  # step 0: validation before training
    for step in (1, 2):
        row = metrics[step]
        # our loss ran in the update (verl's own losses emit no ctpo/* metric) ...
        assert row["actor/ctpo/is_weight_mean"] > 0
        # ... on tool-integrated trajectories: runs of response_mask 0 between model tokens (tool output)
        assert row["actor/ctpo/tool_spans"] > 0 and row["actor/ctpo/tool_tokens"] > 0
        assert row["num_turns/mean"] > 2
        assert row["timing_s/gen"] > 0 and row["timing_s/update_actor"] > 0
    assert 0 < metrics[2]["val-core/synthetic_count/acc/mean@2"] <= 1
    positions = sorted(p.name for p in (run / "positions").glob("*.parquet"))
    assert positions == ["step_000001.parquet", "step_000002.parquet"]
    frame = pd.read_parquet(run / "positions" / "step_000002.parquet")
    assert frame["n"].sum() > 0
    assert (run / "verl_checkpoints" / "global_step_2" / "actor").is_dir()
    info = rundir.read_run_info(run)
    assert info["status"] == "finished" and info["backend"] == "verl"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow_run = client.get_run(info["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "timing_s/step")] == [1, 2]


def test_resume_continues_from_the_checkpoint(workdir: Path, two_step_run: Path, train: Train) -> None:
    before = {row["step"]: row for row in rundir.read_metric_rows(two_step_run)}
    assert train("-m", "ctpo", "--resume", "trainer.total_training_steps=3") == two_step_run
    assert "Resuming from" in (two_step_run / "train.log").read_text()
    rows = rundir.read_metric_rows(two_step_run)
    assert [row["step"] for row in rows] == [0, 1, 2, 3]  # nothing lost, nothing twice
    assert rows[1]["timing_s/step"] == before[1]["timing_s/step"]  # the first steps are the first run's
    assert sorted(p.name for p in (two_step_run / "positions").glob("*.parquet"))[-1] == "step_000003.parquet"
    assert (two_step_run / "verl_checkpoints" / "global_step_3").is_dir()
    info = rundir.read_run_info(two_step_run)
    assert info["status"] == "finished" and len(info["resumed"]) == 1
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    continued = client.get_run(info["mlflow_run_id"])  # a child run: verl refuses changed params
    assert continued.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(continued.info.run_id, "timing_s/step")] == [3]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ctpo"])
def test_every_method_trains_on_verl(two_step_run: Path, train: Train, method: str) -> None:
    run = train(
        "--method",
        method,
        "trainer.total_training_steps=1",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
    )
    (row,) = rundir.read_metric_rows(run)
    assert row["step"] == 1 and row["actor/ctpo/is_weight_mean"] > 0
    assert (run / "positions" / "step_000001.parquet").is_file()


def test_two_workers_shard_the_update_like_one(workdir: Path, two_step_run: Path, train: Train) -> None:
    """FSDP over two gloo processes (trainer.n_gpus_per_node=2, the paper's multi-GPU code path) gives
    the gradient and weights of one worker. The rollouts must be the same in both runs: seeds from the
    prompt (rollout.full_determinism), one sample per prompt with REINFORCE++'s batch-normalised
    advantage (GRPO's would be 0 for identical samples), and one mini-batch, since verl gives each rank
    its own slice of every mini-batch. Plain SGD keeps the weights linear in the gradient (Adam's first
    step is lr * sign(g), which turns float noise in near-zero gradients into whole steps)."""
    common = [
        "--method", "ctpo",
        "trainer.total_training_steps=1", "trainer.val_before_train=false", "trainer.test_freq=-1",
        "trainer.save_freq=1", "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
        "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.full_determinism=true",
        "algorithm.adv_estimator=reinforce_plus_plus", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.optimizer=SGD", "actor_rollout_ref.actor.optim.lr=0.5",
        "actor_rollout_ref.actor.optim.weight_decay=0",
    ]  # fmt: skip
    from safetensors.torch import load_file

    one = train(*common)
    two = train(*common, "trainer.n_gpus_per_node=2")
    (a,), (b,) = rundir.read_metric_rows(one), rundir.read_metric_rows(two)
    assert (a["critic/score/mean"], a["response_length/mean"]) == (
        b["critic/score/mean"],
        b["response_length/mean"],
    )
    assert a["actor/grad_norm"] > 0.01
    assert b["actor/grad_norm"] == pytest.approx(a["actor/grad_norm"], rel=1e-5)
    weights = "verl_checkpoints/global_step_1/actor/huggingface/model.safetensors"
    (start,) = (workdir / "runs" / ".warmstart").glob("*/model.safetensors")
    initial, after_one, after_two = load_file(start), load_file(one / weights), load_file(two / weights)
    moved = max(float((after_one[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # the update is large against the tolerance below
    for name, tensor in after_one.items():
        torch.testing.assert_close(after_two[name], tensor, atol=1e-6, rtol=1e-5)
    assert (two / "verl_checkpoints" / "global_step_1" / "actor" / "model_world_size_2_rank_1.pt").is_file()


ACTOR_VS_LOCAL = r"""
import json, os, sys
from pathlib import Path

import numpy as np
import ray
import torch
from verl import DataProto
from verl.single_controller.ray.base import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.padding import left_right_2_no_padding

from ctpo_cli.algo.losses import get_policy_loss
from ctpo_cli.train.experiments import build_job, compose_experiment
from ctpo_cli.train.local.config import build_config
from ctpo_cli.train.local.model import build_tiny_model, build_tokenizer
from ctpo_cli.train.local.task import sample_problems
from ctpo_cli.train.local.train import group_advantages, minibatch_update, response_log_probs, sample_responses

method = sys.argv[1]
config = build_config("smoke", ["rl.grad_clip=1e9", "rl.lr=1e-6"])
tokenizer = build_tokenizer()
model = build_tiny_model(config.model, tokenizer, seed=0)
model.save_pretrained("model")
tokenizer.save_pretrained("model")

# a batch from the local engine: 4 problems x 2 samples, a tool-output-like gap in every other response
rollout = sample_responses(model, tokenizer, sample_problems(config.task, 4, np.random.default_rng(0)), 2, config, "cpu")
rollout.response_mask[::2, 4:7] = 0
rows = torch.arange(rollout.input_ids.shape[0])
with torch.no_grad():
    log_prob = response_log_probs(model, rollout, rows, 1.0)
old = log_prob + 0.05 * torch.sin(torch.arange(log_prob.numel(), dtype=torch.float32)).view_as(log_prob)
advantages = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1]), 2).unsqueeze(-1).expand_as(old).contiguous()

# verl's actor: the tiny-cpu preset's worker (FSDP, our loss) in a Ray worker, fed as verl's trainer feeds it
job = build_job(compose_experiment(method, "tiny-cpu", runs_dir=Path("runs"), overrides=[
    f"actor_rollout_ref.model.path={Path('model').resolve()}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"]))
env = {k: os.environ[k] for k in ("VERL_PLATFORM", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")}
ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, runtime_env={"env_vars": env})
worker = RayClassWithInitArgs(cls=ray.remote(ActorRolloutRefWorker), config=job.config.actor_rollout_ref, role="actor")
group = RayWorkerGroup(resource_pool=RayResourcePool([1], use_gpu=True, max_colocate_count=1), ray_cls_with_init=worker, device_name="cpu")
group.init_model()
responses = rollout.response_mask.shape[1]
batch = DataProto.from_dict(tensors={
    "prompts": rollout.input_ids[:, :-responses], "responses": rollout.input_ids[:, -responses:],
    "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "position_ids": rollout.position_ids,
    "response_mask": rollout.response_mask, "old_log_probs": old, "advantages": advantages})
batch.meta_info.update(temperature=1.0, multi_turn=True)
data = left_right_2_no_padding(batch.to_tensordict())
size = len(rows)
tu.assign_non_tensor(data, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
    global_batch_size=size, mini_batch_size=size, epochs=1, seed=0, dataloader_kwargs={"shuffle": False}, compute_loss=True)
output = group.update_actor(data)
verl_metrics = tu.get(output[0] if isinstance(output, list) else output, "metrics")

# the local engine's update on the same batch
local = minibatch_update(model, torch.optim.AdamW(model.parameters(), lr=1e-6), get_policy_loss(method),
                         rollout, rows, old, advantages, config)
print("RESULT " + json.dumps({
    "local": {k: float(v) for k, v in local.items()},
    "verl": {k: float(v[0] if isinstance(v, list) else v) for k, v in verl_metrics.items()
             if isinstance(v, (list, float, int)) and (not isinstance(v, list) or len(v) == 1)},
}))
"""


@pytest.mark.parametrize("method", ["ctpo", "gspo"])
def test_the_local_engine_and_verls_actor_agree_on_a_batch(tmp_path: Path, method: str) -> None:
    """One batch (local engine rollouts with tool-output-like gaps in the response mask, off-policy
    old log-probs, group advantages) through the local engine's mini-batch update and through verl's
    actor worker (FSDP on the CPU platform, under Ray, as verl's trainer calls it, in two micro-batches):
    the same loss and gradient norm, to float32 precision (measured: relative differences of 4e-7 to 3e-6;
    verl's forward runs under FSDP and sums two micro-batch losses, and the cumulative ratio exp(K_t)
    compounds the log-prob rounding along the response)."""
    env = {**os.environ, "VERL_PLATFORM": "cpu", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ACTOR_VS_LOCAL, method],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    found = json.loads(lines[0].removeprefix("RESULT "))
    local, verl = found["local"], found["verl"]
    assert local["actor/pg_loss"] != 0 and local["actor/grad_norm"] > 0
    assert verl["actor/pg_loss"] == pytest.approx(local["actor/pg_loss"], rel=2e-5)
    assert verl["grad_norm"] == pytest.approx(local["actor/grad_norm"], rel=2e-5)
    # the gaps reached both losses as the same masked tokens between model tokens (a gap past the end
    # of a short response is padding, not a gap); verl averages its two equal micro-batches
    for key in ("ctpo/tool_spans", "ctpo/tool_tokens"):
        assert verl[key] == pytest.approx(local[key]) and local[key] > 0


# --------------------------------------------------------------------------------------------------
# The pieces


def test_a_gpu_run_imports_none_of_it() -> None:
    """Without VERL_PLATFORM=cpu, `import verl` (which loads our plugin) registers no CPU platform,
    engine or rollout; with it, all three."""
    script = (
        "import verl\n"
        "from verl.plugin.platform import PlatformRegistry\n"
        "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
        "import sys\n"
        "print('cpu' in PlatformRegistry.registered_names(), 'cpu_hf' in RolloutReplicaRegistry._registry,"
        " 'ctpo_cli.train.verl.cpu.platform' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    gpu = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    cpu = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "VERL_PLATFORM": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gpu.stdout.split() == ["False", "False", "False"], gpu.stderr[-2000:]
    assert cpu.stdout.split() == ["True", "True", "True"], cpu.stderr[-2000:]


def test_in_worker_rollout_registry_change_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from verl.workers.rollout import base

    monkeypatch.delattr(base, "_ROLLOUT_REGISTRY")
    with pytest.raises(internals.VerlInternalsChanged, match="_ROLLOUT_REGISTRY"):
        internals.register_inworker_rollout("x", "a.B")


def test_process_group_route_check_fails_loudly_when_verl_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from verl.utils import distributed

    def initialize_global_process_group_ray(timeout_second: object = None, backend: object = None) -> None:
        return None  # a verl that fixed the backend string and dropped the is_initialized() guard

    monkeypatch.setattr(
        distributed, "initialize_global_process_group_ray", initialize_global_process_group_ray
    )
    with pytest.raises(internals.VerlInternalsChanged, match=r"distributed\.py"):
        internals.check_process_group_workaround_applies()


def test_device_id_check_fails_loudly_when_verl_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    internals.check_device_id_usage()  # verl 0.9.1 as installed: passes
    monkeypatch.setattr(inspect, "getsource", lambda obj: "model.to(device=int(get_device_id()))")
    with pytest.raises(internals.VerlInternalsChanged, match="fsdp_utils"):
        internals.check_device_id_usage()


def test_gloo_group_only_inside_verl_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WG_BACKEND", raising=False)
    assert internals.init_gloo_process_group() is False
    assert not torch.distributed.is_initialized()


def test_sampler_log_probs_seeds_and_stops(tmp_path: Path) -> None:
    """The rollout's log-probs are those of a full forward pass at the sampling temperature (what the
    actor recomputes), a seed reproduces a sample, and a stop token ends it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ctpo_cli.train.verl.cpu.rollout import sample_tokens

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    prompt = [1, 20, 21, 22, 2, 1, 14]
    kwargs: dict[str, object] = {
        "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "stop_token_ids": set(), "seed": 123,
    }  # fmt: skip
    ids, log_probs, finish = sample_tokens(model, prompt, **kwargs)  # type: ignore[arg-type]
    again, log_probs_again, _ = sample_tokens(model, prompt, **kwargs)  # type: ignore[arg-type]
    assert (ids, log_probs, finish, len(ids)) == (again, log_probs_again, "length", 12)
    other, _, _ = sample_tokens(model, prompt, **{**kwargs, "seed": 124})  # type: ignore[arg-type]
    assert other != ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(log_probs), expected, atol=1e-5, rtol=0)
    stopped, _, reason = sample_tokens(model, prompt, **{**kwargs, "stop_token_ids": {ids[2]}})  # type: ignore[arg-type]
    assert reason == "stop" and stopped[-1] == ids[2] and len(stopped) <= 3
    json.dumps(log_probs)  # plain floats, as verl's TokenOutput carries them
