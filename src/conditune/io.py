"""Atomic file output: a reader never sees a half-written result or checkpoint.

Every problem with where an output goes (a folder where a file belongs, a file where a folder
belongs, no permission, a read-only or full disk) becomes one :class:`OutputPathError` line naming
the path. :func:`check_writable` asks the same questions before long work starts, so a run does not
fail at its last step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from conditune.errors import CondituneError

# errno values that mean "the disk cannot take these bytes", wherever in a write they show up
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputPathError(CondituneError):
    """An output path cannot be written; ``path`` is the one named in the message."""

    def __init__(self, path: str | os.PathLike, reason: str, *, action: str = "write"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot {action} {self.path}: {reason}")


def os_error_reason(exc: OSError) -> str:
    """A short reason for an OS error, e.g. 'no space left on the device'."""
    known = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT if hasattr(errno, "EDQUOT") else -1: "disk quota exceeded",
        errno.EFBIG: "file too large for this file system or process limit",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.ENAMETOOLONG: "file name too long",
        errno.EISDIR: "it is a folder",
        errno.ENOTDIR: "a parent is a file, not a folder",
    }
    return known.get(exc.errno, exc.strerror or type(exc).__name__)


def _blocking_file(folder: Path) -> Path | None:
    """The first existing non-folder on the way from the root to ``folder`` (None: there is none)."""
    for candidate in [*reversed(folder.parents), folder]:
        if candidate.exists() and not candidate.is_dir():
            return candidate
        if not candidate.exists():
            return None
    return None


def ensure_folder(folder: str | os.PathLike, *, what: str = "folder") -> Path:
    """Create ``folder`` and its parents if needed; any obstacle is one line naming the path."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    blocker = _blocking_file(folder)
    if blocker is not None:
        reason = "it is a file" if blocker == folder else f"{blocker} is a file, not a folder"
        raise OutputPathError(folder, reason, action=f"create the {what}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(folder, os_error_reason(exc), action=f"create the {what}") from None
    return folder


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, *, folder: bool = False, min_free_bytes: int | None = None) -> Path:
    """Fail now, in one line naming the path, if ``path`` could not be written later.

    ``folder=False``: ``path`` is an output file (it may exist and will be replaced; it must not be a
    folder). ``folder=True``: ``path`` is an output folder (it may exist; it must not be a file).
    Checks that no parent is a file and that the nearest existing folder accepts a new file (a
    real probe, so read-only mounts and permissions count even for root), and with
    ``min_free_bytes`` that the disk has that much space. Creates nothing; returns ``path``.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(path, "it is a file, not a folder")
    if not folder and path.is_dir():
        raise OutputPathError(path, "it is a folder, not a file")
    target_folder = path if folder else path.parent
    blocker = _blocking_file(target_folder.absolute())
    if blocker is not None:
        raise OutputPathError(path, f"{blocker} is a file, not a folder")
    existing = _nearest_existing(target_folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".conditune-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(path, f"{existing} does not accept new files ({os_error_reason(exc)})") from None
    if min_free_bytes is not None:
        import shutil

        free = shutil.disk_usage(existing).free
        if free < min_free_bytes:
            raise OutputPathError(
                path, f"{free / 2**20:.0f} MiB free on its disk, {min_free_bytes / 2**20:.0f} MiB needed"
            )
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. Creates the
    parent folders. A path that cannot be written, or a disk that fills up while writing, raises
    :class:`OutputPathError` naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(path, "it is a folder, not a file")
    blocker = _blocking_file(path.parent)
    if blocker is not None:
        raise OutputPathError(path, f"{blocker} is a file, not a folder")
    ensure_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputPathError(path, os_error_reason(exc)) from None
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and (exc.errno in _SPACE_ERRNOS or exc.filename in (None, tmp)):
            # the disk or the target failed (not some file the caller was reading): name the target
            raise OutputPathError(path, os_error_reason(exc)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN and infinities written as null), atomically."""
    with atomic_write(path) as handle:
        json.dump(strict_json(obj), handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def strict_json(obj: Any) -> Any:
    """A copy of ``obj`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in reports; everything else is a bug.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """All JSON lines of a file (none if it is missing); a line cut short by a kill is skipped."""
    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


# Signatures of binary files people pass by mistake where text (a config, a manifest) belongs.
_BINARY_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a zip archive",
    b"RIFF": "a RIFF (WAV) file",
    b"GGUF": "a GGUF model",
    b"\x1f\x8b": "a gzip file",
}


def read_text_file(path: str | os.PathLike, *, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); one line naming the path if it
    is missing, a folder, unreadable, binary or not UTF-8. ``what`` names it: ``"config"``, ``"manifest"``."""
    path = Path(path)
    if not path.exists():
        raise CondituneError(f"{what} {path} not found")
    if path.is_dir():
        raise CondituneError(f"{what} {path} is a folder, not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CondituneError(f"cannot read {what} {path}: {os_error_reason(exc)}") from None
    kind = next((name for magic, name in _BINARY_MAGIC.items() if data.startswith(magic)), None)
    if kind is not None or b"\x00" in data[:4096]:
        raise CondituneError(f"{what} {path} is {kind or 'binary data'}, not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CondituneError(f"{what} {path}:{line}: not UTF-8 text ({exc.reason})") from None


@contextlib.contextmanager
def cleaned_up_on_failure(folder: str | os.PathLike) -> Iterator[Path]:
    """A block that may create ``folder``: if it fails, the folder is removed again when it did not exist before
    and holds nothing but empty folders (a failed run leaves no empty output folder behind)."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield folder
    except BaseException:
        if not existed and folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise
