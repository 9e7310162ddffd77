"""Transcripts in spoken form: numbers, abbreviations and symbols spelled out (English, German).

``normalize_transcript("Dr. Smith paid $3.50 for 2 books in 1984.", "en")`` gives
``"Doctor Smith paid three dollars and fifty cents for two books in nineteen eighty-four."``;
``normalize_transcript("Das kostet z. B. 2,80 € und 19 % mehr.", "de")`` gives
``"Das kostet zum Beispiel zwei Euro achtzig und neunzehn Prozent mehr."``.

It is applied to every sentence before it is synthesised (so the voice and the transcript say the
same words) and to references before scoring. Numbers are spelled out with ``num2words``: cardinals,
decimals ("three point one four", "drei Komma eins vier"), English ordinals ("21st"), years
(four digits from 1100 to 2099 in English, 1100 to 1999 in German: "nineteen eighty-four",
"neunzehnhundertvierundachtzig"), amounts of money ($, €, £), percentages and a few units after a
number (km, kg, cm, mm). What cannot be spelled out without knowing the grammar is left as it is:
German ordinals ("am 3. Mai": dritten, dritte, ...) and a German "1" before a word (ein, eine,
einen, ...). German words in the pre-1996 spelling with "ß" after a short vowel ("daß", "muß")
take today's ("dass", "muss"). The sentence filter (:func:`conditune.data.texts.accept_sentence`) then drops a
sentence that still has digits. Other languages are returned unchanged apart from whitespace. The
function is idempotent: its output normalises to itself.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Expansions that keep their meaning wherever they stand. Keys with a capital are matched as
# written; lower-case keys also at the start of a sentence ("Z. B." -> "Zum Beispiel").
ABBREVIATIONS: dict[str, dict[str, str]] = {
    "en": {
        "Mr.": "Mister",
        "Mrs.": "Missus",
        "Dr.": "Doctor",
        "Prof.": "Professor",
        "St.": "Saint",
        "Jr.": "Junior",
        "Sr.": "Senior",
        "Mt.": "Mount",
        "Gen.": "General",
        "Col.": "Colonel",
        "Lt.": "Lieutenant",
        "Capt.": "Captain",
        "Sgt.": "Sergeant",
        "Rev.": "Reverend",
        "vs.": "versus",
        "etc.": "et cetera",
        "e. g.": "for example",
        "i. e.": "that is",
        "approx.": "approximately",
    },
    "de": {
        "z. B.": "zum Beispiel",
        "d. h.": "das heißt",
        "u. a.": "unter anderem",
        "o. Ä.": "oder Ähnliches",
        "z. T.": "zum Teil",
        "usw.": "und so weiter",
        "bzw.": "beziehungsweise",
        "ca.": "circa",
        "Nr.": "Nummer",
        "Dr.": "Doktor",
        "Prof.": "Professor",
        "Hr.": "Herr",
        "Fr.": "Frau",
        "vgl.": "vergleiche",
        "evtl.": "eventuell",
        "ggf.": "gegebenenfalls",
        "inkl.": "inklusive",
        "bspw.": "beispielsweise",
        "etc.": "et cetera",
        "St.": "Sankt",
        "Str.": "Straße",
        "Jh.": "Jahrhundert",
        "Mio.": "Millionen",
        "Mrd.": "Milliarden",
    },
}
# Pre-1996 German spellings (frequent in fortunes-de) in today's form: "daß" is "dass" to a listener,
# and a transcript must not teach two spellings of one word. Only words whose ß follows a short vowel.
_OLD_SPELLING = {
    "daß": "dass",
    "muß": "muss",
    "mußt": "musst",
    "mußte": "musste",
    "mußten": "mussten",
    "müßte": "müsste",
    "müßten": "müssten",
    "läßt": "lässt",
    "laß": "lass",
    "laßt": "lasst",
    "ißt": "isst",
    "vergißt": "vergisst",
    "wißt": "wisst",
    "gewiß": "gewiss",
    "bißchen": "bisschen",
    "Schluß": "Schluss",
    "Haß": "Hass",
    "Fluß": "Fluss",
    "Kuß": "Kuss",
    "Schloß": "Schloss",
    "Genuß": "Genuss",
    "Prozeß": "Prozess",
    "naß": "nass",
    "Paß": "Pass",
    "Faß": "Fass",
    "Biß": "Biss",
    "Riß": "Riss",
    "Nuß": "Nuss",
}
_OLD_SPELLING_PATTERN = re.compile(
    r"(?<!\w)(" + "|".join(sorted(map(re.escape, _OLD_SPELLING), key=len, reverse=True)) + r")(?!\w)", re.IGNORECASE
)
_AND = {"en": "and", "de": "und"}
_PERCENT = {"en": "percent", "de": "Prozent"}
_POINT = {"en": "point", "de": "Komma"}
# symbol -> (singular, plural)
_CURRENCY = {
    "en": {"$": ("dollar", "dollars"), "€": ("euro", "euros"), "£": ("pound", "pounds")},
    "de": {"$": ("Dollar", "Dollar"), "€": ("Euro", "Euro"), "£": ("Pfund", "Pfund")},
}
_CENTS = {"en": ("cent", "cents"), "de": ("", "")}  # German says "zwei Euro achtzig"
_UNITS = {
    "en": {
        "km": ("kilometre", "kilometres"),
        "kg": ("kilogram", "kilograms"),
        "cm": ("centimetre", "centimetres"),
        "mm": ("millimetre", "millimetres"),
    },
    "de": {
        "km": ("Kilometer", "Kilometer"),
        "kg": ("Kilogramm", "Kilogramm"),
        "cm": ("Zentimeter", "Zentimeter"),
        "mm": ("Millimeter", "Millimeter"),
    },
}
_YEARS = {"en": (1100, 2099), "de": (1100, 1999)}
_INTEGER = {"en": r"\d{1,3}(?:,\d{3})+|\d+", "de": r"\d{1,3}(?:\.\d{3})+|\d+"}
_DECIMAL = {"en": r"\.", "de": ","}


def _base_language(language: str) -> str:
    return (language or "en").replace("_", "-").split("-")[0].lower()


@lru_cache(maxsize=8)
def _abbreviation_pattern(language: str) -> re.Pattern | None:
    table = ABBREVIATIONS.get(language)
    if not table:
        return None
    alternatives = []
    for key in sorted(table, key=len, reverse=True):
        body = r"\.\s?".join(re.escape(part) for part in key.rstrip(".").split(". ")) + r"\."
        if key[0].islower():
            body = f"(?:{re.escape(key[0])}|{re.escape(key[0].upper())})" + body[len(re.escape(key[0])) :]
        alternatives.append(body)
    return re.compile(r"(?<![\w.])(" + "|".join(alternatives) + r")(?!\w)")


def _expand_abbreviations(text: str, language: str) -> str:
    pattern = _abbreviation_pattern(language)
    if pattern is None:
        return text
    table = ABBREVIATIONS[language]
    lookup = {re.sub(r"[\s.]", "", key).lower(): value for key, value in table.items()}

    def replace(match: re.Match) -> str:
        found = match.group(1)
        expansion = lookup[re.sub(r"[\s.]", "", found).lower()]
        if found[0].isupper() and expansion[0].islower():
            expansion = expansion[0].upper() + expansion[1:]
        return expansion + ("." if match.end() == len(text) else "")  # its full stop also ended the sentence

    return pattern.sub(replace, text)


@lru_cache(maxsize=8)
def _number_pattern(language: str) -> re.Pattern:
    units = "|".join(_UNITS[language])
    return re.compile(
        r"(?<![\w.,])(?P<pre>[$€£]\s?)?"
        rf"(?P<int>{_INTEGER[language]})(?:{_DECIMAL[language]}(?P<frac>\d+))?"
        r"(?P<ord>st|nd|rd|th)?"
        rf"(?P<post>\s?(?:%|€|£|\$|(?:{units})(?![\w/])))?"
        r"(?![\w])"
    )


def _cardinal(value: int, language: str) -> str:
    from num2words import num2words

    return num2words(value, lang=language).replace(",", "")


def _spell_number(match: re.Match, text: str, language: str) -> str:
    from num2words import num2words

    whole = match.group(0)
    digits = re.sub(r"[,.]", "", match.group("int"))
    value = int(digits)
    frac, ordinal = match.group("frac"), match.group("ord")
    symbol = (match.group("pre") or match.group("post") or "").strip()
    rest = text[match.end() :]
    if (
        language == "de"
        and not symbol
        and not frac
        and (re.match(r"\.\s+\w", rest) or (value == 1 and re.match(r"\s+\w", rest)))
    ):
        return whole  # an ordinal or "ein/eine/einen": the form depends on the grammar
    if ordinal:
        if language != "en":
            return whole
        return num2words(value, lang="en", to="ordinal")
    low, high = _YEARS[language]
    if not symbol and not frac and len(digits) == 4 and digits == match.group("int") and low <= value <= high:
        return num2words(value, lang=language, to="year").replace(",", "")
    if language == "de" and value == 1 and symbol:
        words = "ein"
    else:
        words = _cardinal(value, language)
    if symbol in _CURRENCY[language]:
        singular, plural = _CURRENCY[language][symbol]
        spoken = f"{words} {singular if value == 1 else plural}"
        if frac:
            cents = int(frac.ljust(2, "0")[:2])
            if cents:
                one, many = _CENTS[language]
                tail = f"{_cardinal(cents, language)} {one if cents == 1 else many}".strip()
                spoken += f" {_AND[language]} {tail}" if language == "en" else f" {tail}"
        return spoken
    if frac:
        words += f" {_POINT[language]} " + " ".join(_cardinal(int(d), language) for d in frac)
    if symbol == "%":
        return f"{words} {_PERCENT[language]}"
    if symbol in _UNITS[language]:
        singular, plural = _UNITS[language][symbol]
        return f"{words} {singular if value == 1 and not frac else plural}"
    return words


def _spell_numbers(text: str, language: str) -> str:
    text = re.sub(r"(?<!\d)(\d{4})\s?[\u2013-]\s?(\d{4})(?!\d)", rf"\1 {'to' if language == 'en' else 'bis'} \2", text)
    pattern = _number_pattern(language)
    out, at = [], 0
    for match in pattern.finditer(text):
        out.append(text[at : match.start()])
        out.append(_spell_number(match, text, language))
        at = match.end()
    out.append(text[at:])
    return "".join(out)


def _modern_spelling(match: re.Match) -> str:
    found = match.group(1)
    modern = _OLD_SPELLING.get(found) or _OLD_SPELLING.get(found.lower()) or _OLD_SPELLING.get(found.capitalize())
    if modern is None:
        return found
    return modern[0].upper() + modern[1:] if found[0].isupper() else modern[0].lower() + modern[1:]


def normalize_transcript(text: str, language: str) -> str:
    """``text`` as it is spoken: numbers, abbreviations and symbols written out (English, German).

    Whitespace is collapsed for every language; other languages are otherwise unchanged."""
    text = " ".join(str(text).split())
    language = _base_language(language)
    if language not in ABBREVIATIONS or not text:
        return text
    starts_lower = text[0].islower()
    text = _expand_abbreviations(text, language)
    text = re.sub(r"\s&\s", f" {_AND[language]} ", text)
    if language == "de" and "ß" in text:
        text = _OLD_SPELLING_PATTERN.sub(_modern_spelling, text)
    if re.search(r"\d", text):
        text = _spell_numbers(text, language)
    if not starts_lower and text[:1].islower():
        text = text[0].upper() + text[1:]  # "5 dogs ran." -> "Five dogs ran."
    return " ".join(text.split())
