"""``conditune train CONFIG.yaml [section.key=value ...] [--resume]``: train a speech LLM."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: Path = typer.Argument(
            ..., help="Training config (YAML: model, data, optimizer, training, ... sections)."
        ),
        overrides: list[str] = typer.Argument(None, help="Overrides as section.key=value, e.g. optimizer.lr=1e-4."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output.dir."),
        resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    ) -> None:
        """Train the adaptor and the selected LLM tensors of a speech LLM (frozen Whisper encoder)."""
        import json

        from conditune.training.config import load_train_config
        from conditune.training.trainer import train

        cfg = load_train_config(config, overrides or [])
        result = train(cfg, resume=resume_from if resume_from else resume, log=lambda m: typer.echo(m, err=True))
        summary = {k: v for k, v in result.to_dict().items() if k != "eval"}
        typer.echo(json.dumps(summary | {"eval": {k: v for k, v in (result.eval or {}).items() if k != "counts"}}))
