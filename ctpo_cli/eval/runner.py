"""``ctpo eval``: avg@k with tool-integrated reasoning on competition sets (the paper's Table 2).

Layout: :mod:`~ctpo_cli.eval.settings` (what was asked), :mod:`~ctpo_cli.eval.backends` (generation),
the tool loop of :mod:`ctpo_cli.tir.protocol`, :mod:`~ctpo_cli.eval.store` (saved samples),
:mod:`~ctpo_cli.eval.metrics` (avg@k, pass@k, intervals, tables); this module runs them.

Reliability: each finished sample is appended to ``<out>/generations/<benchmark>.jsonl`` keyed by
(problem id, sample index), so a rerun of the same command generates only what is missing. A sample
that crashes (sandbox unreachable, a rejected request) is recorded with its error, scored wrong and
generated again by the next run. ``--rescore`` re-scores saved generations without a model.

Files in ``<out>``: ``summary.csv`` / ``summary.md`` (columns below, fractions in [0, 1] in the CSV,
percent in the Markdown), ``per_problem.csv``, ``eval_config.json`` (the generation settings that a
resumed run must share) and ``generations/``. An MLflow run (experiment ``ctpo-eval``) gets the params,
``<benchmark>/avg_at_k``, ``/stderr``, ``/pass_at_<k>`` and the summary files as artifacts.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ctpo_cli.errors import ConfigError, InputFileError
from ctpo_cli.eval.backends import Backend, GenerationRequest, make_backend, resolve_backend
from ctpo_cli.eval.metrics import log_summary, mlflow_params, print_summary, summarize, write_outputs
from ctpo_cli.eval.settings import CONFIG_FILE, GENERATIONS_DIR, RESUME_KEYS, EvalSettings
from ctpo_cli.eval.store import GenerationStore
from ctpo_cli.runs import atomic
from ctpo_cli.runs.rundir import CHECKPOINT_DIR, RUN_FILE, latest_checkpoint
from ctpo_cli.tir.protocol import (
    NO_TOOLS_SYSTEM_PROMPT,
    TirProtocol,
    ToolLoop,
    Trajectory,
    execute,
    get_protocol,
    join_turns,
    whole_response,
)
from ctpo_cli.tir.scoring import AUTHORS, REWARDS, STRICT, extract_boxed, score_batch
from dataset.registry import ground_truth, is_path, load_benchmark, prompt_messages


def sample_record(
    job: _Job, trajectory: Trajectory, authors: bool, strict: bool, reward: str
) -> dict[str, Any]:
    """The JSON record of a finished sample; a crashed one keeps what it produced and its error.

    ``correct_authors``: the authors' reward (any of verl's scorers accepts the whole response);
    ``correct_strict``: the strict one (the final ``\\boxed{}`` of the assistant text),
    ``ctpo_cli.tir.scoring``; ``correct``: the headline one, ``reward``."""
    verdicts = {AUTHORS: authors and job.error is None, STRICT: strict and job.error is None}
    return {
        "problem_id": job.problem_id,
        "sample": job.sample,
        "ground_truth": job.truth,
        "answer": extract_boxed(trajectory.response_text),
        "correct": verdicts[reward],
        "correct_authors": verdicts[AUTHORS],
        "correct_strict": verdicts[STRICT],
        "num_turns": trajectory.num_turns,
        "tool_calls": trajectory.tool_calls,
        "tool_errors": trajectory.tool_errors,
        "response_tokens": trajectory.response_tokens,
        "stop_reason": trajectory.stop_reason,
        "turns": [asdict(turn) for turn in trajectory.turns],
        "error": None if job.error is None else f"{type(job.error).__name__}: {job.error}",
    }


# --------------------------------------------------------------------------------------------------
# Running trajectories


def eval_messages(row: pd.Series, protocol: TirProtocol | None, as_is: bool = False) -> list[dict[str, Any]]:
    """The prompt: with tools, the protocol's system prompt as training adds it
    (``TirProtocol.messages``); without tools (``protocol`` None), ``NO_TOOLS_SYSTEM_PROMPT`` in place
    of any system message; ``as_is``: unchanged (for a model trained on exactly these prompts, e.g. the
    local backend's synthetic task)."""
    messages = prompt_messages(row)
    if as_is:
        return messages
    if protocol is not None:
        return protocol.messages(messages)
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": NO_TOOLS_SYSTEM_PROMPT}, *rest]


def sample_seed(seed: int, problem_id: str, sample: int, turn: int) -> int:
    """A reproducible 31-bit seed per (problem, sample, turn)."""
    return zlib.crc32(f"{seed}:{problem_id}:{sample}:{turn}".encode()) & 0x7FFFFFFF


@dataclass(eq=False)
class _Job:
    """One sample being generated: its trajectory so far, or the error that ended it."""

    problem_id: str
    sample: int
    truth: str
    loop: ToolLoop
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.loop.done


def _records(finished: Sequence[_Job], reward: str) -> list[dict[str, Any]]:
    """Records of finished jobs, scored in one batch (a crashed job, cut short, is scored wrong)."""
    trajectories = [
        job.loop.trajectory() if job.error is None else Trajectory(job.loop.messages, job.loop.turns, "error")
        for job in finished
    ]
    truths = [job.truth for job in finished]
    authors = score_batch([t.full_text for t in trajectories], truths, rule=AUTHORS)
    strict = score_batch([t.response_text for t in trajectories], truths, rule=STRICT)
    return [
        sample_record(*item, reward) for item in zip(finished, trajectories, authors, strict, strict=True)
    ]


def run_jobs(
    jobs: list[_Job], backend: Backend, sandbox: Any, settings: EvalSettings, threads: ThreadPoolExecutor
) -> Iterator[list[dict[str, Any]]]:
    """Advance ``jobs`` together turn by turn; yield the records of those that finished at each step.

    One generation call per turn for all unfinished jobs, then their code runs in parallel threads.
    """
    active = list(jobs)
    while active:
        requests = [
            GenerationRequest(
                *job.loop.request(),
                sample_seed(settings.seed, job.problem_id, job.sample, len(job.loop.turns)),
            )
            for job in active
        ]
        calls = []
        for job, result in zip(active, backend.generate(requests), strict=True):
            if isinstance(result, Exception):
                job.error = result
            elif (call := job.loop.add_generation(result)) is not None:
                calls.append(
                    (job, threads.submit(execute, sandbox, call, backend.count_tokens, job.loop.protocol))
                )
        for job, future in calls:
            try:
                job.loop.add_tool_result(future.result())
            except Exception as error:  # the sandbox failed or refused, not the program
                job.error = error
        finished = [job for job in active if job.finished]
        if finished:
            yield _records(finished, settings.reward)
        active = [job for job in active if not job.finished]


# --------------------------------------------------------------------------------------------------
# The command


def model_label(model: str) -> str:
    """``<run name>`` for a run's checkpoint, else the last path part of the model."""
    path = Path(model)
    if path.name == CHECKPOINT_DIR and (path.parent / RUN_FILE).is_file():
        return path.parent.name
    return path.name or model


def resolve_model(model: str | None, out: Path | None, rescore: bool, console: Console) -> str:
    """``model``; for ``--rescore`` with ``--out``, the model recorded there; else the latest checkpoint
    trained in this directory (printed); else a one-line error saying how to pass ``--model``."""
    if model:
        return model
    if rescore and out is not None and (out / CONFIG_FILE).is_file():
        return str(json.loads((out / CONFIG_FILE).read_text())["model"])
    checkpoint = latest_checkpoint()
    if checkpoint is None:
        raise InputFileError(
            "no --model given and no trained checkpoint under runs/: pass --model PATH (a Hugging Face model directory)"
        )
    console.print(f"[bold]model:[/] the latest checkpoint, {checkpoint}")
    return str(checkpoint)


def default_out(model: str) -> Path:
    """``runs/<name>/eval`` for a run's checkpoint, else ``evals/<model name>``."""
    path = Path(model)
    if path.name == CHECKPOINT_DIR and (path.parent / RUN_FILE).is_file():
        return path.parent / "eval"
    return Path("evals") / (path.name or model)


def check_resume(out: Path, settings: EvalSettings) -> None:
    """Refuse to add samples made with other generation settings; record them on first use."""
    path = out / CONFIG_FILE
    current = {key: getattr(settings, key) for key in RESUME_KEYS}
    current["model"] = (
        str(Path(settings.model).resolve()) if Path(settings.model).exists() else settings.model
    )
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [
            f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in RESUME_KEYS if saved.get(k) != current[k]
        ]
        if diff:
            raise ConfigError(
                f"{out} holds generations made with {', '.join(diff)}: use the same settings to resume, or another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(current, indent=2) + "\n")


@contextmanager
def sandbox_client(url: str | None, console: Console) -> Iterator[Any]:
    """A client of the service at ``url`` (it must be healthy), else of one started for the duration
    (the same rule as ``ctpo train``: ``sandbox.server.given_or_started``)."""
    from sandbox.client import SandboxClient
    from sandbox.server import given_or_started

    if url is None:
        console.print("[bold]sandbox:[/] starting a service for this eval")
    with given_or_started(url) as sandbox, SandboxClient(sandbox.url) as client:
        yield client


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def generate_all(
    settings: EvalSettings,
    frames: dict[str, pd.DataFrame],
    stores: dict[str, GenerationStore],
    backend_name: str,
    console: Console,
) -> None:
    """Generate every missing (problem, sample) of every benchmark, appending records as they finish."""
    todo, correct, empty = {}, {}, dict.fromkeys(frames, 0)
    for name, frame in frames.items():
        done = {key: r for key, r in stores[name].load().items() if r["error"] is None}
        todo[name] = [
            (row, s) for _, row in frame.iterrows() for s in range(settings.n) if (row["id"], s) not in done
        ]
        correct[name] = sum(r["correct"] for r in saved_records(done, frame, settings.n))
    if not any(todo.values()):
        console.print("all samples are already generated")
        return
    url = settings.sandbox_url or os.environ.get("CTPO_SANDBOX_URL")
    protocol = get_protocol(settings.tir)
    with ExitStack() as stack:
        # The sandbox first: a bad one fails before a model is loaded.
        sandbox = stack.enter_context(sandbox_client(url, console)) if settings.tools else None
        progress = stack.enter_context(_progress(console))
        decoding = progress.add_task("  decoding", total=None, visible=False, unit="tokens of this turn")

        def on_step(tokens: int, budget: int) -> None:
            progress.update(decoding, completed=tokens, total=budget, visible=tokens < budget)

        backend = make_backend(settings, backend_name, on_step)
        stack.callback(backend.close)
        window = backend.context_window
        if window is not None and window <= settings.max_tokens:
            console.print(
                f"[yellow]the model has {window} positions, fewer than --max-tokens {settings.max_tokens} plus "
                "a prompt: a sample that reaches the end of its context stops there (finish_reason length)"
            )
        batch_size = settings.batch_size or backend.default_batch_size
        threads = stack.enter_context(ThreadPoolExecutor(max_workers=16, thread_name_prefix="ctpo-tools"))
        for name, pending in todo.items():
            total = len(frames[name]) * settings.n
            task = progress.add_task(
                name, total=total, completed=total - len(pending), unit=f"samples, {correct[name]} correct"
            )
            for start in range(0, len(pending), batch_size):
                jobs = [
                    _Job(
                        str(row["id"]),
                        s,
                        ground_truth(row),
                        ToolLoop(
                            eval_messages(row, protocol if settings.tools else None, settings.prompt_as_is),
                            settings.max_turns,
                            settings.max_tokens,
                            protocol,
                            settings.tools,
                        ),
                    )
                    for row, s in pending[start : start + batch_size]
                ]
                for records in run_jobs(jobs, backend, sandbox, settings, threads):
                    stores[name].append(records)
                    correct[name] += sum(r["correct"] for r in records)
                    empty[name] += sum(r["response_tokens"] == 0 and r["error"] is None for r in records)
                    progress.update(task, advance=len(records), unit=f"samples, {correct[name]} correct")
    for name, count in empty.items():
        if count:
            console.print(
                f"[yellow]{name}: {count} samples got no token (their prompt fills the model's "
                f"{window} positions)"
                if window is not None
                else f"[yellow]{name}: {count} samples got no token"
            )


def run_eval(settings: EvalSettings, console: Console | None = None) -> pd.DataFrame:
    """Generate what is missing (or only re-score with ``rescore``), then write and log the summary.

    Inputs are checked before anything is written; the MLflow run spans the generation, so an
    interrupted eval shows as KILLED/FAILED there while its finished samples stay on disk.
    """
    from ctpo_cli.runs.tracking import git_commit, mlflow_run

    console = console or Console()
    if settings.n < 1:
        raise ConfigError(f"--n must be >= 1 (got {settings.n})")
    if not settings.benchmarks:
        raise ConfigError("--benchmarks is empty")
    get_protocol(settings.tir)  # an unknown --tir or --reward fails here, before anything is written
    if settings.reward not in REWARDS:
        raise ConfigError(f"unknown --reward {settings.reward!r}; choose one of {', '.join(REWARDS)}")
    out = settings.out or default_out(settings.model)
    names = {b: Path(b).stem if is_path(b) else b for b in settings.benchmarks}
    if len(set(names.values())) < len(settings.benchmarks):
        raise ConfigError(f"--benchmarks names a benchmark twice: {', '.join(settings.benchmarks)}")
    stores = {
        names[b]: GenerationStore(out / GENERATIONS_DIR / f"{names[b]}.jsonl") for b in settings.benchmarks
    }
    if settings.rescore:
        if (out / CONFIG_FILE).is_file():  # report the settings the generations were made with
            saved = json.loads((out / CONFIG_FILE).read_text())
            settings = replace(settings, **{k: saved[k] for k in RESUME_KEYS if k != "model"})
        frames, backend = None, "none"
    else:
        frames = {names[b]: load_benchmark(b, settings.data_dir) for b in settings.benchmarks}
        backend = resolve_backend(settings)
        check_resume(out, settings)
    title = f"{model_label(settings.model)}: avg@{settings.n}, {settings.reward} reward" + (
        f" (tool protocol {settings.tir})" if settings.tools else " (no tools)"
    )
    run_name = f"eval-{model_label(settings.model)}"
    with mlflow_run(
        "ctpo-eval", run_name, mlflow_params(settings, backend, out), {"git_commit": git_commit()}
    ) as run_id:
        if frames is None:
            records = rescore(stores, settings.n, settings.reward)
        else:
            console.print(f"[bold]eval:[/] {settings.model} ({backend}) -> {out}")
            generate_all(settings, frames, stores, backend, console)
            records = {
                name: saved_records(stores[name].load(), frame, settings.n) for name, frame in frames.items()
            }
            records |= earlier_benchmarks(out, records, settings.n)
        summary, problems = summarize(records)
        files = write_outputs(out, summary, problems, title)
        print_summary(console, summary, title)
        console.print(f"results in {out}/ ({', '.join(p.name for p in files)})")
        log_summary(run_id, summary, files)
    return summary


def earlier_benchmarks(
    out: Path, evaluated: dict[str, list[dict[str, Any]]], n: int
) -> dict[str, list[dict[str, Any]]]:
    """Samples 0..n-1 of the other benchmarks evaluated in ``out`` before (same settings: ``check_resume``),
    so that the summary there covers every benchmark, not just this command's."""
    stores = sorted((out / GENERATIONS_DIR).glob("*.jsonl"))
    saved = {path.stem: GenerationStore(path).load() for path in stores if path.stem not in evaluated}
    return {
        name: [r for r in records.values() if r["sample"] < n] for name, records in saved.items() if records
    }


def saved_records(
    saved: dict[tuple[str, int], dict[str, Any]], frame: pd.DataFrame, n: int
) -> list[dict[str, Any]]:
    """The saved samples 0..n-1 of the benchmark's problems, in problem order."""
    return [saved[(pid, s)] for pid in frame["id"] for s in range(n) if (pid, s) in saved]


def rescore(stores: dict[str, GenerationStore], n: int, reward: str) -> dict[str, list[dict[str, Any]]]:
    """Re-check every saved sample with the current scorer and rewrite its file (no model needed);
    returns samples 0..n-1 for the summary."""
    records = {}
    for name, store in stores.items():
        saved = list(store.load().values())
        if not saved:
            continue
        texts = [join_turns(turn["text"] for turn in r["turns"]) for r in saved]
        whole = [
            whole_response((turn["text"], (turn.get("tool") or {}).get("content")) for turn in r["turns"])
            for r in saved
        ]
        truths = [r["ground_truth"] for r in saved]
        authors = score_batch(whole, truths, rule=AUTHORS)
        strict = score_batch(texts, truths, rule=STRICT)
        for record, text, verdict, verdict_strict in zip(saved, texts, authors, strict, strict=True):
            record["answer"] = extract_boxed(text)
            record["correct_authors"] = verdict and record["error"] is None
            record["correct_strict"] = verdict_strict and record["error"] is None
            record["correct"] = record[f"correct_{reward}"]
        store.rewrite(saved)
        records[name] = [r for r in saved if r["sample"] < n]
    if not records:
        folder = next(iter(stores.values())).path.parent
        raise InputFileError(f"--rescore: no saved generations for {', '.join(stores)} in {folder}")
    return records
