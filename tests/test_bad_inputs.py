"""Every command given bad input: exit code 2, exactly one line on stderr naming the option, key, file or
value (and the valid choices where there are some), never a traceback. In-process through ``ctpo``'s
real entry point (``ctpo_cli.cli.main``), each case in a fresh working directory."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest

from ctpo_cli import cli
from ctpo_cli.runs import rundir

LOCAL = ["train", "--method", "ctpo", "--backend", "local"]
VERL = ["train", "--method", "ctpo", "--dry-run"]
EVAL = ["eval", "--model", "m", "--benchmarks"]
PREP = ["data", "prepare", "--out", "{d}/prepared", "--from-file"]
VERL_SWEEP = ["sweep", "--backend", "verl", "--model", "tiny-cpu", "--seeds", "0"]
LIMIT_S = 60
"""A case still running after this long has started real work instead of rejecting its input."""

CASES: list[tuple[list[str], str]] = [
    # ctpo methods / unknown commands
    (["methods", "--bogus"], "No such option: --bogus"),
    (["methods", "extra"], "Got unexpected extra argument(s) (extra)"),
    (["fly"], "No such command 'fly'"),
    (["bench", "nothing"], "No such command 'nothing'"),
    (["plot", "nothing"], "No such command 'nothing'"),
    # ctpo train, both engines
    (["train"], "Missing option '--method'"),
    (["train", "--method", "ppo"], "unknown method 'ppo'; valid methods: grpo, gspo, ctpo"),
    (["train", "--method", "ctpo", "--backend", "tpu"], "unknown backend 'tpu'; valid backends: verl, local"),
    (
        [*LOCAL, "--experiment", "x.yaml"],
        "--experiment, --dry-run and --explain apply to --backend verl only",
    ),
    ([*LOCAL, "--dry-run"], "--experiment, --dry-run and --explain apply to --backend verl only"),
    ([*LOCAL, "--explain"], "--experiment, --dry-run and --explain apply to --backend verl only"),
    ([*VERL, "ctpo.tir=react"], "ctpo.tir is 'react'; choose one of authors, ctpo"),
    ([*VERL, "ctpo.reward=lenient"], "ctpo.reward is 'lenient'; choose one of authors, strict"),
    ([*LOCAL, "--seed", "-1"], "Invalid value for '--seed': Input should be greater than or equal to 0"),
    ([*LOCAL, "--seed", "abc"], "Invalid value for '--seed'"),
    ([*LOCAL, "--device", "tpu"], "Invalid value for '--device': 'tpu' is not cpu, cuda or cuda:N"),
    ([*LOCAL, "--preset", "huge"], "unknown preset 'huge'; valid presets: drift, smoke, tiny"),
    ([*LOCAL, "rl.stepz=3"], "valid keys: rl.steps"),
    ([*LOCAL, "optim.lr=3"], "unknown override key 'optim.lr'; sections: model, task"),
    ([*LOCAL, "rl.steps"], "override 'rl.steps' is not key=value"),
    ([*LOCAL, "rl.steps=abc"], "bad override 'rl.steps=abc'"),
    ([*LOCAL, "rl.steps=-5"], "rl.steps must be a finite number >= 1, got -5"),
    ([*LOCAL, "rl.steps=0"], "rl.steps must be a finite number >= 1, got 0"),
    ([*LOCAL, "rl.lr=0"], "rl.lr must be a finite number > 0, got 0.0"),
    ([*LOCAL, "rl.lr=nan"], "rl.lr must be a finite number > 0, got nan"),
    ([*LOCAL, "rl.lr=inf"], "rl.lr must be a finite number > 0, got inf"),
    ([*LOCAL, "rl.temperature=-1"], "rl.temperature must be a finite number > 0, got -1.0"),
    ([*LOCAL, "rl.samples_per_prompt=1"], "rl.samples_per_prompt must be a finite number >= 2"),
    ([*LOCAL, "rl.minibatches=3"], "must be divisible by rl.minibatches"),
    ([*LOCAL, "rl.minibatches=0"], "rl.minibatches must be a finite number >= 1"),
    ([*LOCAL, "rl.max_new_tokens=0"], "rl.max_new_tokens must be a finite number >= 1"),
    ([*LOCAL, "rl.grad_clip=-1"], "rl.grad_clip must be a finite number > 0"),
    ([*LOCAL, "rl.val_every=0"], "rl.val_every must be a finite number >= 1"),
    ([*LOCAL, "rl.val_samples=0"], "rl.val_samples must be a finite number >= 1"),
    ([*LOCAL, "rl.checkpoint_every=0"], "rl.checkpoint_every must be a finite number >= 1"),
    ([*LOCAL, "rl.prompts_per_step=0"], "rl.prompts_per_step must be a finite number >= 1"),
    ([*LOCAL, "rl.loss_agg_mode=mean"], "rl.loss_agg_mode 'mean' is not one of token-mean"),
    ([*LOCAL, "warmstart.careless_frac=1.5"], "warmstart.careless_frac must be in [0, 1], got 1.5"),
    ([*LOCAL, "warmstart.tool_frac=-0.1"], "warmstart.tool_frac must be in [0, 1], got -0.1"),
    ([*LOCAL, "warmstart.tool_frac=0.6"], "careless_frac + warmstart.tool_frac must be at most 1"),
    ([*LOCAL, "warmstart.tool_frac=0.2"], "warmstart.tool_frac > 0: the local engine runs no tools"),
    ([*LOCAL, "warmstart.steps=-1"], "warmstart.steps must be a finite number >= 0"),
    ([*LOCAL, "warmstart.lr=0"], "warmstart.lr must be a finite number > 0"),
    ([*LOCAL, "warmstart.batch_size=0"], "warmstart.batch_size must be a finite number >= 1"),
    ([*LOCAL, "model.hidden_size=0"], "model.hidden_size must be a finite number >= 1"),
    ([*LOCAL, "model.num_hidden_layers=-2"], "model.num_hidden_layers must be a finite number >= 1"),
    ([*LOCAL, "task.min_terms=0"], "task.min_terms must be a finite number >= 1"),
    ([*LOCAL, "task.max_terms=2"], "task.max_terms (2) must be >= task.min_terms (8)"),
    ([*LOCAL, "task.num_eval_problems=0"], "task.num_eval_problems must be a finite number >= 1"),
    ([*LOCAL, "loss.ctpo_clip_low=-1"], "ctpo_clip_low must be a finite number >= 0"),
    ([*LOCAL, "loss.ctpo_clip_c=0"], "ctpo_clip_c must be > 0"),
    (
        ["train", "--method", "grpo", "--backend", "local", "loss.clip_ratio_low=1.5"],
        "clip_ratio_low must be in [0, 1)",
    ),
    ([*LOCAL, "loss.nonsense=1"], "loss.nonsense is no method's hyperparameter; valid: clip_ratio"),
    ([*LOCAL, "--resume"], "no interrupted local run of 'ctpo' with a checkpoint under runs"),
    ([*LOCAL, "--model", "{d}/nowhere"], "nowhere is not a Hugging Face checkpoint (no config.json)"),
    (["train", "--method", "ctpo", "--resume"], "no verl run of 'ctpo' with a checkpoint under runs"),
    ([*VERL, "-e", "{d}/missing.yaml"], "missing.yaml not found"),
    ([*VERL, "-e", "{d}/malformed.yaml"], "malformed YAML in"),
    ([*VERL, "-e", "{d}/list.yaml"], "must be a mapping of keys, not a list"),
    ([*VERL, "--model", "Qwen3-99B"], "unknown model preset 'Qwen3-99B'; presets:"),
    ([*VERL, "trainer.nonsense_key=1"], "unknown verl key 'trainer.nonsense_key'"),
    ([*VERL, "data.train_batch_size"], "is not key=value"),
    ([*VERL, "ctpo.method=grpo"], "ctpo.method is 'grpo' but --method is 'ctpo'"),
    ([*VERL, "ctpo.platform=tpu"], "ctpo.platform must be one of cuda, cpu"),
    ([*VERL, "ctpo.loss.nonsense=1"], "ctpo.loss.nonsense is not a field of method 'ctpo'"),
    ([*VERL, "data.train_batch_size=7"], "must be a multiple of"),
    # ctpo quickstart
    (["quickstart", "--methods", "ppo"], "unknown method 'ppo'; valid methods"),
    (
        ["quickstart", "--samples", "0"],
        "Invalid value for '--samples': Input should be greater than or equal to 1",
    ),
    (["quickstart", "--seed", "-3"], "Invalid value for '--seed'"),
    (["quickstart", "--preset", "huge"], "unknown preset 'huge'"),
    (["quickstart", "rl.steps=-5"], "rl.steps must be a finite number >= 1, got -5"),
    (["quickstart", "--methods", ","], "--methods names no method; e.g. --methods grpo,gspo"),
    # ctpo sweep
    (["sweep", "--methods", "ppo"], "--methods: unknown method 'ppo'; valid: all, grpo"),
    (["sweep", "--methods", ","], "--methods is empty; valid: all, grpo"),
    (["sweep", "--seeds", "4-0"], "--seeds takes ranges and lists such as 0-4 or 0,3,7; got '4-0'"),
    (["sweep", "--seeds", "x"], "--seeds takes ranges and lists such as 0-4 or 0,3,7; got 'x'"),
    (["sweep", "--grid", "rl.lr"], "--grid 'rl.lr' is not key=value[,value...]"),
    (["sweep", "--backend", "slurm"], "unknown backend 'slurm'; valid backends: verl, local"),
    (["sweep", "--samples", "0"], "Invalid value for '--samples'"),
    (["sweep", "--workers", "0"], "Invalid value for '--workers'"),
    (["sweep", "--backend", "verl", "--methods", "ctpo", "--seeds", "0"], "give the cluster's --address"),
    (
        [*VERL_SWEEP, "trainer.total_training_step=1"],
        "unknown verl key 'trainer.total_training_step' (from command line)",
    ),
    (
        [*VERL_SWEEP, "--address", "http://127.0.0.1:1"],
        "cannot reach the Ray job server at --address http://127.0.0.1:1: ",
    ),
    # ctpo bench
    (["bench", "loss", "--batch", "0"], "Invalid value for '--batch'"),
    (["bench", "loss", "--length", "-1"], "Invalid value for '--length'"),
    (["bench", "loss", "--rounds", "0"], "Invalid value for '--rounds'"),
    (["bench", "loss", "--calls", "0"], "Invalid value for '--calls'"),
    (["bench", "sandbox", "--rounds", "0"], "Invalid value for '--rounds'"),
    (["bench", "scoring", "--rounds", "0"], "Invalid value for '--rounds'"),
    (["bench", "loss", "--device", "gpu"], "Invalid value for '--device'"),
    (["bench", "sandbox", "--concurrency", "a,b"], "--concurrency must be comma-separated integers >= 1"),
    (["bench", "sandbox", "--concurrency", "0,8"], "--concurrency must be comma-separated integers >= 1"),
    (["bench", "sandbox", "--requests", "0"], "Invalid value for '--requests'"),
    (["bench", "scoring", "--answers", "0"], "Invalid value for '--answers'"),
    (["bench", "scoring", "--workers", "0"], "Invalid value for '--workers'"),
    # ctpo sandbox serve
    (["sandbox", "serve", "--port", "70000"], "Invalid value for '--port'"),
    (["sandbox", "serve", "--port", "-1"], "Invalid value for '--port'"),
    (["sandbox", "serve", "--workers", "0"], "Invalid value for '--workers'"),
    (["sandbox", "serve", "--max-concurrency", "0"], "Invalid value for '--max-concurrency'"),
    (["sandbox", "serve", "--set", "foo=1"], "--set: sandbox setting must be NAME=VALUE with NAME one of"),
    (["sandbox", "serve", "--set", "nproc=abc"], "--set: sandbox setting nproc needs a int, got 'abc'"),
    (["sandbox", "serve", "--set", "nproc"], "--set: sandbox setting must be NAME=VALUE"),
    (["sandbox", "serve", "--set", "nproc=0"], "sandbox setting nproc must be positive"),
    # ctpo plot
    (["plot", "std-growth"], "no runs found under runs/"),
    (["plot", "std-growth", "nope"], "'nope' is neither a run directory nor a run id or name"),
    (["plot", "std-growth", "--scale", "cubic"], "--scale must be log or linear, not 'cubic'"),
    (["plot", "std-growth", "{d}/runs/bare", "--no-mlflow"], "has no per-position diagnostics"),
    (["plot", "std-growth", "{d}/runs"], "is a directory but not a ctpo run directory"),
    (["plot", "clip-rate", "--bins", "1"], "Invalid value for '--bins'"),
    (["plot", "clip-rate", "{d}/runs/bare", "--steps", "a,b"], "--steps takes comma-separated step numbers"),
    (["plot", "clip-rate", "{d}/runs/bare", "--no-mlflow"], "has no per-position diagnostics"),
    (["plot", "curves", "--smooth", "0"], "Invalid value for '--smooth'"),
    (["plot", "curves"], "no runs found under runs/"),
    (["plot", "curves", "{d}/runs/bare", "--no-mlflow"], "no metrics.jsonl"),
    (["plot", "curves", "{d}/runs/torn", "--no-mlflow"], "run.json is damaged"),
    # ctpo report
    (["report"], "no runs found under runs/"),
    (["report", "nope"], "'nope' is neither a run directory nor a run id or name"),
    (["report", "{d}/runs/bare", "--no-mlflow"], "none of these runs has eval results"),
    (["report", "{d}/runs/headeronly", "--no-mlflow"], "none of these runs has eval results"),
    # ctpo theory
    (["theory", "--vocab", "1"], "Invalid value for '--vocab'"),
    (["theory", "--horizon", "0"], "--horizon must be at least 1, got 0"),
    (["theory", "--drift", "-1"], "--drift must be a finite number >= 0, got -1.0"),
    (["theory", "--drift", "nan"], "--drift must be a finite number >= 0, got nan"),
    (["theory", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["theory", "--advantage", "z"], "unknown advantage 'z'; valid: q, a, outcome"),
    (["theory", "--out", "x"], "--out needs --monte-carlo"),
    (["theory", "--shared-parameters", "--monte-carlo"], "--shared-parameters is for the exact mode"),
    (["theory", "--monte-carlo", "--advantage", "outcome"], "advantage 'outcome' needs exact enumeration"),
    (["theory", "--monte-carlo", "--samples", "1"], "Invalid value for '--samples'"),
    (["theory", "--horizon", "40"], "is above the enumeration limit"),
    (["theory", "--monte-carlo", "--samples", "100000000"], "is above the limit of"),
    # ctpo eval
    (["eval", "--n", "0"], "Invalid value for '--n': Input should be greater than or equal to 1"),
    (
        ["eval", "--temperature", "-1"],
        "Invalid value for '--temperature': Input should be greater than or equal to 0",
    ),
    (["eval", "--top-p", "5"], "Invalid value for '--top-p': Input should be less than or equal to 1"),
    (["eval", "--top-p", "-0.1"], "Invalid value for '--top-p'"),
    (["eval", "--max-turns", "0"], "Invalid value for '--max-turns'"),
    (["eval", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    (["eval", "--seed", "-1"], "Invalid value for '--seed'"),
    (["eval", "--batch-size", "-1"], "Invalid value for '--batch-size'"),
    (["eval", "--benchmarks", "aime25"], "no --model given and no trained checkpoint under runs/"),
    ([*EVAL, "aime99"], "unknown dataset 'aime99'; valid names:"),
    ([*EVAL, "aime25", "--tir", "react"], "unknown tool protocol 'react'; choose one of authors, ctpo"),
    ([*EVAL, "aime25", "--reward", "lenient"], "unknown --reward 'lenient'; choose one of authors, strict"),
    ([*EVAL, "aime25,aime25"], "--benchmarks names a benchmark twice"),
    ([*EVAL, "{d}/missing.parquet"], "missing.parquet does not exist"),
    ([*EVAL, "{d}/corrupt.parquet"], "corrupt.parquet is not a readable parquet file"),
    ([*EVAL, "{d}/notverl.parquet"], "notverl.parquet is not in verl format: missing column(s)"),
    ([*EVAL, "{d}/norows.parquet"], "norows.parquet has no rows"),
    ([*EVAL, "{d}/emptyanswer.parquet"], "reward_model of row 1 has no ground_truth"),
    ([*EVAL, "aime25", "--backend", "tpu"], "unknown backend 'tpu'; choose one of auto, hf, vllm, openai"),
    ([*EVAL, "aime25", "--backend", "openai"], "--backend openai needs --base-url"),
    ([*EVAL, "aime25", "--rescore", "--out", "{d}/noeval"], "--rescore: no saved generations for aime25"),
    # ctpo data prepare
    ([*PREP, "my-set={d}/table.csv"], "give it a name, as NAME=PATH"),
    ([*PREP, "x={d}/missing.csv"], "missing.csv does not exist"),
    ([*PREP, "x={d}/notes.txt"], "unsupported file type '.txt'"),
    ([*PREP, "x={d}/broken.json"], "broken.json is not a readable json table"),
    ([*PREP, "x={d}/emptyanswer.csv"], "row 1 has an empty 'answer'"),
    ([*PREP, "x={d}/nocolumns.csv"], "no problem column"),
    ([*PREP, "x={d}/corrupt.parquet"], "corrupt.parquet is not a readable parquet file"),
    (["data", "prepare", "--datasets", "nope"], "unknown dataset 'nope'; valid names:"),
    # files the command cannot write
    (
        ["theory", "--monte-carlo", "--samples", "100", "--out", "{d}/table.csv/sub"],
        "a part of the path is not a directory",
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad files of every kind, and runs that lack what a command needs."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "malformed.yaml").write_text("ctpo: [unclosed\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pd.DataFrame({"question": ["1+1?"]}).to_parquet(d / "notverl.parquet")
    row = {"data_source": "x", "prompt": [{"role": "user", "content": "1+1?"}], "ability": "math"}
    pd.DataFrame([{**row, "reward_model": {"ground_truth": "2"}}]).iloc[:0].to_parquet(d / "norows.parquet")
    pd.DataFrame(
        [{**row, "reward_model": {"ground_truth": "2"}}, {**row, "reward_model": {"ground_truth": ""}}]
    ).to_parquet(d / "emptyanswer.parquet")
    (d / "table.csv").write_text("problem,answer\n1+1?,2\n")
    (d / "notes.txt").write_text("problem: 1+1\n")
    (d / "broken.json").write_text('[{"problem": "1+1?", "answer": ')
    (d / "emptyanswer.csv").write_text("problem,answer\n1+1?,2\n2+2?,\n")
    (d / "nocolumns.csv").write_text("a,b\n1,2\n")
    (d / "noeval").mkdir()
    rundir.write_run_info(d / "runs" / "bare", {"method": "grpo", "seed": 1, "started": "2026-01-01"})
    headeronly = d / "runs" / "headeronly"
    rundir.write_run_info(headeronly, {"method": "gspo", "seed": 1, "started": "2026-01-02"})
    (headeronly / "eval").mkdir()
    (headeronly / "eval" / "summary.csv").write_text("benchmark,avg_at_k\n")
    torn = d / "runs" / "torn"
    torn.mkdir()
    (torn / rundir.RUN_FILE).write_text(json.dumps({"method": "ctpo", "seed": 0})[:12])
    return d


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line(
    args: list[str],
    message: str,
    inputs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("CTPO_DEBUG", "CTPO_SANDBOX_URL", "VERL_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["ctpo", *(a.replace("{d}", str(inputs)) for a in args)])

    def too_long(signum: int, frame: object) -> None:
        raise TimeoutError(f"ctpo {' '.join(args)} ran for {LIMIT_S} s: it did not reject its input")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(LIMIT_S)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], err


def test_the_list_covers_every_command() -> None:
    """At least 110 cases, and each command (and sub-command) has some."""
    from typer.main import get_group

    group = get_group(cli.app)
    commands = {
        (name, sub) if hasattr(command, "commands") else (name,)
        for name, command in group.commands.items()
        for sub in getattr(command, "commands", {None: None})
    }
    covered = {tuple(args[:2]) if (args[0],) not in commands else (args[0],) for args, _ in CASES}
    assert len(CASES) >= 110
    assert commands <= covered, commands - covered
