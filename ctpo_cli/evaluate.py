"""``ctpo eval``: avg@k with tool-integrated reasoning on competition sets (the paper's Table 2).

For each benchmark, every problem gets ``n`` sampled trajectories (``ctpo_cli.tools`` protocol), each
scored by ``ctpo_cli.scoring.is_correct`` on its final ``\\boxed{}`` answer.

Metrics per benchmark (P problems, problem i with n_i samples of which c_i are correct, p_i = c_i/n_i):

    avg@k      = (1/P) sum_i p_i                        the paper's avg@32 (k = n)
    stderr     = sd(p_1..p_P) / sqrt(P)                  (sample sd, ddof = 1)
    ci95       = avg@k -/+ 1.96 stderr, clipped to [0, 1]
    pass@k     = (1/P) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)]     unbiased (Chen et al. 2021), k = 1, 2, 4, ..., n

The interval treats the problems as the sampling unit (a benchmark as a sample from a population of
similar problems); with 30 problems it is wide (often +/- 8 points), and it ignores the (smaller)
sampling noise within each problem. Also: mean assistant turns and tool calls per sample, tool error
rate (failed executions / executions), mean response tokens (assistant + tool output) and the number of
crashed samples. The ``average`` row is the unweighted mean over benchmarks, with
stderr = sqrt(sum_b stderr_b^2) / B (independent benchmarks).

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
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

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
from rich.table import Table

from ctpo_cli.benchmarks import PAPER_BENCHMARKS, ground_truth, is_path, load_benchmark, prompt_messages
from ctpo_cli.rundir import CHECKPOINT_DIR, RUN_FILE, latest_checkpoint
from ctpo_cli.scoring import extract_boxed, score_batch
from ctpo_cli.tools import (
    NO_TOOLS_SYSTEM_PROMPT,
    STOP_STRINGS,
    SYSTEM_PROMPT,
    GenerationResult,
    ToolLoop,
    Trajectory,
    execute,
    join_turns,
)

BACKENDS = ("auto", "hf", "vllm", "openai")
SUMMARY_FILE, SUMMARY_MD, PER_PROBLEM_FILE, CONFIG_FILE = (
    "summary.csv",
    "summary.md",
    "per_problem.csv",
    "eval_config.json",
)
GENERATIONS_DIR = "generations"
RESUME_KEYS = ("model", "temperature", "top_p", "max_turns", "max_tokens", "tools", "seed", "prompt_as_is")
"""Settings that must match for a rerun to add samples to an existing output directory."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything ``ctpo eval`` was asked to do."""

    model: str
    benchmarks: tuple[str, ...] = PAPER_BENCHMARKS
    n: int = 32
    temperature: float = 0.7
    top_p: float = 1.0
    max_turns: int = 5
    max_tokens: int = 8000
    tools: bool = True
    backend: str = "auto"
    out: Path | None = None
    base_url: str | None = None
    sandbox_url: str | None = None
    data_dir: str = "data"
    seed: int = 0
    batch_size: int = 0  # trajectories advanced together; 0: the backend's default
    rescore: bool = False
    prompt_as_is: bool = False  # the benchmark's messages unchanged: no system prompt added or replaced


# --------------------------------------------------------------------------------------------------
# Generation backends


@dataclass(frozen=True)
class GenerationRequest:
    """Continue ``messages`` with one assistant turn of at most ``max_new_tokens`` tokens."""

    messages: list[dict[str, Any]]
    max_new_tokens: int
    seed: int


class Backend(Protocol):
    """A model that generates assistant turns for a batch of conversations."""

    default_batch_size: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        """One result per request, or the exception that request alone failed with (the sample is
        recorded as crashed); an error of the whole batch raises."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    stop: tuple[str, ...]


class ChatTokenizer:
    """The model's tokenizer and chat template: the same prompt text for every backend.

    ``enable_thinking=False`` is passed to the template (Qwen3 then answers without a thinking block,
    the paper's setting; templates without the variable ignore it).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str) -> ChatTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(path))
        except OSError as error:
            raise FileNotFoundError(
                f"cannot load a tokenizer from {path}: {str(error).splitlines()[0]}"
            ) from error

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        return str(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded) and whether one occurred."""
    positions = [text.find(s) for s in stop if s in text]
    return (text[: min(positions)], True) if positions else (text, False)


class HFBackend:
    """transformers ``generate`` on CPU or one GPU, a batch of conversations at a time.

    Sampling is seeded per batch from its first request's seed (per-request seeds are not possible
    inside one batched ``generate``). Requests of a batch may have different budgets: the batch runs to
    the largest and each sequence is cut to its own (``finish_reason="length"``).
    """

    default_batch_size = 16

    def __init__(self, model: str, sampling: Sampling) -> None:
        import torch
        from transformers import AutoModelForCausalLM, StoppingCriteriaList, StopStringCriteria

        self.chat = ChatTokenizer.load(model)
        tokenizer = self.chat.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        auto: Any = AutoModelForCausalLM  # transformers 5's from_pretrained decorator confuses mypy
        self.model = auto.from_pretrained(model, dtype="auto")
        self.model.to(device).eval()
        self.sampling = sampling
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.stopping = (
            StoppingCriteriaList([StopStringCriteria(tokenizer, list(sampling.stop))])
            if sampling.stop
            else None
        )
        self.torch = torch

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        tokenizer = self.chat.tokenizer
        prompts = [self.chat.render(r.messages) for r in requests]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.model.device
        )
        self.torch.manual_seed(requests[0].seed)
        sample = self.sampling.temperature > 0
        with self.torch.no_grad():
            output = self.model.generate(
                **batch,
                do_sample=sample,
                temperature=self.sampling.temperature if sample else None,
                top_p=self.sampling.top_p if sample else None,
                top_k=None,  # no top-k, whatever the model's generation_config says (Qwen3: 20)
                max_new_tokens=max(r.max_new_tokens for r in requests),
                stopping_criteria=self.stopping,
                pad_token_id=tokenizer.pad_token_id,
            )
        stops_at = self.eos_ids | {tokenizer.pad_token_id}  # pad fills rows a stop string ended
        results: list[GenerationResult | Exception] = []
        for request, row in zip(requests, output[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
            end = next((i for i, token in enumerate(row) if token in stops_at), len(row))
            ids = row[: end + 1] if end < len(row) and row[end] in self.eos_ids else row[:end]
            finish = "stop" if end < len(row) else "length"
            if len(ids) > request.max_new_tokens:
                ids, finish = ids[: request.max_new_tokens], "length"
            text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), self.sampling.stop)
            results.append(GenerationResult(text, len(ids), "stop" if stopped else finish))
        return results

    def close(self) -> None:
        del self.model


class VLLMBackend:
    """vLLM's offline engine (GPU): every request of a batch scheduled together, one sample each with
    its own seed; prefix caching shares the prompt of a problem's samples."""

    default_batch_size = 4096

    def __init__(self, model: str, sampling: Sampling, seed: int) -> None:
        from vllm import LLM, SamplingParams

        self.chat = ChatTokenizer.load(model)
        self.llm = LLM(model=model, seed=seed, enable_prefix_caching=True)
        self.sampling = sampling
        self.params = SamplingParams

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        prompts = [{"prompt_token_ids": self.chat.encode(self.chat.render(r.messages))} for r in requests]
        params = [
            self.params(
                n=1,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                max_tokens=r.max_new_tokens,
                stop=list(self.sampling.stop),
                seed=r.seed,
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            GenerationResult(
                o.outputs[0].text,
                len(o.outputs[0].token_ids),
                "length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]

    def close(self) -> None:
        del self.llm


class OpenAIBackend:
    """Any OpenAI-compatible server (e.g. ``vllm serve CHECKPOINT``) through ``/v1/completions``.

    The prompt is rendered here with the model's own chat template (the tokenizer is loaded from
    ``--model``), exactly as the other backends and training render it; tool messages then need no
    tool-call ids. The served model name is the server's first entry of ``/v1/models``.
    """

    default_batch_size = 64

    def __init__(self, model: str, base_url: str, sampling: Sampling, timeout: float = 600.0) -> None:
        import httpx

        self.chat = ChatTokenizer.load(model)
        self.sampling = sampling
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=httpx.HTTPTransport(retries=3)
        )
        try:
            models = self.http.get("/v1/models").raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"no OpenAI-compatible server at {base_url} ({error!r}); start one with `vllm serve {model}`"
            ) from error
        self.served = str(models[0]["id"])
        self.threads = ThreadPoolExecutor(
            max_workers=self.default_batch_size, thread_name_prefix="ctpo-openai"
        )

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def _one(self, request: GenerationRequest) -> GenerationResult:
        payload = {
            "model": self.served,
            "prompt": self.chat.render(request.messages),
            "max_tokens": request.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "top_k": -1,  # vLLM extension: no top-k, not the model's generation_config default (Qwen3: 20)
            "stop": list(self.sampling.stop) or None,
            "seed": request.seed,
            "n": 1,
        }
        body = self.http.post("/v1/completions", json=payload).raise_for_status().json()
        choice = body["choices"][0]
        text, _ = cut_at_stop(choice["text"], self.sampling.stop)
        tokens = body.get("usage", {}).get("completion_tokens") or self.count_tokens(text)
        return GenerationResult(
            text, int(tokens), "length" if choice.get("finish_reason") == "length" else "stop"
        )

    def _safe(self, request: GenerationRequest) -> GenerationResult | Exception:
        try:
            return self._one(request)
        except Exception as error:  # HTTP error after retries, a malformed reply: this sample only
            return error

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        return list(self.threads.map(self._safe, requests))

    def close(self) -> None:
        self.threads.shutdown()
        self.http.close()


def resolve_backend(settings: EvalSettings) -> str:
    """``auto``: openai with ``--base-url``, vLLM when it is installed and a GPU is visible, else hf."""
    if settings.backend not in BACKENDS:
        raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
    if settings.backend == "openai" and not settings.base_url:
        raise ValueError("--backend openai needs --base-url (e.g. http://localhost:8000 of `vllm serve`)")
    if settings.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ValueError(
                "the vllm backend needs vLLM (pip install 'ctpo[gpu]'); use --backend hf on CPU"
            ) from None
    if settings.backend != "auto":
        return settings.backend
    if settings.base_url:
        return "openai"
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"


def make_backend(settings: EvalSettings, backend: str) -> Backend:
    sampling = Sampling(settings.temperature, settings.top_p, STOP_STRINGS if settings.tools else ())
    if backend == "hf":
        return HFBackend(settings.model, sampling)
    if backend == "vllm":
        return VLLMBackend(settings.model, sampling, settings.seed)
    assert settings.base_url
    return OpenAIBackend(settings.model, settings.base_url, sampling)


# --------------------------------------------------------------------------------------------------
# Saved generations


class GenerationStore:
    """``<benchmark>.jsonl``: one JSON record per finished sample, appended as it finishes.

    The last record of a (problem_id, sample) key wins. A line cut short by a crash is dropped (and
    cut from the file before the next append).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        records = (json.loads(line) for line in complete.decode().splitlines() if line.strip())
        return {(r["problem_id"], r["sample"]): r for r in records}

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Sequence[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        tmp.replace(self.path)


def sample_record(job: _Job, trajectory: Trajectory, correct: bool) -> dict[str, Any]:
    """The JSON record of a finished sample; a crashed one keeps what it produced and its error."""
    return {
        "problem_id": job.problem_id,
        "sample": job.sample,
        "ground_truth": job.truth,
        "answer": extract_boxed(trajectory.response_text),
        "correct": correct and job.error is None,
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


def eval_messages(row: pd.Series, tools: bool, as_is: bool = False) -> list[dict[str, Any]]:
    """The prompt: with tools, the dataset's own system message if it has one, else ``SYSTEM_PROMPT``;
    without tools, ``NO_TOOLS_SYSTEM_PROMPT`` in place of any system message; ``as_is``: unchanged
    (for a model trained on exactly these prompts, e.g. the local backend's synthetic task)."""
    messages = prompt_messages(row)
    if as_is:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    if tools and len(rest) < len(messages):
        return messages
    return [{"role": "system", "content": SYSTEM_PROMPT if tools else NO_TOOLS_SYSTEM_PROMPT}, *rest]


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


def _records(finished: Sequence[_Job]) -> list[dict[str, Any]]:
    """Records of finished jobs, scored in one batch (a crashed job, cut short, is scored wrong)."""
    trajectories = [
        job.loop.trajectory() if job.error is None else Trajectory(job.loop.messages, job.loop.turns, "error")
        for job in finished
    ]
    verdicts = score_batch([t.response_text for t in trajectories], [job.truth for job in finished])
    return [sample_record(*item) for item in zip(finished, trajectories, verdicts, strict=True)]


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
            elif (code := job.loop.add_generation(result)) is not None:
                calls.append((job, threads.submit(execute, sandbox, code, backend.count_tokens)))
        for job, future in calls:
            try:
                job.loop.add_tool_result(future.result())
            except Exception as error:  # the sandbox failed or refused, not the program
                job.error = error
        finished = [job for job in active if job.finished]
        if finished:
            yield _records(finished)
        active = [job for job in active if not job.finished]


# --------------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k) / C(n, k) (n samples, c correct, k <= n)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def problem_table(benchmark: str, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per problem: samples, correct, pass rate, crashed samples, means of the sample stats."""
    frame = pd.DataFrame(
        [
            {
                k: r[k]
                for k in (
                    "problem_id",
                    "ground_truth",
                    "correct",
                    "num_turns",
                    "tool_calls",
                    "response_tokens",
                )
            }
            | {"crashed": r["error"] is not None}
            for r in records
        ]
    )
    grouped = frame.groupby("problem_id", sort=False)
    table = pd.DataFrame(
        {
            "benchmark": benchmark,
            "problem_id": list(grouped.groups),
            "ground_truth": grouped["ground_truth"].first().to_numpy(),
            "n_samples": grouped.size().to_numpy(),
            "n_correct": grouped["correct"].sum().to_numpy().astype(int),
            "n_errors": grouped["crashed"].sum().to_numpy().astype(int),
            "mean_turns": grouped["num_turns"].mean().to_numpy(),
            "mean_tool_calls": grouped["tool_calls"].mean().to_numpy(),
            "mean_response_tokens": grouped["response_tokens"].mean().to_numpy(),
        }
    )
    table.insert(5, "pass_rate", table["n_correct"] / table["n_samples"])
    return table


def benchmark_summary(
    benchmark: str, records: Sequence[dict[str, Any]], problems: pd.DataFrame
) -> dict[str, Any]:
    """The summary row of one benchmark (see the module docstring for the formulas)."""
    rates = problems["pass_rate"].to_numpy()
    count = len(rates)
    avg = float(rates.mean())
    stderr = float(rates.std(ddof=1) / math.sqrt(count)) if count > 1 else math.nan
    k_max = int(problems["n_samples"].min())
    calls = sum(r["tool_calls"] for r in records)
    row: dict[str, Any] = {
        "benchmark": benchmark,
        "n_problems": count,
        "n_samples": len(records),
        "k": k_max,
        "avg_at_k": avg,
        "stderr": stderr,
        **ci95(avg, stderr),
    }
    for k in ks_for(k_max):
        row[f"pass_at_{k}"] = (
            sum(
                pass_at_k(int(n), int(c), k)
                for n, c in zip(problems["n_samples"], problems["n_correct"], strict=True)
            )
            / count
        )
    row |= {
        "mean_turns": sum(r["num_turns"] for r in records) / len(records),
        "mean_tool_calls": calls / len(records),
        "tool_error_rate": sum(r["tool_errors"] for r in records) / calls if calls else math.nan,
        "mean_response_tokens": sum(r["response_tokens"] for r in records) / len(records),
        "n_errors": sum(r["error"] is not None for r in records),
    }
    return row


def ci95(avg: float, stderr: float) -> dict[str, float]:
    """avg -/+ 1.96 stderr, clipped to [0, 1] (a pass rate cannot leave it); NaN with one problem."""
    if math.isnan(stderr):
        return {"ci95_low": math.nan, "ci95_high": math.nan}
    return {"ci95_low": max(0.0, avg - 1.96 * stderr), "ci95_high": min(1.0, avg + 1.96 * stderr)}


def average_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over benchmarks; stderr = sqrt(sum stderr_b^2) / B; counts are summed."""
    frame = pd.DataFrame(rows)
    row: dict[str, Any] = {"benchmark": "average"}
    for column in frame.columns.drop("benchmark"):
        summed = column in ("n_problems", "n_samples", "n_errors")
        row[column] = frame[column].sum() if summed else frame[column].mean(skipna=False)
    row["k"] = int(frame["k"].min())
    row["stderr"] = math.sqrt(float((frame["stderr"] ** 2).sum())) / len(frame)
    row |= ci95(row["avg_at_k"], row["stderr"])
    return row


def summarize(records_by_benchmark: dict[str, list[dict[str, Any]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per benchmark plus ``average``, per-problem table)."""
    rows, tables = [], []
    for benchmark, records in records_by_benchmark.items():
        problems = problem_table(benchmark, records)
        rows.append(benchmark_summary(benchmark, records, problems))
        tables.append(problems)
    if len(rows) > 1:
        rows.append(average_row(rows))
    summary = pd.DataFrame(rows)
    pass_columns = sorted(
        (c for c in summary.columns if c.startswith("pass_at_")), key=lambda c: int(c.rsplit("_", 1)[1])
    )
    head = ["benchmark", "n_problems", "n_samples", "k", "avg_at_k", "stderr", "ci95_low", "ci95_high"]
    tail = ["mean_turns", "mean_tool_calls", "tool_error_rate", "mean_response_tokens", "n_errors"]
    return summary[head + pass_columns + tail], pd.concat(tables, ignore_index=True)


# --------------------------------------------------------------------------------------------------
# Output


def _percent(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def display_rows(summary: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and cells shown in the terminal and in summary.md (rates in percent)."""
    passes = [c for c in summary.columns if c.startswith("pass_at_")]
    header = [
        "benchmark",
        "problems",
        "samples",
        "avg@k %",
        "95% CI",
        *[c.replace("pass_at_", "pass@") for c in passes],
        "turns",
        "tool calls",
        "tool err %",
        "resp. tokens",
        "crashed",
    ]
    cells = []
    for _, row in summary.iterrows():
        cells.append(
            [
                str(row["benchmark"]),
                str(int(row["n_problems"])),
                str(int(row["n_samples"])),
                f"{_percent(row['avg_at_k'])} ± {_percent(row['stderr'])}",
                f"[{_percent(row['ci95_low'])}, {_percent(row['ci95_high'])}]",
                *[_percent(row[c]) for c in passes],
                f"{row['mean_turns']:.2f}",
                f"{row['mean_tool_calls']:.2f}",
                _percent(row["tool_error_rate"]),
                f"{row['mean_response_tokens']:.0f}",
                str(int(row["n_errors"])),
            ]
        )
    return header, cells


def write_outputs(out: Path, summary: pd.DataFrame, problems: pd.DataFrame, title: str) -> list[Path]:
    summary.to_csv(out / SUMMARY_FILE, index=False)
    problems.to_csv(out / PER_PROBLEM_FILE, index=False)
    header, cells = display_rows(summary)
    lines = [
        f"# {title}",
        "",
        "avg@k ± stderr across problems, in percent.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    (out / SUMMARY_MD).write_text("\n".join(lines) + "\n")
    return [out / SUMMARY_FILE, out / SUMMARY_MD, out / PER_PROBLEM_FILE]


def print_summary(console: Console, summary: pd.DataFrame, title: str) -> None:
    header, cells = display_rows(summary)
    table = Table(
        title=title,
        caption="avg@k ± stderr across problems (the 95% CI treats problems as the sampling unit)",
    )
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for i, row in enumerate(cells):
        table.add_row(*row, end_section=i == len(cells) - 2 and cells[-1][0] == "average")
    console.print(table)


def mlflow_params(settings: EvalSettings, backend: str, out: Path) -> dict[str, Any]:
    return {
        "model": settings.model,
        "benchmarks": ",".join(settings.benchmarks),
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_turns": settings.max_turns,
        "max_tokens": settings.max_tokens,
        "backend": backend,
        "tools": settings.tools,
        "seed": settings.seed,
        "rescore": settings.rescore,
        "out": str(out),
    }


def log_summary(summary: pd.DataFrame, files: Sequence[Path]) -> None:
    """``<benchmark>/<column>`` metrics of every finite summary value, and the files as artifacts."""
    import mlflow

    metrics = {}
    for _, row in summary.iterrows():
        for column, value in row.items():
            if column in ("benchmark", "n_problems", "n_samples", "k") or not math.isfinite(float(value)):
                continue
            metrics[f"{row['benchmark']}/{column}"] = float(value)
    mlflow.log_metrics(metrics)
    for path in files:
        mlflow.log_artifact(str(path))


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
        raise ValueError(
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
            raise ValueError(
                f"{out} holds generations made with {', '.join(diff)}: use the same settings to resume, or another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")


@contextmanager
def sandbox_client(url: str | None, console: Console) -> Iterator[Any]:
    """A client of the service at ``url`` (it must be healthy), else of one started for the duration
    (the same rule as ``ctpo train``: ``ctpo_cli.launcher.sandbox_for_run``)."""
    from ctpo_cli.launcher import sandbox_for_run
    from sandbox.client import SandboxClient

    if url is None:
        console.print("[bold]sandbox:[/] starting a service for this eval")
    with sandbox_for_run(url) as sandbox, SandboxClient(sandbox.url) as client:
        yield client


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples, {task.fields[correct]} correct"),
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
    todo, correct = {}, {}
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
    with ExitStack() as stack:
        # The sandbox first: a bad one fails before a model is loaded.
        sandbox = stack.enter_context(sandbox_client(url, console)) if settings.tools else None
        backend = make_backend(settings, backend_name)
        stack.callback(backend.close)
        batch_size = settings.batch_size or backend.default_batch_size
        threads = stack.enter_context(ThreadPoolExecutor(max_workers=16, thread_name_prefix="ctpo-tools"))
        progress = stack.enter_context(_progress(console))
        for name, pending in todo.items():
            total = len(frames[name]) * settings.n
            task = progress.add_task(name, total=total, completed=total - len(pending), correct=correct[name])
            for start in range(0, len(pending), batch_size):
                jobs = [
                    _Job(
                        str(row["id"]),
                        s,
                        ground_truth(row),
                        ToolLoop(
                            eval_messages(row, settings.tools, settings.prompt_as_is),
                            settings.max_turns,
                            settings.max_tokens,
                            settings.tools,
                        ),
                    )
                    for row, s in pending[start : start + batch_size]
                ]
                for records in run_jobs(jobs, backend, sandbox, settings, threads):
                    stores[name].append(records)
                    correct[name] += sum(r["correct"] for r in records)
                    progress.update(task, advance=len(records), correct=correct[name])


def run_eval(settings: EvalSettings, console: Console | None = None) -> pd.DataFrame:
    """Generate what is missing (or only re-score with ``rescore``), then write and log the summary.

    Inputs are checked before anything is written; the MLflow run spans the generation, so an
    interrupted eval shows as KILLED/FAILED there while its finished samples stay on disk.
    """
    from ctpo_cli.tracking import git_commit, mlflow_run

    console = console or Console()
    if settings.n < 1:
        raise ValueError(f"--n must be >= 1 (got {settings.n})")
    if not settings.benchmarks:
        raise ValueError("--benchmarks is empty")
    out = settings.out or default_out(settings.model)
    names = {b: Path(b).stem if is_path(b) else b for b in settings.benchmarks}
    if len(set(names.values())) < len(settings.benchmarks):
        raise ValueError(f"--benchmarks names a benchmark twice: {', '.join(settings.benchmarks)}")
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
    title = f"{model_label(settings.model)}: avg@{settings.n}" + ("" if settings.tools else " (no tools)")
    run_name = f"eval-{model_label(settings.model)}"
    with mlflow_run(
        "ctpo-eval", run_name, mlflow_params(settings, backend, out), {"git_commit": git_commit()}
    ):
        if frames is None:
            records = rescore(stores, settings.n)
        else:
            console.print(f"[bold]eval:[/] {settings.model} ({backend}) -> {out}")
            generate_all(settings, frames, stores, backend, console)
            records = {
                name: saved_records(stores[name].load(), frame, settings.n) for name, frame in frames.items()
            }
        summary, problems = summarize(records)
        files = write_outputs(out, summary, problems, title)
        print_summary(console, summary, title)
        console.print(f"results in {out}/ ({', '.join(p.name for p in files)})")
        log_summary(summary, files)
    return summary


def saved_records(
    saved: dict[tuple[str, int], dict[str, Any]], frame: pd.DataFrame, n: int
) -> list[dict[str, Any]]:
    """The saved samples 0..n-1 of the benchmark's problems, in problem order."""
    return [saved[(pid, s)] for pid in frame["id"] for s in range(n) if (pid, s) in saved]


def rescore(stores: dict[str, GenerationStore], n: int) -> dict[str, list[dict[str, Any]]]:
    """Re-check every saved sample with the current scorer and rewrite its file (no model needed);
    returns samples 0..n-1 for the summary."""
    records = {}
    for name, store in stores.items():
        saved = list(store.load().values())
        if not saved:
            continue
        texts = [join_turns(turn["text"] for turn in r["turns"]) for r in saved]
        verdicts = score_batch(texts, [r["ground_truth"] for r in saved])
        for record, text, verdict in zip(saved, texts, verdicts, strict=True):
            record["answer"] = extract_boxed(text)
            record["correct"] = verdict and record["error"] is None
        store.rewrite(saved)
        records[name] = [r for r in saved if r["sample"] < n]
    if not records:
        folder = next(iter(stores.values())).path.parent
        raise FileNotFoundError(f"--rescore: no saved generations for {', '.join(stores)} in {folder}")
    return records
