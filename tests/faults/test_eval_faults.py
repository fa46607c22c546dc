"""ctpo eval against a flaky OpenAI-compatible server (a real HTTP server in a thread): transient errors
are retried; samples that still fail are left out of avg@k, counted and named; a later run in the same
directory summarises every benchmark evaluated there."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi import FastAPI, Request, Response
from rich.console import Console
from tenacity import wait_none

from ctpo_cli.eval.backends import OpenAIBackend
from ctpo_cli.eval.runner import run_eval
from ctpo_cli.eval.settings import EvalSettings
from ctpo_cli.train.local.model import build_tokenizer

QUESTIONS = {"p0": ("What is 6 times 7?", "42"), "p1": ("What is 3 plus 4?", "7"), "bad": ("Break?", "1")}


@pytest.fixture
def flaky_server(serve_app: Callable[[Any], str]) -> tuple[str, Counter[str]]:
    """Answers every problem right, but each (prompt, seed) gets 503 twice before its answer; the
    problem 'Break?' always gets 500."""
    calls: Counter[str] = Counter()
    api = FastAPI()

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"data": [{"id": "flaky"}]}

    @api.post("/v1/completions")
    async def complete(request: Request) -> Any:
        body = await request.json()
        key = f"{body['prompt']}|{body['seed']}"
        calls[key] += 1
        if "Break?" in body["prompt"]:
            return Response(status_code=500)
        if calls[key] <= 2:
            return Response(status_code=503)
        answer = next(truth for question, truth in QUESTIONS.values() if question in body["prompt"])
        return {"choices": [{"text": f"\\\\boxed{{{answer}}}", "finish_reason": "stop"}], "usage": {}}

    return serve_app(api), calls


def benchmark(path: Path, ids: list[str]) -> Path:
    rows = [
        {
            "id": pid,
            "data_source": "flaky",
            "prompt": [{"role": "user", "content": QUESTIONS[pid][0]}],
            "ability": "math",
            "reward_model": {"ground_truth": QUESTIONS[pid][1], "style": "rule"},
            "extra_info": {"index": i, "split": "test"},
        }
        for i, pid in enumerate(ids)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_transient_errors_are_retried_and_failures_left_out(
    flaky_server: tuple[str, Counter[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, calls = flaky_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(OpenAIBackend._post.retry, "wait", wait_none())  # type: ignore[attr-defined]
    model = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(model)
    out = tmp_path / "out"

    def evaluate(bench: Path) -> pd.DataFrame:
        settings = EvalSettings(
            model=str(model),
            benchmarks=(str(bench),),
            n=2,
            tools=False,
            backend="openai",
            base_url=url,
            out=out,
        )
        return run_eval(settings, Console(width=200)).set_index("benchmark")

    first = evaluate(benchmark(tmp_path / "flaky.parquet", ["p0", "p1", "bad"]))
    assert first.loc["flaky", "avg_at_k"] == 1.0  # the failed samples of 'bad' are no wrong answers
    assert first.loc["flaky", "n_problems"] == 2 and first.loc["flaky", "n_samples"] == 4
    assert first.loc["flaky", "n_errors"] == 2 and first.loc["flaky", "failed_samples"] == "bad#0 bad#1"
    good = [key for key in calls if "Break?" not in key]
    assert len(good) == 4 and all(calls[key] == 3 for key in good)  # two 503s, then the answer
    assert [calls[key] for key in calls if "Break?" in key] == [6, 6]  # every try, then given up
    assert "bad#0 bad#1" in (out / "summary.md").read_text()

    second = evaluate(benchmark(tmp_path / "other.parquet", ["p1"]))
    assert set(second.index) == {"other", "flaky", "average"}  # the earlier benchmark stays in the summary
    assert second.loc["flaky", "n_errors"] == 2  # from its saved samples: only 'other' was asked for
    assert set(pd.read_csv(out / "summary.csv")["benchmark"]) == {"other", "flaky", "average"}
