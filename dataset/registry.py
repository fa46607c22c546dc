"""The registry of datasets (evaluation benchmarks and the training set) and the verl parquet schema.

verl schema, one row per problem (what verl's RLHFDataset reads and ``ctpo eval`` loads):

    id            str    stable problem id (generations are keyed by it)
    data_source   str    the Hugging Face dataset id, e.g. ``math-ai/aime25``
    prompt        list   chat messages [{"role": "system", ...}, {"role": "user", "content": problem}]
    ability       str    ``math``
    reward_model  dict   {"ground_truth": answer as a string, "style": "rule"}
    extra_info    dict   {"index": row number, "split": the source split}

``load_benchmark`` finds a benchmark as a parquet path, else ``dataset/<name>.parquet`` in the working
directory (written by ``ctpo data prepare``), else the copy shipped in this package, else on the Hugging
Face hub (cached into ``dataset/`` for the next offline run).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from ctpo_cli.errors import ConfigError, DataError, InputFileError
from ctpo_cli.runs.atomic import atomic_path
from ctpo_cli.tir.protocol import SYSTEM_PROMPT
from ctpo_cli.tir.scoring import extract_boxed
from dataset import DATA_DIR, shipped_file

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
"""What a verl parquet must have (``id``, ``ability`` and ``extra_info`` are filled in when absent)."""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset on the Hugging Face hub and the columns holding each row's problem, answer and id."""

    name: str
    hf_id: str
    split: str
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str | None = None
    kind: str = "benchmark"  # "benchmark" (evaluation) or "train"


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("aime25", "math-ai/aime25", "test", id_column="id"),
        DatasetSpec("aime26", "math-ai/aime26", "test", id_column="id"),
        DatasetSpec("hmmt_nov_2025", "MathArena/hmmt_nov_2025", "train", id_column="problem_idx"),
        DatasetSpec("brumo_2025", "MathArena/brumo_2025", "train", id_column="problem_idx"),
        # math-ai/aime24 keeps the answer as a boxed "solution"; the box is removed on conversion.
        DatasetSpec("aime24", "math-ai/aime24", "test", answer_column="solution", id_column="id"),
        DatasetSpec("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", "train", kind="train"),
    )
}
PAPER_BENCHMARKS = ("aime25", "aime26", "hmmt_nov_2025", "brumo_2025")
"""The four sets of the paper's Table 2 (avg@32)."""

PROBLEM_ALIASES = ("problem", "question", "Problem", "Question")
ANSWER_ALIASES = ("answer", "Answer", "ground_truth", "final_answer", "solution")


def get_spec(name: str) -> DatasetSpec:
    """The registry entry; ValueError listing the valid names for an unknown one."""
    if name not in REGISTRY:
        raise ConfigError(
            f"unknown dataset {name!r}; valid names: {', '.join(REGISTRY)} (or a path to a .parquet)"
        )
    return REGISTRY[name]


def output_name(spec: DatasetSpec) -> str:
    """File stem under ``dataset/``: ``<name>`` for benchmarks, ``<name>_<split>`` for training sets."""
    return f"{spec.name}_{spec.split}" if spec.kind == "train" else spec.name


def _pick_column(frame: pd.DataFrame, preferred: str, aliases: Sequence[str], what: str, source: str) -> str:
    for column in (preferred, *aliases):
        if column in frame.columns:
            return column
    raise DataError(
        f"{source}: no {what} column (looked for {', '.join(dict.fromkeys((preferred, *aliases)))}; "
        f"has {', '.join(map(str, frame.columns))})"
    )


def _missing(value: Any) -> bool:
    """An absent answer: None, NaN (an empty cell) or blank text."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _answer_text(value: Any) -> str:
    text = str(value).strip()
    return extract_boxed(text) or text


def to_verl(
    raw: pd.DataFrame, spec: DatasetSpec, source: str, system_prompt: str = SYSTEM_PROMPT
) -> pd.DataFrame:
    """Convert rows with a problem and an answer column (hub rows, JSON, CSV-like tables) to the schema.

    Columns are looked up by the spec's names, then by common aliases (``question``, ``Answer``, ...);
    ValueError names what is missing. A boxed answer (``\\boxed{204}``) keeps only the box's content.
    """
    problem_column = _pick_column(raw, spec.problem_column, PROBLEM_ALIASES, "problem", source)
    answer_column = _pick_column(raw, spec.answer_column, ANSWER_ALIASES, "answer", source)
    empty = [i for i, answer in enumerate(raw[answer_column]) if _missing(answer)]
    if empty:
        raise DataError(
            f"{source}: row {empty[0]} has an empty {answer_column!r} (every problem needs its answer)"
        )
    ids = (
        raw[spec.id_column].astype(str).tolist()
        if spec.id_column and spec.id_column in raw.columns
        else [str(i) for i in range(len(raw))]
    )
    rows = [
        {
            "id": f"{spec.name}-{problem_id}",
            "data_source": spec.hf_id,
            "prompt": [
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": str(problem).strip()},
            ],
            "ability": "math",
            "reward_model": {"ground_truth": _answer_text(answer), "style": "rule"},
            "extra_info": {"index": index, "split": spec.split},
        }
        for index, (problem_id, problem, answer) in enumerate(
            zip(ids, raw[problem_column], raw[answer_column], strict=True)
        )
    ]
    frame = pd.DataFrame(rows)
    if frame["id"].duplicated().any():
        raise DataError(f"{source}: duplicate problem ids in column {spec.id_column!r}")
    return frame


def validate(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the verl schema (ValueError naming missing columns); fill ``id``/``ability``/``extra_info``."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source} is not in verl format: missing column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, frame.columns))}); convert it with `ctpo data prepare --from-file`"
        )
    if len(frame) == 0:
        raise DataError(f"{source} has no rows")
    bad = [
        i
        for i, rm in enumerate(frame["reward_model"])
        if not isinstance(rm, dict) or _missing(rm.get("ground_truth"))
    ]
    if bad:
        raise DataError(f"{source}: reward_model of row {bad[0]} has no ground_truth (or an empty one)")
    frame = frame.reset_index(drop=True)
    if "id" not in frame.columns:
        frame["id"] = [str(i) for i in range(len(frame))]
    frame["id"] = frame["id"].astype(str)
    if frame["id"].duplicated().any():
        raise DataError(f"{source}: duplicate values in column id")
    if "ability" not in frame.columns:
        frame["ability"] = "math"
    if "extra_info" not in frame.columns:
        frame["extra_info"] = [{"index": i, "split": "test"} for i in range(len(frame))]
    return frame


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (``$HF_ENDPOINT``) accepts a TCP connection; ``HF_HUB_OFFLINE=1`` counts as yes
    (``datasets`` then answers from its cache). Spares the minute of retries ``datasets`` spends offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def download(spec: DatasetSpec) -> pd.DataFrame:
    """The raw rows from the Hugging Face hub (``datasets`` imported here: it is slow to import).

    ConnectionError at once when the hub cannot be reached."""
    if not hub_reachable():
        raise ConnectionError(f"cannot reach the Hugging Face hub for {spec.hf_id}")
    from datasets import load_dataset

    frame = load_dataset(spec.hf_id, split=spec.split).to_pandas()
    assert isinstance(frame, pd.DataFrame)
    return frame


def is_path(name_or_path: str) -> bool:
    """Whether a ``--benchmarks`` entry names a file rather than a registry entry."""
    return name_or_path.endswith(".parquet") or "/" in name_or_path or Path(name_or_path).is_file()


def load_benchmark(name_or_path: str, data_dir: str | Path = DATA_DIR) -> pd.DataFrame:
    """A benchmark in the verl schema, from a parquet path, ``<data_dir>/<name>.parquet``, the copy
    shipped in this package (:func:`dataset.shipped_file`) or the hub.

    A hub download is also written to ``<data_dir>/<name>.parquet``. Errors are one line: unknown
    names list the valid ones; an unreachable hub says how to prepare the file offline.
    """
    if is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise InputFileError(f"benchmark file {path} does not exist")
        return validate(read_parquet(path), str(path))
    spec = get_spec(name_or_path)
    local = Path(data_dir) / f"{output_name(spec)}.parquet"
    if local.is_file():
        return validate(read_parquet(local), str(local))
    shipped = shipped_file(output_name(spec))
    if shipped is not None:
        return validate(read_parquet(shipped), str(shipped))
    try:
        raw = download(spec)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputFileError(
            f"{spec.name}: no {local}, and {spec.hf_id} could not be downloaded ({reason}); offline, run "
            f"`ctpo data prepare --from-file {spec.name}=FILE` or pass --benchmarks path/to/{spec.name}.parquet"
        ) from error
    frame = to_verl(raw, spec, spec.hf_id)
    write_parquet(frame, local)
    return validate(frame, spec.hf_id)


def read_parquet(path: str | Path) -> pd.DataFrame:
    """A parquet file; DataError naming it when it is not one (truncated, corrupt, another format)."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable parquet file ({str(error).splitlines()[0]})") from None


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def ground_truth(row: pd.Series) -> str:
    """The row's ground truth as a string."""
    return str(row["reward_model"]["ground_truth"])


def prompt_messages(row: pd.Series) -> list[dict[str, str]]:
    """The row's chat prompt as plain dicts (parquet gives numpy arrays of mappings)."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]]
