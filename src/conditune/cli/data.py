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


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Speech data: synthetic sets and manifests.", cls=CommandGroup, no_args_is_help=True)

    @group.command("synth")
    def synth_cmd(
        output: Path = typer.Option(..., "--output", "-o", help="Folder for WAVs, manifests and held-out text."),
        languages: str = typer.Option("en,de", help="Comma-separated language codes."),
        count_train: int = typer.Option(200, help="Training utterances per language."),
        count_dev: int = typer.Option(20, help="Dev utterances per language."),
        count_test: int = typer.Option(20, help="Test utterances per language."),
        heldout_count: int = typer.Option(500, help="Held-out text sentences per language (never spoken)."),
        seed: int = typer.Option(0, help="Seed for the text split and the voices."),
        jobs: int = typer.Option(1, help="Utterances synthesised in parallel."),
        text: list[str] = typer.Option(None, "--text", help="LANG=PATH text file instead of fortunes (repeatable)."),
        engines: str = typer.Option(
            "auto", help="auto (espeak-ng + flite if installed) or a list: espeak-ng,flite,festival."
        ),
        min_words: int = typer.Option(4, help="Shortest sentence in words."),
        max_words: int = typer.Option(20, help="Longest sentence in words."),
        vocab_size: int = typer.Option(
            None,
            help="Speak only sentences made of the N most frequent words "
            "(a limited-vocabulary set a small CPU budget can learn).",
        ),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Synthesise train/dev/test speech from fortunes (or --text) with espeak-ng/flite; resumable."""
        from conditune.io import check_writable
        from conditune.validation import require_int

        for key, value in (
            ("--count-train", count_train),
            ("--count-dev", count_dev),
            ("--count-test", count_test),
            ("--heldout-count", heldout_count),
            ("--seed", seed),
        ):
            require_int(value, key, minimum=0)
        require_int(jobs, "--jobs", minimum=1)
        require_int(min_words, "--min-words", minimum=1)
        require_int(max_words, "--max-words", minimum=min_words)
        if vocab_size is not None:
            require_int(vocab_size, "--vocab-size", minimum=1)
        if not any(lang.strip() for lang in languages.split(",")):
            raise CondituneError(f"--languages {languages!r}: give at least one language code, like en,de")
        check_writable(output, folder=True)
        from conditune.data.synth import SynthConfig, synthesize_dataset

        engine_list = (
            None if engines.strip() in ("", "auto") else tuple(e.strip() for e in engines.split(",") if e.strip())
        )
        config = SynthConfig(
            output=output,
            languages=tuple(lang.strip() for lang in languages.split(",") if lang.strip()),
            count_train=count_train,
            count_dev=count_dev,
            count_test=count_test,
            heldout_count=heldout_count,
            seed=seed,
            jobs=jobs,
            texts=_parse_texts(text),
            engines=engine_list,
            min_words=min_words,
            max_words=max_words,
            vocab_size=vocab_size,
        )
        result = synthesize_dataset(config, progress=progress, log=lambda msg: typer.echo(msg, err=True))
        typer.echo(
            f"engines: {', '.join(result.engines)}; synthesised {result.synthesized}, reused {result.reused}, "
            f"failed {len(result.failed)}",
            err=True,
        )
        for split, path in result.manifests.items():
            n = sum(counts[split] for counts in result.counts.values())
            typer.echo(f"{split}\t{n}\t{path}")
        for lang, path in result.heldout.items():
            typer.echo(f"heldout.{lang}\t{len(path.read_text(encoding='utf-8').splitlines())}\t{path}")

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
