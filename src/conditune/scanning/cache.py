"""Resumable scan cache: one JSON line per finished matrix, keyed by checkpoint fingerprint.

A scan appends each record as soon as it is computed (flushed and fsynced), so a killed scan loses
at most the matrix in flight; a torn last line is ignored on reading. The file name carries the
checkpoint fingerprint and the options that change results, so a different checkpoint (or a full
spectrum instead of the fast path) never reuses another's records.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from conditune.scanning.records import TensorRecord


def cache_dir() -> Path:
    from conditune.models import conditune_home

    return conditune_home() / "scans"


def cache_key(fingerprint: str, options: dict) -> str:
    options_digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return f"{fingerprint[:32]}-{options_digest}"


class ScanCache:
    def __init__(self, key: str, folder: Path | None = None):
        self.path = (folder or cache_dir()) / f"{key}.jsonl"

    def load(self) -> dict[str, TensorRecord]:
        records: dict[str, TensorRecord] = {}
        if not self.path.is_file():
            return records
        with open(self.path) as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn write of a killed scan
                record = TensorRecord.from_row(row)
                if "singular_values" in row:
                    record.extra["singular_values"] = row["singular_values"]
                records[record.name] = record
        return records

    def append(self, records: list[TensorRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_mid_line(self.path)
        with open(self.path, "a") as handle:
            if torn:  # a killed scan left half a line: end it, so the next record starts clean
                handle.write("\n")
            for record in records:
                row = record.to_row()
                if "singular_values" in record.extra:
                    row["singular_values"] = record.extra["singular_values"]
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"
