"""Per-tensor scan records and the files they are written to (CSV, JSON, parquet).

One :class:`TensorRecord` per weight matrix. The record is the contract between the scanner and
everything downstream (``select``, ``theory``, plots), so its columns are listed once, here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conditune.errors import CondituneError
from conditune.io import atomic_write, read_text_file

OK, SKIPPED, FLAGGED = "ok", "skipped", "flagged"

# First ".<digits>." in a name is the layer index: model.layers.12.mlp..., transformer.h.3.attn...,
# encoder.blocks.0... Everything after it (minus .weight/.bias) is the tensor kind.
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)\.(.+)$")
_SUFFIX_RE = re.compile(r"\.(weight|bias)$")
_SLICE_RE = re.compile(r"\[(\d+)\]$")


def parse_name(name: str) -> tuple[int | None, str]:
    """(layer index or None, tensor kind) from a parameter name.

    >>> parse_name("model.layers.12.self_attn.q_proj.weight")
    (12, 'self_attn.q_proj')
    >>> parse_name("model.embed_tokens.weight")
    (None, 'embed_tokens')
    >>> parse_name("model.layers.3.mlp.experts.gate_up_proj[5]")
    (3, 'mlp.experts.gate_up_proj')
    """
    base = _SLICE_RE.sub("", name)
    base = _SUFFIX_RE.sub("", base)
    match = _LAYER_RE.search(base)
    if match:
        return int(match.group(1)), match.group(2)
    return None, base.rsplit(".", 1)[-1]


@dataclass
class TensorRecord:
    """Spectral summary of one weight matrix (see README, "scan" for the meaning of each column)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    layer: int | None = None
    kind: str = ""
    status: str = OK
    reason: str = ""
    sigma_max: float | None = None
    sigma_min: float | None = None  # smallest non-zero singular value
    kappa: float | None = None
    kappa_rel_err: float | None = None  # bound on |kappa - kappa_exact| / kappa_exact
    log2_volume: float | None = None
    frobenius: float | None = None
    stable_rank: float | None = None
    effective_rank: float | None = None  # only with the full spectrum
    rank: int | None = None
    entropy_bits: float | None = None
    kappa_mp: float | None = None
    kappa_norm: float | None = None
    method: str = ""
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.kind:
            self.layer, self.kind = parse_name(self.name)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The 2-D shape the spectrum was computed on (last two dims for slices, (out, rest) for convs)."""
        if len(self.shape) == 2:
            return (int(self.shape[0]), int(self.shape[1]))
        return (int(self.shape[0]), int(math.prod(self.shape[1:])))

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        row["shape"] = format_shape(self.shape)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TensorRecord:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra" or f.name not in row:
                continue
            kwargs[f.name] = _coerce(f.name, row[f.name])
        if "name" not in kwargs:
            raise CondituneError("scan file row has no 'name' column")
        kwargs.setdefault("shape", ())
        kwargs.setdefault("dtype", "")
        kwargs.setdefault("numel", math.prod(kwargs["shape"]) if kwargs["shape"] else 0)
        return cls(**kwargs)


COLUMNS = [f.name for f in dataclasses.fields(TensorRecord) if f.name != "extra"]
_INT_COLUMNS = {"numel", "layer", "rank"}
_STR_COLUMNS = {"name", "dtype", "kind", "status", "reason", "method"}


def format_shape(shape: Iterable[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def parse_shape(text: Any) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(int(d) for d in text)
    text = str(text).strip()
    if not text:
        return ()
    try:
        return tuple(int(d) for d in text.split("x"))
    except ValueError:
        raise CondituneError(f"bad shape {text!r} in scan file (expected like 4096x14336)") from None


def _coerce(name: str, value: Any) -> Any:
    if name == "shape":
        return parse_shape(value)
    if (
        value is None
        or (isinstance(value, str) and value == "")
        or (isinstance(value, float) and math.isnan(value) and name not in _STR_COLUMNS)
    ):
        return "" if name in _STR_COLUMNS else None
    if name in _STR_COLUMNS:
        return str(value)
    if name in _INT_COLUMNS:
        return int(float(value))
    return float(value)


# ----------------------------------------------------------------------------------------------
# files


def write_records(records: list[TensorRecord], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write records atomically; the format comes from the extension (.csv, .json, .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    rows = [r.to_row() for r in records]
    if suffix == ".csv":
        with atomic_write(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
        if meta:  # CSV has no room for metadata: keep it beside the table
            with atomic_write(path.with_suffix(path.suffix + ".meta.json")) as handle:
                json.dump(meta, handle, indent=2)
    elif suffix == ".json":
        with atomic_write(path) as handle:
            json.dump({"meta": meta or {}, "records": rows}, handle, indent=1, allow_nan=True)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in COLUMNS})
        if meta:
            table = table.replace_schema_metadata({b"conditune": json.dumps(meta).encode()})
        with atomic_write(path, "wb") as handle:
            pq.write_table(table, handle)
    else:
        raise CondituneError(f"{path}: unknown output format {suffix!r} (use .csv, .json or .parquet)")
    return path


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def read_records(path: str | Path) -> tuple[list[TensorRecord], dict[str, Any]]:
    """Read a scan file written by :func:`write_records` (or by hand with the same columns).

    Anything wrong with it (not a scan file, a value that is not a number, a condition number
    below 1, a negative size) is one :class:`CondituneError` naming the file and the line (CSV) or
    record (JSON, parquet) and the column.
    """
    path = Path(path)
    if path.is_dir():
        raise CondituneError(f"{path}: is a folder, not a scan file (.csv, .json or .parquet)")
    if not path.is_file():
        raise CondituneError(f"{path}: scan file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows, meta = _read_csv(path)
        elif suffix == ".json":
            rows, meta = _read_json(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            rows = [(f"record {k}", row) for k, row in enumerate(table.to_pylist(), start=1)]
            raw = (table.schema.metadata or {}).get(b"conditune")
            meta = json.loads(raw) if raw else {}
        else:
            raise CondituneError(f"{path}: unknown scan file format {suffix!r} (use .csv, .json or .parquet)")
    except CondituneError:
        raise
    except Exception as exc:  # corrupt file: say which and why, in one line
        raise CondituneError(f"{path}: cannot read scan file ({type(exc).__name__}: {_one_line(exc)})") from exc
    return [_record_from(path, where, row) for where, row in rows], meta


def _read_csv(path: Path) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    rows = []
    reader = csv.DictReader(io.StringIO(read_text_file(path, what="scan file"), newline=""))
    for row in reader:
        rows.append((f"line {reader.line_num}", row))
    meta: dict[str, Any] = {}
    meta_path = path.with_suffix(path.suffix + ".meta.json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CondituneError(f"{meta_path}: cannot read the scan's metadata ({_one_line(exc)})") from None
        if not isinstance(meta, dict):
            raise CondituneError(f"{meta_path}: the scan's metadata is not a JSON object")
    return rows, meta


def _read_json(path: Path) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    data = json.loads(read_text_file(path, what="scan file"))
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        if not isinstance(data.get("records"), list):
            raise CondituneError(f"{path}: not a scan file (a JSON object without a 'records' list)")
        rows, meta = data["records"], data.get("meta") or {}
    elif isinstance(data, list):
        rows = data
    else:
        raise CondituneError(f"{path}: not a scan file (JSON {type(data).__name__}, expected records)")
    return [(f"record {k}", row) for k, row in enumerate(rows, start=1)], meta


def _record_from(path: Path, where: str, row: Any) -> TensorRecord:
    if not isinstance(row, dict):
        raise CondituneError(f"{path}: {where}: {_one_line(repr(row))[:40]} is not a record (an object with a 'name')")
    try:
        record = TensorRecord.from_row(row)
    except (ValueError, TypeError, OverflowError, CondituneError) as exc:
        raise CondituneError(f"{path}: {where}: {_row_problem(row, exc)}") from None
    problem = _impossible(record)
    if problem:
        raise CondituneError(f"{path}: {where}: {problem} (a damaged scan file?)")
    return record


def _row_problem(row: dict[str, Any], exc: Exception) -> str:
    for f in dataclasses.fields(TensorRecord):
        if f.name in row and f.name != "extra":
            try:
                _coerce(f.name, row[f.name])
            except (ValueError, TypeError, OverflowError, CondituneError):
                kind = "whole number" if f.name in _INT_COLUMNS else "shape" if f.name == "shape" else "number"
                return f"column {f.name!r}: {row[f.name]!r} is not a {kind}"
    return _one_line(exc)


def _impossible(record: TensorRecord) -> str | None:
    """A value no scan can produce (sizes are not negative; an ok record's κ = σ_max/σ_min is >= 1)."""
    if record.numel < 0:
        return f"column 'numel': {record.numel} is negative"
    if any(d < 0 for d in record.shape):
        return f"column 'shape': {format_shape(record.shape)} has a negative size"
    kappa = record.kappa
    if record.status == OK and kappa is not None and not math.isnan(kappa) and kappa < 1 - 1e-6:
        return f"column 'kappa': {kappa!r} is below 1 (a condition number sigma_max/sigma_min is >= 1)"
    return None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def spectra_path(scan_file: str | Path) -> Path:
    """Where ``conditune scan --spectrum full -o FILE`` keeps the singular values: ``FILE`` with the suffix
    ``.spectra.safetensors``."""
    return Path(scan_file).with_suffix(".spectra.safetensors")


def attach_spectra(records: list[TensorRecord], scan_file: str | Path) -> int:
    """Put the singular values saved beside ``scan_file`` (if any) into each record's ``extra``; the number of
    records that got one (0 when the scan was not made with the full spectrum)."""
    path = spectra_path(scan_file)
    if not path.is_file():
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            found = 0
            for record in records:
                if record.name in names:
                    record.extra["singular_values"] = handle.get_tensor(record.name).tolist()
                    found += 1
    except Exception as exc:  # noqa: BLE001 - safetensors reports damage as several exception types
        raise CondituneError(f"{path}: cannot read the scan's singular values ({_one_line(exc)})") from None
    return found
