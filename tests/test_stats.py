"""Bootstrap intervals: known answers on synthetic numbers, pairing, determinism, and the WER per utterance."""

from __future__ import annotations

import numpy as np
import pytest

from conditune.evaluation.stats import bootstrap_ratio, paired_bootstrap


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 2.0, size=400)
    iv = bootstrap_ratio(x, resamples=4000, seed=0)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the textbook interval of a mean
    assert iv.value == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - half, abs=0.05) and iv.high == pytest.approx(x.mean() + half, abs=0.05)
    assert bootstrap_ratio(x, seed=0) == bootstrap_ratio(x, seed=0)  # seeded: reproducible


def test_ratio_is_resampled_as_a_ratio():
    errors, words = [1, 0, 9], [10, 10, 10]  # corpus WER 10/30, not the mean of per-utterance rates
    iv = bootstrap_ratio(errors, words, scale=100.0)
    assert iv.value == pytest.approx(100 * 10 / 30)
    assert 0 <= iv.low < iv.value < iv.high <= 90


def test_paired_bootstrap_known_differences():
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 5.0, size=(3, 300))  # large shared variation between items and seeds
    shifted = base + 0.5  # the same items, every one 0.5 higher
    iv = paired_bootstrap(shifted, base)
    assert iv.value == pytest.approx(0.5) and iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)
    assert iv.verdict() == "higher"
    noisy = base + rng.normal(0.0, 0.05, size=base.shape)  # no real difference
    iv = paired_bootstrap(noisy, base)
    assert iv.contains_zero and iv.verdict() == "within noise"
    unpaired = paired_bootstrap(rng.normal(0.5, 5.0, size=(3, 300)), base)  # independent items: wide
    assert unpaired.high - unpaired.low > 10 * (iv.high - iv.low)


def test_paired_bootstrap_of_ratios_and_one_seed():
    a_err, b_err = np.array([[2, 2, 2, 2]]), np.array([[1, 1, 1, 1]])
    words = np.array([[10, 10, 10, 10]])
    iv = paired_bootstrap(a_err, b_err, words, words, scale=100.0)
    assert (iv.value, iv.low, iv.high) == pytest.approx((10.0, 10.0, 10.0))
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 2)))


def test_wer_intervals_sum_to_the_corpus_wer():
    from conditune.evaluation.wer import utterance_errors, wer_intervals, word_error_rate

    refs = ["the cat sat", "a dog ran far", "Guten Morgen"]
    hyps = ["the cat", "a dog ran far away", "guten abend"]
    langs = ["en", "en", "de"]
    rows = utterance_errors(refs, hyps, langs)
    assert rows == [(1, 3), (1, 4), (1, 2)]
    wer = word_error_rate(refs, hyps, langs)
    iv = wer_intervals(refs, hyps, langs)
    assert iv["all"]["value"] == pytest.approx(wer["all"]) and iv["en"]["value"] == pytest.approx(wer["en"])
    assert iv["all"]["low"] <= wer["all"] <= iv["all"]["high"]
