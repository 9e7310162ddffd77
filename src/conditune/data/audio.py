"""Audio loading: any file soundfile can decode, as 16 kHz mono float32 in [-1, 1].

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis, OGG/Opus and, with libsndfile >= 1.1 (the
wheels bundle 1.2), MP3. Resampling uses :func:`scipy.signal.resample_poly` (a polyphase FIR
filter), so there is no torchaudio dependency. Every failure a user can cause is an
:class:`AudioError` whose one-line message names the file.

Long files: :func:`load_audio_segment` (and ``load_audio(..., max_seconds=...)``) decode only the
frames that are used, and say whether the file was longer, so a 2-hour recording costs its first
30 s, not 5 GB, and a caller can refuse to pair a cut recording with its whole transcript.
:func:`speech_activity` is a cheap energy check that tells silence and stationary noise from speech.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
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


def _read(source: str | os.PathLike | BinaryIO, name: str, frames: int = -1) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(source, frames=frames, dtype="float32", always_2d=True)
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


def _checked_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"audio path is not a file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    return path


def load_audio(
    path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, *, max_seconds: float | None = None
) -> np.ndarray:
    """Decode ``path`` to a 1-D float32 array at ``sample_rate``, mono, in [-1, 1].

    Raises :class:`AudioError` naming the file when it is missing, empty, not decodable, holds no
    samples or holds only NaNs. Multi-channel audio is averaged; the output length is
    ``ceil(frames * sample_rate / source_rate)``. With ``max_seconds`` only the first
    ``max_seconds`` are decoded (use :func:`load_audio_segment` to learn whether the file was longer).
    """
    return load_audio_segment(path, sample_rate=sample_rate, max_seconds=max_seconds).wave


@dataclass(frozen=True)
class AudioSegment:
    """The decoded start of an audio file and how it relates to the whole file."""

    wave: np.ndarray  # mono float32 at sample_rate, in [-1, 1]
    sample_rate: int
    file_seconds: float  # duration of the whole file (from its header)
    truncated: bool  # the file is longer than ``wave``: only its first ``max_seconds`` were read

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.sample_rate


def load_audio_segment(
    path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> AudioSegment:
    """Decode at most the first ``max_seconds`` of ``path`` (None: all of it), reading only those frames.

    ``truncated`` says the file is longer: a training pair whose transcript covers the whole file
    must then be skipped (and counted), not trained on. Errors as :func:`load_audio`.
    """
    import soundfile as sf

    path = _checked_file(path)
    if max_seconds is not None and not (max_seconds > 0 and math.isfinite(max_seconds)):
        raise AudioError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
    try:
        info = sf.info(str(path))
    except Exception as exc:  # noqa: BLE001 - libsndfile reports format problems as several exception types
        raise AudioError(f"cannot decode audio {path}: {_one_line(exc)}") from None
    rate, total = int(info.samplerate), int(info.frames)
    frames = -1
    if max_seconds is not None and rate > 0:
        frames = min(total, int(math.ceil(max_seconds * rate))) if total > 0 else int(math.ceil(max_seconds * rate))
    data, rate = _read(path, str(path), frames=frames)
    wave = to_mono_resampled(data, rate, sample_rate, str(path))
    file_seconds = total / rate if rate and total > 0 else len(data) / rate
    return AudioSegment(wave, sample_rate, file_seconds, truncated=0 <= frames < total)


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


# ---------------------------------------------------------------------------------------------- speech activity

# 25 ms frames every 10 ms. A frame is active when its level is above -50 dBFS (an RMS of 0.3% of
# full scale: quieter is silence or dither) and 10 dB above the file's own background (its 10th
# percentile frame level). Stationary sounds (white, pink or brown noise, hum, a steady tone) stay
# within a few dB of their background and give (almost) no active frames; speech has pauses and
# syllables and gives many. Measured on espeak-ng and flite speech, alone and in white noise: active
# at an SNR of 5 dB, not at 0 dB; non-stationary noise (music, babble, clicks) does count as active.
ACTIVITY_FRAME_S = 0.025
ACTIVITY_HOP_S = 0.010
ACTIVITY_FLOOR_DBFS = -50.0
ACTIVITY_MARGIN_DB = 10.0
MIN_SPEECH_SECONDS = 0.15  # about one short syllable


@dataclass(frozen=True)
class SpeechActivity:
    active_fraction: float  # share of frames that are active
    active_seconds: float
    peak_dbfs: float  # loudest frame
    background_dbfs: float  # 10th percentile frame level

    @property
    def has_speech(self) -> bool:
        """Enough active sound to be worth decoding (False: silence or stationary noise)."""
        return self.active_seconds >= MIN_SPEECH_SECONDS

    def describe(self) -> str:
        if self.peak_dbfs < ACTIVITY_FLOOR_DBFS:
            return f"silent (peak {self.peak_dbfs:.0f} dBFS)"
        if not self.has_speech:
            return f"no speech detected: steady sound at {self.background_dbfs:.0f} dBFS (noise or a tone?)"
        return f"{self.active_seconds:.1f} s of activity ({self.active_fraction:.0%})"


def speech_activity(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> SpeechActivity:
    """Frame energies of a mono wave against an absolute floor and the file's own background."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    frame, hop = max(1, int(ACTIVITY_FRAME_S * sample_rate)), max(1, int(ACTIVITY_HOP_S * sample_rate))
    if wave.size < frame:
        wave = np.pad(wave, (0, frame - wave.size))
    energy = np.concatenate([[0.0], np.cumsum(wave * wave)])  # frame sums in O(n), no frame copies
    starts = np.arange(0, wave.size - frame + 1, hop)
    level = 10 * np.log10((energy[starts + frame] - energy[starts]) / frame + 1e-20)
    background = float(np.percentile(level, 10))
    active = level > max(ACTIVITY_FLOOR_DBFS, background + ACTIVITY_MARGIN_DB)
    return SpeechActivity(
        active_fraction=float(active.mean()),
        active_seconds=float(active.sum() * hop / sample_rate),
        peak_dbfs=float(level.max()),
        background_dbfs=background,
    )
