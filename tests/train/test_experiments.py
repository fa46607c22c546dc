"""experiments/ -> verl: every method x model preset composes with verl's own Hydra config and passes
verl's validate_config (both offline, on CPU); the paper's settings arrive in verl; the CLI's dry run
and its one-line errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctpo_cli import cli
from ctpo_cli.algo.losses import METHODS
from ctpo_cli.train.experiments import (
    EXPERIMENTS_DIR,
    VerlJob,
    build_job,
    compose_experiment,
    compose_verl,
    hydra_value,
    model_presets,
)

PRESETS = ("Qwen3-4B", "Qwen3-14B", "qwen3-0.6b-1gpu", "tiny-cpu")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], VerlJob]:
    """Every method x preset, composed and validated once (verl is imported on the first)."""
    runs = tmp_path_factory.mktemp("runs")
    return {
        (method, preset): build_job(compose_experiment(method, preset, runs_dir=runs))
        for method in METHODS
        for preset in PRESETS
    }


def test_every_method_has_a_file_and_every_preset_is_tested() -> None:
    assert sorted(p.stem for p in (EXPERIMENTS_DIR / "method").glob("*.yaml")) == sorted(METHODS)
    assert sorted(p.lower() for p in PRESETS) == model_presets()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("preset", PRESETS)
def test_each_combination_reaches_verl_with_its_loss(
    jobs: dict[tuple[str, str], VerlJob], method: str, preset: str
) -> None:
    job = jobs[method, preset]
    policy_loss = job.config.actor_rollout_ref.actor.policy_loss
    assert policy_loss.loss_mode == f"ctpo/{method}"
    assert policy_loss._target_ == "ctpo_cli.train.verl.plugin.CTPOPolicyLossConfig"
    assert policy_loss.ctpo_diagnostics_dir == str(job.experiment.run_dir)
    data, actor = job.config.data, job.config.actor_rollout_ref.actor
    assert policy_loss.ctpo_minibatches_per_step == data.train_batch_size // actor.ppo_mini_batch_size
    assert job.command[1:3] == ["-m", "verl.trainer.main_ppo"]
    # verl's worker-side conversion builds our config subclass with the values (what the loss reads)
    from verl.utils.config import omega_conf_to_dataclass

    from ctpo_cli.train.verl.plugin import CTPOPolicyLossConfig

    converted = omega_conf_to_dataclass(job.config.actor_rollout_ref.actor)
    assert isinstance(converted.policy_loss, CTPOPolicyLossConfig)
    for key, value in job.experiment.ctpo.loss.items():
        assert getattr(converted.policy_loss, key) == value


def test_the_paper_setup_reaches_verl(jobs: dict[tuple[str, str], VerlJob]) -> None:
    """docs/method.md, "Paper's experimental setup", on the default model."""
    job = jobs["ctpo", "Qwen3-14B"]
    cfg = job.config
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert (cfg.data.train_batch_size, rollout.n, actor.ppo_mini_batch_size) == (512, 8, 32)
    assert job.config.actor_rollout_ref.actor.policy_loss.ctpo_minibatches_per_step == 16
    assert actor.optim.lr == 1e-6 and actor.use_kl_loss is False and actor.entropy_coeff == 0
    assert cfg.algorithm.use_kl_in_reward is False and cfg.algorithm.adv_estimator == "grpo"
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (16000, 8000)
    assert rollout.multi_turn.enable and rollout.multi_turn.max_assistant_turns == 5
    assert rollout.multi_turn.format == "ctpo_authors" and rollout.name == "vllm" and rollout.mode == "async"
    assert rollout.agent.default_agent_loop == "ctpo_authors_agent"
    assert cfg.data.apply_chat_template_kwargs.enable_thinking is False
    val = rollout.val_kwargs
    assert (val.n, val.temperature, val.top_p, val.do_sample) == (32, 0.7, 1.0, True)
    assert cfg.trainer.test_freq == 20 and cfg.trainer.total_training_steps == 305
    assert (cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes) == (8, 1)
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen3-14B"
    assert Path(cfg.data.train_files).name == "deepscaler_train.parquet"
    assert [Path(f).name for f in cfg.data.val_files] == ["aime25.parquet", "aime26.parquet"]
    assert cfg.reward.custom_reward_function.path == "pkg://ctpo_cli.train.verl.reward"
    assert "mlflow" in cfg.trainer.logger
    assert cfg.trainer.project_name == "ctpo-verl-Qwen3-14B"
    assert cfg.trainer.experiment_name == job.experiment.ctpo.run_name
    assert job.experiment.ctpo.run_name.startswith("ctpo-Qwen3-14B-s0-")


def test_the_authors_run_is_the_default_for_every_method_and_preset(
    jobs: dict[tuple[str, str], VerlJob],
) -> None:
    """The authors' ctpo.sh: sequence-level rollout IS at 5.0, their tool protocol (256-character tool
    messages, 30 s) and reward, their validation and checkpoint cadence, their memory settings."""
    from ctpo_cli.train.verl.tools import CodeInterpreterTool

    for (method, preset), job in jobs.items():
        cfg = job.config
        correction = cfg.algorithm.rollout_correction
        assert (correction.rollout_is, correction.rollout_is_threshold) == ("sequence", 5.0), (method, preset)
        assert correction.rollout_is_batch_normalize is False
        assert cfg.reward.custom_reward_function.name == "authors_score"
        multi_turn = cfg.actor_rollout_ref.rollout.multi_turn
        if preset == "tiny-cpu":  # the tiny warm start speaks the ctpo protocol (its preset says why)
            assert job.experiment.ctpo.tir == "ctpo" and multi_turn.format == "ctpo_python_block"
            continue
        assert cfg.trainer.val_before_train is False
        assert job.experiment.ctpo.tir == "authors" and multi_turn.max_tool_response_length == 256
        assert multi_turn.tool_response_truncate_side == "middle" and multi_turn.format == "ctpo_authors"
        assert Path(multi_turn.tool_config_path).name == "tools-authors.yaml"
        assert CodeInterpreterTool.protocol.run_timeout == 30.0
        assert cfg.trainer.save_freq == (20 if preset != "qwen3-0.6b-1gpu" else -1)
    for preset in ("Qwen3-14B", "Qwen3-4B"):
        actor = jobs["ctpo", preset].config.actor_rollout_ref.actor
        assert actor.fsdp_config.param_offload and actor.fsdp_config.optimizer_offload
        assert (actor.use_dynamic_bsz, actor.ppo_micro_batch_size_per_gpu) == (False, 1)


def test_our_protocol_and_reward_are_named_alternatives(tmp_path: Path) -> None:
    job = build_job(
        compose_experiment(
            "ctpo", "Qwen3-4B", overrides=["ctpo.tir=ctpo", "ctpo.reward=strict"], runs_dir=tmp_path
        )
    )
    rollout = job.config.actor_rollout_ref.rollout
    assert (
        rollout.multi_turn.format == "ctpo_python_block"
        and rollout.agent.default_agent_loop == "ctpo_python_agent"
    )
    assert rollout.multi_turn.max_tool_response_length == 4096
    assert job.config.reward.custom_reward_function.name == "strict_score"
    assert job.experiment.sources["reward.custom_reward_function.name"].endswith("reward/strict.yaml")
    with pytest.raises(ValueError, match=r"ctpo\.tir is .simpletir.; choose one of authors, ctpo"):
        compose_experiment("ctpo", "Qwen3-4B", overrides=["ctpo.tir=simpletir"], runs_dir=tmp_path)


def test_method_hyperparameters(jobs: dict[tuple[str, str], VerlJob]) -> None:
    gspo = jobs["gspo", "Qwen3-14B"]
    assert (
        gspo.config.actor_rollout_ref.actor.clip_ratio_low,
        gspo.config.actor_rollout_ref.actor.clip_ratio_high,
    ) == (
        3e-4,
        4e-4,
    )
    assert gspo.hparams == {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4}
    ctpo = jobs["ctpo", "Qwen3-14B"].hparams
    assert ctpo == {"ctpo_clip_low": 0.025, "ctpo_clip_high": 0.05, "ctpo_clip_c": 0.05, "ctpo_power": 0.5}
    fixed = jobs["ctpo-fixed", "Qwen3-14B"].hparams
    assert fixed["ctpo_power"] == 0.0
    assert math.exp(-fixed["ctpo_clip_low"]) == pytest.approx(0.5)
    assert math.exp(fixed["ctpo_clip_high"]) == pytest.approx(5.0) == math.exp(fixed["ctpo_clip_c"])
    grpo = jobs["grpo", "Qwen3-4B"].hparams
    assert grpo == {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0}


def test_one_gpu_preset_scales_down(jobs: dict[tuple[str, str], VerlJob]) -> None:
    cfg = jobs["ctpo", "qwen3-0.6b-1gpu"].config
    assert cfg.trainer.n_gpus_per_node == 1
    assert cfg.actor_rollout_ref.actor.policy_loss.ctpo_minibatches_per_step == 4


def test_model_path_seed_and_overrides(tmp_path: Path) -> None:
    experiment = compose_experiment(
        "grpo",
        "Qwen/Qwen3-8B",
        seed=7,
        overrides=[
            "data.train_batch_size=64",
            "actor_rollout_ref.rollout.engine_kwargs.vllm.enforce_eager=true",  # free-form map: becomes +key
            "+trainer.ctpo_extra=1",  # verbatim to verl
        ],
        runs_dir=tmp_path,
    )
    job = build_job(experiment)
    assert job.config.actor_rollout_ref.model.path == "Qwen/Qwen3-8B"
    assert experiment.ctpo.model == "Qwen3-8B" and experiment.ctpo.run_name.startswith("grpo-Qwen3-8B-s7-")
    assert job.config.data.seed == 7 and job.config.actor_rollout_ref.rollout.seed == 7
    assert job.config.data.train_batch_size == 64
    assert job.config.actor_rollout_ref.actor.policy_loss.ctpo_minibatches_per_step == 2
    assert "+actor_rollout_ref.rollout.engine_kwargs.vllm.enforce_eager=true" in job.overrides
    assert job.overrides[-1] == "+trainer.ctpo_extra=1" and job.config.trainer.ctpo_extra == 1
    assert experiment.sources["data.train_batch_size"] == "command line"


def test_hydra_values_round_trip() -> None:
    values = [
        "plain",
        "with space",
        "it's",
        "1.5",
        "true",
        "null",
        "a=b,c",
        "sqlite:////x/y.db",
        3,
        1e-6,
        None,
        False,
    ]
    overrides = [f"+roundtrip.v{i}={hydra_value(v)}" for i, v in enumerate(values)]
    overrides += ["actor_rollout_ref.rollout.name=vllm", f"+roundtrip.list={hydra_value(['a b', 2, None])}"]
    composed = OmegaConf.to_container(compose_verl(overrides).roundtrip)
    assert composed == {**{f"v{i}": v for i, v in enumerate(values)}, "list": ["a b", 2, None]}


# --------------------------------------------------------------------------------------------------
# Through the command line


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """``ctpo <args>`` in this process (its real ``main``, error handling included)."""
    monkeypatch.setattr(sys, "argv", ["ctpo", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CTPO_SANDBOX_URL", raising=False)
    yield tmp_path


def test_dry_run_prints_config_and_command(
    jobs: dict[tuple[str, str], VerlJob],
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run_cli(
        ["train", "--method", "ctpo", "--model", "Qwen3-14B", "--dry-run"], capsys, monkeypatch
    )
    assert code == 0, err
    config, _, command = out.partition("# command, run by `ctpo train`")
    assert "loss_mode: ctpo/ctpo" in config and "ctpo_clip_low: 0.025" in config
    assert "-m verl.trainer.main_ppo" in command
    for override in (
        "actor_rollout_ref.actor.policy_loss.loss_mode=ctpo/ctpo",
        "+actor_rollout_ref.actor.policy_loss.ctpo_clip_low=0.025",
        "+actor_rollout_ref.actor.policy_loss.ctpo_clip_high=0.05",
        "+actor_rollout_ref.actor.policy_loss.ctpo_clip_c=0.05",
        "+actor_rollout_ref.actor.policy_loss.ctpo_power=0.5",
        "+actor_rollout_ref.actor.policy_loss.ctpo_minibatches_per_step=16",
        "actor_rollout_ref.model.path=Qwen/Qwen3-14B",
    ):
        assert override in command
    assert "MLFLOW_TRACKING_URI=sqlite:///" in command
    assert not (in_tmp / "runs").exists()  # a dry run creates nothing
    assert err.count("\n") <= 1  # at most the one-line note that data/ is not prepared yet


BAD_INPUTS = {
    "unknown method": (["--method", "ppo"], "unknown method 'ppo'; valid methods: grpo, gspo, ctpo"),
    "unknown preset": (["--method", "ctpo", "--model", "qwen9"], "unknown model preset 'qwen9'; presets:"),
    "unknown backend": (["--method", "ctpo", "--backend", "jax"], "valid backends: verl, local"),
    "unknown verl key": (
        ["--method", "ctpo", "--dry-run", "actor_rollout_ref.actor.ppo_mini_batchsize=3"],
        "unknown verl key 'actor_rollout_ref.actor.ppo_mini_batchsize' (from command line)",
    ),
    "unknown ctpo key": (["--method", "ctpo", "--dry-run", "ctpo.seeed=3"], "unknown key 'ctpo.seeed'"),
    "not key=value": (["--method", "ctpo", "--dry-run", "lr"], "override 'lr' is not key=value"),
    "missing file": (["--method", "ctpo", "-e", "nope.yaml"], "experiment file nope.yaml not found"),
    "malformed yaml": (["--method", "ctpo", "-e", "bad.yaml"], "malformed YAML in bad.yaml:"),
    "loss field of another method": (
        ["--method", "grpo", "--dry-run", "ctpo.loss.ctpo_power=1"],
        "ctpo.loss.ctpo_power is not a field of method 'grpo'",
    ),
    "verl validation": (
        [
            "--method",
            "ctpo",
            "--dry-run",
            "trainer.n_gpus_per_node=3",
            "actor_rollout_ref.actor.use_dynamic_bsz=false",
        ],
        "verl rejected the config: real_train_batch_size (4096) must be divisible",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line(
    jobs: dict[tuple[str, str], VerlJob],
    case: str,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (in_tmp / "bad.yaml").write_text("data:\n  train_batch_size: 64\n bad: [\n")
    args, expected = BAD_INPUTS[case]
    code, _out, err = run_cli(["train", *args], capsys, monkeypatch)
    assert code != 0
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert expected in err


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_without_gpus_one_line_names_the_alternatives(tmp_path: Path) -> None:
    """Issue 9, through the real command in a fresh process: no GPU (and no vLLM) here."""
    env = {k: v for k, v in os.environ.items() if k != "CTPO_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "ctpo_cli.cli", "train", "--method", "ctpo", "--model", "Qwen3-14B"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs GPUs and verl" in lines[0] and "--backend local" in lines[0] and "--dry-run" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", list(METHODS))
def test_experiment_files_state_the_methods_defaults(
    jobs: dict[tuple[str, str], VerlJob], method: str
) -> None:
    """experiments/method/<m>.yaml and ctpo_cli.algo.defaults (the one source the losses and the
    diagnostics use) must agree on every hyperparameter the method has."""
    from ctpo_cli.algo import defaults, diagnostics

    job = jobs[method, "Qwen3-14B"]
    actor = job.config.actor_rollout_ref.actor
    stated = {
        **{k: actor[k] for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c")},
        **job.experiment.ctpo.loss,
    }
    for key, value in METHODS[method].defaults.items():
        assert stated[key] == pytest.approx(value, rel=1e-12), key
    source = {"grpo": defaults.PPO, "seq-is": defaults.PPO, "gspo": defaults.GSPO, "ctpo": defaults.CTPO}
    assert METHODS[method].defaults == dict(source.get(method, defaults.CTPO_FIXED))
    # the diagnostics' reference windows are the two CTPO variants' windows
    assert diagnostics.SQRT_WINDOW == (0.025, 0.05, 0.5)
    assert pytest.approx((-math.log(2.0), math.log(5.0))) == diagnostics.FIXED_WINDOW
