"""Word error rate and Whisper text normalisation."""

from __future__ import annotations

import json
import math

import pytest

from conditune.evaluation import wer as wer_module
from conditune.evaluation.wer import normalise, word_error_rate


def test_one_substitution_in_four_words():
    result = word_error_rate(["the cat sat down"], ["the cat sit down"])
    assert result["all"] == pytest.approx(25.0)
    assert result["en"] == pytest.approx(25.0)
    counts = result["counts"]["all"]
    assert (counts["substitutions"], counts["deletions"], counts["insertions"], counts["hits"]) == (1, 0, 0, 3)
    assert counts["reference_words"] == 4 and counts["utterances"] == 1


def test_corpus_wer_sums_errors():
    # 1 deletion out of 2 words + 1 insertion against 3 words: (1 + 1) / 5, not the mean of 50% and 33%
    result = word_error_rate(["good morning", "open the door"], ["good", "open the door now"])
    assert result["all"] == pytest.approx(40.0)
    c = result["counts"]["all"]
    assert (c["deletions"], c["insertions"]) == (1, 1)
    assert word_error_rate(["a b"], ["a b"])["all"] == 0.0
    assert word_error_rate(["a b"], [""])["all"] == pytest.approx(100.0)


def test_normaliser_case_punctuation_titles():
    assert normalise("Hello, World!", "en") == "hello world"
    assert normalise("Mr. Smith", "en") == normalise("mister smith", "en") == "mister smith"
    assert normalise("I can't  go", "en") == "i can not go"
    assert normalise("um, twenty five apples", "en") == "25 apples"
    assert word_error_rate(["Mr. Smith went home."], ["mister smith went home"])["all"] == 0.0
    assert word_error_rate(["Hello, World!"], ["hello world"], languages=["de"])["all"] == 0.0


def test_german_basic_normaliser_keeps_umlauts():
    assert normalise("Grüße aus München, Herr Müller!", "de") == "grüße aus münchen herr müller"
    assert normalise("Straße (leise)", "de") == "straße"
    # a missing umlaut is an error in German
    assert word_error_rate(["Grüße aus München"], ["Grüsse aus München"], "de")["all"] == pytest.approx(100 / 3)


def test_language_detection():
    assert normalise("Mr. X", "en-US") == normalise("Mr. X", "en_gb") == "mister x"
    assert normalise("Mr. X", "de") == "mr x"


def test_per_language_split():
    refs = ["the cat sat down", "open it", "eins zwei drei"]
    hyps = ["the cat sit down", "open it", "eins zwei"]
    result = word_error_rate(refs, hyps, ["en", "en", "de"])
    assert result["en"] == pytest.approx(100 * 1 / 6)
    assert result["de"] == pytest.approx(100 * 1 / 3)
    assert result["all"] == pytest.approx(100 * 2 / 9)
    assert result["counts"]["de"]["deletions"] == 1
    assert result["counts"]["en"]["utterances"] == 2
    json.dumps(result)  # plain numbers only


def test_empty_references_are_left_out_and_counted():
    result = word_error_rate(["(laughs)", "hello there"], ["something", "hello there"], ["en", "en"])
    assert result["all"] == 0.0
    assert result["counts"]["en"]["empty_references"] == 1
    only_empty = word_error_rate(["uh"], ["hello"])
    assert math.isnan(only_empty["all"]) and math.isnan(only_empty["en"])


def test_mismatched_lengths():
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["a"], ["en", "de"])


def test_spelling_mapping_from_env(tmp_path, monkeypatch):
    table = tmp_path / "english.json"
    table.write_text(json.dumps({"colour": "color"}), encoding="utf-8")
    monkeypatch.setenv(wer_module.SPELLING_ENV, str(table))
    wer_module.english_spelling_mapping.cache_clear()
    wer_module._normaliser.cache_clear()
    try:
        assert normalise("The colour red", "en") == "the color red"
    finally:
        monkeypatch.delenv(wer_module.SPELLING_ENV)
        wer_module.english_spelling_mapping.cache_clear()
        wer_module._normaliser.cache_clear()
