"""A synthetic speech set from text: ``conditune data synth``.

Text comes from Debian's ``fortunes`` (English, ``/usr/share/games/fortunes``) and
``fortunes-de`` (German, ``/usr/share/games/fortunes/de``) or from any text file per language
(``texts={"en": [path]}``, CLI ``--text en=PATH``). Records are split into sentences, cleaned
(attribution lines such as ``-- Author`` dropped, quotes removed, whitespace collapsed) and filtered
(complete sentences of ``min_words``..``max_words`` words, letters of the language's script plus
``, . ; : ! ? ' -`` only, no digits, no acronyms), then deduplicated on their lower-cased letters.

Each language's pool is shuffled with the seed and sliced, in this order, into test, dev, the
held-out text and train, so the splits never share a sentence, and raising ``count_train`` only
appends to train. The held-out sentences are written to ``heldout_text.<lang>.txt`` and never
spoken: the forgetting evaluation measures the language model on them.

``vocab_size=N`` (CLI ``--vocab-size N``) makes a limited-vocabulary set: train, dev and test keep only
sentences whose every word is among the N most frequent words of the language's pool, so each word is
heard many times (with the defaults 4-20 words and N=1000: ~2,100 English and ~1,100 German sentences).
A model that must learn from a CPU budget of a few thousand utterances cannot learn words it hears once;
this is the set it can. The held-out text is still drawn from the whole pool (general text).

Speech comes from espeak-ng (every language; several accents for English, voice variants m1-m7 and
f1-f5, speaking rate 130-200 words/min, pitch 30-70), and for English also from flite (voices kal16,
awb, rms, slt; varied duration stretch and mean F0) when it is installed, and festival
(``voice_kal_diphone``) when asked for with ``engines=("espeak-ng", "flite", "festival")``. Every
choice (engine, voice, rate, pitch, loudness) is drawn from a generator seeded by (seed, language,
text), so the same seed gives the same set on the same machine. Audio is written as 16 kHz mono
16-bit WAV; a file's name carries a hash of its text and voice, so a rerun skips what is already
there (resumable) and never reuses audio made for other settings. Manifests are written atomically
at the end.

espeak-ng is needed: Debian ``apt-get install espeak-ng``, or ``pip install espeakng-loader``,
whose wheel bundles libespeak-ng and its data and is used through ctypes when the ``espeak-ng``
program is not on PATH.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conditune.errors import CondituneError

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
FORTUNE_DIRS = {"en": FORTUNES_ROOT, "de": FORTUNES_ROOT / "de"}
FORTUNE_PACKAGES = {"en": "fortunes", "de": "fortunes-de"}
# Pictures, or text mostly in another language.
SKIP_FORTUNE_FILES = {"art", "ascii-art", "asciiart", "translate-me", "translations", "channel-debian.fortunes"}

ESPEAK_VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-029"),
    "de": ("de",),
}
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
ESPEAK_SPEED = (130, 200)  # words per minute; espeak-ng's default is 175
ESPEAK_PITCH = (30, 70)  # 0-99; default 50
FLITE_VOICES = {"kal16": (90, 130), "awb": (90, 130), "rms": (85, 125), "slt": (150, 200)}  # mean F0 range, Hz
FLITE_STRETCH = (0.85, 1.2)
FESTIVAL_VOICES = ("kal_diphone",)
FESTIVAL_STRETCH = (0.9, 1.2)
ENGINE_WEIGHTS = {"espeak-ng": 0.6, "flite": 0.3, "festival": 0.1}
ENGLISH_ONLY_ENGINES = {"flite", "festival"}
PEAK_LEVEL = (0.5, 0.95)

_LETTERS = {
    "en": "A-Za-z",
    "de": "A-Za-zÄÖÜäöüß",
}
_PUNCT = " ,.;:!?'-"
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "jr",
    "sr",
    "prof",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "no",
    "mt",
    "gen",
    "col",
    "lt",
    "sgt",
    "capt",
    "rev",
    "hr",
    "fr",
    "frl",
    "nr",
    "z.b",
    "bzw",
    "usw",
    "ca",
    "vgl",
    "d.h",
    "u.a",
    "evtl",
    "ggf",
    "dt",
    "bspw",
    "inkl",
    "sog",
    "str",
    "jh",
    "ev",
}


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")
_ATTRIBUTION = re.compile(r"^\s*(--|\u2014|\u2015|\u2013)\s*\S")
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u00b4": "'",
        "`": "'",
        "\u201c": " ",
        "\u201d": " ",
        "\u201e": " ",
        "\u00ab": " ",
        "\u00bb": " ",
        '"': " ",
        "\u00a0": " ",
        "\u2026": "...",
    }
)
_QUOTE_MARKS = re.compile(r"(^|\s)'+|'+(?=\s|$|[,.;:!?])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_NOT_LETTER = re.compile(r"[\W\d_]+")


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return _OVERSTRIKE.sub("", text).replace("\r\n", "\n")


def split_records(text: str) -> list[str]:
    """Fortune records (between ``%`` lines) or paragraphs (between blank lines), attributions dropped."""
    records: list[str] = []
    for block in re.split(r"^%[ \t]*$", text, flags=re.M):
        for paragraph in re.split(r"\n[ \t]*\n", block):
            lines: list[str] = []
            for line in paragraph.split("\n"):
                if _ATTRIBUTION.match(line):
                    break  # an attribution and whatever follows it
                lines.append(line.strip())
            joined = " ".join(part for part in lines if part)
            if joined:
                records.append(joined)
    return records


def split_sentences(text: str) -> list[str]:
    """Split at . ! ? followed by space, except after common abbreviations and initials."""
    sentences: list[str] = []
    start = 0
    for match in re.finditer(r"[.!?]+[\"')\]]*\s+", text):
        before = text[start : match.start()].split()
        last = before[-1].lower().strip("\"'(") if before else ""
        if text[match.start()] == "." and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def clean_sentence(sentence: str) -> str:
    text = unicodedata.normalize("NFC", sentence).translate(_TYPOGRAPHY)
    text = _QUOTE_MARKS.sub(r"\1", text)  # quote marks, not apostrophes
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return " ".join(text.split())


def accept_sentence(text: str, language: str, min_words: int, max_words: int, max_chars: int) -> bool:
    """Whether a cleaned sentence is good TTS input with an unambiguous transcript."""
    if not text or len(text) > max_chars:
        return False
    words = text.split()
    if not min_words <= len(words) <= max_words:
        return False
    letters = _LETTERS.get(language)
    if letters is not None:
        if not re.fullmatch(f"[{letters}{re.escape(_PUNCT)}]+", text):
            return False
    elif not all(ch.isalpha() or ch in _PUNCT for ch in text):
        return False
    if text[-1] not in ".!?" or not text[0].isalpha():
        return False
    if text[0].isupper() is False and text[0].lower() != text[0].upper():
        return False  # a cased script must start with a capital letter
    if re.match(r"\w{1,2}:", text):
        return False  # "Q: ...", "A: ..." dialogue labels
    if ".." in text or "--" in text or "''" in text or re.search(r"(^|\s)-|-(\s|$)|[,;:!?.][^\s]", text[:-1]):
        return False
    for word in words:
        core = word.strip(_PUNCT)
        if not core or len(core) > 30:
            return False
        if core[1:] != core[1:].lower():  # acronyms, shouting, camel case
            return False
    return True


def dedupe_key(text: str) -> str:
    return _NOT_LETTER.sub(" ", text.lower()).strip()


_EXTRACT_CACHE: dict[tuple, list[str]] = {}


def extract_sentences(
    paths: Iterable[Path], language: str, min_words: int = 4, max_words: int = 20, max_chars: int = 160
) -> list[str]:
    """Accepted, deduplicated sentences from text files, sorted (independent of file order)."""
    paths = [Path(p) for p in paths]
    key = (
        tuple((str(p.absolute()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths),
        language,
        min_words,
        max_words,
        max_chars,
    )
    if key not in _EXTRACT_CACHE:
        while len(_EXTRACT_CACHE) >= 8:  # a few text sets per process at most
            _EXTRACT_CACHE.pop(next(iter(_EXTRACT_CACHE)))
        _EXTRACT_CACHE[key] = _extract_sentences(paths, language, min_words, max_words, max_chars)
    return list(_EXTRACT_CACHE[key])


def _extract_sentences(paths: list[Path], language: str, min_words: int, max_words: int, max_chars: int) -> list[str]:
    by_key: dict[str, str] = {}
    for path in paths:
        for record in split_records(read_text_file(path)):
            for raw in split_sentences(record):
                if not min_words - 2 <= len(raw.split()) <= max_words + 5:
                    continue  # cheap pre-filter; the exact count is checked after cleaning
                sentence = clean_sentence(raw)
                if accept_sentence(sentence, language, min_words, max_words, max_chars):
                    key = dedupe_key(sentence)
                    if key not in by_key or sentence < by_key[key]:
                        by_key[key] = sentence
    return sorted(by_key.values())


def fortune_files(language: str) -> list[Path]:
    """The installed fortune files for ``language`` (``en``: fortunes, ``de``: fortunes-de)."""
    folder = FORTUNE_DIRS.get(language)
    if folder is None:
        raise CondituneError(f"no built-in text for language '{language}': pass --text {language}=PATH")
    files = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if (
                path.is_file()
                and not path.is_symlink()
                and path.suffix not in (".dat", ".u8")
                and path.name not in SKIP_FORTUNE_FILES
            ):
                files.append(path)
    if not files:
        raise CondituneError(
            f"no {language} text: apt-get install {FORTUNE_PACKAGES[language]} (fortunes in {folder}), "
            f"or pass --text {language}=PATH"
        )
    return files


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


class EngineError(Exception):
    pass


class _Engine:
    name = ""

    def synthesize(self, text: str, params: Mapping[str, Any], scratch: Path) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def version(self) -> str:
        return ""


def _run(cmd: list[str], text: str | None = None, timeout: float = 120) -> None:
    try:
        done = subprocess.run(
            cmd, input=None if text is None else text.encode("utf-8"), capture_output=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{cmd[0]}: {exc}") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.decode("utf-8", "replace").split())[:300]
        raise EngineError(f"{Path(cmd[0]).name} exited with status {done.returncode}: {message}")


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"engine wrote no readable audio: {exc}") from None
    return data, int(rate)


class EspeakCLI(_Engine):
    name = "espeak-ng"

    def __init__(self, exe: str):
        self.exe = exe

    def synthesize(self, text, params, scratch):
        out = scratch / "espeak.wav"
        _run(
            [
                self.exe,
                "-b",
                "1",
                "-v",
                params["voice"],
                "-s",
                str(params["speed"]),
                "-p",
                str(params["pitch"]),
                "-w",
                str(out),
                "--stdin",
            ],
            text,
        )
        return _read_wav(out)

    def version(self) -> str:
        try:
            done = subprocess.run([self.exe, "--version"], capture_output=True, timeout=30)
            return " ".join(done.stdout.decode("utf-8", "replace").split())
        except (OSError, subprocess.TimeoutExpired):
            return ""


class EspeakLibrary(_Engine):
    """libespeak-ng from the ``espeakng-loader`` wheel, through ctypes (one synthesis at a time)."""

    name = "espeak-ng"
    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self):
        import espeakng_loader

        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2: synchronous
        if rate <= 0:
            raise EngineError("libespeak-ng from espeakng-loader failed to initialise")
        self.rate = rate
        self._callback = self._CALLBACK(self._collect)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav, count, _events) -> int:
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synthesize(self, text, params, scratch):
        with self._lock:
            self._chunks = []
            if self.lib.espeak_SetVoiceByName(params["voice"].encode()) != 0:
                raise EngineError(f"espeak-ng has no voice '{params['voice']}'")
            self.lib.espeak_SetParameter(1, int(params["speed"]), 0)  # espeakRATE
            self.lib.espeak_SetParameter(3, int(params["pitch"]), 0)  # espeakPITCH
            data = text.encode("utf-8")
            status = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)  # 1: UTF-8
            self.lib.espeak_Synchronize()
            if status != 0 or not self._chunks:
                raise EngineError(f"libespeak-ng synthesis failed (status {status})")
            audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        return audio[:, None], self.rate

    def version(self) -> str:
        return "libespeak-ng (espeakng-loader)"


class Flite(_Engine):
    name = "flite"

    def __init__(self, exe: str):
        self.exe = exe

    def synthesize(self, text, params, scratch):
        out = scratch / "flite.wav"
        text_file = scratch / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        _run(
            [
                self.exe,
                "-voice",
                params["voice"],
                "--setf",
                f"duration_stretch={params['stretch']}",
                "--setf",
                f"int_f0_target_mean={params['f0']}",
                "-f",
                str(text_file),
                "-o",
                str(out),
            ]
        )
        return _read_wav(out)

    def version(self) -> str:
        try:
            done = subprocess.run([self.exe, "--version"], capture_output=True, timeout=30)
            return " ".join(done.stdout.decode("utf-8", "replace").split())[:100]
        except (OSError, subprocess.TimeoutExpired):
            return ""


class Festival(_Engine):
    name = "festival"

    def __init__(self, exe: str):
        self.exe = exe

    def synthesize(self, text, params, scratch):
        out = scratch / "festival.wav"
        _run(
            [
                self.exe,
                "-o",
                str(out),
                "-eval",
                f"(voice_{params['voice']})",
                "-eval",
                f"(Parameter.set 'Duration_Stretch {params['stretch']})",
            ],
            text,
        )
        return _read_wav(out)


def find_espeak() -> _Engine:
    exe = shutil.which("espeak-ng")
    if exe:
        return EspeakCLI(exe)
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        raise CondituneError(
            "espeak-ng is not installed: apt-get install espeak-ng, or pip install espeakng-loader"
        ) from None
    try:
        return EspeakLibrary()
    except (OSError, EngineError) as exc:
        raise CondituneError(f"espeakng-loader is installed but libespeak-ng does not load: {exc}") from None


def available_engines(requested: Sequence[str] | None = None) -> dict[str, _Engine]:
    """Engines to use: ``None`` means espeak-ng plus flite when installed; espeak-ng is always required."""
    engines: dict[str, _Engine] = {"espeak-ng": find_espeak()}
    wanted = ("espeak-ng", "flite") if requested is None else tuple(requested)
    for name in wanted:
        if name == "espeak-ng":
            continue
        if name == "flite":
            exe = shutil.which("flite")
            if exe:
                engines["flite"] = Flite(exe)
            elif requested is not None:
                raise CondituneError("flite is not installed: apt-get install flite")
        elif name == "festival":
            exe = shutil.which("text2wave")
            if exe:
                engines["festival"] = Festival(exe)
            else:
                raise CondituneError("festival is not installed: apt-get install festival festvox-kallpc16k")
        else:
            raise CondituneError(f"unknown speech engine '{name}' (use espeak-ng, flite, festival)")
    return engines


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return np.random.default_rng([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)])


def choose_voice(text: str, language: str, seed: int, engines: Sequence[str]) -> dict[str, Any]:
    """Engine, voice and prosody for one sentence: a pure function of its arguments."""
    rng = _rng("voice", seed, language, text)
    usable = [e for e in engines if e == "espeak-ng" or (e in ENGLISH_ONLY_ENGINES and language == "en")]
    weights = np.array([ENGINE_WEIGHTS.get(e, 0.1) for e in usable], dtype=np.float64)
    engine = usable[int(rng.choice(len(usable), p=weights / weights.sum()))]
    gain = round(float(rng.uniform(*PEAK_LEVEL)), 3)
    if engine == "espeak-ng":
        voices = ESPEAK_VOICES.get(language, (language,))
        voice = voices[int(rng.integers(len(voices)))]
        variant = ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        return {
            "engine": engine,
            "voice": f"{voice}+{variant}" if variant else voice,
            "speed": int(rng.integers(ESPEAK_SPEED[0], ESPEAK_SPEED[1] + 1)),
            "pitch": int(rng.integers(ESPEAK_PITCH[0], ESPEAK_PITCH[1] + 1)),
            "peak": gain,
        }
    if engine == "flite":
        names = sorted(FLITE_VOICES)
        voice = names[int(rng.integers(len(names)))]
        low, high = FLITE_VOICES[voice]
        return {
            "engine": engine,
            "voice": voice,
            "stretch": round(float(rng.uniform(*FLITE_STRETCH)), 3),
            "f0": int(rng.integers(low, high + 1)),
            "peak": gain,
        }
    voice = FESTIVAL_VOICES[int(rng.integers(len(FESTIVAL_VOICES)))]
    return {"engine": engine, "voice": voice, "stretch": round(float(rng.uniform(*FESTIVAL_STRETCH)), 3), "peak": gain}


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
) -> TextPlan:
    """Shuffle the pool with the seed and slice it: test, dev, held-out text, train.

    ``vocab_size``: train/dev/test come from the common-words-only part of the pool (in the same shuffled
    order), the held-out text from the rest of the whole pool."""
    pool = sorted(set(sentences))
    order = _rng("split", seed, language).permutation(len(pool))
    pool = [pool[i] for i in order]
    spoken = common_words_only(pool, vocab_size) if vocab_size else pool
    needed = sum(counts.get(s, 0) for s in SPLITS)
    if needed > len(spoken):
        limited = f" with only the {vocab_size} most frequent words" if vocab_size else ""
        raise CondituneError(
            f"{language}: {needed} sentences wanted for train/dev/test but only {len(spoken)} usable ones{limited} "
            f"in {source or 'the text sources'}: lower the counts, raise the vocabulary or add text with --text {language}=PATH"
        )
    splits: dict[str, list[str]] = {}
    at = 0
    for split in ("test", "dev"):
        splits[split] = spoken[at : at + counts.get(split, 0)]
        at += counts.get(split, 0)
    if vocab_size:  # held-out text: sentences with a rarer word, never spoken whatever the counts
        speakable = set(spoken)
        heldout = [s for s in pool if s not in speakable][:heldout_count]
        splits["train"] = spoken[at : at + counts.get("train", 0)]
    else:
        heldout_n = min(heldout_count, len(pool) - needed)
        heldout = pool[at : at + heldout_n]
        at += heldout_n
        splits["train"] = pool[at : at + counts.get("train", 0)]
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
    output: Path
    languages: tuple[str, ...] = ("en", "de")
    count_train: int = 200
    count_dev: int = 20
    count_test: int = 20
    heldout_count: int = 500
    seed: int = 0
    jobs: int = 1
    texts: dict[str, list[Path]] = field(default_factory=dict)  # language -> text files (else fortunes)
    engines: tuple[str, ...] | None = None  # None: espeak-ng + flite when installed
    min_words: int = 4
    max_words: int = 20
    max_chars: int = 160
    vocab_size: int | None = None  # limited-vocabulary set: only sentences of the N most frequent words
    sample_rate: int = SAMPLE_RATE


@dataclass
class SynthResult:
    output: Path
    manifests: dict[str, Path]
    heldout: dict[str, Path]
    counts: dict[str, dict[str, int]]  # language -> split -> utterances
    synthesized: int
    reused: int
    failed: list[tuple[str, str]]  # (id, reason)
    engines: list[str]


def _synthesize_item(item: SynthItem, engine: _Engine, sample_rate: int) -> float:
    """Write ``item.audio`` unless it exists; returns its duration in seconds."""
    from conditune.data.audio import save_wav, to_mono_resampled

    with tempfile.TemporaryDirectory(prefix=".synth-", dir=item.audio.parent) as scratch:
        data, rate = engine.synthesize(item.text, item.voice, Path(scratch))
    audio = to_mono_resampled(data, rate, sample_rate, item.id)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak < 1e-4:
        raise EngineError("engine produced silence")
    audio = audio * (float(item.voice.get("peak", 0.9)) / peak)
    save_wav(item.audio, audio, sample_rate)
    return audio.size / sample_rate


def _existing_duration(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return info.frames / info.samplerate if info.frames > 0 else None
    except Exception:  # noqa: BLE001
        return None


def synthesize_dataset(
    config: SynthConfig,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SynthResult:
    """Build (or finish building) the synthetic speech set described by ``config``."""
    from conditune.data.manifest import Utterance, write_manifest
    from conditune.io import atomic_write_json, atomic_write_text

    log = log or (lambda message: None)
    for name, value in (
        ("count_train", config.count_train),
        ("count_dev", config.count_dev),
        ("count_test", config.count_test),
        ("heldout_count", config.heldout_count),
    ):
        if value < 0:
            raise CondituneError(f"{name} must be >= 0, got {value}")
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
    engines = available_engines(config.engines)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    counts = {"train": config.count_train, "dev": config.count_dev, "test": config.count_test}

    plans: dict[str, TextPlan] = {}
    items: list[SynthItem] = []
    for lang in languages:
        files = [Path(p) for p in config.texts[lang]] if lang in config.texts else fortune_files(lang)
        sentences = extract_sentences(files, lang, config.min_words, config.max_words, config.max_chars)
        source = (
            ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
            if lang in config.texts
            else str(FORTUNE_DIRS[lang])
        )
        plan = plan_texts(sentences, lang, config.seed, counts, config.heldout_count, source, config.vocab_size)
        plans[lang] = plan
        log(
            f"{lang}: {plan.pool_size} usable sentences; "
            + ", ".join(f"{s} {len(plan.splits[s])}" for s in SPLITS)
            + f", held-out text {len(plan.heldout)}"
        )
        if len(plan.heldout) < config.heldout_count:
            log(f"{lang}: only {len(plan.heldout)} of {config.heldout_count} held-out sentences left over")
        for split in SPLITS:
            folder = output / "audio" / lang / split
            folder.mkdir(parents=True, exist_ok=True)
            for index, text in enumerate(plan.splits[split]):
                voice = choose_voice(text, lang, config.seed, list(engines))
                utt_id = f"{lang}-{split}-{index:05d}"
                audio = folder / f"{utt_id}-{_file_hash(text, voice, config.sample_rate)}.wav"
                items.append(SynthItem(utt_id, lang, split, text, voice, audio))

    durations: dict[str, float] = {}
    failed: list[tuple[str, str]] = []
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

    def work(item: SynthItem) -> float:
        return _synthesize_item(item, engines[item.voice["engine"]], config.sample_rate)

    progress_bar = None
    task = None
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
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(config.jobs))) as pool:
            futures = {pool.submit(work, item): item for item in todo}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    durations[item.id] = future.result()
                except (EngineError, CondituneError) as exc:
                    failed.append((item.id, str(exc)))
                if progress_bar is not None:
                    progress_bar.advance(task)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    if todo and len(failed) == len(todo):
        raise CondituneError(f"speech synthesis failed for all {len(todo)} utterances: {failed[0][1]}")
    for utt_id, reason in failed[:5]:
        log(f"skipped {utt_id}: {reason}")

    manifests: dict[str, Path] = {}
    result_counts: dict[str, dict[str, int]] = {lang: {} for lang in languages}
    for split in SPLITS:
        chosen = [item for item in items if item.split == split and item.id in durations]
        utterances = [Utterance(item.id, item.audio, item.text, item.language) for item in chosen]
        extras = {item.id: {"duration": round(durations[item.id], 3), "tts": item.voice} for item in chosen}
        manifests[split] = write_manifest(output / f"{split}.jsonl", utterances, extras=extras)
        for lang in languages:
            result_counts[lang][split] = sum(1 for item in chosen if item.language == lang)
    heldout: dict[str, Path] = {}
    for lang, plan in plans.items():
        heldout[lang] = output / f"heldout_text.{lang}.txt"
        atomic_write_text(heldout[lang], "".join(line + "\n" for line in plan.heldout))
    summary = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in ("texts", "output")
        },
        "texts": {
            lang: [str(p) for p in config.texts[lang]] if lang in config.texts else [str(FORTUNE_DIRS.get(lang))]
            for lang in languages
        },
        "engines": {name: engine.version() for name, engine in engines.items()},
        "pool_sizes": {lang: plan.pool_size for lang, plan in plans.items()},
        "counts": result_counts,
        "heldout_counts": {lang: len(plan.heldout) for lang, plan in plans.items()},
        "failed": [list(f) for f in failed],
    }
    atomic_write_json(output / "synth_config.json", summary)
    return SynthResult(
        output=output,
        manifests=manifests,
        heldout=heldout,
        counts=result_counts,
        synthesized=len(todo) - len(failed),
        reused=reused,
        failed=failed,
        engines=list(engines),
    )
