"""Audio loading, manifests, batching and the synthetic speech set (real files in tmp_path)."""

from __future__ import annotations

import json
import shutil
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conditune.data.audio import AudioError, audio_duration, audio_fingerprint, load_audio
from conditune.data.batching import length_bucketed_batches
from conditune.data.manifest import Utterance, read_manifest, utterances_from_rows, write_manifest
from conditune.errors import CondituneError


def _sine(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([tone] * channels, axis=1) if channels > 1 else tone


def _peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


# ----------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("rate", [8000, 44100, 16000])
def test_load_audio_resamples_and_keeps_frequency(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, _sine(440.0, rate, 1.0), rate)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == 16000
    assert abs(_peak_hz(audio, 16000) - 440.0) < 3.0
    assert np.abs(audio).max() <= 1.0
    assert abs(np.abs(audio).max() - 0.5) < 0.05


def test_load_audio_other_rate_and_formats(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, _sine(1000.0, 22050, 0.5), 22050)
    audio = load_audio(path, sample_rate=8000)
    assert audio.size == 4000
    assert abs(_peak_hz(audio, 8000) - 1000.0) < 5.0
    ogg = tmp_path / "tone.ogg"
    sf.write(ogg, _sine(300.0, 16000, 0.5), 16000, format="OGG", subtype="VORBIS")
    assert abs(_peak_hz(load_audio(ogg), 16000) - 300.0) < 5.0
    if "MP3" in sf.available_formats():  # libsndfile >= 1.1
        mp3 = tmp_path / "tone.mp3"
        sf.write(mp3, _sine(440.0, 44100, 1.0), 44100, format="MP3")
        audio = load_audio(mp3)
        assert abs(audio.size - 16000) < 1200 and abs(_peak_hz(audio, 16000) - 440.0) < 3.0


def test_load_audio_stereo_mixdown(tmp_path):
    rate = 16000
    left = _sine(440.0, rate, 0.5)
    stereo = np.stack([left, -left * 0 + 0.25], axis=1)  # tone on the left, a constant on the right
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    audio = load_audio(path)
    np.testing.assert_allclose(audio, ((left + 0.25) / 2).astype(np.float32), atol=1e-5)


def test_load_audio_errors(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioError, match="not found.*missing.wav"):
        load_audio(missing)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.*empty.wav"):
        load_audio(empty)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError, match="broken.wav") as info:
        load_audio(broken)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, CondituneError)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(1600, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN.*nan.wav|nan.wav.*NaN"):
        load_audio(nan)
    no_frames = tmp_path / "no_frames.wav"
    with wave.open(str(no_frames), "wb") as handle:
        handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(16000)
    with pytest.raises(AudioError, match="no_frames.wav"):
        load_audio(no_frames)


def test_fingerprint_and_duration(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(a, _sine(440.0, 16000, 0.5), 16000)
    sf.write(b, _sine(441.0, 16000, 0.5), 16000)
    assert audio_fingerprint(a) == audio_fingerprint(a)
    assert audio_fingerprint(a) != audio_fingerprint(b)
    assert len(audio_fingerprint(a)) == 64
    assert audio_duration(a) == pytest.approx(0.5)
    with pytest.raises(AudioError, match="nope.wav"):
        audio_fingerprint(tmp_path / "nope.wav")


# ----------------------------------------------------------------------------------- manifest


def _write_wav(path: Path, seconds: float = 0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _sine(440.0, 16000, seconds), 16000)
    return path


def test_read_manifest_good_and_bad_lines(tmp_path):
    _write_wav(tmp_path / "wavs" / "a.wav")
    _write_wav(tmp_path / "wavs" / "b.wav")
    lines = [
        json.dumps({"audio": "wavs/a.wav", "text": "Hello there.", "language": "en", "id": "a"}),  # 1 good
        "{not json",  # 2 bad JSON
        json.dumps({"audio": "wavs/b.wav"}),  # 3 missing text
        json.dumps({"audio": "wavs/missing.wav", "text": "gone"}),  # 4 missing audio
        json.dumps({"audio": "wavs/b.wav", "text": "   "}),  # 5 empty text
        "",  # 6 blank: ignored
        json.dumps({"audio": "wavs/b.wav", "text": "Guten Tag.", "language": "de"}),  # 7 good, default id
        json.dumps({"audio": "wavs/a.wav", "text": "again", "id": "a"}),  # 8 duplicate id
        json.dumps(["a", "list"]),  # 9 not an object
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = read_manifest(manifest)
    assert [u.id for u in data.utterances] == ["a", "train-7"]
    assert data.utterances[0] == Utterance("a", tmp_path / "wavs" / "a.wav", "Hello there.", "en")
    assert data.utterances[1].language == "de"
    assert data.utterances[1].audio == tmp_path / "wavs" / "b.wav"
    assert [line for line, _ in data.skipped] == [2, 3, 4, 5, 8, 9]
    reasons = dict(data.skipped)
    assert "JSON" in reasons[2] and "text" in reasons[3] and "not found" in reasons[4]
    assert "empty text" in reasons[5] and "duplicate" in reasons[8]
    with pytest.raises(CondituneError, match=r"train\.jsonl:2: invalid JSON"):
        read_manifest(manifest, strict=True)
    with pytest.raises(CondituneError, match="manifest not found"):
        read_manifest(tmp_path / "nothing.jsonl")


def test_manifest_relative_paths_resolve_from_manifest_folder(tmp_path, monkeypatch):
    wav = _write_wav(tmp_path / "data" / "audio" / "x.wav")
    manifest = tmp_path / "data" / "sub" / "m.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps({"audio": "../audio/x.wav", "text": "relative"})
        + "\n"
        + json.dumps({"audio": str(wav), "text": "absolute"})
        + "\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    data = read_manifest(Path("data/sub/m.jsonl"), strict=True)
    assert [u.audio.resolve() for u in data.utterances] == [wav.resolve(), wav.resolve()]
    assert [u.id for u in data.utterances] == ["m-1", "m-2"]


def test_write_manifest_round_trip(tmp_path):
    wav = _write_wav(tmp_path / "audio" / "y.wav")
    utts = [Utterance("u1", wav, "Grüße aus München.", "de"), Utterance("u2", wav, "hi there", "en")]
    out = write_manifest(tmp_path / "out" / "m.jsonl", utts, extras={"u1": {"duration": 0.1}})
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["audio"] == "../audio/y.wav" and rows[0]["duration"] == 0.1
    assert "Grüße" in out.read_text(encoding="utf-8")
    back = read_manifest(out, strict=True).utterances
    assert [(u.id, u.audio.resolve(), u.text, u.language) for u in back] == [
        (u.id, u.audio.resolve(), u.text, u.language) for u in utts
    ]
    assert not list(out.parent.glob(".*tmp"))


def test_rows_to_utterances(tmp_path):
    """The ``datasets`` import path on plain rows (no ``datasets`` package needed)."""
    rate = 8000
    buf = tmp_path / "enc.flac"
    sf.write(buf, _sine(440.0, rate, 0.25), rate)
    rows = [
        {"audio": {"array": _sine(440.0, rate, 0.5), "sampling_rate": rate}, "text": "one"},
        {"audio": {"bytes": buf.read_bytes(), "path": None}, "text": "two"},
        {"audio": {"bytes": None, "path": str(buf)}, "text": "three"},
        {"audio": {"bytes": b"garbage" * 10, "path": None}, "text": "broken"},
        {"audio": {"array": _sine(440.0, rate, 0.5), "sampling_rate": rate}, "text": ""},
    ]
    utts, skipped = utterances_from_rows(rows, tmp_path / "cache", language="de", prefix="train")
    assert [u.text for u in utts] == ["one", "two", "three"]
    assert {u.language for u in utts} == {"de"}
    assert [index for index, _ in skipped] == [3, 4]
    assert sf.info(str(utts[0].audio)).samplerate == 16000
    assert load_audio(utts[0].audio).size == 8000
    assert load_audio(utts[1].audio).size == 4000


def test_load_hf_dataset_without_datasets(monkeypatch):
    from conditune.data import manifest

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(CondituneError, match="pip install datasets"):
        manifest.load_hf_dataset("some/dataset", "test")


def test_load_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional 'datasets' package not installed")
    import io

    def encoded(freq):
        buf = io.BytesIO()
        sf.write(buf, _sine(freq, 8000, 0.5), 8000, format="WAV")
        return {"bytes": buf.getvalue(), "path": f"{freq}.wav"}

    ds = datasets.Dataset.from_dict({"audio": [encoded(300), encoded(500)], "sentence": ["one", "two"]})
    ds = ds.cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "ds"))
    from conditune.data.manifest import load_hf_dataset

    utts = load_hf_dataset(
        str(tmp_path / "ds"), "test", text_column="sentence", language="de", cache_dir=tmp_path / "cache"
    )
    assert [(u.text, u.language) for u in utts] == [("one", "de"), ("two", "de")]
    assert load_audio(utts[1].audio).size == 8000
    assert len(read_manifest(tmp_path / "cache" / "manifest.jsonl", strict=True)) == 2
    with pytest.raises(CondituneError, match="no split 'train'"):
        load_hf_dataset(str(tmp_path / "ds"), "train", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------- batching


def test_length_bucketed_batches():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(1, 1000, 523)]
    batches = length_bucketed_batches(lengths, max_batch=8, seed=3, epoch=0, bucket_size_multiplier=4)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert batches == length_bucketed_batches(lengths, max_batch=8, seed=3, epoch=0, bucket_size_multiplier=4)
    assert batches != length_bucketed_batches(lengths, max_batch=8, seed=3, epoch=1, bucket_size_multiplier=4)
    assert batches != length_bucketed_batches(lengths, max_batch=8, seed=4, epoch=0, bucket_size_multiplier=4)

    # bucketing: far less spread inside a batch than in random batches (multiplier 1)
    def spread(bs):
        return np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs if len(b) > 1])

    unbucketed = length_bucketed_batches(lengths, max_batch=8, seed=3, epoch=0, bucket_size_multiplier=1)
    assert spread(batches) < 0.5 * spread(unbucketed)
    assert length_bucketed_batches([], 4, 0, 0) == []
    with pytest.raises(ValueError):
        length_bucketed_batches([1, 2], 0, 0, 0)


# ----------------------------------------------------------------------------------- synth

from conditune.data import synth  # noqa: E402

_HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not _HAVE_ESPEAK, reason="espeak-ng not installed (apt-get install espeak-ng)")

EN_TEXT = """\
The quick brown fox jumps over the lazy dog. A stitch in time saves nine lives today.
"Never trust a computer you can't throw out a window," he said.
%
All that glitters is not gold, my friend. Mr. Smith went to Washington by train.
		-- Anonymous Author
%
Too short. WHY ARE YOU SHOUTING AT ME NOW? The year 1984 was long ago indeed.
Every cloud has a silver lining somewhere. Fortune favours the bold and the brave.
Early to bed and early to rise makes a man healthy. Actions speak louder than words ever could.
Better late than never, as they always say. Curiosity killed the cat but satisfaction brought it back.
Practice makes perfect if you keep at it. Rome was not built in a single day.
Two wrongs do not make a right at all. When in Rome, do as the Romans do.
The pen is mightier than the sword in the end. Where there is smoke there is usually fire.
"""

DE_TEXT = """\
Der frühe Vogel fängt den Wurm am Morgen. Aller Anfang ist schwer, sagt man oft.
Übung macht den Meister, auch wenn es dauert. Wer zuletzt lacht, lacht am besten.
		-- Volksmund
%
Morgenstund hat Gold im Mund, so heißt es. Lügen haben kurze Beine und kommen nicht weit.
Ohne Fleiß kein Preis für die Faulen. Reden ist Silber, Schweigen ist Gold.
Viele Köche verderben den Brei in der Küche. Wer nicht wagt, der nicht gewinnt am Ende.
Was du heute kannst besorgen, das verschiebe nicht auf morgen.
Der Apfel fällt nicht weit vom Stamm, sagt die Großmutter. Hunde, die bellen, beißen nicht so schnell.
Kleine Geschenke erhalten die Freundschaft sehr lange. Wo ein Wille ist, da ist auch ein Weg.
"""


def test_sentence_extraction(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text(EN_TEXT, encoding="utf-8")
    sentences = synth.extract_sentences([path], "en", min_words=4, max_words=20)
    assert "The quick brown fox jumps over the lazy dog." in sentences
    assert "Never trust a computer you can't throw out a window, he said." in sentences
    assert "Mister Smith went to Washington by train." in sentences  # no split after "Mr.", then spelled out
    assert "The year nineteen eighty-four was long ago indeed." in sentences  # numbers spelled out
    assert not any("Anonymous" in s or "SHOUTING" in s or "1984" in s or s == "Too short." for s in sentences)
    assert sentences == sorted(set(sentences))
    de = tmp_path / "de.txt"
    de.write_text(DE_TEXT, encoding="utf-8")
    german = synth.extract_sentences([de], "de")
    assert "Lügen haben kurze Beine und kommen nicht weit." in german
    assert not any("Volksmund" in s for s in german)


def test_plan_texts_disjoint_and_stable():
    pool = [f"Sentence number {i} is here." for i in range(100)]
    counts = {"train": 20, "dev": 5, "test": 5}
    plan = synth.plan_texts(pool, "en", 7, counts, heldout_count=10)
    sets = [set(plan.splits[s]) for s in synth.SPLITS] + [set(plan.heldout)]
    assert [len(s) for s in sets] == [20, 5, 5, 10]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    bigger = synth.plan_texts(pool, "en", 7, {**counts, "train": 40}, heldout_count=10)
    assert bigger.splits["train"][:20] == plan.splits["train"]  # more train only appends
    assert bigger.splits["test"] == plan.splits["test"] and bigger.heldout == plan.heldout
    assert synth.plan_texts(pool, "en", 8, counts, 10).splits["test"] != plan.splits["test"]
    with pytest.raises(CondituneError, match="only 100 usable"):
        synth.plan_texts(pool, "en", 7, {"train": 99, "dev": 1, "test": 1}, 0)


def test_plan_texts_limited_vocabulary():
    pool = [
        "The cat sat on the mat.",
        "The cat sat on the rug.",
        "The cat sat.",
        "A cat sat on the mat.",
        "The dog ran far.",
        "A red hat.",
    ]
    # word counts: the 7, cat 4, sat 4, on 3, a 2, mat 2, then 1 each (ties go alphabetically)
    kept = ["The cat sat on the mat.", "The cat sat.", "A cat sat on the mat."]
    assert synth.common_words_only(pool, 6) == kept
    assert synth.common_words_only(pool, 5) == ["The cat sat."]  # "a" wins the tie with "mat"
    assert synth.common_words_only(list(reversed(pool)), 6) == list(reversed(kept))
    counts = {"train": 2, "dev": 0, "test": 1}
    plan = synth.plan_texts(pool, "en", 3, counts, heldout_count=50, vocab_size=6)
    assert sorted(plan.splits["train"] + plan.splits["test"]) == sorted(kept) and plan.pool_size == 3
    assert sorted(plan.heldout) == sorted(set(pool) - set(kept))  # all the rest, never spoken
    with pytest.raises(CondituneError, match="only 3 usable ones with only the 6 most frequent words"):
        synth.plan_texts(pool, "en", 3, {**counts, "train": 3}, 0, vocab_size=6)


def test_synth_rejects_a_vocabulary_below_one(tmp_path):
    with pytest.raises(CondituneError, match="vocab_size must be >= 1"):
        synth.synthesize_dataset(synth.SynthConfig(output=tmp_path / "s", vocab_size=0), progress=False)


def test_choose_voice_deterministic():
    engines = ["espeak-ng", "flite"]
    a = synth.choose_voice("Hello there my friend.", "en", 0, engines)
    assert a == synth.choose_voice("Hello there my friend.", "en", 0, engines)
    voices = {json.dumps(synth.choose_voice(f"Text {i}.", "en", 0, engines), sort_keys=True) for i in range(30)}
    assert len(voices) == 30
    german = [synth.choose_voice(f"Satz {i}.", "de", 0, engines) for i in range(20)]
    assert all(v["engine"] == "espeak-ng" and v["voice"].startswith("de") for v in german)


def test_missing_espeak_error(monkeypatch):
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(CondituneError, match="apt-get install espeak-ng.*pip install espeakng-loader"):
        synth.find_espeak()


def test_espeakng_loader_library(tmp_path):
    pytest.importorskip("espeakng_loader", reason="optional espeakng-loader wheel not installed")
    engine = synth.EspeakLibrary()
    data, rate = engine.synthesize(
        "Guten Morgen, wie geht es dir?", {"voice": "de+f3", "speed": 160, "pitch": 55}, tmp_path
    )
    assert rate == 22050 and data.shape[1] == 1 and 0.5 < data.shape[0] / rate < 5
    assert 0.05 < np.abs(data).max() <= 1.0
    with pytest.raises(synth.EngineError, match="no voice"):
        engine.synthesize("Hello.", {"voice": "xx-nonexistent", "speed": 160, "pitch": 50}, tmp_path)


def _synth(tmp_path: Path, name: str, texts: dict, **kwargs):
    config = synth.SynthConfig(
        output=tmp_path / name,
        languages=("en", "de"),
        count_train=3,
        count_dev=3,
        count_test=3,
        heldout_count=4,
        seed=11,
        jobs=2,
        texts=texts,
        **kwargs,
    )
    return synth.synthesize_dataset(config, progress=False)


@needs_espeak
def test_synth_small_run(tmp_path):
    (tmp_path / "en.txt").write_text(EN_TEXT, encoding="utf-8")
    (tmp_path / "de.txt").write_text(DE_TEXT, encoding="utf-8")
    texts = {"en": [tmp_path / "en.txt"], "de": [tmp_path / "de.txt"]}
    first = _synth(tmp_path, "a", texts)
    speaks_heldout = {lang for lang, n in first.counts.items() if n[synth.HELDOUT_VOICE_SPLIT]}
    assert first.synthesized == 18 + 3 * len(speaks_heldout) and not first.failed
    for lang in ("en", "de"):
        assert {k: v for k, v in first.counts[lang].items() if k in synth.SPLITS} == {"train": 3, "dev": 3, "test": 3}
    split_texts = {}
    for split in synth.SPLITS:
        data = read_manifest(first.manifests[split], strict=True)
        assert len(data.utterances) == 6
        split_texts[split] = {u.text for u in data.utterances}
        for utt in data.utterances:
            info = sf.info(str(utt.audio))
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            audio = load_audio(utt.audio)
            assert 0.5 < audio.size / 16000 < 15 and 0.3 < np.abs(audio).max() <= 1.0
    all_texts = [t for s in split_texts.values() for t in s]
    assert len(all_texts) == len(set(all_texts)) == 18  # no overlap between splits
    for lang in ("en", "de"):
        heldout = first.heldout[lang].read_text(encoding="utf-8").splitlines()
        assert len(heldout) == 4 and not set(heldout) & set(all_texts)
    rows = [json.loads(line) for line in first.manifests["train"].read_text().splitlines()]
    assert all(row["tts"]["engine"] in first.engines and row["duration"] > 0 for row in rows)
    summary = json.loads((tmp_path / "a" / "synth_config.json").read_text())
    for engine in {row["tts"]["engine"] for row in rows}:
        assert summary["synthesis_speed"]["per_engine"][engine]["seconds_per_utterance"] > 0
    assert json.loads((tmp_path / "a" / "synth_config.json").read_text())["counts"]["de"]["test"] == 3

    # same seed, another folder: same texts, same voices, same audio files
    second = _synth(tmp_path, "b", texts)
    for split in synth.SPLITS:
        rows_a = [json.loads(x) for x in first.manifests[split].read_text().splitlines()]
        rows_b = [json.loads(x) for x in second.manifests[split].read_text().splitlines()]
        assert rows_a == rows_b

    # rerun in place: everything reused
    again = _synth(tmp_path, "a", texts)
    assert again.synthesized == 0 and again.reused == first.synthesized
    assert again.speed["per_engine"] == first.speed["per_engine"]  # the speeds measured when the audio was made


@needs_espeak
@pytest.mark.skipif(
    not synth.FORTUNE_DIRS["en"].is_dir() or not synth.FORTUNE_DIRS["de"].is_dir(),
    reason="fortunes / fortunes-de not installed (apt-get install fortunes fortunes-de)",
)
def test_synth_from_fortunes_cli(tmp_path):
    from conditune.cli import main

    out = tmp_path / "fortunes"
    args = [
        "data",
        "synth",
        "--output",
        str(out),
        "--count-train",
        "2",
        "--count-dev",
        "1",
        "--count-test",
        "1",
        "--heldout-count",
        "5",
        "--seed",
        "3",
        "--jobs",
        "2",
        "--source",
        "en=fortunes",
        "--source",
        "de=fortunes-de",
        "--heldout-voice",
        "en=espeak-ng:en-gb",
        "--heldout-voice",
        "de=none",
        "--no-progress",
    ]
    assert main(args) == 0
    rows = [json.loads(x) for s in synth.SPLITS for x in (out / f"{s}.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["language"] for r in rows} == {"en", "de"}
    heldout = (out / "heldout_text.de.txt").read_text(encoding="utf-8").splitlines()
    assert len(heldout) == 5 and not set(heldout) & {r["text"] for r in rows}
    held = [json.loads(x) for x in (out / "test_heldout_voice.jsonl").read_text().splitlines()]
    assert [(r["language"], r["tts"]["id"]) for r in held] == [("en", "espeak-ng:en-gb")]
    summary = json.loads((out / "synth_config.json").read_text())
    assert summary["texts"]["en"].keys() == {"fortunes"} and summary["heldout_voices"] == {"en": "espeak-ng:en-gb"}
    assert main([*args[:-1], "--source", "de=nope", "--no-progress"]) == 1  # an unknown source: one line, exit 1
    assert main(["data", "check", str(out / "train.jsonl"), "--decode"]) == 0
    assert main(["data", "synth", "--output", str(out), "--languages", "fr", "--no-progress"]) == 1
