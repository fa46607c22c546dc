"""``ctpo eval`` end to end on CPU: a real tiny Qwen3 model, a real sandbox, real math-verify, real MLflow.

The model (2 layers, hidden size 64, byte-level tokenizer built here) is trained for a few seconds to
memorise three conversations in the tool-integrated format:

- "What is 6 times 7?"  -> writes ```python print(6*7)```, reads the sandbox's 42, answers \\boxed{42}
- "What is 2 to the power 10?" -> the same with 2**10 and \\boxed{1024}
- "What is 3 plus 4?"   -> answers \\boxed{8} without code (wrong: the truth is 7)

so with tools its avg@k is 2/3 exactly when (and only when) the eval loop runs the code, feeds the real
output back and scores the final answers. The tool output (42, 1024) is never produced by the model in
the first turn: it must come from the sandbox. Sampling uses temperature 0.1 so the memorised turns come
out every time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from rich.console import Console

from ctpo_cli.errors import BackendUnavailable
from ctpo_cli.eval import runner
from ctpo_cli.eval.backends import ChatTokenizer, GenerationRequest, HFBackend, Sampling
from ctpo_cli.eval.metrics import pass_at_k, summarize
from ctpo_cli.eval.runner import resolve_model, run_eval
from ctpo_cli.eval.settings import EvalSettings
from ctpo_cli.tir.protocol import format_tool_output
from sandbox.client import SandboxUnavailable
from sandbox.server import running_service

SYSTEM = "Use python."
CONVERSATIONS = [
    (
        "What is 6 times 7?",
        "42",
        ["Let me compute.\n```python\nprint(6*7)\n```", "42\n", "So the answer is \\boxed{42}."],
    ),
    ("What is 2 to the power 10?", "1024", ["```python\nprint(2**10)\n```", "1024\n", "\\boxed{1024}"]),
    ("What is 3 plus 4?", "7", ["Easy: \\boxed{8}"]),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(problem: str, turns: list[str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]
    for i, text in enumerate(turns):
        if i % 2:
            messages.append({"role": "tool", "content": format_tool_output(text, "", "Finished", False)})
        else:
            messages.append({"role": "assistant", "content": text})
    return messages


def build_tiny_model(path: Path) -> None:
    """Byte-level tokenizer + 2-layer Qwen3, trained until it reproduces CONVERSATIONS' assistant turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )
    rows, masks = [], []
    for problem, _, turns in CONVERSATIONS:
        ids: list[int] = []
        mask: list[bool] = []
        for message in conversation(problem, turns):
            head = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False).input_ids
            body = [
                *tokenizer(message["content"], add_special_tokens=False).input_ids,
                tokenizer.eos_token_id,
            ]
            tail = tokenizer("\n", add_special_tokens=False).input_ids
            ids += head + body + tail
            mask += [False] * len(head) + [message["role"] == "assistant"] * len(body) + [False] * len(tail)
        rows.append(ids)
        masks.append(mask)
    length = max(map(len, rows))
    inputs = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        inputs[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(400):
        loss = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 2e-3:
            break
    assert loss.item() < 2e-3, f"the tiny model did not memorise its conversations (loss {loss.item():.4f})"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and robust on a busy 2-core machine
    path = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_model(path)
    yield path
    torch.set_num_threads(threads)


@pytest.fixture
def bench_file(tmp_path: Path) -> Path:
    """The three problems as a verl parquet with its own system prompt."""
    rows = [
        {
            "id": f"p{i}",
            "data_source": "tiny",
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}],
            "ability": "math",
            "reward_model": {"ground_truth": truth, "style": "rule"},
            "extra_info": {"index": i, "split": "test"},
        }
        for i, (problem, truth, _) in enumerate(CONVERSATIONS)
    ]
    path = tmp_path / "tiny.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path: MLflow's default store becomes tmp_path/mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CTPO_SANDBOX_URL", raising=False)
    return tmp_path


def settings(model: Path, bench: Path, out: Path, **changes: Any) -> EvalSettings:
    base = EvalSettings(
        model=str(model),
        benchmarks=(str(bench),),
        n=2,
        temperature=0.1,
        max_turns=3,
        max_tokens=200,
        tir="ctpo",  # the tiny model was trained on the ctpo protocol (```python blocks, ```output messages)
        backend="hf",
        out=out,
    )
    return dataclasses.replace(base, **changes)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mlflow_runs(workdir: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ctpo-eval"], order_by=["attributes.start_time ASC"])
    assert isinstance(runs, pd.DataFrame)
    return runs


def forbid_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "make_backend", fail)


def test_eval_with_tools_end_to_end(
    tiny_model: Path, bench_file: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = workdir / "out"
    console = Console(width=200, record=True)
    summary = run_eval(settings(tiny_model, bench_file, out), console)
    assert "starting a service for this eval" in console.export_text()

    records = read_jsonl(out / "generations" / "tiny.jsonl")
    assert sorted((r["problem_id"], r["sample"]) for r in records) == [
        (f"p{i}", s) for i in range(3) for s in range(2)
    ]
    by_problem = {pid: [r for r in records if r["problem_id"] == pid] for pid in ("p0", "p1", "p2")}
    for record in by_problem["p0"]:
        assert record["tool_calls"] == 1 and record["tool_errors"] == 0 and record["num_turns"] == 2
        assert record["turns"][0]["tool"]["content"] == "```output\n42\n```"  # printed by the sandbox
        assert record["answer"] == "42" and record["correct"] is record["correct_strict"] is True
        assert record["correct_authors"] is True
    assert all(r["answer"] == "1024" and r["correct"] and r["correct_strict"] for r in by_problem["p1"])
    assert all(r["tool_calls"] == 0 and r["answer"] == "8" and not r["correct"] for r in by_problem["p2"])

    row = summary.set_index("benchmark").loc["tiny"]
    rates = [1.0, 1.0, 0.0]
    assert row["avg_at_k"] == pytest.approx(2 / 3)
    assert row["stderr"] == pytest.approx(statistics.stdev(rates) / math.sqrt(3))
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx(
        (2 / 3 - 1.96 * row["stderr"], 1.0)
    )  # clipped
    assert (row["pass_at_1"], row["pass_at_2"]) == pytest.approx((2 / 3, 2 / 3))
    assert row["mean_tool_calls"] == pytest.approx(4 / 6) and row["tool_error_rate"] == 0
    assert row["mean_turns"] == pytest.approx((2 + 2 + 2 + 2 + 1 + 1) / 6)
    assert row["mean_response_tokens"] == pytest.approx(sum(r["response_tokens"] for r in records) / 6)

    csv = pd.read_csv(out / "summary.csv")
    for column in (
        "benchmark",
        "n_problems",
        "n_samples",
        "avg_at_k",
        "stderr",
        "ci95_low",
        "ci95_high",
        "pass_at_1",
        "pass_at_2",
        "mean_turns",
        "mean_tool_calls",
        "tool_error_rate",
        "mean_response_tokens",
    ):
        assert column in csv.columns
    assert csv["avg_at_k"].tolist() == pytest.approx([2 / 3])
    per_problem = pd.read_csv(out / "per_problem.csv")
    assert per_problem["n_correct"].tolist() == [2, 2, 0]
    markdown = (out / "summary.md").read_text()
    assert "| tiny | 3 | 6 | 66.7 ± 33.3 | [1.3, 100.0] | 66.7 ± 33.3 | 66.7 ± 33.3 |" in markdown
    assert "| avg@k % | 95% CI | authors % | strict % |" in markdown

    runs = mlflow_runs(workdir)
    assert len(runs) == 1 and runs.loc[0, "status"] == "FINISHED"
    assert runs.loc[0, "metrics.tiny/avg_at_k"] == pytest.approx(2 / 3)
    assert runs.loc[0, "metrics.tiny/pass_at_2"] == pytest.approx(2 / 3)
    assert runs.loc[0, "params.n"] == "2" and runs.loc[0, "params.backend"] == "hf"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.loc[0, "run_id"])}
    assert artifacts == {"summary.csv", "summary.md", "per_problem.csv"}

    # The same command again: nothing to generate, no model loaded, same numbers.
    forbid_model(monkeypatch)
    again = run_eval(settings(tiny_model, bench_file, out), Console(width=200))
    assert len(read_jsonl(out / "generations" / "tiny.jsonl")) == 6
    assert again["avg_at_k"].tolist() == pytest.approx([2 / 3])

    # Other generation settings may not be mixed into the same directory.
    with pytest.raises(ValueError, match=r"temperature=0\.1 \(now 0\.7\)"):
        run_eval(settings(tiny_model, bench_file, out, temperature=0.7), Console(width=200))


def test_crash_keeps_finished_samples_and_rerun_resumes(
    tiny_model: Path, bench_file: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = workdir / "out"
    generated: list[int] = []
    original = HFBackend.generate

    def crash_after_first_batch(self: Any, requests: Any) -> Any:
        if generated:
            raise RuntimeError("simulated crash")
        generated.append(len(requests))
        return original(self, requests)

    monkeypatch.setattr(HFBackend, "generate", crash_after_first_batch)
    # Without tools each sample is one generation, and batch size 2 makes a batch of one problem.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(settings(tiny_model, bench_file, out, tools=False, batch_size=2), Console(width=200))
    path = out / "generations" / "tiny.jsonl"
    assert [(r["problem_id"], r["sample"]) for r in read_jsonl(path)] == [("p0", 0), ("p0", 1)]
    assert mlflow_runs(workdir).loc[0, "status"] == "FAILED"
    with open(path, "a") as f:
        f.write('{"problem_id": "p1", "sam')  # a record torn by the crash

    requested: list[int] = []

    def count(self: Any, requests: Any) -> Any:
        requested.append(len(requests))
        return original(self, requests)

    monkeypatch.setattr(HFBackend, "generate", count)
    summary = run_eval(settings(tiny_model, bench_file, out, tools=False, batch_size=2), Console(width=200))
    assert sum(requested) == 4  # only the four missing samples
    records = read_jsonl(path)
    assert sorted((r["problem_id"], r["sample"]) for r in records) == [
        (f"p{i}", s) for i in range(3) for s in range(2)
    ]
    assert all(r["tool_calls"] == 0 for r in records)
    assert summary["n_samples"].tolist() == [6]


def test_sigkill_mid_eval_then_rerun(
    tiny_model: Path, bench_file: Path, tmp_path: Path, run_ctpo: Any
) -> None:
    """kill -9 of a ``ctpo eval`` (a real process, its own sandbox service) while it appends samples: the
    service dies with it, and the same command run again generates only what is missing, so every
    sample is on disk exactly once, the summary counts each, and the killed MLflow run is marked KILLED."""
    n = 48
    command = [
        *("eval", "--model", str(tiny_model), "--benchmarks", str(bench_file), "--n", str(n)),
        *("--temperature", "0.1", "--max-turns", "3", "--max-tokens", "200", "--tir", "ctpo"),
        *("--backend", "hf", "--batch-size", "4", "--out", "out"),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("CTPO_SANDBOX_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ctpo_cli.cli", *command],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = tmp_path / "out" / "generations" / "tiny.jsonl"
    deadline, seen = time.monotonic() + 240, 0
    while time.monotonic() < deadline and process.poll() is None:
        seen = path.read_bytes().count(b"\n") if path.is_file() else 0
        if seen >= 8:
            break
        time.sleep(0.05)
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 8 <= seen < 3 * n, f"killed after {seen} of {3 * n} samples: not in the middle"
    assert children, "the eval started no sandbox service"
    _, alive = psutil.wait_procs(children, timeout=30)
    for leftover in alive:
        leftover.kill()
    assert not alive, f"processes outlived the killed eval: {[p.pid for p in alive]}"

    before = len(read_jsonl_complete(path))
    result = run_ctpo(*command, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    keys = [(r["problem_id"], r["sample"]) for r in read_jsonl(path)]
    assert sorted(keys) == sorted((f"p{i}", s) for i in range(3) for s in range(n))  # each once
    assert before >= 8
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["n_samples"].tolist() == [3 * n]
    assert summary["avg_at_k"].tolist() == pytest.approx([2 / 3])  # 2 of the 3 problems, every sample
    runs = mlflow_runs(tmp_path)
    assert runs["status"].tolist() == ["KILLED", "FINISHED"]


def read_jsonl_complete(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``'s complete lines (a kill may leave the last one cut)."""
    data = path.read_text()
    return [json.loads(line) for line in data[: data.rfind("\n") + 1].splitlines()]


def test_the_context_window_bounds_every_turn(tiny_model: Path, bench_file: Path, workdir: Path) -> None:
    """A budget past the model's positions is cut where they end, and a prompt that fills them gets an
    empty turn; decoding progress is reported step by step. (Before, the 256-position local model ran
    greedy decoding to the 8,000-token default, silently, for minutes per batch.)"""
    short, long = (conversation(problem, [])[:2] for problem, _, _ in (CONVERSATIONS[2], CONVERSATIONS[1]))
    chat = ChatTokenizer.load(str(tiny_model))
    lengths = [chat.count_tokens(chat.render(messages)) for messages in (short, long)]
    window = lengths[0] + 6
    assert lengths[1] >= window
    model = workdir / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": window}))
    steps: list[tuple[int, int]] = []
    backend = HFBackend(str(model), Sampling(0.0, 1.0, ()), lambda done, budget: steps.append((done, budget)))
    assert backend.context_window == window
    results = backend.generate([GenerationRequest(short, 8000, 0), GenerationRequest(long, 8000, 0)])
    assert [(r.num_tokens, r.finish_reason) for r in results] == [(6, "length"), (0, "length")]
    assert results[0].text == "Easy: "  # the memorised answer, cut at the window
    assert steps == [(i, 6) for i in range(7)] + [(6, 6)]

    console = Console(width=200, record=True)
    # The benchmark's prompts as they are: "What is 2 to the power 10?" is the one that fills the window.
    run_eval(settings(model, bench_file, workdir / "out", tools=False, n=1, prompt_as_is=True), console)
    assert (
        f"tiny: 1 samples got no token (their prompt fills the model's {window} positions)"
        in console.export_text()
    )


def test_rescore_uses_saved_generations_only(
    tiny_model: Path, bench_file: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = workdir / "out"
    run_eval(settings(tiny_model, bench_file, out), Console(width=200))
    path = out / "generations" / "tiny.jsonl"
    records = read_jsonl(path)
    for record in records:  # as if an older scorer had got every verdict wrong
        record["correct"] = not record["correct"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert pd.read_csv(out / "summary.csv")["avg_at_k"].tolist() == pytest.approx([2 / 3])

    forbid_model(monkeypatch)
    bench_file.unlink()  # no dataset needed either
    summary = run_eval(
        EvalSettings(model="unused", benchmarks=(str(bench_file),), n=2, out=out, rescore=True),
        Console(width=200),
    )
    assert summary["avg_at_k"].tolist() == pytest.approx([2 / 3])
    assert [r["correct"] for r in read_jsonl(path)] == [
        r["answer"] in ("42", "1024") for r in read_jsonl(path)
    ]
    runs = mlflow_runs(workdir)
    assert runs.iloc[-1]["params.rescore"] == "True" and runs.iloc[-1]["params.temperature"] == "0.1"

    # A smaller n summarises fewer samples but keeps every saved one.
    fewer = run_eval(
        EvalSettings(model="unused", benchmarks=(str(bench_file),), n=1, out=out, rescore=True), Console()
    )
    assert fewer["n_samples"].tolist() == [3] and len(read_jsonl(path)) == 6


def test_latest_checkpoint_is_the_default_model(tiny_model: Path, bench_file: Path, workdir: Path) -> None:
    import shutil

    from ctpo_cli.runs.rundir import write_run_info

    for name, started in (("old-run", "2026-01-01"), ("new-run", "2026-02-01")):
        write_run_info(workdir / "runs" / name, {"method": "ctpo", "started": started})
        shutil.copytree(tiny_model, workdir / "runs" / name / "checkpoint")
    console = Console(width=200, record=True)
    model = resolve_model(None, None, False, console)
    assert Path(model) == Path("runs/new-run/checkpoint")
    assert "runs/new-run/checkpoint" in console.export_text()
    run_eval(
        EvalSettings(
            model=model, benchmarks=(str(bench_file),), n=1, tools=False, max_tokens=40, backend="hf"
        ),
        console,
    )
    assert (workdir / "runs" / "new-run" / "eval" / "summary.csv").is_file()


@pytest.fixture
def completions_server(tiny_model: Path, serve_app: Callable[[Any], str]) -> Any:
    """A minimal OpenAI-style ``/v1/completions`` server (as ``vllm serve`` offers) over the tiny model,
    written directly against transformers, in a background uvicorn thread."""
    import threading

    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    lock = threading.Lock()
    requests: list[dict[str, Any]] = []
    api = FastAPI()

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"data": [{"id": "tiny"}]}

    @api.post("/v1/completions")
    def complete(body: dict[str, Any]) -> dict[str, Any]:
        requests.append(body)
        prompt = tokenizer(body["prompt"], return_tensors="pt", add_special_tokens=False)
        with lock, torch.no_grad():
            torch.manual_seed(body["seed"])
            output = model.generate(
                **prompt,
                max_new_tokens=body["max_tokens"],
                do_sample=True,
                temperature=body["temperature"],
                top_p=body["top_p"],
                stop_strings=body["stop"],
                tokenizer=tokenizer,
            )
        new = output[0, prompt["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True)
        finish = "stop" if tokenizer.eos_token_id in new else "length"
        for stop in body["stop"] or []:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return {
            "choices": [{"text": text, "finish_reason": finish}],
            "usage": {"completion_tokens": len(new)},
        }

    return serve_app(api), requests


def test_openai_backend_against_a_completions_server(
    tiny_model: Path,
    bench_file: Path,
    workdir: Path,
    completions_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, requests = completions_server
    console = Console(width=200, record=True)
    with running_service() as service:
        monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)  # a sandbox that is already running
        summary = run_eval(
            settings(tiny_model, bench_file, workdir / "out", backend="auto", base_url=url), console
        )
    assert "starting a service" not in console.export_text()
    assert summary["avg_at_k"].tolist() == pytest.approx([2 / 3])
    assert {r["model"] for r in requests} == {"tiny"} and {tuple(r["stop"]) for r in requests} == {
        ("```output",)
    }
    assert len(requests) == 6 + 4  # one turn per sample, plus the second turn of the four tool users
    records = read_jsonl(workdir / "out" / "generations" / "tiny.jsonl")
    assert sum(r["tool_calls"] for r in records) == 4
    assert mlflow_runs(workdir).loc[0, "params.backend"] == "openai"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env_code = "import sys; from ctpo_cli.cli import main; sys.argv = ['ctpo', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", env_code, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    no_model = run_cli("eval", "--benchmarks", "aime25", cwd=tmp_path)
    assert no_model.returncode == 2
    assert no_model.stderr.strip().count("\n") == 0 and "pass --model PATH" in no_model.stderr

    unknown = run_cli("eval", "--model", "m", "--benchmarks", "aime99", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.strip().count("\n") == 0
    assert "valid names: aime25, aime26, hmmt_nov_2025, brumo_2025" in unknown.stderr


def test_an_unhealthy_sandbox_fails_before_the_model_loads(
    tiny_model: Path, bench_file: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid_model(monkeypatch)
    with pytest.raises(
        SandboxUnavailable, match=r"sandbox service at http://127\.0\.0\.1:9 does not answer /health"
    ):
        run_eval(
            settings(tiny_model, bench_file, workdir / "out", sandbox_url="http://127.0.0.1:9"), Console()
        )


def test_a_benchmark_named_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names a benchmark twice"):
        run_eval(EvalSettings(model="m", benchmarks=("a/x.parquet", "b/x.parquet"), out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_offline_benchmark_error_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub, even on a machine with internet
    # the competition sets ship with ctpo; a registry dataset that does not (DeepScaleR) needs the hub
    result = run_cli("eval", "--model", "m", "--benchmarks", "deepscaler", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "ctpo data prepare --from-file deepscaler=FILE" in result.stderr
    assert not (tmp_path / "evals").exists()  # nothing written for a failed start


def test_vllm_backend_without_vllm_is_a_clear_error(
    tiny_model: Path, bench_file: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without the GPU extra
    with pytest.raises(BackendUnavailable, match=r"needs vLLM .*use --backend hf on CPU"):
        run_eval(
            settings(tiny_model, bench_file, workdir / "out", backend="vllm", tools=False), Console(width=200)
        )
    assert not (workdir / "out").exists()


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of the n samples that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 4), (8, 8, 8), (10, 1, 5), (6, 5, 2)]
)
def test_pass_at_k_is_the_subset_probability(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k))


def fake_record(pid: str, sample: int, correct: bool, calls: int = 0, errors: int = 0) -> dict[str, Any]:
    return {
        "problem_id": pid,
        "sample": sample,
        "ground_truth": "1",
        "correct": correct,
        "correct_authors": correct,
        "correct_strict": correct and sample > 0,
        "num_turns": calls + 1,
        "tool_calls": calls,
        "tool_errors": errors,
        "response_tokens": 100 + sample,
        "error": None,
    }


def test_summary_over_benchmarks() -> None:
    a = [
        fake_record(p, s, c)
        for p, outcomes in (("x", [1, 1, 0, 0]), ("y", [1, 1, 1, 1]), ("z", [0, 0, 0, 0]))
        for s, c in enumerate(outcomes)
    ]
    b = [
        fake_record(p, s, c, calls=2, errors=e)
        for p, outcomes in (("u", [1, 0, 0, 0]), ("v", [1, 1, 1, 0]))
        for s, (c, e) in enumerate(zip(outcomes, [1, 0, 0, 2], strict=True))
    ]
    summary, problems = summarize({"a": a, "b": b})
    rows = summary.set_index("benchmark")
    assert list(summary["benchmark"]) == ["a", "b", "average"]
    assert rows.loc["a", "avg_at_k"] == pytest.approx(0.5)
    assert rows.loc["a", "avg_at_k_strict"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3)  # sample 0 not strict
    assert rows.loc["a", "stderr"] == pytest.approx(statistics.stdev([0.5, 1.0, 0.0]) / math.sqrt(3))
    assert rows.loc["a", "pass_at_2"] == pytest.approx((1 - 1 / 6 + 1 + 0) / 3)
    assert rows.loc["a", "pass_at_4"] == pytest.approx(2 / 3)
    assert rows.loc["b", "avg_at_k"] == pytest.approx(0.5)
    assert rows.loc["b", "stderr"] == pytest.approx(0.25)
    assert (rows.loc["b", "ci95_low"], rows.loc["b", "ci95_high"]) == pytest.approx((0.5 - 0.49, 0.5 + 0.49))
    assert (rows.loc["a", "ci95_low"], rows.loc["a", "ci95_high"]) == (0.0, 1.0)  # 0.5 -/+ 0.566, clipped
    assert rows.loc["b", "tool_error_rate"] == pytest.approx(6 / 16)
    assert math.isnan(rows.loc["a", "tool_error_rate"])
    assert rows.loc["average", "avg_at_k"] == pytest.approx(0.5)
    assert rows.loc["average", "stderr"] == pytest.approx(
        math.hypot(rows.loc["a", "stderr"], rows.loc["b", "stderr"]) / 2
    )
    assert rows.loc["average", "n_problems"] == 5 and rows.loc["average", "n_samples"] == 20
    assert problems["pass_rate"].tolist() == [0.5, 1.0, 0.0, 0.25, 0.75]
