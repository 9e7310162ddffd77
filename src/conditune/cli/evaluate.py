"""``conditune evaluate CHECKPOINT MANIFEST``: word error rate of a trained speech LLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from conditune.errors import CondituneError


def register(app: typer.Typer) -> None:
    from conditune.cli.transcribe import _load

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
        from conditune.io import atomic_write_json, atomic_write_text
        from conditune.speech.features import FeatureCache
        from conditune.training.trainer import evaluate_examples, prepare_examples, read_manifests

        model = _load(checkpoint, device, llm, encoder)
        utts, bad_rows = read_manifests(str(manifest), strict)
        cache = FeatureCache(model.encoder, feature_cache, memory=True)
        examples, skipped = prepare_examples(utts, model, cache, strict=strict, batch_size=16, max_text_tokens=None)
        if not examples:
            raise CondituneError(f"{manifest}: no usable utterances")
        res = evaluate_examples(
            model, examples, cache, batch_size=batch_size, num_beams=beams, max_new_tokens=max_new_tokens
        )
        wer = res["wer"]
        report = {
            "checkpoint": str(checkpoint),
            "manifest": str(manifest),
            "utterances": len(examples),
            "skipped": {"rows": bad_rows, **skipped},
            "wer": {k: v for k, v in wer.items() if k != "counts"},
            "counts": wer.get("counts", {}),
        }
        report = json.loads(json.dumps(report, default=float).replace("NaN", "null"))
        if predictions:
            atomic_write_text(
                predictions, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in res["predictions"])
            )
        if output:
            atomic_write_json(output, report)
        line = ", ".join(
            f"{k} {v:.2f}%" if isinstance(v, float) and not math.isnan(v) else f"{k} n/a"
            for k, v in wer.items()
            if k != "counts"
        )
        typer.echo(f"WER: {line} ({len(examples)} utterances, skipped {bad_rows + sum(skipped.values())})")
