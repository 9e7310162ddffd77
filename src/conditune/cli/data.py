"""``conditune data``: build a synthetic speech set, check manifests."""

from __future__ import annotations

from pathlib import Path

import typer

from conditune.cli.base import EXIT_CHECK_FAILED, CommandGroup
from conditune.errors import CondituneError


def _parse_texts(values: list[str] | None) -> dict[str, list[Path]]:
    texts: dict[str, list[Path]] = {}
    for value in values or []:
        lang, sep, path = value.partition("=")
        if not sep or not lang.strip() or not path.strip():
            raise CondituneError(f"--text expects LANG=PATH, got '{value}'")
        texts.setdefault(lang.strip(), []).append(Path(path.strip()).expanduser())
    return texts


def _parse_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or []:
        lang, sep, rest = value.partition("=")
        if not sep or not lang.strip() or not rest.strip():
            raise CondituneError(f"{option} expects LANG=VALUE, got '{value}'")
        pairs[lang.strip()] = rest.strip()
    return pairs


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _report_synth(result) -> None:
    typer.echo(
        f"engines: {', '.join(result.engines)}; synthesised {result.synthesized}, reused {result.reused}, "
        f"failed {len(result.failed)}",
        err=True,
    )
    for split, path in result.manifests.items():
        n = sum(counts.get(split, 0) for counts in result.counts.values())
        typer.echo(f"{split}\t{n}\t{path}")
    for lang, path in result.heldout.items():
        typer.echo(f"heldout.{lang}\t{len(path.read_text(encoding='utf-8').splitlines())}\t{path}")


OTHER_SECTIONS = ("model", "data", "optimizer", "training", "evaluation", "output", "demo", "experiment")


def _synth_config(arguments: list[str], options: dict):
    """[CONFIG.yaml] [synth.key=value ...] and the command's options (which win) into one checked SynthConfig:
    the ``synth:`` section of a recipe file (the demo's, or one of your own), the other sections left out."""
    from conditune.cli.demo import split_arguments
    from conditune.config import load_config, parse_overrides
    from conditune.data.synth import SynthRecipe
    from conditune.io import check_writable

    config, overrides = split_arguments(arguments)
    given = {f"synth.{k}": v for k, v in options.items()}
    cfg = load_config(SynthRecipe, config, {**parse_overrides(overrides), **given}, ignore_sections=OTHER_SECTIONS)
    check_writable(cfg.synth.output, folder=True)
    return cfg.synth


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Speech data: synthetic sets and manifests.", cls=CommandGroup, no_args_is_help=True)

    @group.command("synth")
    def synth_cmd(
        arguments: list[str] = typer.Argument(
            None,
            metavar="[CONFIG.yaml] [synth.key=value ...]",
            help="A recipe with a synth: section (e.g. configs/speech_demo.yaml) and overrides.",
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", help="Folder for WAVs, manifests and held-out text [synth.output]."
        ),
        languages: str = typer.Option(None, help="Comma-separated language codes [synth.languages] (default en,de)."),
        count_train: int = typer.Option(None, help="Training utterances per language [synth.count_train] (200)."),
        count_dev: int = typer.Option(None, help="Dev utterances per language [synth.count_dev] (20)."),
        count_test: int = typer.Option(None, help="Test utterances per language [synth.count_test] (100)."),
        heldout_count: int = typer.Option(None, help="Held-out text sentences per language, never spoken (500)."),
        seed: int = typer.Option(None, help="Seed for the text split and the voices [synth.seed] (0)."),
        jobs: int = typer.Option(None, help="Utterances synthesised in parallel [synth.jobs] (1)."),
        text: list[str] = typer.Option(
            None, "--text", help="LANG=PATH text file instead of the text sources (repeatable)."
        ),
        source: list[str] = typer.Option(
            None,
            "--source",
            help="LANG=NAME[,NAME] text sources for a language (repeatable): wikipedia-en, fortunes, "
            "auf-deutsch, fortunes-de, trans-de-en. Default: en=wikipedia-en,fortunes de=auf-deutsch,fortunes-de,trans-de-en.",
        ),
        engines: str = typer.Option(
            None, help="auto (every installed engine) or a list: espeak-ng,mbrola,pico,festival,flite."
        ),
        heldout_voice: list[str] = typer.Option(
            None,
            "--heldout-voice",
            help="LANG=VOICE held out of train/dev/test and speaking test_heldout_voice.jsonl "
            "(repeatable; VOICE like mbrola:mb-us2, or none). Default: en=mbrola:mb-us2 de=mbrola:mb-de7.",
        ),
        count_heldout_voice: int = typer.Option(
            None, help="Held-out-voice utterances per language (default: all of test)."
        ),
        min_words: int = typer.Option(None, help="Shortest sentence in words (4)."),
        max_words: int = typer.Option(None, help="Longest sentence in words (20)."),
        vocab_size: int = typer.Option(None, help="Speak only sentences made of the N most frequent words."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Synthesise train/dev/test (and a held-out-voice test) speech from open-vocabulary text; resumable."""
        from conditune.data.synth import DEFAULT_HELDOUT_VOICES, synthesize_dataset

        options = {
            "output": str(output), "count_train": count_train, "count_dev": count_dev, "count_test": count_test,
            "heldout_count": heldout_count, "seed": seed, "jobs": jobs, "count_heldout_voice": count_heldout_voice,
            "min_words": min_words, "max_words": max_words, "vocab_size": vocab_size,
            "languages": list(_split(languages)) if languages is not None else None,
            "texts": {k: [str(p) for p in v] for k, v in _parse_texts(text).items()} or None,
            "sources": {lang: list(_split(names)) for lang, names in _parse_pairs(source, "--source").items()} or None,
            "heldout_voices": {**DEFAULT_HELDOUT_VOICES, **_parse_pairs(heldout_voice, "--heldout-voice")} if heldout_voice else None,
        }  # fmt: skip
        options = {k: v for k, v in options.items() if v is not None}  # what the user gave
        if engines is not None:  # "auto" is an explicit None: every installed engine
            options["engines"] = None if engines.strip() in ("", "auto") else list(_split(engines))
        config = _synth_config(arguments or [], options)
        _report_synth(synthesize_dataset(config, progress=progress, log=lambda msg: typer.echo(msg, err=True)))

    @group.command("check")
    def check_cmd(
        manifests: list[Path] = typer.Argument(..., help="JSONL manifests to validate."),
        strict: bool = typer.Option(False, help="Stop at the first manifest with a bad line."),
        decode: bool = typer.Option(False, help="Also decode every audio file."),
    ) -> None:
        """Validate manifests: count utterances per language, list bad lines; exit 2 if any line is bad."""
        bad = checked = 0
        for path in manifests:
            found = _check_manifest(path, decode=decode)
            bad, checked = bad + found, checked + 1
            if found and strict:
                break
        if bad:
            typer.echo(f"failed: {bad} problem(s) in {checked} manifest(s) checked (listed on stdout)", err=True)
            raise typer.Exit(EXIT_CHECK_FAILED)

    app.add_typer(group, name="data")


def _check_manifest(path: Path, *, decode: bool) -> int:
    """Print one manifest's summary and its problems on stdout; return how many problems."""
    from collections import Counter

    from conditune.data.audio import AudioError, load_audio
    from conditune.data.manifest import read_manifest

    data = read_manifest(path, warn=False)
    languages = Counter(u.language for u in data.utterances)
    typer.echo(f"{path}\t{data.summary()}\t" + " ".join(f"{k}={v}" for k, v in sorted(languages.items())))
    for line_no, reason in data.skipped:
        typer.echo(f"  {path}:{line_no}: {reason}")
    bad = len(data.skipped)
    if not data.utterances and not data.skipped:
        typer.echo(f"  {path}: no utterances (an empty manifest)")
        bad += 1
    if decode:
        for utt in data.utterances:
            try:
                load_audio(utt.audio)
            except AudioError as exc:
                typer.echo(f"  {path}: {utt.id}: {exc}")
                bad += 1
    return bad
