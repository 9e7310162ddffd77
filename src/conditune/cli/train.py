"""``conditune train CONFIG.yaml [section.key=value ...] [--resume]``: train a speech LLM."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: Path = typer.Argument(..., help="Training config (YAML with model/data/train sections)."),
        overrides: list[str] = typer.Argument(None, help="Overrides as section.key=value, e.g. train.lr=1e-4."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
        resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    ) -> None:
        """Train the adaptor and the selected LLM tensors of a speech LLM (frozen Whisper encoder)."""
        import json

        from conditune.training.config import load_train_config
        from conditune.training.trainer import train

        _quiet_transformers()
        cfg = load_train_config(config, overrides or [])
        result = train(cfg, resume=resume_from if resume_from else resume, log=lambda m: typer.echo(m, err=True))
        typer.echo(
            json.dumps({k: v for k, v in result.to_dict().items() if k != "eval"} | {"eval": _short(result.eval)})
        )


def _short(wer):
    if not wer:
        return None
    return {k: v for k, v in wer.items() if k != "counts"}


def _quiet_transformers() -> None:
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantisation and weight-loading bars
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
