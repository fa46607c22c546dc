"""``ctpo data prepare``: datasets from the Hugging Face hub or local files, written as verl parquet.

    ctpo data prepare                                   # every registry dataset, from the hub
    ctpo data prepare --datasets aime25,deepscaler      # some of them
    ctpo data prepare --from-file aime25=aime25.jsonl   # offline: a local parquet/JSON/JSONL/CSV file

Output: ``<out>/<name>.parquet`` for benchmarks (``dataset/aime25.parquet``) and ``<out>/<name>_<split>.parquet``
for training sets (``dataset/deepscaler_train.parquet``), in the schema of ``dataset.registry``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctpo_cli.errors import BackendUnavailable, ConfigError, DataError, InputFileError
from dataset import DATA_DIR
from dataset.registry import (
    REGISTRY,
    REQUIRED_COLUMNS,
    DatasetSpec,
    download,
    get_spec,
    hub_reachable,
    output_name,
    read_parquet,
    to_verl,
    validate,
    write_parquet,
)

LOCAL_FORMATS = (".parquet", ".json", ".jsonl", ".csv")


@dataclass(frozen=True)
class Prepared:
    """One written file and where its rows came from."""

    name: str
    path: Path
    rows: int
    source: str


def read_table(path: Path) -> pd.DataFrame:
    """A local parquet, JSON (a list of records or a dict of columns), JSON Lines or CSV file."""
    if not path.is_file():
        raise InputFileError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix not in LOCAL_FORMATS:
        raise ConfigError(f"{path}: unsupported file type {suffix!r} (use one of {', '.join(LOCAL_FORMATS)})")
    try:
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            data = json.loads(path.read_text())
            return pd.DataFrame(data if isinstance(data, list) else dict(data))
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise DataError(
            f"{path} is not a readable {suffix[1:]} table ({str(error).splitlines()[0]})"
        ) from None


def parse_from_file(entry: str) -> tuple[DatasetSpec, Path]:
    """``NAME=PATH`` or ``PATH`` (the file stem names the dataset) -> the spec and the file.

    A name outside the registry makes a custom benchmark with ``data_source`` ``local/<name>``.
    """
    name, sep, path = entry.partition("=")
    if not sep:
        path, name = entry, Path(entry).stem
    if name in REGISTRY:
        return REGISTRY[name], Path(path)
    if not name.isidentifier():
        raise ConfigError(f"--from-file {entry}: give it a name, as NAME=PATH (known: {', '.join(REGISTRY)})")
    return DatasetSpec(name, f"local/{name}", "test"), Path(path)


def convert_file(spec: DatasetSpec, path: Path) -> pd.DataFrame:
    """A local file in the verl schema: converted from problem/answer columns, or checked if already verl."""
    raw = read_table(path)
    if all(column in raw.columns for column in REQUIRED_COLUMNS):
        return validate(raw, str(path))
    return to_verl(raw, spec, str(path))


def prepare(
    datasets: Sequence[str] | None = None, from_files: Sequence[str] = (), out: str | Path = DATA_DIR
) -> list[Prepared]:
    """Write each dataset as ``<out>/<file stem>.parquet``; local files first, the hub for the rest.

    ``datasets`` defaults to the whole registry when no ``from_files`` are given, else to none.
    """
    out = Path(out)
    jobs: list[tuple[DatasetSpec, Path | None]] = [parse_from_file(entry) for entry in from_files]
    local_names = {spec.name for spec, _ in jobs}
    names = list(datasets) if datasets is not None else ([] if from_files else list(REGISTRY))
    jobs += [(get_spec(name), None) for name in names if name not in local_names]
    if any(path is None for _, path in jobs) and not hub_reachable():
        missing = ",".join(spec.name for spec, path in jobs if path is None)
        raise BackendUnavailable(
            f"cannot reach the Hugging Face hub to download {missing}; offline, convert local files with "
            "`ctpo data prepare --from-file NAME=FILE` (parquet, JSON, JSONL or CSV with problem and answer columns)"
        )
    prepared = []
    for spec, path in jobs:
        if path is None:
            frame, source = to_verl(download(spec), spec, spec.hf_id), f"hub {spec.hf_id}:{spec.split}"
        else:
            frame, source = convert_file(spec, path), str(path)
        target = out / f"{output_name(spec)}.parquet"
        write_parquet(frame, target)
        prepared.append(Prepared(spec.name, target, len(frame), source))
    return prepared
