"""The reproduction manifest: every setting that decides what a verl run computes, with our value (read
from the composed config), the paper's value and section, the authors' released value and file, and why
ours differs where it does.

``ctpo train --dry-run --explain`` prints it for the job it composed; ``docs/reproduce.md`` is the same
table for ``--method ctpo --model Qwen3-14B``, written by ``python -m ctpo_cli.train.manifest`` (a test
regenerates it and compares, so it cannot go stale). A row whose value differs from the authors'
without a documented reason (a preset or an override changed it) is marked ``differs``, naming the layer
that set it.

Sources. Paper: Zhang et al. 2026, arXiv 2605.07331, as restated in docs/method.md (its section numbers
are given). Authors: horizon-llm/CTPO at its initial release: ``ctpo.sh`` (the launcher), their verl
fork's ``examples/sglang_multiturn/config/tool_config/local_sandbox_tool_config.yaml``,
``verl/tools/local_sandbox_tool.py``, ``verl/experimental/agent_loop/{tool_agent_loop,tool_parser}.py``,
``verl/utils/reward_score/__init__.py``; a key ``ctpo.sh`` does not set has verl's default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ctpo_cli.tir.protocol import get_protocol
from ctpo_cli.train.experiments import LOSS_PREFIX, VerlJob

DOC = Path(__file__).resolve().parents[2] / "docs" / "reproduce.md"
DOC_METHOD, DOC_MODEL = "ctpo", "Qwen3-14B"

ROLLOUT = "actor_rollout_ref.rollout."
ACTOR = "actor_rollout_ref.actor."
SH = "ctpo.sh"


@dataclass(frozen=True)
class Setting:
    """One row: ``key`` is read from the composed config (a verl key, or ``ctpo.*`` of our section)."""

    name: str
    key: str
    paper: str
    authors: Any
    """The authors' value, comparable to ours (None: theirs has no such setting)."""
    authors_file: str
    why: str = ""
    """Why ours differs from the authors' (empty: it must not)."""
    read: Callable[[Any], Any] | None = None
    """How to turn the config value into the compared one (default: as is)."""
    ctpo_only: bool = False
    """A CTPO loss setting (the authors' release trains CTPO only): not shown for the other methods."""


def _names(paths: Any) -> list[str]:
    return [Path(p).stem for p in (paths if isinstance(paths, list | tuple) else [paths])]


def _timeout(tir: Any) -> float:
    return get_protocol(str(tir)).run_timeout


def _blocked_patterns(tir: Any) -> int:
    return len(get_protocol(str(tir)).blocked_code)


SETTINGS: tuple[Setting, ...] = (
    # data and batch
    Setting(
        "training set",
        "data.train_files",
        "DeepScaleR, ~40K problems (§6)",
        ["deepscaler_train"],
        f"{SH} TRAIN_FILES: dataset/deepscaler/train.parquet",
        read=_names,
    ),
    Setting("prompts per step", "data.train_batch_size", "512 (§6)", 512, f"{SH} TRAIN_BATCH_SIZE"),
    Setting("responses per prompt G", ROLLOUT + "n", "8 (§1, §6)", 8, f"{SH} ROLLOUT_N"),
    Setting(
        "PPO mini-batch (prompts)",
        ACTOR + "ppo_mini_batch_size",
        "32: 16 optimizer steps per batch (§6)",
        32,
        f"{SH} PPO_MINI_BATCH_SIZE",
    ),
    Setting("epochs per batch", ACTOR + "ppo_epochs", "1 (§6)", 1, "verl default"),
    Setting("learning rate", ACTOR + "optim.lr", "1e-6 (§6)", 1e-6, f"{SH} optim.lr"),
    Setting("KL loss", ACTOR + "use_kl_loss", "none (§6)", False, f"{SH} use_kl_loss"),
    Setting("entropy bonus", ACTOR + "entropy_coeff", "0 (§6)", 0, f"{SH} entropy_coeff"),
    Setting("training steps", "trainer.total_training_steps", "about 305 (§6)", 305, f"{SH} TOTAL_STEPS"),
    Setting("max prompt tokens", "data.max_prompt_length", "16,000 (§6)", 16000, f"{SH} MAX_PROMPT_LENGTH"),
    Setting(
        "max response tokens (tool output included)",
        "data.max_response_length",
        "8,000 (§6)",
        8000,
        f"{SH} MAX_RESPONSE_LENGTH",
    ),
    Setting(
        "Qwen3 thinking mode",
        "data.apply_chat_template_kwargs.enable_thinking",
        "off (§6)",
        False,
        f"{SH} ENABLE_THINKING",
    ),
    # rollout
    Setting("rollout engine", ROLLOUT + "name", "vLLM, async (§6)", "vllm", f"{SH} rollout.name"),
    Setting("rollout temperature", ROLLOUT + "temperature", "not stated", 1.0, "verl default"),
    Setting("rollout top_p", ROLLOUT + "top_p", "not stated", 1.0, "verl default"),
    Setting(
        "advantage",
        "algorithm.adv_estimator",
        "GRPO outcome advantage (§1 (4))",
        "grpo",
        f"{SH} adv_estimator",
    ),
    # loss
    Setting(
        "policy loss",
        ACTOR + "policy_loss.loss_mode",
        "CTPO (§2 (9))",
        "ctpo/ctpo",
        f"{SH} loss_mode=cum-token-cumprod-la (their verl fork)",
        ctpo_only=True,
    ),
    Setting(
        "a_low", ACTOR + "policy_loss.ctpo_clip_low", "0.025 (§2)", 0.025, f"{SH} LA_CLIP_LOW", ctpo_only=True
    ),
    Setting(
        "a_high",
        ACTOR + "policy_loss.ctpo_clip_high",
        "0.05 (§2)",
        0.05,
        f"{SH} LA_CLIP_HIGH",
        ctpo_only=True,
    ),
    Setting(
        "a_c (dual clip)",
        ACTOR + "policy_loss.ctpo_clip_c",
        "0.05 (§2)",
        0.05,
        f"{SH} LA_CLIP_C",
        ctpo_only=True,
    ),
    Setting(
        "position exponent p",
        ACTOR + "policy_loss.ctpo_power",
        "0.5 (§2)",
        0.5,
        f"{SH} CLIP_RATIO_LA_POWER",
        ctpo_only=True,
    ),
    Setting(
        "loss aggregation",
        ACTOR + "loss_agg_mode",
        "token-mean (§3)",
        "token-mean",
        "verl default",
        ctpo_only=True,
    ),
    Setting(
        "rollout IS correction",
        "algorithm.rollout_correction.rollout_is",
        "not stated",
        "sequence",
        f"{SH} ROLLOUT_IS_LEVEL (run names: issequence_th5.0)",
    ),
    Setting(
        "rollout IS threshold",
        "algorithm.rollout_correction.rollout_is_threshold",
        "not stated",
        5.0,
        f"{SH} ROLLOUT_IS_THRESHOLD",
    ),
    Setting(
        "rollout IS batch normalisation",
        "algorithm.rollout_correction.rollout_is_batch_normalize",
        "not stated",
        False,
        f"{SH} ROLLOUT_IS_BATCH_NORM",
    ),
    # tools
    Setting(
        "tool protocol",
        "ctpo.tir",
        "Python in a sandbox, output back as a tool message (§6)",
        "authors",
        "tool_agent_loop.py, tool_parser.py (VERL_HERMES_FALLBACK=1), local_sandbox_tool_config.yaml",
    ),
    Setting(
        "tool parser (which code runs)",
        ROLLOUT + "multi_turn.format",
        "not stated",
        "ctpo_authors",
        "tool_parser.py: first JSON call, else first code block anywhere",
    ),
    Setting(
        "tool message cap (characters)",
        ROLLOUT + "multi_turn.max_tool_response_length",
        "not stated",
        256,
        "verl default, not overridden in ctpo.sh",
    ),
    Setting(
        "tool message cut",
        ROLLOUT + "multi_turn.tool_response_truncate_side",
        "not stated",
        "middle",
        "verl default",
    ),
    Setting(
        "seconds per program",
        "ctpo.tir",
        "not stated",
        30.0,
        "local_sandbox_tool_config.yaml default_timeout",
        read=_timeout,
    ),
    Setting(
        "code patterns the tool refuses",
        "ctpo.tir",
        "not stated",
        24,
        "local_sandbox_tool.py strict mode (block_dangerous_code: true): while True, threading, eval(, "
        "open(..., 'w'), os.environ, ...",
        read=_blocked_patterns,
    ),
    Setting(
        "assistant turns", ROLLOUT + "multi_turn.max_assistant_turns", "up to 5 (§6)", 5, f"{SH} MAX_TURNS"
    ),
    Setting("user (tool) turns", ROLLOUT + "multi_turn.max_user_turns", "not stated", 5, f"{SH} MAX_TURNS"),
    Setting(
        "tool calls per turn", ROLLOUT + "multi_turn.max_parallel_calls", "not stated", 1, "verl default"
    ),
    # reward
    Setting(
        "reward",
        "ctpo.reward",
        "1 if the answer is correct, else 0 (§1)",
        "authors",
        "verl/utils/reward_score/__init__.py: any of math_reward, math_dapo, math_verify",
    ),
    # validation and checkpoints
    Setting(
        "validation sets",
        "data.val_files",
        "avg@32 on AIME25, AIME26, HMMT Nov 25, BRUMO 25 (§7)",
        ["aime25", "aime26"],
        f"{SH} VAL_FILES",
        read=_names,
    ),
    Setting("validation samples", ROLLOUT + "val_kwargs.n", "32 (§7)", 32, f"{SH} N_VAL"),
    Setting(
        "validation temperature", ROLLOUT + "val_kwargs.temperature", "0.7 (§7)", 0.7, f"{SH} VAL_TEMPERATURE"
    ),
    Setting("validation top_p", ROLLOUT + "val_kwargs.top_p", "1.0 (§7)", 1.0, "verl default"),
    Setting("validation every", "trainer.test_freq", "20 steps (§6)", 20, f"{SH} TEST_FREQ"),
    Setting(
        "validation before training",
        "trainer.val_before_train",
        "not stated",
        False,
        f"{SH} val_before_train",
    ),
    Setting("checkpoint every", "trainer.save_freq", "not stated", 20, f"{SH} SAVE_FREQ"),
    # hardware and memory
    Setting("GPUs", "trainer.n_gpus_per_node", "8 H100/H200, one node (§6)", 8, f"{SH} NGPUS"),
    Setting(
        "parameter offload", ACTOR + "fsdp_config.param_offload", "not stated", True, f"{SH} param_offload"
    ),
    Setting(
        "optimizer offload",
        ACTOR + "fsdp_config.optimizer_offload",
        "not stated",
        True,
        f"{SH} optimizer_offload",
    ),
    Setting("dynamic batching", ACTOR + "use_dynamic_bsz", "not stated", False, "verl default"),
    Setting(
        "micro-batch per GPU",
        ACTOR + "ppo_micro_batch_size_per_gpu",
        "not stated",
        1,
        f"{SH} PPO_MICRO_BATCH_SIZE",
    ),
    Setting(
        "rollout tensor parallel",
        ROLLOUT + "tensor_model_parallel_size",
        "not stated",
        1,
        f"{SH} ROLLOUT_TP",
        why="2 for the 14B preset, with Ulysses 2 in the actor: our choice for 24K-token sequences; "
        "untested on GPUs (set it to 1 to match)",
    ),
    Setting(
        "rollout GPU memory share",
        ROLLOUT + "gpu_memory_utilization",
        "not stated",
        0.6,
        f"{SH} ROLLOUT_GPU_UTIL",
    ),
)
"""The compared settings of a verl run (see the module docstring)."""

NOT_REPRODUCED: tuple[tuple[str, str, str], ...] = (
    (
        "math-verify timeouts",
        "verl/utils/reward_score (their copy, in reward threads)",
        "ours run where math-verify's SIGALRM timeout works (a process pool); in threads answers such as "
        "025 vs 25 could score 0 (method.md §8)",
    ),
    (
        "reward scorers' code",
        "their modified math_verify.py (gold normalisation) and math_dapo.py",
        "we call the installed verl 0.9.1's scorers unmodified (its math_dapo adds a \\boxed{} fallback)",
    ),
    (
        "sandbox",
        "sandbox/sandbox_api.py (firejail/bwrap/subprocess)",
        "ours isolates every program (bubblewrap, namespaces, cgroups, no network); their tool's pattern "
        "block list is reproduced by the authors protocol (above)",
    ),
    ("void-turn masking", f"{SH} MASK_VOID_TURNS=False", "off in theirs; not implemented here"),
    ("weight-sync bucket", f"{SH} update_weights_bucket_megabytes=4096", "speed only; verl's default here"),
    (
        "dataset prompts",
        "their parquet files (not in the release's git history)",
        "ours from `ctpo data prepare`; the protocol's system prompt replaces ours (tir/protocol.py)",
    ),
)
"""What the authors' release does that ``ctpo`` knowingly does not (no key to compare)."""


def _value(job: VerlJob, key: str) -> Any:
    if key.startswith("ctpo."):
        return getattr(job.experiment.ctpo, key.removeprefix("ctpo."))
    value = OmegaConf.select(job.config, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    return str(value)


def rows(job: VerlJob) -> list[dict[str, str]]:
    """The manifest of ``job``: one dict per setting (name, key, ours, paper, authors, note)."""
    table = []
    ctpo = job.experiment.ctpo.method == "ctpo"
    for setting in SETTINGS:
        if setting.ctpo_only and not ctpo:
            continue
        ours = _value(job, setting.key)
        compared = setting.read(ours) if setting.read else ours
        same = compared == setting.authors
        note = "same" if same else setting.why
        if not same and not setting.why:
            source = job.experiment.sources.get(setting.key.removeprefix(LOSS_PREFIX), None)
            note = f"differs (set by {source})" if source else "differs"
        table.append(
            {
                "setting": setting.name,
                "key": setting.key,
                "ours": _show(compared),
                "paper": setting.paper,
                "authors": f"{_show(setting.authors)} ({setting.authors_file})",
                "note": note,
            }
        )
    return table


def undocumented(job: VerlJob) -> list[str]:
    """Settings of ``job`` that differ from the authors' with no documented reason."""
    return [row["setting"] for row in rows(job) if row["note"].startswith("differs")]


def markdown(job: VerlJob, command: str) -> str:
    """The manifest as a Markdown document."""
    lines = [
        "# Reproducing the paper's runs: every setting, ours next to the paper's and the authors'",
        "",
        f"Generated by `python -m ctpo_cli.train.manifest` from the composed config of `{command}`",
        "(`ctpo train ... --dry-run --explain` prints the same table for any method and preset). Paper:",
        "arXiv 2605.07331 as restated in [method.md](method.md) (section numbers there). Authors:",
        "[horizon-llm/CTPO](https://github.com/horizon-llm/CTPO) at its initial release; a key their",
        "`ctpo.sh` does not set has verl's default. By default `ctpo train` reproduces their run; our",
        "cleaner choices are named alternatives: `ctpo.tir=ctpo` (tool protocol) and `ctpo.reward=strict`",
        "(reward), in an experiment file or on the command line. `ctpo eval` reports avg@k under both",
        "rewards and takes `--tir authors|ctpo`.",
        "",
        "| setting | key | ours | paper | authors (file) | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows(job):
        cells = [row[c].replace("|", "\\|") for c in ("setting", "key", "ours", "paper", "authors", "note")]
        cells[1] = f"`{cells[1]}`"
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## What the authors' release does that ctpo knowingly does not",
        "",
        "| what | theirs | ours |",
        "|---|---|---|",
        *(f"| {what} | {theirs} | {ours} |" for what, theirs, ours in NOT_REPRODUCED),
        "",
        "The tiny-cpu preset (verl on this machine's CPU) uses `ctpo.tir=ctpo`: its warm-started 0.3M-parameter",
        "model speaks that protocol and the authors' prompt would not fit its 96-token prompts.",
        "",
    ]
    return "\n".join(lines)


def print_explain(job: VerlJob, print_line: Callable[[str], None] = print) -> None:
    """The manifest of ``job`` for ``ctpo train --dry-run --explain``: one line per setting."""
    table = rows(job)
    width = max(len(row["setting"]) for row in table)
    print_line("# reproduction manifest: ours | paper | authors (file) | note  (docs/reproduce.md)")
    for row in table:
        print_line(
            f"# {row['setting']:<{width}}  {row['ours']} | {row['paper']} | {row['authors']} | {row['note']}"
        )


def doc_job(runs_dir: str | Path) -> VerlJob:
    """The job docs/reproduce.md describes (composed offline; nothing is written under ``runs_dir``)."""
    from ctpo_cli.train.experiments import build_job, compose_experiment

    return build_job(compose_experiment(DOC_METHOD, DOC_MODEL, runs_dir=runs_dir))


def main(argv: Sequence[str] = ()) -> None:
    """Write docs/reproduce.md."""
    import tempfile

    with tempfile.TemporaryDirectory() as runs:
        text = markdown(doc_job(runs), f"ctpo train --method {DOC_METHOD} --model {DOC_MODEL}")
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
