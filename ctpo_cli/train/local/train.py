"""The local backend's trainer: verl's RL loop on one machine, with the same losses and diagnostics.

One training step, as verl does it:
  1. rollout: P prompts x G samples from the current policy mu (temperature sampling);
  2. reward: 1 if the final \\boxed{} answer is right (``ctpo_cli.tir.scoring``), else 0;
  3. advantage: GRPO outcome advantage A_i = (R_i - mean_group) / (std_group + 1e-6), on every token;
  4. old log-probs: recomputed by the trainer with a forward pass (log mu);
  5. M mini-batches, one optimizer step each: mini-batch 1 is on-policy, the later ones are
     off-policy (pi_theta != mu), which is where the IS ratio of the chosen method matters.
The per-position K_t statistics are fed from inside the loss and flushed once per step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctpo_cli.algo import diagnostics
from ctpo_cli.algo.losses import PolicyLossFn, get_method, get_policy_loss, method_hparams
from ctpo_cli.errors import ConfigError, InputFileError
from ctpo_cli.runs import rundir, tracking
from ctpo_cli.tir.scoring import score_batch
from ctpo_cli.train.local.config import LocalConfig, build_config, flat_params
from ctpo_cli.train.local.model import build_tiny_model, build_tokenizer, load_policy, on_device
from ctpo_cli.train.local.task import Problem, eval_problems, sample_problems

EXPERIMENT = "ctpo-local"
WARMSTART_DIR = ".warmstart"
TINY = "tiny-qwen3"


@dataclass
class Rollout:
    """A batch of sampled responses, laid out as [left-padded prompt | right-padded response]."""

    input_ids: torch.Tensor  # (N, P + R)
    attention_mask: torch.Tensor  # (N, P + R)
    response_mask: torch.Tensor  # (N, R) 1 on response tokens up to and including EOS
    prompt_length: int
    texts: list[str]

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, problem: Problem, system_prompt: str = "") -> str:
    """The problem as chat-template text ending with the assistant header (Qwen3: no thinking)."""
    text = tokenizer.apply_chat_template(
        problem.messages(system_prompt), add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert isinstance(text, str)
    return text


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, problems: list[Problem], device: str, system_prompt: str = ""
) -> dict[str, torch.Tensor]:
    """Chat-formatted prompts, left-padded (generation appends on the right)."""
    texts = [chat_prompt(tokenizer, p, system_prompt) for p in problems]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    samples: int,
    config: LocalConfig,
    device: str,
) -> Rollout:
    """``samples`` responses per problem (grouped: problem i owns rows i*samples .. i*samples+samples-1),
    at ``rl.temperature``, at most ``rl.max_new_tokens`` each."""
    prompts = encode_prompts(
        tokenizer, [p for p in problems for _ in range(samples)], device, config.task.system_prompt
    )
    model.eval()
    output = model.generate(  # type: ignore[operator]
        **prompts,
        do_sample=True,
        temperature=config.rl.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=config.rl.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_length = prompts["input_ids"].shape[1]
    response = output[:, prompt_length:]
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    response = torch.where(after_eos, tokenizer.pad_token_id, response)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompts["input_ids"], response], dim=1),
        attention_mask=torch.cat([prompts["attention_mask"], response_mask], dim=1),
        response_mask=response_mask,
        prompt_length=prompt_length,
        texts=texts,
    )


def response_log_probs(
    model: PreTrainedModel, rollout: Rollout, rows: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log pi(y_t | s_t) of the response tokens of ``rows`` (logits divided by the sampling temperature)."""
    input_ids = rollout.input_ids[rows]
    logits = model(
        input_ids=input_ids,
        attention_mask=rollout.attention_mask[rows],
        position_ids=rollout.position_ids[rows],
    ).logits
    logits = logits[:, rollout.prompt_length - 1 : -1].float() / temperature
    targets = input_ids[:, rollout.prompt_length :]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """GRPO outcome advantage: A_i = (R_i - mean_group) / (std_group + 1e-6), per response."""
    grouped = rewards.view(-1, samples)
    normalised = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-6)
    return normalised.view(-1)


def avg_at_k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    k: int,
    config: LocalConfig,
    device: str,
) -> float:
    """Mean over problems of the fraction of k sampled responses that are right (avg@k).

    Sampling is seeded from the problems, so every method and step is judged on the same draws.
    """
    torch.manual_seed(len(problems) * 7919 + k)
    rollout = sample_responses(model, tokenizer, problems, k, config, device)
    correct = score_batch(rollout.texts, [str(p.answer) for p in problems for _ in range(k)])
    return float(np.mean(correct))


# --------------------------------------------------------------------------------------------------
# Warm start


def warmstart_key(config: LocalConfig, seed: int, model: str) -> str:
    """Identifies a warm-start checkpoint: model source, model/task/warm-start config and seed."""
    blob = json.dumps(
        [model, asdict(config.model), asdict(config.task), asdict(config.warmstart), seed], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def demonstration(
    tokenizer: PreTrainedTokenizerBase, problem: Problem, config: LocalConfig, careless: bool, tool: bool
) -> tuple[list[int], list[bool]]:
    """One demonstration as token ids and which of them are trained on (the assistant's).

    A plain one is the worked solution (careless: the wrong box, see ``WarmStartConfig``). A tool one
    is a turn ending with a ```````python`` block, the tool's message as the chat template renders it
    (what verl's agent loop appends; not trained on), then the boxed count. Each assistant turn ends
    with the end-of-turn token.
    """
    from ctpo_cli.tir.protocol import FINISHED, format_tool_output

    if tool:
        code_turn, final_turn = problem.tool_solution()
        output = format_tool_output(f"{problem.count}\n", "", FINISHED, False)
        tool_text = tokenizer.apply_chat_template(
            [{"role": "tool", "content": output}], add_generation_prompt=True, tokenize=False
        )
        turns = [
            (code_turn + tokenizer.eos_token, True),
            (str(tool_text), False),
            (final_turn + tokenizer.eos_token, True),
        ]
    else:
        turns = [(problem.solution(careless) + tokenizer.eos_token, True)]
    segments = [(chat_prompt(tokenizer, problem, config.task.system_prompt), False), *turns]
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [train] * len(piece)
    return ids, trained


def pad_demonstrations(
    demos: list[tuple[list[int], list[bool]]], pad_id: int, device: str
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not trained on)."""
    length = max(len(ids) for ids, _ in demos)
    input_ids = torch.full((len(demos), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(demos), length), dtype=torch.long)
    labels = torch.full((len(demos), length), -100, dtype=torch.long)
    for row, (ids, trained) in enumerate(demos):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(trained), torch.tensor(ids), -100)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
    }


def supervised_warmstart(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: LocalConfig,
    seed: int,
    device: str,
    console: Console,
) -> None:
    """Teacher-forced cross-entropy on worked solutions (response tokens only), a
    ``warmstart.careless_frac`` share of them careless (see ``WarmStartConfig``)."""
    rng = np.random.default_rng([seed, 0])
    ws = config.warmstart
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warmstart.lr)
    steps = config.warmstart.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 20) * (1 - i / steps)
    )
    model.train()
    with _progress(console) as progress:
        task = progress.add_task("warm start (supervised)", total=config.warmstart.steps, metric="")
        for _ in range(config.warmstart.steps):
            problems = sample_problems(config.task, config.warmstart.batch_size, rng)
            kinds = rng.random(len(problems))
            demos = [
                demonstration(tokenizer, p, config, careless=u < ws.careless_frac, tool=u >= 1 - ws.tool_frac)
                for p, u in zip(problems, kinds, strict=True)
            ]
            batch = pad_demonstrations(demos, tokenizer.pad_token_id, device)
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(task, advance=1, metric=f"loss {loss.item():.3f}")


def warmstart_seed(config: LocalConfig, seed: int) -> int:
    """The warm start's seed: ``warmstart.seed``, or the run's ``seed`` when that is -1."""
    return seed if config.warmstart.seed < 0 else config.warmstart.seed


def starting_checkpoint(config: LocalConfig, model_path: str | None, seed: int, runs_dir: Path) -> Path:
    """Where the starting policy of (config, model, seed) is cached: ``runs/.warmstart/<key>``."""
    key = warmstart_key(config, warmstart_seed(config, seed), model_path or TINY)
    return Path(runs_dir) / WARMSTART_DIR / key


def initial_policy(
    config: LocalConfig, model_path: str | None, seed: int, runs_dir: Path, device: str, console: Console
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy: the warm-started model, trained once per (config, seed) and cached."""
    cache = starting_checkpoint(config, model_path, seed, runs_dir)
    seed = warmstart_seed(config, seed)
    if (cache / "config.json").is_file():
        return load_policy(cache, device)
    if model_path:
        model, tokenizer = load_policy(model_path, device)
    else:
        tokenizer = build_tokenizer()
        model = on_device(build_tiny_model(config.model, tokenizer, seed), device)
    if config.warmstart.steps > 0:
        supervised_warmstart(model, tokenizer, config, seed, device, console)
    _save_checkpoint(cache, model, tokenizer, None)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The RL step


def minibatch_update(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    loss_fn: PolicyLossFn,
    rollout: Rollout,
    rows: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    config: LocalConfig,
) -> dict[str, torch.Tensor]:
    """One optimizer step on ``rows`` of ``rollout``, as verl's actor takes it on one mini-batch:
    log pi(y_t) at the sampling temperature, the method's loss over the response mask (method.md (5),
    (12)), backward, gradient-norm clip, step. Returns the loss's metrics plus ``actor/pg_loss`` and
    ``actor/grad_norm`` (before clipping), as verl names them. ``old_log_prob`` and ``advantages`` are
    per token, for the whole rollout."""
    log_prob = response_log_probs(model, rollout, rows, config.rl.temperature)
    loss, metrics = loss_fn(
        old_log_prob=old_log_prob[rows],
        log_prob=log_prob,
        advantages=advantages[rows],
        response_mask=rollout.response_mask[rows].bool(),
        loss_agg_mode=config.rl.loss_agg_mode,
        config=config.loss,
    )
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.rl.grad_clip)
    optimizer.step()
    return {**metrics, "actor/pg_loss": loss.detach(), "actor/grad_norm": grad_norm}


def rl_step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    method: str,
    config: LocalConfig,
    problems: list[Problem],
    stats: diagnostics.PositionStats,
    generator: torch.Generator,
    device: str,
) -> dict[str, float]:
    """One rollout batch and its M optimizer steps; returns the step's metrics."""
    rl = config.rl
    loss_fn = get_policy_loss(method)
    start = time.perf_counter()
    rollout = sample_responses(model, tokenizer, problems, rl.samples_per_prompt, config, device)
    generated = time.perf_counter()
    truths = [str(p.answer) for p in problems for _ in range(rl.samples_per_prompt)]
    rewards = torch.tensor(score_batch(rollout.texts, truths), dtype=torch.float32, device=device)
    advantages = group_advantages(rewards, rl.samples_per_prompt)
    rows = torch.arange(len(rewards), device=device)
    with torch.no_grad():
        old_log_prob = response_log_probs(model, rollout, rows, rl.temperature)

    model.train()
    sums: dict[str, float] = {}
    order = torch.randperm(len(rewards), generator=generator).to(device)
    token_advantages = advantages.unsqueeze(-1).expand_as(old_log_prob)
    for minibatch in order.chunk(rl.minibatches):
        metrics = minibatch_update(
            model, optimizer, loss_fn, rollout, minibatch, old_log_prob, token_advantages, config
        )
        stats.end_minibatch()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) / rl.minibatches
    elapsed = time.perf_counter() - start
    tokens = float(rollout.response_mask.sum())
    groups = rewards.view(-1, rl.samples_per_prompt)
    return {
        **sums,
        "actor/ppo_kl_last_minibatch": float(metrics["actor/ppo_kl"]),
        "reward/mean": float(rewards.mean()),
        "reward/solved_all_frac": float((groups.min(-1).values == 1).float().mean()),
        "reward/zero_advantage_frac": float((groups.std(-1) == 0).float().mean()),
        "response_length/mean": tokens / len(rewards),
        "perf/step_s": elapsed,
        "perf/rollout_s": generated - start,
        "perf/tokens_per_s": tokens / elapsed,
    }


# --------------------------------------------------------------------------------------------------
# Checkpoints and the run


def _save_checkpoint(
    path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, state: dict[str, Any] | None
) -> None:
    """Write a Hugging Face checkpoint (+ trainer state) next to ``path`` and swap it in atomically."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
    except BaseException as error:  # (a full disk): free what was written, keep the previous checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"os error (\d+)", str(error))
        if code and not isinstance(error, OSError):  # safetensors reports I/O errors as its own type
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from error
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metric]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _resumable_run(runs_dir: Path, method: str) -> Path:
    """The most recent unfinished run of ``method`` with a checkpoint to resume from."""
    for run in reversed(rundir.find_runs(runs_dir)):
        info = rundir.read_run_info(run)
        resumable = info.get("backend") == "local" and info.get("status") != "finished"
        if (
            resumable
            and info.get("method") == method
            and (run / rundir.CHECKPOINT_DIR / "trainer_state.pt").is_file()
        ):
            return run
    raise InputFileError(
        f"no interrupted local run of {method!r} with a checkpoint under {runs_dir}; start one without --resume"
    )


def _forget_after(run_dir: Path, step: int, info: dict[str, Any], console: Console) -> str | None:
    """Before a resume from the step-``step`` checkpoint: drop what steps after it wrote (a process killed
    between checkpoints logged them; they are trained again) from ``metrics.jsonl`` and ``positions/``.

    MLflow cannot delete single steps of a metric's history, so when steps were dropped the resumed run
    continues in a new MLflow run (tagged ``ctpo.resumed_from_run``/``_step``) that gets the history up
    to ``step`` re-logged; the old run, which also holds the dropped steps, is tagged
    ``ctpo.superseded_by``. Returns the superseded run's id (removed from ``info``), or None when
    nothing was dropped and the same MLflow run continues.
    """
    diagnostics.discard_positions_after(run_dir, step)
    dropped = rundir.keep_steps_through(run_dir, step)
    if not dropped:
        return None
    console.print(
        f"steps {dropped[0]}-{dropped[-1]} were logged after the step-{step} checkpoint; they are trained "
        "again (dropped from metrics.jsonl; a new MLflow run continues this one)"
    )
    superseded = info.pop("mlflow_run_id", None)
    return str(superseded) if superseded else None


def train_local(
    method: str,
    model: str | None = None,
    seed: int = 0,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    device: str = "cpu",
    resume: bool = False,
    runs_dir: str | Path = rundir.RUNS_DIR,
    console: Console | None = None,
) -> Path:
    """Train ``method`` on the synthetic task; returns the run directory.

    Each run is an MLflow run (experiment ``ctpo-local``) mirrored by ``runs/<name>/``. Ctrl-C saves
    a checkpoint, marks the run killed and re-raises; ``resume=True`` continues the latest
    interrupted run of the method (overrides then apply on top of its saved config, e.g. more steps).
    """
    console = console or Console()
    get_method(method)
    runs_dir = Path(runs_dir)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but torch sees no GPU; use --device cpu")
    if resume:
        run_dir = _resumable_run(runs_dir, method)
        info = rundir.read_run_info(run_dir)
        config = build_config(info["preset"], [*info["overrides"], *(overrides or [])])
        seed, model = info["seed"], info["model_path"]
    else:
        config = build_config(preset, overrides)
        if config.warmstart.tool_frac > 0:
            raise ConfigError(
                "warmstart.tool_frac > 0: the local engine runs no tools; train with tool use on verl "
                "(ctpo train --model tiny-cpu)"
            )
        run_dir = rundir.claim_run_dir(runs_dir, rundir.run_name(method, model or TINY, seed))
        info = {
            "method": method,
            "backend": "local",
            "model": model or TINY,
            "model_path": model,
            "preset": preset,
            "overrides": list(overrides or []),
            "seed": seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "status": "running",
        }
    hparams = method_hparams(method, config.loss)
    torch.use_deterministic_algorithms(True, warn_only=True)

    start_step, superseded = 0, None
    state_file = run_dir / rundir.CHECKPOINT_DIR / "trainer_state.pt"
    if resume:
        policy, tokenizer = load_policy(run_dir / rundir.CHECKPOINT_DIR, device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.rl.lr)
        state = torch.load(state_file, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        superseded = _forget_after(run_dir, start_step, info, console)
        console.print(f"resuming [bold]{run_dir}[/] from step {start_step}")
    else:
        policy, tokenizer = initial_policy(config, model, seed, runs_dir, device, console)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.rl.lr)

    params = {
        "method": method,
        "seed": seed,
        "model": info["model"],
        "git_commit": tracking.git_commit(),
        **flat_params(config),
    }
    params.update({f"loss.{k}": v for k, v in hparams.items()})
    tags = {"run_dir": str(run_dir.resolve()), "backend": "local", "method": method}
    if superseded:
        tags.update({"ctpo.resumed_from_run": superseded, "ctpo.resumed_from_step": str(start_step)})
    stats = diagnostics.PositionStats(run_dir)
    diagnostics.activate(stats)
    progress = TrainProgress(step=start_step)
    try:
        with tracking.mlflow_run(
            EXPERIMENT, run_dir.name, params, tags, run_id=info.get("mlflow_run_id")
        ) as run_id:
            info.update(mlflow_run_id=run_id, run_dir=str(run_dir), status="running", hparams=hparams)
            rundir.write_run_info(run_dir, info)
            if superseded:  # the new MLflow run holds the whole history up to the checkpoint
                tracking.log_history(run_id, rundir.read_metric_steps(run_dir))
                tracking.set_tags(superseded, {"ctpo.superseded_by": run_id})
            _train_loop(
                policy,
                tokenizer,
                optimizer,
                method,
                config,
                seed,
                progress,
                run_dir,
                run_id,
                stats,
                device,
                console,
            )
        info["status"] = "finished"
    except KeyboardInterrupt:
        info["status"] = "killed"
        raise
    except BaseException:
        info["status"] = "failed"
        raise
    finally:
        diagnostics.activate(None)
        try:
            if progress.step > start_step or not state_file.exists():
                state = {"optimizer": optimizer.state_dict(), "step": progress.step, "seed": seed}
                _save_checkpoint(run_dir / rundir.CHECKPOINT_DIR, policy, tokenizer, state)
        except BaseException:  # (a full disk): run.json and MLflow say so, not "running" or "finished"
            info["status"] = "failed"
            if "mlflow_run_id" in info:
                tracking.end_run(info["mlflow_run_id"], "failed")
            raise
        finally:
            rundir.write_run_info(run_dir, info)
        if "mlflow_run_id" in info:
            tracking.log_artifacts(
                info["mlflow_run_id"],
                [
                    run_dir / name
                    for name in (
                        diagnostics.POSITIONS_DIR,
                        rundir.CHECKPOINT_DIR,
                        rundir.METRICS_FILE,
                        rundir.RUN_FILE,
                    )
                ],
            )
        if info["status"] == "killed":
            console.print(
                f"[yellow]checkpoint saved at step {progress.step}; continue with: "
                f"ctpo train --method {method} --backend local --resume"
            )
    return run_dir


@dataclass
class TrainProgress:
    """The last completed RL step (what a checkpoint taken now would hold)."""

    step: int


def _train_loop(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    method: str,
    config: LocalConfig,
    seed: int,
    progress: TrainProgress,
    run_dir: Path,
    run_id: str,
    stats: diagnostics.PositionStats,
    device: str,
    console: Console,
) -> None:
    """Steps progress.step+1 .. rl.steps, with validation, checkpoints, metrics (file + MLflow)."""
    rl = config.rl
    held_out = eval_problems(config.task, seed)
    with _progress(console) as bar:
        task = bar.add_task(f"{method} RL", total=rl.steps, completed=progress.step, metric="")
        if progress.step == 0:
            _log(
                run_dir,
                run_id,
                0,
                {"val/avg_at_k": avg_at_k(policy, tokenizer, held_out, rl.val_samples, config, device)},
            )
        for step in range(progress.step + 1, rl.steps + 1):
            torch.manual_seed(seed * 100_003 + step)
            problems = sample_problems(
                config.task, rl.prompts_per_step, np.random.default_rng([seed, 1, step])
            )
            generator = torch.Generator().manual_seed(seed * 100_003 + step)
            metrics = rl_step(
                policy, tokenizer, optimizer, method, config, problems, stats, generator, device
            )
            stats.flush(step)
            if step % rl.val_every == 0 or step == rl.steps:
                metrics["val/avg_at_k"] = avg_at_k(
                    policy, tokenizer, held_out, rl.val_samples, config, device
                )
            _log(run_dir, run_id, step, metrics)
            progress.step = step
            if step % rl.checkpoint_every == 0 and step < rl.steps:
                state = {"optimizer": optimizer.state_dict(), "step": step, "seed": seed}
                _save_checkpoint(run_dir / rundir.CHECKPOINT_DIR, policy, tokenizer, state)
            shown = f"reward {metrics['reward/mean']:.2f}  kl {metrics['actor/ppo_kl']:.1e}"
            bar.update(task, advance=1, metric=shown)


def _log(run_dir: Path, run_id: str, step: int, metrics: dict[str, float]) -> None:
    """Append to metrics.jsonl and log to the MLflow run."""
    rundir.append_metrics(run_dir, step, metrics)
    tracking.log_metrics(run_id, metrics, step=step)
