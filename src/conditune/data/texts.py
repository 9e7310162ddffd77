"""Sentences for speech synthesis: split, clean, normalise, filter, deduplicate.

A text (fortune records, paragraphs, Wikipedia extracts) is cut into sentences (not after "Mr.",
"z. B." or initials), cleaned (quote marks removed, whitespace collapsed), normalised with
:func:`normalize_transcript` (numbers, abbreviations and symbols spelled out as they are spoken)
and kept if it is good TTS input with an unambiguous transcript (:func:`accept_sentence`).
Sentences are deduplicated on their lower-cased letters.

:func:`normalize_transcript` is the one normaliser for both sides: it is applied to every sentence
before it is spoken, so the manifest's transcript holds exactly the words the voice says, and the
evaluation applies it to references, so "Dr. Who won 3 prizes in 1984" is scored as "Doctor Who
won three prizes in nineteen eighty-four" wherever it comes from.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from conditune.data.normalize import normalize_transcript

__all__ = [
    "accept_sentence",
    "clean_sentence",
    "dedupe_key",
    "extract_sentences",
    "normalize_transcript",
    "read_text_file",
    "remove_bracketed",
    "sentences_from_records",
    "split_records",
    "split_sentences",
]

_LETTERS = {
    "en": "A-Za-z",
    "de": "A-Za-zÄÖÜäöüß",
}
_PUNCT = " ,.;:!?'-"
# Where a full stop does not end a sentence.
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
    "approx",
}

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
        "\u202f": " ",
        "\u2026": "...",
    }
)
_QUOTE_MARKS = re.compile(r"(^|\s)'+|'+(?=\s|$|[,.;:!?])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_NOT_LETTER = re.compile(r"[\W\d_]+")
_BRACKETED = re.compile(r"\s*(\([^()]*\)|\[[^\[\]]*\])")


def read_text_file(path: Path) -> str:
    raw = Path(path).read_bytes()
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
        if text[match.start()] == "." and len(before) >= 2 and f"{before[-2]}{last}".lower() in _ABBREVIATIONS:
            continue  # "z. B.", "d. h.": the second half of a spaced abbreviation
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def remove_bracketed(text: str) -> str:
    """Drop ``(...)`` and ``[...]`` spans (Wikipedia's dates, pronunciations and notes)."""
    previous = None
    while previous != text:
        previous, text = text, _BRACKETED.sub("", text)
    return text


def clean_sentence(sentence: str) -> str:
    text = unicodedata.normalize("NFC", sentence).translate(_TYPOGRAPHY)
    text = _QUOTE_MARKS.sub(r"\1", text)  # quote marks, not apostrophes
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return " ".join(text.split())


def accept_sentence(text: str, language: str, min_words: int, max_words: int, max_chars: int) -> bool:
    """Whether a cleaned, normalised sentence is good TTS input with an unambiguous transcript."""
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


def sentences_from_records(
    records: Iterable[str],
    language: str,
    *,
    min_words: int = 4,
    max_words: int = 20,
    max_chars: int = 160,
) -> list[str]:
    """Accepted, normalised, deduplicated sentences of ``records``, sorted (independent of their order)."""
    by_key: dict[str, str] = {}
    for record in records:
        for raw in split_sentences(record):
            if not min_words - 2 <= len(raw.split()) <= 2 * max_words:
                continue  # cheap pre-filter; the exact count is checked after normalising
            sentence = normalize_transcript(clean_sentence(raw), language)
            if accept_sentence(sentence, language, min_words, max_words, max_chars):
                key = dedupe_key(sentence)
                if key not in by_key or sentence < by_key[key]:
                    by_key[key] = sentence
    return sorted(by_key.values())


_EXTRACT_CACHE: dict[tuple, list[str]] = {}


def extract_sentences(
    paths: Iterable[Path], language: str, min_words: int = 4, max_words: int = 20, max_chars: int = 160
) -> list[str]:
    """Accepted sentences from text files (``%``-separated records or paragraphs), cached per process."""
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
        records = (record for path in paths for record in split_records(read_text_file(path)))
        _EXTRACT_CACHE[key] = sentences_from_records(
            records, language, min_words=min_words, max_words=max_words, max_chars=max_chars
        )
    return list(_EXTRACT_CACHE[key])
