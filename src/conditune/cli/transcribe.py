"""``conditune transcribe CHECKPOINT AUDIO...``: transcribe audio with a trained speech LLM."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from conditune.errors import CondituneError


def resolve_model_dir(path: Path) -> Path:
    """A model folder, a checkpoint, or a training output folder (its ``final/`` or latest checkpoint)."""
    from conditune.speech.modeling import CONFIG_NAME
    from conditune.training.checkpoint import latest_checkpoint

    if not path.exists():
        raise CondituneError(f"{path} does not exist")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "final" / CONFIG_NAME).is_file():
        return path / "final"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CondituneError(f"{path}: not a speech model, checkpoint or training output folder")


def _load(checkpoint: Path, device: str | None, llm: str | None = None, encoder: str | None = None):
    from conditune.cli.train import _quiet_transformers
    from conditune.speech.modeling import SpeechLLM

    _quiet_transformers()
    overrides = {}
    if llm:
        overrides["llm.path"] = llm
        overrides["llm.gguf_file"] = None
    if encoder:
        overrides["encoder.path"] = encoder
    model = SpeechLLM.from_pretrained(resolve_model_dir(checkpoint), device=device, overrides=overrides)
    model.eval()
    return model


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
        """Transcribe audio files with a trained speech LLM."""
        from conditune.io import atomic_write_text

        model = _load(checkpoint, device, llm, encoder)
        texts = model.transcribe(
            [str(a) for a in audio], batch_size=batch_size, num_beams=beams, max_new_tokens=max_new_tokens
        )
        rows = [{"audio": str(a), "text": t} for a, t in zip(audio, texts)]
        if output:
            atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            typer.echo(f"wrote {len(rows)} transcripts to {output}", err=True)
        else:
            for row in rows:
                typer.echo(f"{row['audio']}\t{row['text']}")
