"""Speech engines and voices: each voice speaks (or is skipped naming its package), prosody moves,
the mix is dominated by human-derived voices, and the held-out voice never trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conditune.data import engines, synth
from conditune.data.manifest import read_manifest
from conditune.errors import CondituneError

SENTENCES = {
    "en": "The weather was fine, so we walked along the river.",
    "de": "Das Wetter war schön, also gingen wir am Fluss entlang.",
}
# The parameter each engine speeds up with, and a fast and a slow value of it.
TEMPO = {
    "espeak-ng": ("speed", 220, 120),
    "mbrola": ("speed", 220, 120),
    "pico": ("speed", 150, 70),
    "flite": ("stretch", 0.7, 1.4),
}


def _engine_or_skip(voice: engines.Voice) -> engines.Engine:
    found = {name: engines.find_engine(name) for name in engines.ENGINES if name != "espeak-ng"}
    found["espeak-ng"] = engines.EspeakCLI(shutil.which("espeak-ng")) if shutil.which("espeak-ng") else None
    engine = found.get(voice.engine)
    if engine is None:
        pytest.skip(f"{voice.engine} not installed (apt-get install {engines.ENGINE_PACKAGES[voice.engine]})")
    if not engines.voice_installed(voice):
        pytest.skip(f"voice {voice.id} not installed (apt-get install {voice.package})")
    return engine


def _seconds(engine: engines.Engine, text: str, params: dict, scratch: Path) -> tuple[float, float]:
    data, rate = engine.synthesize(text, params, scratch)
    assert data.ndim == 2 and data.shape[1] == 1 and rate in (16000, 22050, 32000, 48000, 8000, 11025)
    return data.shape[0] / rate, float(np.abs(data).max())


# espeak-ng's English accents share one engine: one of them stands for the rest
VOICES = [v for v in engines.VOICES if v.engine != "espeak-ng" or v.name in ("en-us", "de")]


@pytest.mark.parametrize("voice", VOICES, ids=lambda v: v.id)
def test_voice_speaks_and_its_tempo_moves(voice, tmp_path):
    engine = _engine_or_skip(voice)
    rng = np.random.default_rng(0)
    params = synth.voice_params(voice, rng)
    assert params["id"] == voice.id and params["engine"] == voice.engine
    duration, peak = _seconds(engine, SENTENCES[voice.language], params, tmp_path)
    assert 1.5 < duration < 8.0 and peak > 0.05
    if voice.engine == "festival":
        key, fast, slow = ("rate", 1.3, 0.75) if "rate" in params else ("stretch", 0.8, 1.3)
    else:
        key, fast, slow = TEMPO[voice.engine]
    quick, _ = _seconds(engine, SENTENCES[voice.language], {**params, key: fast}, tmp_path)
    slow_s, _ = _seconds(engine, SENTENCES[voice.language], {**params, key: slow}, tmp_path)
    assert quick < 0.85 * slow_s, f"{voice.id}: {key}={fast} gave {quick:.2f} s, {key}={slow} gave {slow_s:.2f} s"


def test_festival_process_keeps_no_state_between_utterances(tmp_path):
    voice = engines.find_voice("festival:cmu_us_slt_arctic_hts")
    engine = _engine_or_skip(voice)
    text, hts = SENTENCES["en"], {"voice": "cmu_us_slt_arctic_hts", "rate": 1.1}
    try:
        first, _ = engine.synthesize(text, hts, tmp_path)
        if engines.voice_installed(engines.find_voice("festival:kal_diphone")):
            engine.synthesize("Something else, slowly.", {"voice": "kal_diphone", "stretch": 1.3}, tmp_path)
        engine.synthesize('A "quoted" (bracketed) sentence.', {**hts, "rate": 0.8}, tmp_path)
        again, _ = engine.synthesize(text, hts, tmp_path)
    finally:
        engine.close()
    fresh = engines.find_engine("festival")
    try:
        alone, _ = fresh.synthesize(text, hts, tmp_path)
    finally:
        fresh.close()
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, alone)


def test_pico_markup_is_escaped(tmp_path):
    voice = engines.find_voice("pico:en-US")
    engine = _engine_or_skip(voice)
    duration, _ = _seconds(
        engine, "Salt <and> pepper & more.", {"voice": "en-US", "speed": 100, "pitch": 100}, tmp_path
    )
    assert duration > 0.5


def test_engine_detection(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "pico2wave" else real_which(name))
    if real_which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    assert "pico" in engines.missing_engines() and engines.missing_engines()["pico"] == "libttspico-utils"
    assert "pico" not in engines.available_engines(None)
    with pytest.raises(CondituneError, match="pico is not installed: apt-get install libttspico-utils"):
        engines.available_engines(("espeak-ng", "pico"))
    with pytest.raises(CondituneError, match="unknown speech engine 'sam'"):
        engines.available_engines(("sam",))
    with pytest.raises(CondituneError, match="unknown voice"):
        engines.find_voice("mbrola:mb-xx9")


def test_mix_is_dominated_by_human_derived_voices():
    every = list(engines.ENGINES)
    for language in ("en", "de"):
        held = synth.DEFAULT_HELDOUT_VOICES[language]
        drawn = [synth.choose_voice(f"Sentence {i}.", language, 0, every, exclude=(held,))["id"] for i in range(3000)]
        assert held not in drawn
        human = {v.id for v in engines.VOICES if v.human}
        assert sum(d in human for d in drawn) / len(drawn) > 0.7
        assert sum(d.startswith("espeak-ng:") for d in drawn) / len(drawn) < 0.25
        assert len(set(drawn)) == len([v for v in engines.voices_for(language) if v.id != held])
    # the draw is a pure function of its arguments, and the installed-voice list narrows it
    a = synth.choose_voice("Hello there.", "en", 3, every, voices=["pico:en-US", "mbrola:mb-us1"])
    assert a == synth.choose_voice("Hello there.", "en", 3, every, voices=["pico:en-US", "mbrola:mb-us1"])
    assert a["id"] in ("pico:en-US", "mbrola:mb-us1")
    with pytest.raises(CondituneError, match="no voice to speak it"):
        synth.choose_voice("Hallo.", "de", 0, ["espeak-ng"], exclude=("espeak-ng:de",))


def test_config_checks(tmp_path):
    with pytest.raises(CondituneError, match="speaks en, not de"):
        synth.synthesize_dataset(
            synth.SynthConfig(output=tmp_path, heldout_voices={"de": "pico:en-GB"}), progress=False
        )
    with pytest.raises(CondituneError, match="count_heldout_voice must be 0..count_test"):
        synth.synthesize_dataset(
            synth.SynthConfig(output=tmp_path, count_test=5, count_heldout_voice=6), progress=False
        )


TEXT_EN = " ".join(
    f"Sentence number {w} is spoken by a voice today."
    for w in ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
)
TEXT_DE = " ".join(
    f"Der Satz mit der Nummer {w} wird heute gesprochen."
    for w in ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf", "zwölf"]
)


def test_heldout_voice_set(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    (tmp_path / "en.txt").write_text(TEXT_EN, encoding="utf-8")
    (tmp_path / "de.txt").write_text(TEXT_DE, encoding="utf-8")
    held = {"en": "espeak-ng:en-gb"}
    german = synth.DEFAULT_HELDOUT_VOICES["de"]
    if engines.voice_installed(engines.find_voice(german)) and "mbrola" in engines.available_engines(None):
        held["de"] = german
    config = synth.SynthConfig(
        output=tmp_path / "set",
        count_train=6,
        count_dev=2,
        count_test=3,
        heldout_count=1,
        count_heldout_voice=2,
        jobs=2,
        texts={"en": [tmp_path / "en.txt"], "de": [tmp_path / "de.txt"]},
        heldout_voices=held,
    )
    result = synth.synthesize_dataset(config, progress=False)
    assert result.heldout_voices == held and not result.failed
    rows = {s: [json.loads(x) for x in result.manifests[s].read_text().splitlines()] for s in result.manifests}
    spoken = rows[synth.HELDOUT_VOICE_SPLIT]
    assert len(spoken) == 2 * len(held) and {r["tts"]["id"] for r in spoken} == set(held.values())
    for lang, voice in held.items():
        tests = [r["text"] for r in rows["test"] if r["language"] == lang]
        assert [r["text"] for r in spoken if r["language"] == lang] == tests[:2]  # the first test sentences again
        assert voice not in {r["tts"]["id"] for s in synth.SPLITS for r in rows[s] if r["language"] == lang}
    assert len(read_manifest(result.manifests[synth.HELDOUT_VOICE_SPLIT], strict=True)) == len(spoken)
    summary = json.loads((tmp_path / "set" / "synth_config.json").read_text())
    assert summary["heldout_voices"] == held and summary["counts"]["en"][synth.HELDOUT_VOICE_SPLIT] == 2
    assert set(summary["synthesis_speed"]["per_voice"]) >= set(held.values())


def test_measure_synthesis_speed():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    speed = synth.measure_synthesis_speed(languages=("en", "de"), engines=("espeak-ng",))
    assert set(speed.per_voice) == {f"espeak-ng:{v}" for v in engines.ESPEAK_VOICES["en"]} | {"espeak-ng:de"}
    assert all(0 < s < 10 for s in speed.per_voice.values()) and set(speed.per_language) == {"en", "de"}
