"""``conditune transcribe CHECKPOINT AUDIO...``: transcribe audio with a trained speech LLM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    @app.command("transcribe")
    def transcribe_cmd(
        checkpoint: Path = typer.Argument(..., help="Trained model folder, checkpoint, or training output folder."),
        audio: list[Path] = typer.Argument(..., help="Audio files (any format soundfile reads)."),
        output: Path = typer.Option(None, "--output", "-o", help="Write JSONL {audio, text} here instead of stdout."),
        batch_size: int = typer.Option(8, help="Utterances per generation batch."),
        beams: int = typer.Option(1, help="Beam width (1: greedy)."),
        max_new_tokens: int = typer.Option(128, help="Longest transcript in tokens."),
        device: str = typer.Option(None, help="torch device (default: CPU)."),
        llm: str = typer.Option(None, help="Base LLM path, if it moved since training (folder, hub id or .gguf)."),
        encoder: str = typer.Option(None, help="Encoder folder, if it moved since training."),
    ) -> None:
        """Transcribe audio files with a trained speech LLM (files without speech are reported, not decoded)."""
        from conditune.cli.common import check_generation_options, load_for_inference, speech_check
        from conditune.evaluation.transcription import transcribe
        from conditune.io import atomic_write_text, check_writable

        check_generation_options(batch_size=batch_size, beams=beams, max_new_tokens=max_new_tokens, device=device)
        if output is not None:
            check_writable(output)  # before the model loads: nothing finished can be lost at the end
        activity = speech_check(audio)  # also decodes every file once: a bad one is one line, now
        model, processor = load_for_inference(checkpoint, device=device, llm=llm, encoder=encoder)
        voiced = [a for a in audio if activity[a].has_speech]
        texts = dict(zip(voiced, transcribe(model, processor, [str(a) for a in voiced], batch_size=batch_size,
                                            num_beams=beams, max_new_tokens=max_new_tokens)))  # fmt: skip
        rows = [{"audio": str(a), "text": texts.get(a, ""), "speech": activity[a].describe()} for a in audio]
        silent = len(audio) - len(voiced)
        if silent:
            log.warning("%d of %d files hold no speech and were not decoded (text left empty)", silent, len(audio))
        if output:
            atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            typer.echo(f"wrote {len(rows)} transcripts to {output}", err=True)
        else:
            for row in rows:
                typer.echo(f"{row['audio']}\t{row['text']}")
