"""JSONL speech manifests and Hugging Face ``datasets`` import.

A manifest holds one utterance per line::

    {"audio": "wavs/utt1.wav", "text": "Hello there.", "language": "en", "id": "utt1"}

``audio`` is relative to the manifest's folder (absolute paths also work); ``language`` defaults
to ``"en"``; ``id`` defaults to ``<manifest stem>-<line number>``. Other keys (durations, voice
settings) are allowed and ignored. Blank lines are ignored. A line with invalid JSON, a missing
key, an empty text, a duplicate id or a missing audio file is skipped and reported in
:attr:`ManifestData.skipped`; with ``strict=True`` it raises :class:`CondituneError` naming
``file:line`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conditune.errors import CondituneError

log = logging.getLogger(__name__)


@dataclass
class Utterance:
    id: str
    audio: Path
    text: str
    language: str = "en"


@dataclass
class ManifestData:
    path: Path | None = None
    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, reason)

    def __len__(self) -> int:
        return len(self.utterances)

    def summary(self) -> str:
        text = f"{len(self.utterances)} utterances"
        if self.skipped:
            text += f", {len(self.skipped)} lines skipped"
        return text


def _parse_line(raw: str, line_no: int, base: Path, stem: str) -> Utterance:
    """One manifest line to an Utterance; raises ValueError with the reason."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("audio", "text"):
        if key not in obj:
            raise ValueError(f"missing key '{key}'")
    audio, text = obj["audio"], obj["text"]
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError("'audio' must be a non-empty string")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    text = text.strip()
    if not text:
        raise ValueError("empty text")
    language = obj.get("language", "en")
    if not isinstance(language, str) or not language.strip():
        raise ValueError("'language' must be a non-empty string")
    utt_id = obj.get("id", f"{stem}-{line_no}")
    if not isinstance(utt_id, (str, int)) or isinstance(utt_id, bool) or not str(utt_id).strip():
        raise ValueError("'id' must be a non-empty string")
    audio_path = Path(audio).expanduser()
    if not audio_path.is_absolute():
        audio_path = base / audio_path
    if not audio_path.is_file():
        raise ValueError(f"audio file not found: {audio_path}")
    return Utterance(id=str(utt_id), audio=audio_path, text=text, language=language.strip())


def read_manifest(path: str | os.PathLike, strict: bool = False, *, warn: bool = True) -> ManifestData:
    """Read a JSONL manifest; bad lines are skipped and counted (``strict``: raise on the first).

    A UTF-8 byte-order mark (as some Windows editors write) is ignored. ``warn``: log one warning
    line when lines were skipped (``conditune data check`` lists them itself).
    """
    path = Path(path)
    if path.is_dir():
        raise CondituneError(f"manifest {path} is a folder, not a JSONL file")
    if not path.is_file():
        raise CondituneError(f"manifest not found: {path}")
    base = path.absolute().parent
    data = ManifestData(path=path)
    seen: dict[str, int] = {}
    try:
        handle = open(path, encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise CondituneError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    utt = _parse_line(raw, line_no, base, path.stem)
                    if utt.id in seen:
                        raise ValueError(f"duplicate id '{utt.id}' (first on line {seen[utt.id]})")
                except ValueError as exc:
                    if strict:
                        raise CondituneError(f"{path}:{line_no}: {exc}") from None
                    data.skipped.append((line_no, str(exc)))
                    continue
                seen[utt.id] = line_no
                data.utterances.append(utt)
        except UnicodeDecodeError as exc:
            raise CondituneError(f"manifest {path} is not UTF-8 text ({exc.reason})") from None
    if data.skipped and warn:
        log.warning(
            "%s: skipped %d of %d lines (first: line %d: %s)",
            path,
            len(data.skipped),
            len(data.skipped) + len(data.utterances),
            *data.skipped[0],
        )
    return data


def _relative_audio(audio: Path, base: Path) -> str:
    audio = Path(audio).absolute()
    try:
        return Path(os.path.relpath(audio, base)).as_posix()
    except ValueError:  # another drive on Windows
        return str(audio)


def write_manifest(
    path: str | os.PathLike,
    utterances: Iterable[Utterance],
    *,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``utterances`` as JSONL atomically, audio paths relative to the manifest's folder.

    ``extras`` maps an utterance id to additional keys for its line (e.g. duration, voice).
    """
    from conditune.io import atomic_write

    path = Path(path)
    base = path.absolute().parent
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for utt in utterances:
            row: dict[str, Any] = {
                "id": utt.id,
                "audio": _relative_audio(utt.audio, base),
                "text": utt.text,
                "language": utt.language,
            }
            if extras and utt.id in extras:
                row.update({k: v for k, v in extras[utt.id].items() if k not in row})
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "dataset"


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise CondituneError(
            "the 'datasets' package is not installed: pip install datasets "
            "(or convert the data to a JSONL manifest, see docs/data.md)"
        ) from None
    return datasets


def _decode_audio_field(value: Any, name: str, sample_rate: int):
    """An audio cell in any of the shapes ``datasets`` produces, to a mono float32 array."""
    from conditune.data.audio import AudioError, decode_audio_bytes, load_audio, to_mono_resampled

    if isinstance(value, (str, os.PathLike)):
        return load_audio(value, sample_rate)
    if isinstance(value, Mapping):
        if value.get("array") is not None and value.get("sampling_rate"):
            return to_mono_resampled(value["array"], int(value["sampling_rate"]), sample_rate, name)
        if value.get("bytes"):
            return decode_audio_bytes(value["bytes"], sample_rate, name)
        if value.get("path"):
            return load_audio(value["path"], sample_rate)
        raise AudioError(f"audio {name} has neither bytes, path nor array")
    # datasets >= 4 may hand back a torchcodec AudioDecoder when decoding was not switched off
    samples = getattr(value, "get_all_samples", None)
    if callable(samples):
        got = samples()
        return to_mono_resampled(got.data.numpy().T, int(got.sample_rate), sample_rate, name)
    raise AudioError(f"audio {name}: unsupported value of type {type(value).__name__}")


def utterances_from_rows(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    audio_column: str = "audio",
    text_column: str = "text",
    language: str = "en",
    language_column: str | None = None,
    id_column: str | None = None,
    prefix: str = "utt",
    sample_rate: int = 16000,
    limit: int | None = None,
) -> tuple[list[Utterance], list[tuple[int, str]]]:
    """Decode dataset rows to 16 kHz WAVs under ``out_dir``; returns (utterances, skipped rows).

    A WAV already present is reused (resumable). Rows with an empty text or undecodable audio are
    skipped as ``(row index, reason)``.
    """
    from conditune.data.audio import AudioError, save_wav

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    utterances: list[Utterance] = []
    skipped: list[tuple[int, str]] = []
    for index, row in enumerate(rows):
        if limit is not None and len(utterances) >= limit:
            break
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            skipped.append((index, "empty text"))
            continue
        utt_id = str(row[id_column]) if id_column else f"{prefix}-{index:08d}"
        wav = out_dir / f"{_slug(utt_id)}.wav"
        if not wav.is_file():
            try:
                audio = _decode_audio_field(row.get(audio_column), f"{prefix} row {index}", sample_rate)
            except AudioError as exc:
                skipped.append((index, str(exc)))
                continue
            save_wav(wav, audio, sample_rate)
        lang = str(row.get(language_column) or language) if language_column else language
        utterances.append(Utterance(id=utt_id, audio=wav, text=text.strip(), language=lang))
    return utterances, skipped


def load_hf_dataset(
    name_or_path: str,
    split: str,
    audio_column: str = "audio",
    text_column: str = "text",
    language: str = "en",
    *,
    language_column: str | None = None,
    id_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    config_name: str | None = None,
) -> list[Utterance]:
    """Utterances from a Hugging Face ``datasets`` dataset with an audio column.

    ``name_or_path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
    a local dataset folder or file loadable by ``datasets.load_dataset``, or a hub name that is
    already in the ``datasets`` cache (this function never asks for a download itself; with no
    network a hub name that is not cached fails with the library's message). Audio is decoded here
    with soundfile (``Audio(decode=False)``, so torchcodec/ffmpeg are not needed), resampled to
    16 kHz mono and written as WAV under ``cache_dir`` (default
    ``$CONDITUNE_HOME/datasets/<name>/<split>``) together with a ``manifest.jsonl`` that
    :func:`read_manifest` can read later. Requires the optional ``datasets`` package.
    """
    datasets = _import_datasets()
    source = Path(name_or_path).expanduser()
    try:
        if source.is_dir() and ((source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(source))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise CondituneError(f"dataset {name_or_path} has no split '{split}' (has: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(source) if source.exists() else name_or_path, config_name, split=split)
    except CondituneError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CondituneError(f"cannot load dataset {name_or_path} split {split}: {_one_line(exc)}") from None
    columns = list(ds.column_names)
    for column in (audio_column, text_column) + ((language_column,) if language_column else ()):
        if column not in columns:
            raise CondituneError(f"dataset {name_or_path} has no column '{column}' (has: {', '.join(columns)})")
    feature = ds.features.get(audio_column)
    if isinstance(feature, datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    if cache_dir is None:
        from conditune.models import conditune_home

        cache_dir = conditune_home() / "datasets" / _slug(str(name_or_path)) / _slug(split)
    cache_dir = Path(cache_dir)
    utterances, skipped = utterances_from_rows(
        ds,
        cache_dir / "audio",
        audio_column=audio_column,
        text_column=text_column,
        language=language,
        language_column=language_column,
        id_column=id_column,
        prefix=_slug(split),
        limit=limit,
    )
    if skipped:
        log.warning("%s[%s]: skipped %d rows (first: row %d: %s)", name_or_path, split, len(skipped), *skipped[0])
    if not utterances:
        raise CondituneError(f"dataset {name_or_path} split {split} gave no usable utterances")
    write_manifest(cache_dir / "manifest.jsonl", utterances)
    return utterances


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
