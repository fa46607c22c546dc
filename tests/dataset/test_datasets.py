"""Benchmark registry, verl-schema conversion and ``ctpo data prepare`` (local files only; no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ctpo_cli.errors import BackendUnavailable
from ctpo_cli.tir.protocol import SYSTEM_PROMPT
from dataset.prepare import prepare
from dataset.registry import PAPER_BENCHMARKS, REGISTRY, load_benchmark

PROBLEMS = [
    {"problem": "Find $x$ if $x + 1 = 26$.", "answer": "025", "id": "a"},
    {"problem": "Compute $17/2$.", "answer": 8.5, "id": "b"},
    {"problem": "What is $\\frac{1}{3}\\cdot\\frac{1}{3}$?", "answer": "\\boxed{\\frac{1}{9}}", "id": "c"},
]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is unreachable in these tests, also on machines with internet."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_registry_has_the_papers_datasets() -> None:
    # The Hugging Face ids of docs/method.md.
    assert {name: REGISTRY[name].hf_id for name in PAPER_BENCHMARKS} == {
        "aime25": "math-ai/aime25",
        "aime26": "math-ai/aime26",
        "hmmt_nov_2025": "MathArena/hmmt_nov_2025",
        "brumo_2025": "MathArena/brumo_2025",
    }
    assert REGISTRY["deepscaler"].hf_id == "agentica-org/DeepScaleR-Preview-Dataset"
    assert REGISTRY["deepscaler"].split == "train"


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prepare_from_jsonl_writes_verl_schema(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "aime25.jsonl", PROBLEMS)
    (written,) = prepare(from_files=[f"aime25={source}"], out=tmp_path / "data")
    assert written.path == tmp_path / "data" / "aime25.parquet" and written.rows == 3

    frame = pd.read_parquet(written.path)
    assert list(frame.columns) == ["id", "data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert frame["id"].tolist() == ["aime25-a", "aime25-b", "aime25-c"]
    assert set(frame["data_source"]) == {"math-ai/aime25"}
    first = frame.iloc[0]
    assert [dict(m) for m in first["prompt"]] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Find $x$ if $x + 1 = 26$."},
    ]
    assert [rm["ground_truth"] for rm in frame["reward_model"]] == ["025", "8.5", "\\frac{1}{9}"]
    assert {rm["style"] for rm in frame["reward_model"]} == {"rule"}
    assert [dict(e) for e in frame["extra_info"]] == [{"index": i, "split": "test"} for i in range(3)]

    loaded = load_benchmark("aime25", data_dir=tmp_path / "data")
    assert loaded["id"].tolist() == frame["id"].tolist()


def test_prepare_reads_json_csv_and_parquet_and_names_train_files(tmp_path: Path) -> None:
    json_file = tmp_path / "brumo.json"
    json_file.write_text(
        json.dumps([{"question": p["problem"], "Answer": str(p["answer"])} for p in PROBLEMS])
    )
    csv_file = tmp_path / "train.csv"
    pd.DataFrame(PROBLEMS).drop(columns="id").to_csv(csv_file, index=False)
    parquet_file = tmp_path / "hmmt.parquet"
    pd.DataFrame(PROBLEMS).astype(str).to_parquet(parquet_file)
    written = prepare(
        from_files=[f"brumo_2025={json_file}", f"deepscaler={csv_file}", f"hmmt_nov_2025={parquet_file}"],
        out=tmp_path / "data",
    )
    assert {w.name: w.path.name for w in written} == {
        "brumo_2025": "brumo_2025.parquet",
        "deepscaler": "deepscaler_train.parquet",
        "hmmt_nov_2025": "hmmt_nov_2025.parquet",
    }
    train = pd.read_parquet(tmp_path / "data" / "deepscaler_train.parquet")
    assert [rm["ground_truth"] for rm in train["reward_model"]] == ["025", "8.5", "\\frac{1}{9}"]
    assert {e["split"] for e in train["extra_info"]} == {"train"}
    brumo = pd.read_parquet(tmp_path / "data" / "brumo_2025.parquet")
    assert brumo.iloc[1]["prompt"][1]["content"] == "Compute $17/2$."


def test_cli_data_prepare(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctpo_cli.cli import app

    source = write_jsonl(tmp_path / "aime25.jsonl", PROBLEMS)
    result = CliRunner().invoke(
        app, ["data", "prepare", "--from-file", str(source), "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.output
    assert "aime25" in result.output and (tmp_path / "d" / "aime25.parquet").is_file()


def test_a_verl_parquet_passes_through_and_loads_by_path(tmp_path: Path) -> None:
    verl_file = tmp_path / "mine.parquet"
    pd.DataFrame(
        [
            {
                "data_source": "mine",
                "prompt": [{"role": "user", "content": "1+1?"}],
                "reward_model": {"ground_truth": "2"},
            }
        ]
    ).to_parquet(verl_file)
    frame = load_benchmark(str(verl_file))
    assert frame["id"].tolist() == ["0"] and frame["ability"].tolist() == ["math"]
    (written,) = prepare(from_files=[str(verl_file)], out=tmp_path / "data")
    assert written.name == "mine" and pd.read_parquet(written.path)["data_source"].tolist() == ["mine"]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "solution_text": "2"}])
    with pytest.raises(
        ValueError,
        match=r"bad\.jsonl: no answer column \(looked for answer, Answer, .*has question, solution_text\)",
    ):
        prepare(from_files=[f"aime25={source}"], out=tmp_path / "data")
    broken = tmp_path / "broken.parquet"
    pd.DataFrame([{"data_source": "x", "prompt": [{"role": "user", "content": "q"}]}]).to_parquet(broken)
    with pytest.raises(
        ValueError, match=r"broken\.parquet is not in verl format: missing column\(s\) reward_model"
    ):
        load_benchmark(str(broken))


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'aime99'; valid names: aime25, aime26") as unknown:
        load_benchmark("aime99", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist") as missing:
        load_benchmark(str(tmp_path / "nope.parquet"))
    with pytest.raises(FileNotFoundError, match=r"ctpo data prepare --from-file deepscaler=FILE") as offline:
        load_benchmark("deepscaler", data_dir=tmp_path / "data")
    with pytest.raises(
        BackendUnavailable, match=r"cannot reach the Hugging Face hub to download aime25,deepscaler"
    ) as hub:
        prepare(["aime25", "deepscaler"], out=tmp_path / "data")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'") as suffix:
        prepare(from_files=[f"aime25={write_jsonl(tmp_path / 'x.txt', PROBLEMS)}"], out=tmp_path / "data")
    for error in (unknown, missing, offline, hub, suffix):
        assert "\n" not in str(error.value)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("name", "problems"),
    [("aime25", 30), ("aime26", 30), ("hmmt_nov_2025", 30), ("brumo_2025", 30), ("aime24", 30)],
)
def test_competition_sets_are_shipped(tmp_path: Path, name: str, problems: int) -> None:
    """Offline, with nothing prepared, every competition set loads from the copy shipped in the package."""
    frame = load_benchmark(name, data_dir=tmp_path / "empty")
    assert len(frame) == problems
    assert frame["data_source"].iloc[0] == REGISTRY[name].hf_id
    assert not (tmp_path / "empty").exists()
