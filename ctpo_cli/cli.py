"""The ``ctpo`` command. Commands are thin: each imports its implementation lazily, so start-up stays fast
(``import verl`` alone takes seconds) and ``ctpo --help`` never touches torch or verl."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from types import ModuleType

import typer
from rich.console import Console
from rich.markup import escape

from ctpo_cli.errors import BackendUnavailable, ConfigError, UserError
from dataset import DATA_DIR
from sandbox.config import WithoutCgroups

app = typer.Typer(
    name="ctpo",
    help="Which importance-sampling ratio should a policy-gradient trainer use? GRPO vs GSPO vs CTPO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: timings as ratios against a named baseline in the same run.")
app.add_typer(bench_app, name="bench")
plot_app = typer.Typer(
    help="Figures from runs (run dirs, MLflow run ids or names; default: the latest run of each method).",
    no_args_is_help=True,
)
app.add_typer(plot_app, name="plot")

LOG_WIDTH = 200
"""Columns of a table written off a terminal (a pipe, a log file): wide enough that no header is elided."""
console = Console(width=None if sys.stdout.isatty() else LOG_WIDTH)


@app.command()
def methods() -> None:
    """Table of every method: its IS ratio, clip rule, default hyperparameters and paper."""
    from rich.table import Table

    from ctpo_cli.algo.losses import METHODS

    table = Table(title="IS-ratio methods (ctpo_cli.algo.losses)")
    for column in ("method", "ratio", "clip rule", "defaults", "paper"):
        table.add_column(column, overflow="fold")
    for m in METHODS.values():
        defaults = ", ".join(f"{k}={v:.4g}" for k, v in m.defaults.items())
        if m.fixed_agg_mode:
            defaults += f", agg={m.fixed_agg_mode}"
        table.add_row(m.name, m.ratio, m.clip_rule, defaults, m.paper)
    console.print(table)


BACKENDS = ("verl", "local")


def torch_device(value: str) -> str:
    """A ``--device`` option: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not cpu, cuda or cuda:N")
    return value


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides of the experiment (verl keys, ctpo.*); +key=value goes to verl as is."
    ),
    method: str = typer.Option(..., "--method", "-m", help="grpo, gspo, ctpo, ctpo-fixed or seq-is."),
    model: str | None = typer.Option(
        None,
        help="verl: preset Qwen3-14B (default), Qwen3-4B or qwen3-0.6b-1gpu, a preset file or a model path; "
        "local: a checkpoint (default: the tiny model).",
    ),
    backend: str = typer.Option("verl", help="verl (GPU cluster, the paper's runs) or local (this machine)."),
    seed: int | None = typer.Option(
        None, min=0, help="Random seed (verl default: the experiment's; local: 0)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="verl: print the composed config and command; run nothing."
    ),
    explain: bool = typer.Option(
        False,
        "--explain",
        help="with --dry-run: every setting next to the paper's and the authors' (docs/reproduce.md).",
    ),
    experiment: list[Path] = typer.Option(
        [], "--experiment", "-e", help="verl: extra experiment YAML (repeatable)."
    ),
    out: Path = typer.Option(Path("runs"), help="Runs directory (one sub-directory per run)."),
    sandbox_url: str | None = typer.Option(
        None, envvar="CTPO_SANDBOX_URL", help="verl: use this sandbox service instead of starting one."
    ),
    preset: str = typer.Option("tiny", help="local: configuration preset."),
    device: str = typer.Option("cpu", callback=torch_device, help="local: cpu or cuda."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="local: continue the latest interrupted run; verl: continue the latest run of the method "
        "from its last verl checkpoint (e.g. with a larger trainer.total_training_steps).",
    ),
) -> None:
    """Train one method: a verl job built from experiments/ (default) or the local backend."""
    from ctpo_cli.algo.losses import get_method

    get_method(method)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "local":
        if experiment or dry_run or explain:
            raise UserError("--experiment, --dry-run and --explain apply to --backend verl only")
        from ctpo_cli.train.local.train import train_local

        train_local(
            method=method,
            model=model,
            seed=0 if seed is None else seed,
            preset=preset,
            overrides=list(overrides or []),
            device=device,
            resume=resume,
            runs_dir=out,
            console=console,
        )
        return
    if explain and not dry_run:
        raise UserError("--explain goes with --dry-run (it prints, it does not launch)")
    from ctpo_cli.train.launcher import TrainingFailed, train_verl

    try:
        run_dir = train_verl(
            method,
            model,
            seed,
            experiment,
            overrides or [],
            out,
            dry_run,
            sandbox_url,
            resume=resume,
            explain=explain,
        )
    except TrainingFailed as failure:
        Console(stderr=True).print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        raise typer.Exit(failure.code) from None
    if run_dir is not None:
        console.print(f"run finished: {run_dir}")


DEFAULT_METHODS = "grpo,gspo,ctpo,ctpo-fixed,seq-is"
INCOMPLETE = 3
"""Exit code of a ``ctpo eval`` some of whose samples failed (see ``n_errors`` in its summary)."""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def quickstart(
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides of the local config (e.g. rl.steps=20)."
    ),
    seed: int = typer.Option(0, min=0, help="Seed shared by every method (same data, same starting policy)."),
    preset: str = typer.Option("tiny", help="Local configuration preset (tiny, smoke)."),
    methods: str = typer.Option(DEFAULT_METHODS, help="Comma-separated."),
    samples: int = typer.Option(8, min=1, help="k of the held-out avg@k."),
    out: Path = typer.Option(Path("runs"), help="Runs directory."),
    figures: Path = typer.Option(Path("figures"), help="Where figures and tables go."),
) -> None:
    """The whole comparison on this machine: train every method, evaluate, plot, report (CPU, minutes)."""
    from ctpo_cli.quickstart import quickstart as run_quickstart

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise ConfigError(f"--methods names no method; e.g. --methods {DEFAULT_METHODS}")
    run_quickstart(seed, preset, chosen, list(overrides or []), samples, out, figures, console)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    overrides: list[str] = typer.Argument(None, help="key=value overrides applied to every cell."),
    methods: str = typer.Option("all", help="all, or comma-separated methods."),
    seeds: str = typer.Option("0-4", help="Seeds: ranges and lists, e.g. 0-4 or 0,3,7."),
    grid: list[str] = typer.Option(
        [], "--grid", help="key=v1,v2: one more axis of the grid (repeatable; every combination runs)."
    ),
    backend: str = typer.Option("local", help="local (Ray tasks) or verl (Ray jobs on --address)."),
    preset: str = typer.Option("tiny", help="local: configuration preset."),
    model: str | None = typer.Option(None, help="Model (as for ctpo train; default: the backend's)."),
    samples: int | None = typer.Option(
        None,
        min=1,
        help="Samples per evaluated problem, the k of avg@k (local: held-out problems, default 8; verl: "
        "the paper's benchmarks, default 32 as its Table 2).",
    ),
    out: Path = typer.Option(Path("sweeps") / "sweep", help="Sweep directory (rerun to resume)."),
    address: str | None = typer.Option(
        None, help="Ray cluster (local: default start one for the sweep; verl: the job server, required)."
    ),
    workers: int | None = typer.Option(
        None, min=1, help="local: CPUs of the Ray started here (default: all)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the grid (verl: the job commands); run nothing."
    ),
) -> None:
    """A grid of runs (methods x seeds x --grid overrides) on Ray, resumable, evaluated, with one report."""
    from ctpo_cli.sweep.grid import SweepSpec, parse_grid, parse_methods, parse_seeds

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    spec = SweepSpec(
        backend=backend,
        preset=preset,
        model=model,
        methods=tuple(parse_methods(methods)),
        seeds=tuple(parse_seeds(seeds)),
        override_sets=tuple(parse_grid(grid)),
        common=tuple(overrides or []),
        samples=samples or (32 if backend == "verl" else 8),
    )
    if dry_run:
        from ctpo_cli.sweep.run import print_grid

        print_grid(spec, out, console)
        return
    from ctpo_cli.sweep.run import SweepFailed, run_sweep

    try:
        report = run_sweep(spec, out, address, workers, console)
    except SweepFailed as failure:
        Console(stderr=True).print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"sweep finished: report in {report}")


@bench_app.command("loss")
def bench_loss(
    batch: int = typer.Option(64, min=1, help="Responses per micro-batch."),
    length: int = typer.Option(8192, min=1, help="Tokens per response."),
    rounds: int = typer.Option(5, min=1, help="Interleaved rounds (baseline, every method, baseline)."),
    calls: int = typer.Option(3, min=1, help="Timed forward+backward passes per contestant and round."),
    device: str = typer.Option("cpu", callback=torch_device, help="cpu or cuda."),
    out: str = typer.Option("", help="Also write the table as CSV here."),
) -> None:
    """Time forward+backward of every method against verl's built-in `vanilla` loss (same run)."""
    from ctpo_cli.bench.loss import bench_losses

    bench_losses(
        batch=batch,
        length=length,
        rounds=rounds,
        calls=calls,
        device=device,
        out=out or None,
        console=console,
    )


@bench_app.command("sandbox")
def bench_sandbox(
    requests: int = typer.Option(40, min=1, help="Runs per timed batch (one measured call of the harness)."),
    concurrency: str = typer.Option("1,8,32", help="Comma-separated numbers of concurrent clients."),
    rounds: int = typer.Option(5, min=1, help="Interleaved rounds (bare, sandbox, bare) per concurrency."),
    out: str = typer.Option("", help="Also write the table as CSV here."),
) -> None:
    """Executions/s and p50/p99 latency of a trivial program: sandbox service vs bare `python -c`."""
    from ctpo_cli.bench.sandbox import bench_sandbox as run_bench

    try:
        levels = [int(level) for level in concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency must be comma-separated integers >= 1, not {concurrency!r}")
    run_bench(requests=requests, concurrencies=levels, rounds=rounds, out=out or None, console=console)


sandbox_app = typer.Typer(help="The isolated Python execution service (bubblewrap).", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("serve")
def sandbox_serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8080, min=0, max=65535, help="TCP port (0: any free port)."),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes."),
    max_concurrency: int | None = typer.Option(
        None, min=1, help="Programs running at once per worker (default: number of CPUs); others queue."
    ),
    unsafe_no_isolation: bool = typer.Option(
        False, "--unsafe-no-isolation", help="Run programs WITHOUT bubblewrap isolation (throwaway hosts)."
    ),
    settings: list[str] | None = typer.Option(
        None, "--set", help="NAME=VALUE, repeatable: a limit of sandbox.config.SandboxConfig, e.g. nproc=128."
    ),
    without_cgroups: WithoutCgroups = typer.Option(
        WithoutCgroups.warn,
        help="Where no cgroup can bound a request: warn (per-process limits only) or refuse.",
    ),
) -> None:
    """SandboxFusion-compatible POST /run_code and GET /health; refuses to start without bubblewrap."""
    from sandbox.config import SandboxConfig
    from sandbox.executor import check_isolation
    from sandbox.server import serve

    options = [*(settings or []), f"without_cgroups={without_cgroups.value}"]
    try:  # (the sandbox is standalone: its errors are built-in ones, the user's here)
        config = SandboxConfig(isolate=not unsafe_no_isolation).with_settings(options)
    except ValueError as error:
        raise ConfigError(f"--set: {error}") from None
    try:
        check_isolation(config)
    except (FileNotFoundError, ValueError) as error:
        raise BackendUnavailable(str(error)) from None
    serve(host, port, workers, max_concurrency, unsafe_no_isolation, options)


RUNS_HELP = "Run dirs, run names under runs/, MLflow run ids or names (default: latest run of each method)."
STEPS_HELP = "Comma-separated steps (nearest available); default: early, mid and late steps."
ONPOLICY_HELP = "Also use each step's on-policy first mini-batch (pi = mu there, K_t ~ 0)."


@plot_app.command("std-growth")
def plot_std_growth(
    runs: list[str] | None = typer.Argument(None, help=RUNS_HELP, show_default=False),
    steps: str = typer.Option("", help=STEPS_HELP),
    include_onpolicy: bool = typer.Option(False, help=ONPOLICY_HELP),
    scale: str = typer.Option("log", help="Axis scale of both axes: log or linear."),
    out: str = typer.Option("figures", help="Directory for the PNG, PDF and CSV files."),
    mlflow: bool = typer.Option(True, help="Log the files to each run's MLflow record."),
) -> None:
    """std of the cumulative log ratio K_t against position t, with the σ√t and free power-law fits."""
    from analysis.commands import Options, parse_steps, std_growth

    if scale not in ("log", "linear"):
        raise UserError(f"--scale must be log or linear, not {scale!r}")
    std_growth(runs or [], parse_steps(steps), include_onpolicy, scale, Options(Path(out), mlflow, console))


@plot_app.command("clip-rate")
def plot_clip_rate(
    runs: list[str] | None = typer.Argument(None, help=RUNS_HELP, show_default=False),
    steps: str = typer.Option("", help=STEPS_HELP),
    include_onpolicy: bool = typer.Option(False, help=ONPOLICY_HELP),
    bins: int = typer.Option(24, min=2, help="Log-spaced position bins (at most)."),
    out: str = typer.Option("figures", help="Directory for the PNG, PDF and CSV files."),
    mlflow: bool = typer.Option(True, help="Log the files to each run's MLflow record."),
) -> None:
    """Clip rate by position of the fixed window vs the √t window, and its late/early uniformity."""
    from analysis.commands import Options, clip_rate, parse_steps

    clip_rate(runs or [], parse_steps(steps), include_onpolicy, bins, Options(Path(out), mlflow, console))


@plot_app.command("curves")
def plot_curves(
    runs: list[str] | None = typer.Argument(None, help=RUNS_HELP, show_default=False),
    smooth: int = typer.Option(1, min=1, help="Rolling mean over this many logged steps (not validation)."),
    out: str = typer.Option("figures", help="Directory for the PNG and PDF files."),
    mlflow: bool = typer.Option(True, help="Log the files to each run's MLflow record."),
) -> None:
    """Reward, validation avg@k, clip fraction, KL and response length against step, per method."""
    from analysis.commands import Options, curves

    curves(runs or [], smooth, Options(Path(out), mlflow, console))


@app.command()
def report(
    runs: list[str] | None = typer.Argument(
        None,
        help=RUNS_HELP + " Eval dirs outside a run (ctpo eval --model M) count as 'base'.",
        show_default=False,
    ),
    eval_name: str = typer.Option(
        "", "--eval", help="Read <run>/eval/<EVAL>/ (default: eval/ itself, else its newest sub-directory)."
    ),
    out: str = typer.Option("figures", help="Directory for the Markdown and CSV tables."),
    mlflow: bool = typer.Option(True, help="Log the tables to each run's MLflow record."),
) -> None:
    """Table 2 (method x benchmark avg@k, 95% intervals), the ablation, and clipping by position."""
    from analysis.commands import Options, run_report

    run_report(runs or [], Options(Path(out), mlflow, console), eval_name)


@app.command()
def theory(
    vocab: int = typer.Option(3, min=2, help="Vocabulary size V (at least 2)."),
    horizon: int | None = typer.Option(
        None, help="Steps T. Default 6; --monte-carlo: 64, run at T, T/2, T/4, T/8.", show_default=False
    ),
    drift: float = typer.Option(0.3, help="Behaviour logits = target logits + drift * N(0, 1)."),
    seeds: int | None = typer.Option(
        None, help="Random problems (seeds 0..N-1). Default 8; --monte-carlo: 4.", show_default=False
    ),
    monte_carlo: bool = typer.Option(
        False, "--monte-carlo", help="Markov policies, long horizons: sampled estimates against exact values."
    ),
    samples: int = typer.Option(
        20_000, min=2, help="--monte-carlo: sequences drawn from mu per seed and horizon."
    ),
    advantage: str = typer.Option(
        "q", help="Per-token signal: q = Q^pi, a = Q^pi - V^pi(s_t), outcome = R(y) (exact mode only)."
    ),
    shared_parameters: bool = typer.Option(
        False,
        "--shared-parameters",
        help="Exact mode: Markov policies whose positions share one parameter table (as in an LLM).",
    ),
    out: str = typer.Option("", help="--monte-carlo: write theory_positions.csv and the figure here."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
) -> None:
    """The paper's Table 1, computed: bias and variance of the token, cumulative, full and geometric IS ratios."""
    import json
    from pathlib import Path

    from rich.table import Table

    from ctpo_cli.theory import exact as th

    if out and not monte_carlo:
        raise ConfigError("--out needs --monte-carlo (the exact mode writes no files)")
    if shared_parameters and monte_carlo:
        raise ConfigError("--shared-parameters is for the exact mode (per-position variances do not change)")
    steps = horizon if horizon is not None else (64 if monte_carlo else 6)
    count = seeds if seeds is not None else (4 if monte_carlo else 8)
    files: list[Path] = []
    study: th.ExactStudy | th.MonteCarloStudy
    if monte_carlo:
        sampled = th.run_monte_carlo_study(vocab, steps, drift, count, samples, advantage)
        if out:
            import pandas as pd

            from ctpo_cli.theory.figure import plot_variance_by_position

            Path(out).mkdir(parents=True, exist_ok=True)
            files = [Path(out) / "theory_positions.csv"]
            sampled.write_csv(files[0])
            files += plot_variance_by_position(pd.DataFrame(sampled.positions), Path(out))
        study = sampled
    else:
        study = th.run_exact_study(vocab, steps, drift, count, advantage, shared_parameters)
    if json_output:
        print(json.dumps({**study.to_json(), "files": [str(p) for p in files]}))
        return
    text = study.table()
    table = Table(title=escape(text.title), caption=escape(text.caption))
    for column in text.columns:
        table.add_column(column, overflow="fold")
    for row in text.rows:
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    for path in files:
        console.print(f"wrote {path}")


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        "", help="Model directory (HF format). Default: the latest checkpoint under runs/."
    ),
    benchmarks: str = typer.Option(
        "",
        help="Comma-separated benchmark names or .parquet paths. Default: the paper's four (aime25,aime26,hmmt_nov_2025,brumo_2025).",
    ),
    n: int = typer.Option(32, "--n", min=1, help="Samples per problem: the k of avg@k."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling threshold."),
    max_turns: int = typer.Option(5, min=1, help="Assistant turns per sample (tool calls <= max_turns - 1)."),
    max_tokens: int = typer.Option(8000, min=1, help="Response token budget, tool output included."),
    tools: bool = typer.Option(
        True, "--tools/--no-tools", help="Run the model's python blocks in the sandbox."
    ),
    tir: str = typer.Option(
        "authors",
        help="Tool protocol: authors (the authors' released run, as training by default) or ctpo (ours).",
    ),
    reward: str = typer.Option(
        "authors",
        help="Headline reward (avg@k, CI, pass@k): authors or strict; both are reported side by side.",
    ),
    backend: str = typer.Option(
        "auto", help="auto, hf (transformers), vllm (offline engine) or openai (--base-url)."
    ),
    base_url: str = typer.Option(
        "", help="OpenAI-compatible server, e.g. http://localhost:8000 of `vllm serve`."
    ),
    out: str = typer.Option(
        "", help="Output directory. Default: runs/<run>/eval for a run's checkpoint, else evals/<model>."
    ),
    sandbox_url: str = typer.Option(
        "", help="Sandbox service ($CTPO_SANDBOX_URL); default: start one for the eval."
    ),
    data_dir: str = typer.Option(
        str(DATA_DIR),
        help="Where `ctpo data prepare` wrote the benchmarks (the shipped sets are found without it).",
    ),
    seed: int = typer.Option(0, min=0, help="Base seed of the per-sample seeds."),
    batch_size: int = typer.Option(0, min=0, help="Samples generated together (0: the backend's default)."),
    rescore: bool = typer.Option(False, "--rescore", help="Re-score saved generations; no model is loaded."),
    prompt_as_is: bool = typer.Option(
        False, "--prompt-as-is", help="Use the benchmark's messages unchanged (no system prompt added)."
    ),
) -> None:
    """avg@k with tool-integrated reasoning (the paper's Table 2), resumable; summary in <out>/ and MLflow."""
    from pathlib import Path

    from ctpo_cli.eval.runner import resolve_model, run_eval
    from ctpo_cli.eval.settings import EvalSettings
    from dataset.registry import PAPER_BENCHMARKS

    settings = EvalSettings(
        model=resolve_model(model or None, Path(out) if out else None, rescore, console),
        benchmarks=tuple(b.strip() for b in benchmarks.split(",") if b.strip())
        if benchmarks
        else PAPER_BENCHMARKS,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_turns=max_turns,
        max_tokens=max_tokens,
        tools=tools,
        tir=tir,
        reward=reward,
        backend=backend,
        out=Path(out) if out else None,
        base_url=base_url or None,
        sandbox_url=sandbox_url or None,
        data_dir=data_dir,
        seed=seed,
        batch_size=batch_size,
        rescore=rescore,
        prompt_as_is=prompt_as_is,
    )
    summary = run_eval(settings, console)
    failed = int(summary.loc[summary["benchmark"] != "average", "n_errors"].sum())
    if failed:
        Console(stderr=True).print(
            f"[bold yellow]incomplete:[/] {failed} samples failed after retries (named in summary.md, left "
            "out of avg@k); run the same command again to generate them",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(INCOMPLETE)


@bench_app.command("scoring")
def bench_scoring(
    answers: int = typer.Option(
        2000, min=1, help="Responses to score (8 per ground truth, about half right)."
    ),
    workers: int = typer.Option(2, min=1, help="Worker processes of the scoring pool."),
    rounds: int = typer.Option(3, min=1, help="Interleaved rounds (baseline, pool, baseline)."),
    out: str = typer.Option("", help="Also write the table as CSV here."),
) -> None:
    """Answers/s of score_batch (math-verify worker pool) vs math-verify called in-process."""
    from ctpo_cli.bench.scoring import bench_scoring as run_bench

    run_bench(answers=answers, workers=workers, rounds=rounds, out=out or None, console=console)


data_app = typer.Typer(help="Datasets in verl's parquet format.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    datasets: str = typer.Option(
        "", help="Comma-separated registry names. Default: all, or none with --from-file."
    ),
    from_file: list[str] = typer.Option(
        [], help="NAME=PATH of a local parquet/JSON/JSONL/CSV file (repeatable)."
    ),
    out: str = typer.Option(str(DATA_DIR), help="Output directory."),
) -> None:
    """Write DeepScaleR and the benchmarks as verl parquet (<out>/<name>.parquet), from the hub or local files."""
    from rich.table import Table

    from dataset.prepare import prepare

    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    table = Table(title="ctpo data prepare")
    for column in ("dataset", "rows", "file", "source"):
        table.add_column(column)
    for item in prepare(names, from_file, out):
        table.add_row(item.name, str(item.rows), str(item.path), item.source)
    console.print(table)


BUG_NOTE = "this is a bug in ctpo; please report it with the traceback above"
INTERRUPTED = (
    "interrupted: everything finished so far is saved; run the same command again to continue "
    "(ctpo train: add --resume)"
)
PATH_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "name too long",
}
"""OSErrors about a path the user chose (``--out``, a runs directory) or a full disk: one line."""


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends a command as Ctrl-C does: runs are recorded KILLED, checkpoints saved, services stopped."""
    raise KeyboardInterrupt


def one_line(error: BaseException) -> str | None:
    """The one line shown for a user's error (not ctpo's): bad input, a missing file, an unavailable
    service, a full or read-only disk, memory; None for anything else (a bug)."""
    from sandbox.client import SandboxUnavailable  # (httpx: imported only when an error is handled)

    click = click_exceptions()
    if isinstance(error, UserError | SandboxUnavailable):
        return str(error)
    if isinstance(error, click.UsageError):
        where = f" (see {error.ctx.command_path} --help)" if error.ctx else ""
        return f"{error.format_message()}{where}"
    if isinstance(error, click.ClickException):
        return error.format_message()
    if isinstance(error, OSError) and error.errno in PATH_ERRORS:
        return f"cannot use {error.filename or 'a file'}: {PATH_ERRORS[error.errno]}"
    if isinstance(error, MemoryError):
        return "out of memory: use a smaller model, batch (--batch-size) or fewer samples"
    return None


def click_exceptions() -> ModuleType:
    """The exceptions of the click that Typer runs on (Typer 0.2x vendors its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def main() -> None:
    """Entry point: a user's error becomes one red line (exit 2; CTPO_DEBUG=1 shows the traceback), any
    other exception its traceback and a note that it is a bug (exit 1); Ctrl-C or SIGTERM (exit 130)
    says what was kept."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # Rich shows progress; no tqdm bars
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = run_app()
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


def run_app() -> int:
    """The app, its errors shown as :func:`main` says; the exit code."""
    click = click_exceptions()
    errors = Console(stderr=True, width=None if sys.stderr.isatty() else LOG_WIDTH)
    try:
        code = app(prog_name="ctpo", standalone_mode=False)
    except click.NoArgsIsHelpError as error:
        error.show()  # the help text, as `ctpo` alone or `ctpo plot` prints it
        return error.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as error:
        line = one_line(error)
        if line is None or os.environ.get("CTPO_DEBUG"):
            traceback.print_exc()
        if line is None:
            errors.print(f"[bold red]error:[/] {BUG_NOTE}", highlight=False, soft_wrap=True)
            return 1
        errors.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        return 2
    if code == 130:
        errors.print(f"[yellow]{INTERRUPTED}[/]", highlight=False, soft_wrap=True)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
