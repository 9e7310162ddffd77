"""Audio loading: any file soundfile can decode, as 16 kHz mono float32 in [-1, 1].

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis, OGG/Opus and, with libsndfile >= 1.1 (the
wheels bundle 1.2), MP3. Resampling uses :func:`scipy.signal.resample_poly` (a polyphase FIR
filter), so there is no torchaudio dependency. Every failure a user can cause is an
:class:`AudioError` whose one-line message names the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np

from conditune.errors import CondituneError

SAMPLE_RATE = 16000


class AudioError(CondituneError):
    """An audio file is missing, unreadable, empty or holds no usable samples."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read(source: str | os.PathLike | BinaryIO, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile reports format problems as several exception types
        raise AudioError(f"cannot decode audio {name}: {_one_line(exc)}") from None
    return data, int(rate)


def to_mono_resampled(data: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE, name: str = "<array>") -> np.ndarray:
    """Mix ``data`` (frames, or frames x channels) down to mono, resample to ``sample_rate``.

    NaNs become 0 (all-NaN audio is an error), infinities and anything outside [-1, 1] are clipped.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    elif data.ndim != 1:
        raise AudioError(f"audio {name} has shape {data.shape}, expected (frames,) or (frames, channels)")
    if data.size == 0:
        raise AudioError(f"audio {name} is empty (no samples)")
    if rate <= 0:
        raise AudioError(f"audio {name} has an invalid sample rate {rate}")
    nan = np.isnan(data)
    if nan.all():
        raise AudioError(f"audio {name} holds only NaN samples")
    if nan.any():
        data = np.where(nan, np.float32(0.0), data)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(sample_rate, rate)
        data = resample_poly(data.astype(np.float64), ratio.numerator, ratio.denominator).astype(np.float32)
    return np.clip(data, -1.0, 1.0).astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to a 1-D float32 array at ``sample_rate``, mono, in [-1, 1].

    Raises :class:`AudioError` naming the file when it is missing, empty, not decodable, holds no
    samples or holds only NaNs. Multi-channel audio is averaged; the output length is
    ``ceil(frames * sample_rate / source_rate)``.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"audio path is not a file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    data, rate = _read(path, str(path))
    return to_mono_resampled(data, rate, sample_rate, str(path))


def decode_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE, name: str = "<bytes>") -> np.ndarray:
    """Like :func:`load_audio` for an encoded file held in memory (e.g. a datasets ``bytes`` field)."""
    if not data:
        raise AudioError(f"audio {name} is empty (0 bytes)")
    array, rate = _read(io.BytesIO(data), name)
    return to_mono_resampled(array, rate, sample_rate, name)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (cheap: no decoding)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except Exception as exc:  # noqa: BLE001
        raise AudioError(f"cannot decode audio {path}: {_one_line(exc)}") from None
    return info.frames / info.samplerate if info.samplerate else 0.0


def num_samples(duration_s: float, sample_rate: int = SAMPLE_RATE) -> int:
    return int(math.ceil(duration_s * sample_rate))


def save_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM WAV atomically (temporary file beside ``path``, then rename)."""
    import soundfile as sf

    from conditune.io import atomic_write

    with atomic_write(path, "wb") as handle:
        sf.write(
            handle, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV"
        )


def audio_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes, hex: a cache key that changes whenever the file does."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except OSError as exc:
        raise AudioError(f"cannot read audio file {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()
