"""``conditune demo``: scan, select, train and evaluate a speech LLM on a CPU within a time budget."""

from __future__ import annotations

from pathlib import Path

import typer

from conditune.demo import DemoOptions

DEFAULTS = DemoOptions()  # one place for the defaults: the library's


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        output: Path = typer.Option(
            Path("runs/demo"), "--output", "-o", help="Folder for metrics.json, report.md and plots."
        ),
        minutes: float = typer.Option(
            30.0, "--minutes", help="Total wall-clock budget, set-up and evaluation included."
        ),
        seed: int = typer.Option(0, "--seed", help="Training seed (the speech set is always the same)."),
        count: int = typer.Option(100, "--count", help="How many lowest-kappa LLM tensors train."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No stage headers or progress bars."),
        train_utterances: int = typer.Option(
            None, "--train-utterances", hidden=True, help="Train utterances per language."
        ),
        dev_utterances: int = typer.Option(None, "--dev-utterances", hidden=True),
        test_utterances: int = typer.Option(None, "--test-utterances", hidden=True),
        heldout: int = typer.Option(100, "--heldout", hidden=True, help="Held-out sentences per language."),
        agreement_prompts: int = typer.Option(10, "--agreement-prompts", hidden=True),
        steps: int = typer.Option(
            None, "--steps", hidden=True, help="Fixed optimizer steps instead of the time budget."
        ),
        align_steps: int = typer.Option(
            DEFAULTS.align_steps, "--align-steps", hidden=True, help="CTC alignment steps before the main ones."
        ),
        readout: str = typer.Option(
            DEFAULTS.readout,
            "--readout",
            hidden=True,
            help="embeddings: CTC-compressed token-embedding readout; adaptor: the paper's (all positions).",
        ),
        vocab_size: int = typer.Option(
            DEFAULTS.vocab_size,
            "--vocab-size",
            hidden=True,
            help="Speak sentences of the N most frequent words (0: any).",
        ),
        speech_dir: Path = typer.Option(
            None, "--speech-dir", hidden=True, help="Speech set folder (default $CONDITUNE_HOME/demo/speech)."
        ),
    ) -> None:
        """Fetch the demo models, synthesise speech, select the lowest-kappa tensors, train, measure WER and forgetting."""
        import json

        from conditune.demo import run_demo

        options = DemoOptions(
            output=output,
            minutes=minutes,
            seed=seed,
            count=count,
            train_per_language=train_utterances,
            dev_per_language=dev_utterances,
            test_per_language=test_utterances,
            heldout=heldout,
            agreement_prompts=agreement_prompts,
            max_steps=steps,
            progress=not quiet,
            speech_dir=speech_dir,
            align_steps=align_steps,
            readout=readout,
            vocab_size=vocab_size or None,
        )
        result = run_demo(options)
        m = result.metrics
        typer.echo(
            json.dumps(
                {
                    "output": str(result.output),
                    "wer": m["wer"],
                    "forgetting": m["forgetting"],
                    "steps": m["steps"],
                    "seconds": m["seconds"],
                    "setup_seconds": m["setup_seconds"],
                }
            )
        )
