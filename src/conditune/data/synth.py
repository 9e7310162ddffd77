"""A synthetic speech set from text: ``conditune data synth``.

Text comes from the open-vocabulary sources of :mod:`conditune.data.sources` (by default English
Wikipedia lead sections and Debian ``fortunes`` for English; ``auf-deutsch``, ``fortunes-de`` and
``trans-de-en`` for German) or from any text file per language (``texts={"en": [path]}``, CLI
``--text en=PATH``). Sentences are split, cleaned, normalised to spoken form
(:func:`conditune.data.normalize.normalize_transcript`), filtered and deduplicated
(:mod:`conditune.data.texts`).

Each language's pool is shuffled with the seed and sliced, in this order, into test, dev, the
held-out text and train, so the splits never share a sentence, and raising ``count_train`` only
appends to train. The held-out sentences (English: Wikipedia only) are written to
``heldout_text.<lang>.txt`` and never spoken: the forgetting evaluation measures the language model
on them. ``vocab_size=N`` keeps train/dev/test to sentences made of the N most frequent words.

Speech comes from the engines of :mod:`conditune.data.engines` (MBROLA, Pico, festival, flite,
espeak-ng), the mix dominated by voices built from human recordings. One voice per language (by
default English ``mbrola:mb-us2``, German ``mbrola:mb-de7``) is held out: no train, dev or test
utterance uses it, and it speaks the first ``count_heldout_voice`` test sentences again into
``test_heldout_voice.jsonl``, a paired test of speech from a speaker the model never heard. Every
choice (voice, rate, pitch, loudness) is drawn from a generator seeded by (seed, language, text),
so the same seed gives the same set on the same machine. Audio is 16 kHz mono 16-bit WAV; a file's
name carries a hash of its text and voice, so a rerun skips what is already there (resumable) and
never reuses audio made for other settings. Manifests are written atomically at the end, and the
seconds each engine took per utterance go into ``synth_config.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conditune.data.engines import (  # noqa: F401  (re-exported: the synth API before the split)
    ESPEAK_VARIANTS,
    ESPEAK_VOICES,
    VOICES,
    Engine,
    EngineError,
    EspeakCLI,
    EspeakLibrary,
    Festival,
    Flite,
    Mbrola,
    Pico,
    Voice,
    available_engines,
    find_espeak,
    find_voice,
    installed_voices,
    missing_engines,
    voice_installed,
    voices_for,
)
from conditune.data.sources import (  # noqa: F401
    DEFAULT_SOURCES,
    FORTUNE_DIRS,
    FORTUNE_PACKAGES,
    HELDOUT_TEXT_SOURCES,
    fortune_files,
    source_sentences,
)
from conditune.data.texts import (  # noqa: F401
    accept_sentence,
    clean_sentence,
    dedupe_key,
    extract_sentences,
    read_text_file,
    split_records,
    split_sentences,
)
from conditune.errors import CondituneError

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
HELDOUT_VOICE_SPLIT = "test_heldout_voice"
# The held-out voice of each language: a speaker (and, for English, a male American voice) no
# training utterance has; chosen from the voices Whisper base transcribes well (results/data/voices.md).
DEFAULT_HELDOUT_VOICES = {"en": "mbrola:mb-us2", "de": "mbrola:mb-de7"}

# Prosody ranges per engine.
ESPEAK_SPEED = (130, 200)  # words per minute; espeak-ng's default is 175
ESPEAK_PITCH = (30, 70)  # 0-99; default 50
MBROLA_SPEED = (130, 190)
MBROLA_PITCH = (35, 65)
PICO_SPEED = (80, 120)  # percent of the voice's own rate
PICO_PITCH = (85, 115)  # percent of the voice's own pitch
HTS_RATE = (0.85, 1.15)  # festival HTS speech rate (>1 faster)
FESTIVAL_STRETCH = (0.9, 1.2)  # festival diphone duration stretch (>1 slower)
FLITE_VOICES = {"kal16": (90, 130), "awb": (90, 130), "rms": (85, 125), "slt": (150, 200)}  # mean F0 range, Hz
FLITE_STRETCH = (0.85, 1.2)
PEAK_LEVEL = (0.5, 0.95)


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


def seeded_rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return np.random.default_rng([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)])


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return round(float(rng.uniform(*bounds)), 3)


def _integer(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def voice_params(voice: Voice, rng: np.random.Generator) -> dict[str, Any]:
    """The engine's settings for one utterance of ``voice``: its prosody drawn from ``rng``."""
    params: dict[str, Any] = {"engine": voice.engine, "id": voice.id, "voice": voice.name}
    if voice.engine == "espeak-ng":
        variant = ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        params["voice"] = f"{voice.name}+{variant}" if variant else voice.name
        params.update(speed=_integer(rng, ESPEAK_SPEED), pitch=_integer(rng, ESPEAK_PITCH))
    elif voice.engine == "mbrola":
        params.update(speed=_integer(rng, MBROLA_SPEED), pitch=_integer(rng, MBROLA_PITCH))
    elif voice.engine == "pico":
        params.update(speed=_integer(rng, PICO_SPEED), pitch=_integer(rng, PICO_PITCH))
    elif voice.engine == "festival" and voice.name.endswith("_hts"):
        params.update(rate=_uniform(rng, HTS_RATE))
    elif voice.engine == "festival":
        params.update(stretch=_uniform(rng, FESTIVAL_STRETCH))
    elif voice.engine == "flite":
        params.update(stretch=_uniform(rng, FLITE_STRETCH), f0=_integer(rng, FLITE_VOICES.get(voice.name, (90, 130))))
    params["peak"] = _uniform(rng, PEAK_LEVEL)
    return params


def choose_voice(
    text: str,
    language: str,
    seed: int,
    engines: Sequence[str],
    *,
    voices: Collection[str] | None = None,
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """Voice and prosody for one sentence: a pure function of its arguments.

    The voice is drawn with the catalogue's weights among the voices of ``language`` whose engine is
    in ``engines`` (and whose id is in ``voices``, when given: the installed ones), never one in
    ``exclude`` (the held-out voice)."""
    candidates = [
        v
        for v in voices_for(language)
        if v.engine in engines and (voices is None or v.id in voices) and v.id not in exclude
    ]
    if not candidates:
        raise CondituneError(
            f"{language}: no voice to speak it with engines {', '.join(engines)}"
            + (f" once {', '.join(exclude)} is held out" if exclude else "")
        )
    rng = seeded_rng("voice", seed, language, text)
    weights = np.array([v.weight for v in candidates], dtype=np.float64)
    voice = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
    return voice_params(voice, rng)


def heldout_voice_params(text: str, language: str, seed: int, voice_id: str) -> dict[str, Any]:
    """The held-out voice's settings for one test sentence (its own prosody draw)."""
    return voice_params(find_voice(voice_id), seeded_rng("heldout-voice", seed, language, text))


@dataclass
class SynthItem:
    id: str
    language: str
    split: str
    text: str
    voice: dict[str, Any]
    audio: Path


@dataclass
class TextPlan:
    language: str
    pool_size: int
    splits: dict[str, list[str]]
    heldout: list[str]


def common_words_only(sentences: Sequence[str], vocab_size: int) -> list[str]:
    """The sentences whose every word (lower-cased letters) is among the ``vocab_size`` most frequent words of
    ``sentences`` (ties broken alphabetically, so the result does not depend on the input order)."""
    counts = Counter(word for sentence in sentences for word in dedupe_key(sentence).split())
    vocab = {word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocab_size]}
    return [s for s in sentences if all(word in vocab for word in dedupe_key(s).split())]


def plan_texts(
    sentences: Sequence[str],
    language: str,
    seed: int,
    counts: Mapping[str, int],
    heldout_count: int,
    source: str = "",
    vocab_size: int | None = None,
    heldout_from: Collection[str] | None = None,
) -> TextPlan:
    """Shuffle the pool with the seed and slice it: test, dev, held-out text, train.

    ``heldout_from``: only these sentences may become held-out text (English: Wikipedia's); the others
    stay for train. ``vocab_size``: train/dev/test come from the common-words-only part of the pool (in
    the same shuffled order), the held-out text from the rest of the pool."""
    pool = sorted(set(sentences))
    order = seeded_rng("split", seed, language).permutation(len(pool))
    pool = [pool[i] for i in order]
    spoken = common_words_only(pool, vocab_size) if vocab_size else pool
    needed = sum(counts.get(s, 0) for s in SPLITS)
    if needed > len(spoken):
        limited = f" with only the {vocab_size} most frequent words" if vocab_size else ""
        raise CondituneError(
            f"{language}: {needed} sentences wanted for train/dev/test but only {len(spoken)} usable ones{limited} "
            f"in {source or 'the text sources'}: lower the counts, raise the vocabulary or add text with --text {language}=PATH"
        )
    eligible = set(pool) if heldout_from is None else set(heldout_from)
    splits: dict[str, list[str]] = {}
    at = 0
    for split in ("test", "dev"):
        splits[split] = spoken[at : at + counts.get(split, 0)]
        at += counts.get(split, 0)
    if vocab_size:  # held-out text: sentences with a rarer word, never spoken whatever the counts
        speakable = set(spoken)
        heldout = [s for s in pool if s not in speakable and s in eligible][:heldout_count]
        splits["train"] = spoken[at : at + counts.get("train", 0)]
    else:
        rest = pool[at:]
        room = len(rest) - counts.get("train", 0)  # train keeps what it asked for; held-out text gets the rest
        heldout = [s for s in rest if s in eligible][: min(heldout_count, room)]
        taken = set(heldout)
        splits["train"] = [s for s in rest if s not in taken][: counts.get("train", 0)]
    return TextPlan(language=language, pool_size=len(spoken), splits=splits, heldout=heldout)


def _file_hash(text: str, voice: Mapping[str, Any], sample_rate: int) -> str:
    key = json.dumps(
        {"text": text, "voice": dict(voice), "sr": sample_rate, "v": 1}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """The ``synth:`` section of a recipe and the options of ``conditune data synth`` (one field each)."""

    output: str = "data/speech"
    languages: list[str] = field(default_factory=lambda: ["en", "de"])
    count_train: int = 200
    count_dev: int = 20
    count_test: int = 100
    heldout_count: int = 500
    seed: int = 0
    jobs: int = 1
    texts: dict[str, list[str]] = field(default_factory=dict)  # language -> text files (replace the sources)
    sources: dict[str, list[str]] = field(default_factory=dict)  # language -> text sources; else DEFAULT_SOURCES
    heldout_text_sources: dict[str, list[str]] | None = None  # None: HELDOUT_TEXT_SOURCES
    engines: list[str] | None = None  # None: every installed engine
    heldout_voices: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_HELDOUT_VOICES))  # "" : none
    count_heldout_voice: int | None = None  # None: count_test (the first N test sentences, spoken again)
    min_words: int = 4
    max_words: int = 20
    max_chars: int = 160
    vocab_size: int | None = None  # limited-vocabulary set: only sentences of the N most frequent words
    sample_rate: int = SAMPLE_RATE

    def validate(self) -> None:
        """Every value in range, each error naming its ``conditune data synth`` option."""
        from conditune.validation import require_int

        for key in ("count_train", "count_dev", "count_test", "heldout_count", "seed"):
            require_int(getattr(self, key), f"--{key.replace('_', '-')}", minimum=0)
        require_int(self.jobs, "--jobs", minimum=1)
        require_int(self.min_words, "--min-words", minimum=1)
        require_int(self.max_words, "--max-words", minimum=self.min_words)
        if self.vocab_size is not None:
            require_int(self.vocab_size, "--vocab-size", minimum=1)
        if self.count_heldout_voice is not None:
            require_int(self.count_heldout_voice, "--count-heldout-voice", minimum=0)
        if not any(lang.strip() for lang in self.languages):
            raise CondituneError("--languages: give at least one language code, like en,de")


@dataclass
class SynthRecipe:
    """A recipe file's ``synth:`` section (what ``conditune data synth CONFIG.yaml`` reads)."""

    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self) -> None:
        self.synth.validate()


@dataclass
class SynthResult:
    output: Path
    manifests: dict[str, Path]  # train, dev, test, test_heldout_voice
    heldout: dict[str, Path]
    counts: dict[str, dict[str, int]]  # language -> split -> utterances
    synthesized: int
    reused: int
    failed: list[tuple[str, str]]  # (id, reason)
    engines: list[str]
    heldout_voices: dict[str, str] = field(default_factory=dict)  # language -> voice id (when spoken)
    speed: dict[str, Any] = field(default_factory=dict)  # measured synthesis seconds (synth_config.json)


def synthesize_item(item: SynthItem, engine: Engine, sample_rate: int) -> tuple[float, float]:
    """Write ``item.audio``; returns (its duration, seconds the engine and the conversion took)."""
    from conditune.data.audio import save_wav, to_mono_resampled

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".synth-", dir=item.audio.parent) as scratch:
        data, rate = engine.synthesize(item.text, item.voice, Path(scratch))
    audio = to_mono_resampled(data, rate, sample_rate, item.id)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak < 1e-4:
        raise EngineError("engine produced silence")
    audio = audio * (float(item.voice.get("peak", 0.9)) / peak)
    seconds = time.perf_counter() - start
    save_wav(item.audio, audio, sample_rate)
    return audio.size / sample_rate, seconds


def _existing_duration(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return info.frames / info.samplerate if info.frames > 0 else None
    except Exception:  # noqa: BLE001
        return None


def _check_config(config: SynthConfig) -> tuple[str, ...]:
    for name, value in (
        ("count_train", config.count_train),
        ("count_dev", config.count_dev),
        ("count_test", config.count_test),
        ("heldout_count", config.heldout_count),
    ):
        if value < 0:
            raise CondituneError(f"{name} must be >= 0, got {value}")
    if config.count_heldout_voice is not None and not 0 <= config.count_heldout_voice <= config.count_test:
        raise CondituneError(
            f"count_heldout_voice must be 0..count_test ({config.count_test}): the held-out voice speaks test "
            f"sentences; got {config.count_heldout_voice}"
        )
    if config.vocab_size is not None and config.vocab_size < 1:
        raise CondituneError(f"vocab_size must be >= 1, got {config.vocab_size}")
    if config.min_words < 1 or config.max_words < config.min_words:
        raise CondituneError(f"word limits {config.min_words}..{config.max_words} are not a valid range")
    languages = tuple(dict.fromkeys(lang.strip() for lang in config.languages if lang.strip()))
    if not languages:
        raise CondituneError("no languages given")
    for lang, paths in config.texts.items():
        for path in paths:
            if not Path(path).is_file():
                raise CondituneError(f"text file for {lang} not found: {path}")
    for lang, voice_id in config.heldout_voices.items():
        if voice_id and voice_id.lower() != "none":
            voice = find_voice(voice_id)
            if voice.language != lang:
                raise CondituneError(f"held-out voice {voice_id} speaks {voice.language}, not {lang}")
    return languages


@dataclass
class TextPool:
    sentences: list[str]
    heldout_from: set[str] | None  # None: any sentence may be held-out text
    sources: dict[str, int]  # source -> sentences it gave
    description: str


def language_pool(config: SynthConfig, language: str, log: Callable[[str], None]) -> TextPool:
    """The sentences ``language`` is spoken from: its ``--text`` files, else its text sources.

    A default source that is missing here (a Debian package, PyPI out of reach) is skipped with a
    message; one named in ``config.sources`` is an error."""
    limits = {"min_words": config.min_words, "max_words": config.max_words, "max_chars": config.max_chars}
    if language in config.texts:
        files = [Path(p) for p in config.texts[language]]
        sentences = extract_sentences(files, language, limits["min_words"], limits["max_words"], limits["max_chars"])
        description = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        return TextPool(sentences, None, {description: len(sentences)}, description)
    explicit = language in config.sources
    names = tuple(config.sources.get(language) or DEFAULT_SOURCES.get(language, ()))
    if not names:
        raise CondituneError(f"no built-in text for language '{language}': pass --text {language}=PATH")
    per_source: dict[str, list[str]] = {}
    errors = []
    for name in names:
        try:
            per_source[name] = source_sentences(name, log=log, **limits)
        except CondituneError as exc:
            if explicit:
                raise
            errors.append(str(exc))
            log(f"{language}: text source {name} skipped: {exc}")
    if not per_source:
        raise CondituneError(f"{language}: no text source available ({'; '.join(errors)}); pass --text {language}=PATH")
    heldout_names = (HELDOUT_TEXT_SOURCES if config.heldout_text_sources is None else config.heldout_text_sources).get(
        language, ()
    )
    chosen = [n for n in heldout_names if n in per_source]
    heldout_from = {s for n in chosen for s in per_source[n]} if chosen else None
    sentences = sorted({s for found in per_source.values() for s in found})
    return TextPool(sentences, heldout_from, {n: len(s) for n, s in per_source.items()}, ", ".join(per_source))


def _heldout_voice(
    config: SynthConfig, language: str, engines: Mapping[str, Engine], log: Callable[[str], None]
) -> tuple[str, bool]:
    """(the voice held out for ``language`` or "", whether it can speak here)."""
    voice_id = config.heldout_voices.get(language, "")
    if not voice_id or voice_id.lower() == "none":
        return "", False
    voice = find_voice(voice_id)
    if voice.engine not in engines or not voice_installed(voice):
        log(
            f"{language}: held-out voice {voice_id} is not installed (apt-get install {voice.package}): "
            f"no {HELDOUT_VOICE_SPLIT} utterances for {language}"
        )
        return voice_id, False
    return voice_id, True


def _plan_language(
    config: SynthConfig, language: str, engines: Mapping[str, Engine], output: Path, log: Callable[[str], None]
) -> tuple[TextPlan, TextPool, list[SynthItem], str]:
    counts = {"train": config.count_train, "dev": config.count_dev, "test": config.count_test}
    pool = language_pool(config, language, log)
    plan = plan_texts(
        pool.sentences,
        language,
        config.seed,
        counts,
        config.heldout_count,
        pool.description,
        config.vocab_size,
        heldout_from=pool.heldout_from,
    )
    log(
        f"{language}: {plan.pool_size} usable sentences ({', '.join(f'{k} {v}' for k, v in pool.sources.items())}); "
        + ", ".join(f"{s} {len(plan.splits[s])}" for s in SPLITS)
        + f", held-out text {len(plan.heldout)}"
    )
    if len(plan.heldout) < config.heldout_count:
        log(f"{language}: only {len(plan.heldout)} of {config.heldout_count} held-out sentences left over")
    heldout_voice, speaks = _heldout_voice(config, language, engines, log)
    exclude = (heldout_voice,) if heldout_voice else ()
    installed = installed_voices(list(engines), language)
    items: list[SynthItem] = []

    def add(split: str, index: int, text: str, voice: dict[str, Any]) -> None:
        folder = output / "audio" / language / split
        folder.mkdir(parents=True, exist_ok=True)
        utt_id = f"{language}-{split}-{index:05d}"
        audio = folder / f"{utt_id}-{_file_hash(text, voice, config.sample_rate)}.wav"
        items.append(SynthItem(utt_id, language, split, text, voice, audio))

    for split in SPLITS:
        for index, text in enumerate(plan.splits[split]):
            add(
                split,
                index,
                text,
                choose_voice(text, language, config.seed, list(engines), voices=installed, exclude=exclude),
            )
    if speaks:
        count = config.count_test if config.count_heldout_voice is None else config.count_heldout_voice
        for index, text in enumerate(plan.splits["test"][:count]):
            add(HELDOUT_VOICE_SPLIT, index, text, heldout_voice_params(text, language, config.seed, heldout_voice))
    return plan, pool, items, heldout_voice if speaks else ""


def _run_items(
    todo: Sequence[SynthItem], engines: Mapping[str, Engine], config: SynthConfig, progress: bool
) -> tuple[dict[str, tuple[float, float]], list[tuple[str, str]], float]:
    """Synthesise ``todo`` with ``config.jobs`` threads: ({id: (duration, seconds)}, failures, wall seconds)."""
    done: dict[str, tuple[float, float]] = {}
    failed: list[tuple[str, str]] = []
    progress_bar = task = None
    if progress and todo:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress_bar = Progress(
            TextColumn("synthesising"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        progress_bar.start()
        task = progress_bar.add_task("synth", total=len(todo))
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(config.jobs))) as pool:
            futures = {
                pool.submit(synthesize_item, item, engines[item.voice["engine"]], config.sample_rate): item
                for item in todo
            }
            for future in as_completed(futures):
                item = futures[future]
                try:
                    done[item.id] = future.result()
                except (EngineError, CondituneError) as exc:
                    failed.append((item.id, str(exc)))
                if progress_bar is not None:
                    progress_bar.advance(task)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    return done, failed, time.perf_counter() - start


def speed_summary(
    items: Sequence[SynthItem], timings: Mapping[str, tuple[float, float]], jobs: int, wall: float
) -> dict[str, Any]:
    """Seconds per utterance and real-time factor per engine and per voice, from this run's syntheses."""

    def group(key: Callable[[SynthItem], str]) -> dict[str, dict[str, float]]:
        sums: dict[str, list[float]] = {}
        for item in items:
            if item.id in timings:
                duration, seconds = timings[item.id]
                entry = sums.setdefault(key(item), [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += seconds
                entry[2] += duration
        return {
            name: {
                "utterances": int(n),
                "seconds_per_utterance": round(seconds / n, 4),
                "realtime_factor": round(seconds / audio, 4) if audio else None,
            }
            for name, (n, seconds, audio) in sorted(sums.items())
        }

    return {
        "per_engine": group(lambda item: item.voice["engine"]),
        "per_voice": group(lambda item: item.voice.get("id", item.voice["engine"])),
        "utterances": len(timings),
        "jobs": jobs,
        "wall_seconds": round(wall, 2),
        "utterances_per_second": round(len(timings) / wall, 3) if wall > 0 and timings else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "note": "seconds per utterance are per worker thread (engine call + resampling), so they grow with load",
    }


def synthesize_dataset(
    config: SynthConfig,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SynthResult:
    """Build (or finish building) the synthetic speech set described by ``config``."""
    log = log or (lambda message: None)
    languages = _check_config(config)
    engines = available_engines(config.engines)
    if config.engines is None and (missing := missing_engines()):
        log("speech engines not installed: " + "; ".join(f"{n} (apt-get install {p})" for n, p in missing.items()))
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    plans: dict[str, TextPlan] = {}
    pools: dict[str, TextPool] = {}
    heldout_voices: dict[str, str] = {}
    items: list[SynthItem] = []
    for lang in languages:
        plans[lang], pools[lang], lang_items, voice = _plan_language(config, lang, engines, output, log)
        items += lang_items
        if voice:
            heldout_voices[lang] = voice

    durations: dict[str, float] = {}
    todo: list[SynthItem] = []
    for item in items:
        existing = _existing_duration(item.audio)
        if existing is None:
            todo.append(item)
        else:
            durations[item.id] = existing
    reused = len(items) - len(todo)
    if reused:
        log(f"reusing {reused} files already synthesised")
    try:
        timings, failed, wall = _run_items(todo, engines, config, progress)
    finally:
        for engine in engines.values():
            engine.close()
    durations.update({utt_id: duration for utt_id, (duration, _) in timings.items()})
    if todo and len(failed) == len(todo):
        raise CondituneError(f"speech synthesis failed for all {len(todo)} utterances: {failed[0][1]}")
    for utt_id, reason in failed[:5]:
        log(f"skipped {utt_id}: {reason}")
    speed = speed_summary(todo, timings, max(1, int(config.jobs)), wall)
    if not timings:  # all reused: keep the speeds measured when the audio was made
        previous = _previous_speed(output / "synth_config.json")
        speed = {**previous, "reused": True} if previous else speed
    manifests, counts = _write_outputs(
        config, output, languages, items, durations, plans, pools, engines, failed, speed, heldout_voices
    )
    return SynthResult(
        output=output,
        manifests=manifests,
        heldout={lang: output / f"heldout_text.{lang}.txt" for lang in languages},
        counts=counts,
        synthesized=len(todo) - len(failed),
        reused=reused,
        failed=failed,
        engines=list(engines),
        heldout_voices=heldout_voices,
        speed=speed,
    )


def _previous_speed(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8")).get("synthesis_speed")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return found if isinstance(found, dict) and found.get("utterances") else None


def _write_outputs(
    config: SynthConfig,
    output: Path,
    languages: Sequence[str],
    items: Sequence[SynthItem],
    durations: Mapping[str, float],
    plans: Mapping[str, TextPlan],
    pools: Mapping[str, TextPool],
    engines: Mapping[str, Engine],
    failed: Sequence[tuple[str, str]],
    speed: Mapping[str, Any],
    heldout_voices: Mapping[str, str],
) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    from conditune.data.manifest import Utterance, write_manifest
    from conditune.io import atomic_write_json, atomic_write_text

    manifests: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {lang: {} for lang in languages}
    for split in (*SPLITS, HELDOUT_VOICE_SPLIT):
        chosen = [item for item in items if item.split == split and item.id in durations]
        utterances = [Utterance(item.id, item.audio, item.text, item.language) for item in chosen]
        extras = {item.id: {"duration": round(durations[item.id], 3), "tts": item.voice} for item in chosen}
        manifests[split] = write_manifest(output / f"{split}.jsonl", utterances, extras=extras)
        for lang in languages:
            counts[lang][split] = sum(1 for item in chosen if item.language == lang)
    for lang, plan in plans.items():
        atomic_write_text(output / f"heldout_text.{lang}.txt", "".join(line + "\n" for line in plan.heldout))
    training_voices = Counter(
        (item.language, item.voice.get("id", item.voice["engine"])) for item in items if item.split in SPLITS
    )
    summary = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in ("texts", "output")
        },
        "texts": {lang: pools[lang].sources for lang in languages},
        "engines": {name: engine.version() for name, engine in engines.items()},
        "pool_sizes": {lang: plan.pool_size for lang, plan in plans.items()},
        "counts": counts,
        "heldout_counts": {lang: len(plan.heldout) for lang, plan in plans.items()},
        "heldout_voices": dict(heldout_voices),
        "voices": {
            lang: {voice: n for (vl, voice), n in sorted(training_voices.items()) if vl == lang} for lang in languages
        },
        "synthesis_speed": dict(speed),
        "failed": [list(f) for f in failed],
    }
    atomic_write_json(output / "synth_config.json", summary)
    return manifests, counts


# --------------------------------------------------------------------------------------------
# Speed probe
# --------------------------------------------------------------------------------------------

PROBE_SENTENCES = {
    "en": (
        "The river flows through the old town and into the sea.",
        "Most of the early settlers were farmers who grew wheat and barley.",
    ),
    "de": (
        "Der Zug nach Berlin fährt heute eine halbe Stunde später ab.",
        "Am Wochenende gehen wir mit den Kindern in den Park.",
    ),
}


@dataclass
class SynthSpeed:
    per_voice: dict[str, float]  # voice id -> seconds per utterance (one thread)
    per_language: dict[str, float]  # language -> mean seconds per utterance of the training mix
    load_average: float  # 1-minute load when measured


def measure_synthesis_speed(
    *,
    languages: Sequence[str] = ("en", "de"),
    engines: Sequence[str] | None = None,
    heldout_voices: Mapping[str, str] | None = None,
    repeats: int = 1,
) -> SynthSpeed:
    """Time each installed voice on a few short sentences (single thread) and weigh them as the mix does.

    For planning: a run of N utterances per language takes about ``N * per_language[lang] / jobs``
    seconds on an otherwise idle machine with ``jobs`` cores."""
    found = available_engines(engines)
    held = dict(DEFAULT_HELDOUT_VOICES if heldout_voices is None else heldout_voices)
    per_voice: dict[str, float] = {}
    per_language: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="conditune-speed-") as tmp:
        for lang in languages:
            sentences = PROBE_SENTENCES.get(lang, PROBE_SENTENCES["en"]) * max(1, repeats)
            weights, times = [], []
            for voice in voices_for(lang):
                if voice.engine not in found or not voice_installed(voice):
                    continue
                seconds = []
                for index, text in enumerate(sentences):
                    item = SynthItem(
                        "probe",
                        lang,
                        "probe",
                        text,
                        voice_params(voice, seeded_rng("probe", index)),
                        Path(tmp) / f"{index}.wav",
                    )
                    try:
                        seconds.append(synthesize_item(item, found[voice.engine], SAMPLE_RATE)[1])
                    except EngineError:
                        continue
                if seconds:
                    per_voice[voice.id] = round(float(np.mean(seconds)), 4)
                    if voice.id != held.get(lang):
                        weights.append(voice.weight)
                        times.append(per_voice[voice.id])
            if weights:
                per_language[lang] = round(float(np.average(times, weights=weights)), 4)
    for engine in found.values():
        engine.close()
    return SynthSpeed(per_voice=per_voice, per_language=per_language, load_average=round(os.getloadavg()[0], 2))
