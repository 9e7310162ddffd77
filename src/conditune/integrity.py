"""Integrity records for checkpoint folders: the size and sha256 of every file, checked on load.

A truncated or bit-flipped weight file can load without complaint (a flipped bit in a float is just
another float) and train or decode garbage. The saver writes :data:`MANIFEST_NAME` last, after every
file it lists is complete; the loader checks it first, before any model is built, and a damaged or
missing file is one error line naming it::

    write_manifest(folder, ["adaptor.safetensors", "llm_delta.safetensors", "state.json"])
    verify_manifest(folder)                    # raises IntegrityError naming the first bad file
    newest, skipped = latest_intact(folders)   # --resume: the newest complete checkpoint
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from conditune.errors import CondituneError
from conditune.io import atomic_write_json

MANIFEST_NAME = "integrity.json"
FORMAT = 1
_CHUNK = 1 << 22


class IntegrityError(CondituneError):
    """A checkpoint folder whose files do not match their integrity record; ``path`` is the first bad one."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class FileRecord:
    name: str  # path relative to the folder, with forward slashes
    size: int
    sha256: str


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, files: Iterable[str | os.PathLike] | None = None) -> Path:
    """Record the size and sha256 of ``files`` (relative to ``folder``; default: every file in it,
    recursively, but temporary ``.*.tmp`` files) in ``folder/integrity.json``, written atomically.

    Call it after the files are complete, as the checkpoint's last write.
    """
    folder = Path(folder)
    names = sorted(_relative(folder, f) for f in files) if files is not None else _all_files(folder)
    records = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise CondituneError(f"{path}: cannot record its integrity: not a file")
        records[name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    target = folder / MANIFEST_NAME
    atomic_write_json(target, {"format": FORMAT, "algorithm": "sha256", "files": records})
    return target


def read_integrity(folder: str | os.PathLike) -> list[FileRecord] | None:
    """The integrity record of ``folder`` (None when it has none); a damaged record is an IntegrityError."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        return [FileRecord(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(path, "damaged integrity record (not the JSON that write_manifest writes)") from None


def manifest_problem(folder: str | os.PathLike, *, hashes: bool = True, missing_ok: bool = False) -> str | None:
    """What is wrong with ``folder`` (one line naming the file), or None when every recorded file matches.

    Sizes are checked first for every file (cheap: catches truncation), then the hashes (``hashes=False``
    skips them). A folder without a record is a problem unless ``missing_ok``.
    """
    try:
        verify_manifest(folder, hashes=hashes, missing_ok=missing_ok)
    except IntegrityError as exc:
        return str(exc)
    return None


def verify_manifest(folder: str | os.PathLike, *, hashes: bool = True, missing_ok: bool = False) -> None:
    """Raise :class:`IntegrityError` naming the first missing, truncated, grown or changed file of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IntegrityError(folder, "checkpoint folder not found")
    records = read_integrity(folder)
    if records is None:
        if missing_ok:
            return
        raise IntegrityError(
            folder / MANIFEST_NAME, "missing: the checkpoint was not saved completely (or by an older version)"
        )
    for record in records:
        path = folder / record.name
        if not path.is_file():
            raise IntegrityError(path, "missing from the checkpoint")
        size = path.stat().st_size
        if size != record.size:
            cut = "truncated" if size < record.size else "longer than recorded"
            raise IntegrityError(path, f"damaged checkpoint file: {cut} ({size} bytes, recorded {record.size})")
    if hashes:
        for record in records:
            path = folder / record.name
            if sha256_of(path) != record.sha256:
                raise IntegrityError(path, "damaged checkpoint file: its sha256 differs from the recorded one")


def latest_intact(
    folders: Iterable[str | os.PathLike], *, hashes: bool = True, missing_ok: bool = False
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first intact folder of ``folders`` (give them newest first) and the (folder, problem) pairs
    of the damaged ones before it, for a warning such as "checkpoint-40 is damaged (...): resuming from
    checkpoint-30"."""
    skipped: list[tuple[Path, str]] = []
    for folder in folders:
        folder = Path(folder)
        problem = manifest_problem(folder, hashes=hashes, missing_ok=missing_ok)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def _relative(folder: Path, name: str | os.PathLike) -> str:
    path = Path(name)
    if path.is_absolute():
        path = path.relative_to(folder)
    return path.as_posix()


def _all_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
