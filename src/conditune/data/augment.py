"""Audio augmentation for training speech (numpy/scipy), deterministic from the seed.

Two pure functions: :func:`draw_augmentation` turns (config, seed, key) into the parameters of one
augmented copy, or ``None`` (the copy stays clean); :func:`apply_augmentation` applies them to a
waveform. The key names the copy (``f"{utterance_id}#{copy}"``, see :func:`copy_keys`), so the same
seed gives the same copies whatever the order or the number of processes; every random number the
effects use (the noise, the room's impulse response) comes from seeds inside the parameters.
:meth:`AugmentParams.to_dict` is a stable JSON description and :meth:`AugmentParams.fingerprint` a
short hash of it: a feature cache keys an augmented copy on (audio fingerprint, params fingerprint).

Effects, in the order they are applied (each on with its own probability when a copy is augmented;
an augmented copy gets at least one):

* ``speed`` — speed perturbation by resampling (tempo and pitch together, as Kaldi's): a factor
  ``s`` makes the audio ``1/s`` as long.
* ``reverb`` — a synthetic room: a unit direct path plus an exponentially decaying Gaussian noise
  tail that falls 60 dB in ``rt60`` seconds, scaled to a direct-to-reverberant ratio ``drr_db``;
  the output keeps the input's length and RMS.
* ``noise`` — white, pink (1/f) or brown (1/f²) noise at ``snr_db`` (signal power over noise power,
  both over the whole utterance).
* ``telephone`` — down to 8 kHz, optional 8-bit μ-law, 300–3,400 Hz band-pass (4th-order
  Butterworth), back up to the input rate.
* ``gain`` — ``gain_db``; if the result would exceed a peak of 0.99 it is scaled down to 0.99 (no
  clipping).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from math import gcd

import numpy as np

EFFECTS = ("speed", "reverb", "noise", "telephone", "gain")
NOISE_COLORS = ("white", "pink", "brown")
PEAK_LIMIT = 0.99
TELEPHONE_RATE = 8000
TELEPHONE_BAND = (300.0, 3400.0)
MU = 255


@dataclass
class AugmentConfig:
    probability: float = 0.8  # chance that an augmented copy is augmented at all (else it is a clean copy)
    copies: int = 1  # augmented copies per training utterance, besides the original
    keep_original: bool = True  # False: an utterance's first copy takes its place (no extra cost per utterance)
    effects: tuple[str, ...] = EFFECTS  # which effects are on
    speed_probability: float = 0.5
    speed_range: tuple[float, float] = (0.9, 1.1)
    reverb_probability: float = 0.3
    rt60_range: tuple[float, float] = (0.2, 0.8)  # seconds
    drr_db_range: tuple[float, float] = (0.0, 12.0)  # direct-to-reverberant ratio
    noise_probability: float = 0.5
    snr_db_range: tuple[float, float] = (5.0, 30.0)
    noise_colors: tuple[str, ...] = NOISE_COLORS
    telephone_probability: float = 0.15
    mulaw_probability: float = 0.5  # of a telephone copy
    gain_probability: float = 0.5
    gain_db_range: tuple[float, float] = (-10.0, 6.0)

    def __post_init__(self) -> None:
        from conditune.errors import CondituneError

        unknown = set(self.effects) - set(EFFECTS)
        if unknown:
            raise CondituneError(f"unknown augmentation effect(s) {sorted(unknown)} (known: {', '.join(EFFECTS)})")
        bad_colors = set(self.noise_colors) - set(NOISE_COLORS)
        if bad_colors or not self.noise_colors:
            raise CondituneError(f"noise_colors must be among {', '.join(NOISE_COLORS)}, got {self.noise_colors}")
        if self.copies < 0 or not 0.0 <= self.probability <= 1.0:
            raise CondituneError(
                f"augment: copies must be >= 0 and probability in [0, 1], got {self.copies}, {self.probability}"
            )
        for name in ("speed_range", "rt60_range", "drr_db_range", "snr_db_range", "gain_db_range"):
            low, high = getattr(self, name)
            if low > high:
                raise CondituneError(f"augment.{name}: {low} > {high}")
        if self.speed_range[0] <= 0 or self.rt60_range[0] <= 0:
            raise CondituneError("augment: speed and rt60 ranges must be positive")


@dataclass(frozen=True)
class AugmentParams:
    """One augmented copy; ``None`` fields are effects that are off."""

    speed: float | None = None
    rt60: float | None = None
    drr_db: float | None = None
    reverb_seed: int | None = None
    snr_db: float | None = None
    noise_color: str | None = None
    noise_seed: int | None = None
    telephone: bool = False
    mulaw: bool = False
    gain_db: float | None = None

    def to_dict(self) -> dict:
        """A stable, JSON-able description: only the effects that are on, in a fixed layout."""
        out: dict = {}
        if self.speed is not None:
            out["speed"] = self.speed
        if self.rt60 is not None:
            out["reverb"] = {"rt60": self.rt60, "drr_db": self.drr_db, "seed": self.reverb_seed}
        if self.snr_db is not None:
            out["noise"] = {"snr_db": self.snr_db, "color": self.noise_color, "seed": self.noise_seed}
        if self.telephone:
            out["telephone"] = {"mulaw": self.mulaw}
        if self.gain_db is not None:
            out["gain_db"] = self.gain_db
        return out

    def fingerprint(self) -> str:
        """16 hex digits of the sha256 of :meth:`to_dict` (with a format version)."""
        text = json.dumps({"augment": 1, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"augment\x1f{seed}\x1f{key}".encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)])


def copy_keys(utterance_id: str, copies: int) -> list[str]:
    """The keys of an utterance's augmented copies: ``id#0``, ``id#1``, ..."""
    return [f"{utterance_id}#{index}" for index in range(copies)]


def draw_augmentation(config: AugmentConfig, *, seed: int, key: str) -> AugmentParams | None:
    """The augmentation of the copy named ``key``: a pure function of (config, seed, key).

    ``None``: this copy is not augmented (probability ``1 - config.probability``)."""
    rng = _rng(seed, key)
    on = [name for name in EFFECTS if name in config.effects]
    if not on or rng.random() >= config.probability:
        return None
    chances = {
        "speed": config.speed_probability,
        "reverb": config.reverb_probability,
        "noise": config.noise_probability,
        "telephone": config.telephone_probability,
        "gain": config.gain_probability,
    }
    draws = {name: rng.random() for name in EFFECTS}  # drawn for every effect: a switched-off effect moves nothing
    chosen = {name for name in on if draws[name] < chances[name]}
    if not chosen:
        chosen = {on[int(rng.integers(len(on)))]}
    values: dict = {}
    if "speed" in chosen:
        values["speed"] = round(float(rng.uniform(*config.speed_range)), 2)  # 2 decimals: a cheap resampling ratio
    if "reverb" in chosen:
        values["rt60"] = round(float(rng.uniform(*config.rt60_range)), 3)
        values["drr_db"] = round(float(rng.uniform(*config.drr_db_range)), 2)
        values["reverb_seed"] = int(rng.integers(2**31))
    if "noise" in chosen:
        values["snr_db"] = round(float(rng.uniform(*config.snr_db_range)), 2)
        values["noise_color"] = config.noise_colors[int(rng.integers(len(config.noise_colors)))]
        values["noise_seed"] = int(rng.integers(2**31))
    if "telephone" in chosen:
        values["telephone"] = True
        values["mulaw"] = bool(rng.random() < config.mulaw_probability)
    if "gain" in chosen:
        values["gain_db"] = round(float(rng.uniform(*config.gain_db_range)), 2)
    return AugmentParams(**values)


# --------------------------------------------------------------------------------------------
# Effects
# --------------------------------------------------------------------------------------------


def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """Play ``wave`` ``factor`` times as fast (resampled: ``len / factor`` samples, pitch scaled too)."""
    from scipy.signal import resample_poly

    ratio = Fraction(factor).limit_denominator(200)
    if ratio == 1:
        return wave.copy()
    return resample_poly(wave, ratio.denominator, ratio.numerator)


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a flat (white), 1/f (pink) or 1/f² (brown) power spectrum."""
    white = rng.standard_normal(n)
    if color != "white" and n > 1:
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n)
        freqs[0] = freqs[1]  # no infinite DC
        spectrum /= np.sqrt(freqs) if color == "pink" else freqs
        white = np.fft.irfft(spectrum, n)
    white -= white.mean()
    rms = float(np.sqrt(np.mean(white**2)))
    return white / rms if rms > 0 else white


def add_noise(wave: np.ndarray, snr_db: float, color: str, seed: int) -> np.ndarray:
    power = float(np.mean(wave**2))
    if power <= 0:
        return wave.copy()
    noise = colored_noise(wave.size, color, np.random.default_rng(seed))
    return wave + noise * np.sqrt(power / 10 ** (snr_db / 10))


def room_impulse_response(rt60: float, drr_db: float, seed: int, *, sample_rate: int) -> np.ndarray:
    """A unit direct path, then 2.5 ms later a Gaussian tail decaying 60 dB in ``rt60`` s, at ``drr_db``."""
    rng = np.random.default_rng(seed)
    length = int(sample_rate * min(1.2 * rt60, 1.5))
    delay = max(1, int(0.0025 * sample_rate))
    t = np.arange(length - delay) / sample_rate
    tail = rng.standard_normal(t.size) * np.exp(-np.log(1000.0) * t / rt60)
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))  # direct energy 1 over tail energy
    response = np.zeros(length)
    response[0] = 1.0
    response[delay:] = tail
    return response


def add_reverb(wave: np.ndarray, rt60: float, drr_db: float, seed: int, *, sample_rate: int) -> np.ndarray:
    from scipy.signal import fftconvolve

    response = room_impulse_response(rt60, drr_db, seed, sample_rate=sample_rate)
    out = fftconvolve(wave, response)[: wave.size]
    before, after = float(np.sqrt(np.mean(wave**2))), float(np.sqrt(np.mean(out**2)))
    return out * (before / after) if after > 0 else out


def mulaw(wave: np.ndarray, bits: int = 8) -> np.ndarray:
    """μ-law companding with ``bits``-bit quantisation and back (G.711-like)."""
    x = np.clip(wave, -1.0, 1.0)
    compressed = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    levels = 2 ** (bits - 1)
    quantised = np.round(compressed * levels) / levels
    return np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(MU)) / MU


def telephone(wave: np.ndarray, *, sample_rate: int, use_mulaw: bool) -> np.ndarray:
    """Down to 8 kHz, optional μ-law, 300–3,400 Hz band-pass, back to ``sample_rate``."""
    from scipy.signal import butter, resample_poly, sosfilt

    common = gcd(int(sample_rate), TELEPHONE_RATE)
    narrow = resample_poly(wave, TELEPHONE_RATE // common, int(sample_rate) // common)
    if use_mulaw:
        narrow = mulaw(narrow)
    sos = butter(4, TELEPHONE_BAND, btype="bandpass", fs=TELEPHONE_RATE, output="sos")
    narrow = sosfilt(sos, narrow)
    out = resample_poly(narrow, int(sample_rate) // common, TELEPHONE_RATE // common)
    return out[: wave.size] if out.size >= wave.size else np.pad(out, (0, wave.size - out.size))


def apply_gain(wave: np.ndarray, gain_db: float) -> np.ndarray:
    out = wave * 10 ** (gain_db / 20)
    peak = float(np.abs(out).max()) if out.size else 0.0
    return out * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else out


def apply_augmentation(wave: np.ndarray, params: AugmentParams | None, *, sample_rate: int) -> np.ndarray:
    """``wave`` (mono float) with ``params`` applied, as float32 within ±0.99; ``None`` returns a copy."""
    out = np.asarray(wave, dtype=np.float64).reshape(-1)
    if params is None:
        return out.astype(np.float32)
    if params.speed is not None:
        out = change_speed(out, params.speed)
    if params.rt60 is not None:
        out = add_reverb(
            out, params.rt60, float(params.drr_db or 0.0), int(params.reverb_seed or 0), sample_rate=sample_rate
        )
    if params.snr_db is not None:
        out = add_noise(out, params.snr_db, params.noise_color or "white", int(params.noise_seed or 0))
    if params.telephone:
        out = telephone(out, sample_rate=sample_rate, use_mulaw=params.mulaw)
    out = apply_gain(out, params.gain_db or 0.0)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Augmented copies as audio sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentedAudio:
    """An augmented copy of an audio file: what the feature cache encodes (once) and keys on (file, params)."""

    path: str
    params: AugmentParams

    def __str__(self) -> str:  # names the copy in logs, predictions and the data hash
        return f"{self.path}#aug-{self.params.fingerprint()}"

    def cache_key(self, file_fingerprint: str) -> str:
        return hashlib.sha256(f"{file_fingerprint}\x1f{self.params.fingerprint()}".encode()).hexdigest()

    def load(self, *, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
        from conditune.data.audio import load_audio

        wave = load_audio(self.path, sample_rate=sample_rate, max_seconds=max_seconds)
        out = apply_augmentation(wave, self.params, sample_rate=sample_rate)
        if max_seconds is not None:  # slowed down past the window: the window's worth, like any long file
            out = out[: int(max_seconds * sample_rate)]
        return out


def augmented_copies(utterance_id: str, path: str, config: AugmentConfig, *, seed: int) -> list[AugmentedAudio | str]:
    """The training copies of one utterance besides the original: augmented ones, or the clean file where a
    copy's draw is clean."""
    copies: list[AugmentedAudio | str] = []
    for key in copy_keys(utterance_id, config.copies):
        params = draw_augmentation(config, seed=seed, key=key)
        copies.append(AugmentedAudio(str(path), params) if params is not None else str(path))
    return copies
