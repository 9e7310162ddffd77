"""Resumable scan cache: one JSON line per finished matrix, keyed by checkpoint fingerprint.

A scan appends each record as soon as it is computed (flushed and fsynced), so a killed scan loses
at most the matrix in flight. On reading, a line that is not a whole record (torn by a kill, or
damaged some other way) is skipped and counted in :attr:`ScanCache.skipped`, with one warning: its
tensor is scanned again, and the cache keeps working for every later scan. The file name carries the
checkpoint fingerprint and the options that change results, so a different checkpoint (or a full
spectrum instead of the fast path) never reuses another's records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from conditune.errors import CondituneError
from conditune.io import OutputPathError, ensure_folder, os_error_reason
from conditune.scanning.records import TensorRecord

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    from conditune.models import conditune_home

    return conditune_home() / "scans"


def cache_key(fingerprint: str, options: dict) -> str:
    options_digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return f"{fingerprint[:32]}-{options_digest}"


class ScanCache:
    def __init__(self, key: str, folder: Path | None = None):
        self.path = (folder or cache_dir()) / f"{key}.jsonl"
        self.skipped: list[tuple[int, str]] = []  # (line number, why) of the lines the last load() skipped

    def load(self) -> dict[str, TensorRecord]:
        records: dict[str, TensorRecord] = {}
        self.skipped = []
        if not self.path.is_file():
            return records
        with open(self.path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = _parse_line(raw)
                except _BAD_LINE as exc:
                    self.skipped.append((line_no, " ".join(str(exc).split())[:120] or type(exc).__name__))
                    continue
                records[record.name] = record
        if self.skipped:
            line_no, why = self.skipped[0]
            log.warning(
                "scan cache %s: skipped %d damaged line(s), scanning those tensors again (first: line %d: %s)",
                self.path,
                len(self.skipped),
                line_no,
                why,
            )
        return records

    def append(self, records: list[TensorRecord]) -> None:
        ensure_folder(self.path.parent, what="scan cache folder")
        try:
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
        except OSError as exc:
            raise OutputPathError(
                self.path, f"{os_error_reason(exc)} (the records so far are kept; rerun, or scan with --no-cache)"
            ) from None


_BAD_LINE = (ValueError, TypeError, KeyError, OverflowError, CondituneError)  # JSONDecodeError is a ValueError


def _parse_line(raw: bytes) -> TensorRecord:
    row = json.loads(raw.decode("utf-8"))
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not a record")
    record = TensorRecord.from_row(row)
    if "singular_values" in row:
        record.extra["singular_values"] = row["singular_values"]
    return record


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"
