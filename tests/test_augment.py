"""Augmentation: deterministic from (seed, key), and each effect measurably does what it says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conditune.data import augment
from conditune.data.augment import AugmentConfig, AugmentParams, apply_augmentation, draw_augmentation
from conditune.errors import CondituneError

SR = 16000


def _tone(freq: float, seconds: float = 1.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _speechlike(seconds: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * seconds)) / SR
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.2 * envelope * (np.sin(2 * np.pi * 220 * t) + 0.3 * rng.standard_normal(t.size))).astype(np.float32)


def _band_db(wave: np.ndarray, low: float, high: float) -> float:
    """Mean power per frequency bin in [low, high) Hz, in dB."""
    spectrum = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(wave.size, 1 / SR)
    return float(10 * np.log10(spectrum[(freqs >= low) & (freqs < high)].mean()))


def test_draw_is_deterministic_and_keyed():
    config = AugmentConfig()
    keys = augment.copy_keys("en-train-00001", 3)
    assert keys == ["en-train-00001#0", "en-train-00001#1", "en-train-00001#2"]
    first = [draw_augmentation(config, seed=7, key=k) for k in keys]
    assert first == [draw_augmentation(config, seed=7, key=k) for k in keys]
    many = [draw_augmentation(config, seed=7, key=f"u{i}#0") for i in range(300)]
    described = {json.dumps(p.to_dict(), sort_keys=True) for p in many if p}
    assert len(described) > 200  # keys give different copies
    assert [draw_augmentation(config, seed=8, key=f"u{i}#0") for i in range(300)] != many
    # the same parameters give the same audio, bit for bit
    wave = _speechlike()
    chosen = next(p for p in many if p and p.snr_db is not None and p.rt60 is not None)
    a = apply_augmentation(wave, chosen, sample_rate=SR)
    assert a.dtype == np.float32 and np.array_equal(a, apply_augmentation(wave, chosen, sample_rate=SR))
    assert not np.array_equal(a, wave[: a.size])


def test_probability_effects_and_description():
    never = AugmentConfig(probability=0.0)
    assert all(draw_augmentation(never, seed=0, key=str(i)) is None for i in range(100))
    always = AugmentConfig(probability=1.0)
    drawn = [draw_augmentation(always, seed=0, key=str(i)) for i in range(400)]
    assert all(p is not None and p.to_dict() for p in drawn)  # an augmented copy has at least one effect
    half = [draw_augmentation(AugmentConfig(probability=0.5), seed=0, key=str(i)) for i in range(2000)]
    assert abs(sum(p is not None for p in half) / 2000 - 0.5) < 0.05  # 4.5 standard deviations
    only_gain = AugmentConfig(probability=1.0, effects=("gain",))
    assert {tuple(draw_augmentation(only_gain, seed=0, key=str(i)).to_dict()) for i in range(50)} == {("gain_db",)}
    rates = {name: 0 for name in augment.EFFECTS}
    for p in drawn:
        for name in p.to_dict():
            rates[{"gain_db": "gain"}.get(name, name)] += 1
    assert rates["noise"] > rates["telephone"] > 0 and rates["speed"] > rates["reverb"] > 0
    params = AugmentParams(speed=1.05, snr_db=10.0, noise_color="pink", noise_seed=3, telephone=True)
    assert params.to_dict() == {
        "speed": 1.05,
        "noise": {"snr_db": 10.0, "color": "pink", "seed": 3},
        "telephone": {"mulaw": False},
    }
    assert json.loads(json.dumps(params.to_dict())) == params.to_dict()
    assert params.fingerprint() == AugmentParams(**vars(params)).fingerprint()
    assert params.fingerprint() != AugmentParams(speed=1.06).fingerprint() and len(params.fingerprint()) == 16
    with pytest.raises(CondituneError, match="unknown augmentation effect"):
        AugmentConfig(effects=("echo",))
    with pytest.raises(CondituneError, match="noise_colors"):
        AugmentConfig(noise_colors=("purple",))
    with pytest.raises(CondituneError, match="speed_range"):
        AugmentConfig(speed_range=(1.2, 0.9))


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.07, 1.1])
def test_speed_changes_length_and_pitch(factor):
    wave = _tone(500.0, seconds=2.0)
    out = apply_augmentation(wave, AugmentParams(speed=factor), sample_rate=SR)
    assert abs(out.size - wave.size / factor) <= 1
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak = np.fft.rfftfreq(out.size, 1 / SR)[np.argmax(spectrum)]
    assert abs(peak - 500.0 * factor) < 2.0


@pytest.mark.parametrize("color", augment.NOISE_COLORS)
@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_noise_at_the_asked_snr(color, snr):
    wave = _speechlike()
    out = apply_augmentation(wave, AugmentParams(snr_db=snr, noise_color=color, noise_seed=11), sample_rate=SR)
    noise = out.astype(np.float64) - wave
    measured = 10 * np.log10(np.sum(wave.astype(np.float64) ** 2) / np.sum(noise**2))
    assert abs(measured - snr) < 0.1


def test_noise_colors_have_their_slopes():
    rng = np.random.default_rng(1)
    freqs = np.fft.rfftfreq(2**16, 1 / SR)
    band = (freqs > 50) & (freqs < 5000)
    slopes = {}
    for color in augment.NOISE_COLORS:
        noise = augment.colored_noise(2**16, color, rng)
        assert abs(np.sqrt(np.mean(noise**2)) - 1.0) < 1e-9
        power = np.abs(np.fft.rfft(noise)) ** 2
        slopes[color] = np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0]
    assert abs(slopes["white"]) < 0.1 and abs(slopes["pink"] + 1) < 0.1 and abs(slopes["brown"] + 2) < 0.1


@pytest.mark.parametrize("rt60", [0.3, 0.7])
def test_reverb_tail_decays_at_rt60_after_the_direct_path(rt60):
    response = augment.room_impulse_response(rt60, 6.0, seed=5, sample_rate=SR)
    assert response[0] == 1.0
    tail = response[1:]
    assert abs(10 * np.log10(1.0 / np.sum(tail**2)) - 6.0) < 1e-6  # the direct-to-reverberant ratio
    # Schroeder backward integration; the -5 to -25 dB decay extrapolated to 60 dB (T20)
    energy = np.cumsum(tail[::-1] ** 2)[::-1]
    decay = 10 * np.log10(energy / energy[0])
    t = np.arange(decay.size) / SR
    fit = (decay < -5) & (decay > -25)
    slope = np.polyfit(t[fit], decay[fit], 1)[0]
    assert abs(-60 / slope - rt60) < 0.1 * rt60
    # on audio: a click gets a tail, the level is kept, the length too
    click = np.zeros(SR, dtype=np.float32)
    click[100] = 0.5
    out = apply_augmentation(click, AugmentParams(rt60=rt60, drr_db=6.0, reverb_seed=5), sample_rate=SR)
    assert out.size == click.size
    after = out[100 + int(0.05 * SR) : 100 + int(0.3 * SR)]
    assert np.sum(after.astype(np.float64) ** 2) > 0.01 * np.sum(out.astype(np.float64) ** 2)
    assert abs(np.sqrt(np.mean(out.astype(np.float64) ** 2)) - np.sqrt(np.mean(click.astype(np.float64) ** 2))) < 1e-4


@pytest.mark.parametrize("use_mulaw", [False, True])
def test_telephone_band(use_mulaw):
    wave = (0.1 * np.random.default_rng(2).standard_normal(2 * SR)).astype(np.float32)
    out = apply_augmentation(wave, AugmentParams(telephone=True, mulaw=use_mulaw), sample_rate=SR)
    assert out.size == wave.size
    inside = _band_db(out, 500, 3000)
    assert abs(inside - _band_db(wave, 500, 3000)) < 3.0  # the band passes
    assert _band_db(out, 20, 150) < inside - 25
    assert _band_db(out, 4200, 8000) < inside - 40  # nothing above the 8 kHz rate's Nyquist


def test_mulaw_round_trip():
    x = np.linspace(-0.9, 0.9, 1001)
    y = augment.mulaw(x)
    big = np.abs(x) > 0.05
    assert np.max(np.abs(y[big] - x[big]) / np.abs(x[big])) < 0.04  # 8-bit μ-law: ~3 % steps at most
    assert np.max(np.abs(y[~big] - x[~big])) < 0.002  # finer steps near zero


def test_gain_and_peak_limit():
    wave = _tone(300.0, level=0.1)
    quieter = apply_augmentation(wave, AugmentParams(gain_db=-6.0), sample_rate=SR)
    np.testing.assert_allclose(quieter, wave * 10 ** (-6 / 20), rtol=1e-6)
    louder = apply_augmentation(_tone(300.0, level=0.5), AugmentParams(gain_db=20.0), sample_rate=SR)
    assert abs(np.abs(louder).max() - augment.PEAK_LIMIT) < 1e-6  # scaled, not clipped
    np.testing.assert_allclose(louder / np.abs(louder).max(), _tone(300.0, level=0.5) / 0.5, atol=1e-4)
    np.testing.assert_array_equal(apply_augmentation(wave, None, sample_rate=SR), wave)
