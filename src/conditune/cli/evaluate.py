"""``conditune evaluate CHECKPOINT MANIFEST``: word error rate of a trained speech LLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from conditune.errors import CondituneError


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        checkpoint: Path = typer.Argument(..., help="Trained model folder, checkpoint, or training output folder."),
        manifest: Path = typer.Argument(..., help="JSONL manifest with audio, text, language."),
        output: Path = typer.Option(None, "--output", "-o", help="Write metrics JSON here."),
        predictions: Path = typer.Option(None, help="Also write per-utterance predictions (JSONL) here."),
        batch_size: int = typer.Option(8, help="Utterances per generation batch."),
        beams: int = typer.Option(1, help="Beam width (1: greedy)."),
        max_new_tokens: int = typer.Option(128, help="Longest transcript in tokens."),
        strict: bool = typer.Option(False, help="Fail on a bad manifest line or audio file instead of skipping it."),
        feature_cache: Path = typer.Option(None, help="Folder to cache encoder outputs in (default: memory only)."),
        device: str = typer.Option(None, help="torch device (default: CPU)."),
        llm: str = typer.Option(None, help="Base LLM path, if it moved since training (folder, hub id or .gguf)."),
        encoder: str = typer.Option(None, help="Encoder folder, if it moved since training."),
    ) -> None:
        """Word error rate of a trained speech LLM on a manifest, overall and per language."""
        from conditune.cli.common import check_generation_options, load_for_inference
        from conditune.data.examples import prepare_examples, read_manifests
        from conditune.evaluation.transcription import evaluate_examples
        from conditune.io import atomic_write_json, atomic_write_text, check_writable

        check_generation_options(batch_size=batch_size, beams=beams, max_new_tokens=max_new_tokens, device=device)
        for path in (output, predictions):
            if path is not None:
                check_writable(path)  # before the model loads
        utts, bad_rows = read_manifests(manifest, strict=strict)  # a bad manifest: one line, before the model
        model, processor = load_for_inference(checkpoint, device=device, llm=llm, encoder=encoder,
                                              cache_dir=feature_cache)  # fmt: skip
        prepared = prepare_examples(utts, processor, strict=strict, batch_size=16)
        if not prepared.examples:
            raise CondituneError(f"{manifest}: no usable utterances")
        result = evaluate_examples(
            model, processor, prepared.examples, batch_size=batch_size, num_beams=beams, max_new_tokens=max_new_tokens
        )
        report = {
            "checkpoint": str(checkpoint),
            "manifest": str(manifest),
            "utterances": len(prepared.examples),
            "skipped": {"rows": bad_rows, **prepared.skipped},
            "wer": result.summary(),
            "counts": result.wer.get("counts", {}),
        }
        if predictions:
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
            atomic_write_text(predictions, lines)
        if output:
            atomic_write_json(output, report)
        line = ", ".join(
            f"{k} {v:.2f}%" if isinstance(v, float) and not math.isnan(v) else f"{k} n/a"
            for k, v in result.summary().items()
        )
        typer.echo(
            f"WER: {line} ({len(prepared.examples)} utterances, skipped {bad_rows + sum(prepared.skipped.values())})"
        )
