"""Saved generations of ``ctpo eval``: one JSONL file per benchmark, appended sample by sample."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctpo_cli.errors import warn_damaged
from ctpo_cli.runs import atomic


class GenerationStore:
    """``<benchmark>.jsonl``: one JSON record per finished sample, appended as it finishes.

    The last record of a (problem_id, sample) key wins. A line cut short by a crash is dropped (and
    cut from the file before the next append); a damaged line elsewhere is skipped with a warning, so
    its sample is generated again.
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
        records = {}
        for number, line in enumerate(complete.decode(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
                if record is not None:
                    records[(record["problem_id"], record["sample"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                warn_damaged(f"{self.path}:{number}", "not a saved sample (it will be generated again)")
        return records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Sequence[dict[str, Any]]) -> None:
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
