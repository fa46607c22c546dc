"""The reproduction manifest (docs/reproduce.md, ``ctpo train --dry-run --explain``) is generated from the
composed config, and the default runs differ from the authors' release only where it says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctpo_cli.train import manifest
from ctpo_cli.train.experiments import build_job, compose_experiment


def test_docs_reproduce_md_is_what_the_config_composes_to(tmp_path: Path) -> None:
    """Regenerate with `python -m ctpo_cli.train.manifest` when this fails."""
    expected = manifest.markdown(
        manifest.doc_job(tmp_path), f"ctpo train --method {manifest.DOC_METHOD} --model {manifest.DOC_MODEL}"
    )
    assert manifest.DOC.read_text() == expected


@pytest.mark.parametrize("method", ["ctpo", "grpo", "gspo", "ctpo-fixed", "seq-is"])
@pytest.mark.parametrize("model", ["Qwen3-14B", "Qwen3-4B"])
def test_paper_presets_differ_from_the_authors_only_with_a_reason(
    method: str, model: str, tmp_path: Path
) -> None:
    job = build_job(compose_experiment(method, model, runs_dir=tmp_path))
    assert manifest.undocumented(job) == []
    notes = {row["setting"]: row["note"] for row in manifest.rows(job)}
    assert notes["rollout IS correction"] == notes["tool message cap (characters)"] == "same"
    assert ("a_low" in notes) == (method == "ctpo")  # the authors' release trains CTPO only


def test_an_override_shows_up_as_a_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = build_job(
        compose_experiment("ctpo", "Qwen3-4B", overrides=["ctpo.reward=strict"], runs_dir=tmp_path)
    )
    assert manifest.undocumented(job) == ["reward"]
    manifest.print_explain(job)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("# reward "))
    assert "strict | 1 if the answer is correct" in line and line.endswith("differs (set by command line)")
