"""``conditune demo [CONFIG.yaml] [section.key=value ...]``: scan, select, train and evaluate within a time budget."""

from __future__ import annotations

from pathlib import Path

import typer

from conditune.errors import CondituneError

READOUTS = {  # --readout presets: what the LLM reads
    "adaptor": {"model.ctc.compress": False, "model.ctc.readout": "adaptor", "training.ctc_weight": 0.0},
    "embeddings": {"model.ctc.compress": True, "model.ctc.readout": "embeddings"},
}


def split_arguments(arguments: list[str]) -> tuple[Path | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]``: the optional config file first, then the overrides."""
    config, overrides = None, []
    for arg in arguments:
        if "=" in arg:
            overrides.append(arg)
        elif config is None and not overrides:
            config = Path(arg)
        else:
            raise CondituneError(f"unexpected argument {arg!r}: give one config file, then section.key=value overrides")
    return config, overrides


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        arguments: list[str] = typer.Argument(
            None,
            metavar="[CONFIG.yaml] [section.key=value ...]",
            help="The recipe (default: the shipped speech_demo.yaml) and overrides.",
        ),
        output: Path = typer.Option(
            None, "--output", "-o", help="Folder for metrics.json, report.md and plots [demo.output]."
        ),
        minutes: float = typer.Option(
            None, "--minutes", help="Wall-clock budget, set-up and evaluation included [demo.minutes]."
        ),
        seed: int = typer.Option(
            None, "--seed", help="Training seed; the speech set is always the same [training.seed]."
        ),
        count: int = typer.Option(None, "--count", help="How many lowest-kappa LLM tensors train [demo.count]."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No stage headers or progress bars."),
        train_utterances: int = typer.Option(None, "--train-utterances", hidden=True, help="[demo.train_per_language]"),
        dev_utterances: int = typer.Option(None, "--dev-utterances", hidden=True, help="[demo.dev_per_language]"),
        test_utterances: int = typer.Option(None, "--test-utterances", hidden=True, help="[demo.test_per_language]"),
        heldout: int = typer.Option(
            None, "--heldout", hidden=True, help="Held-out sentences per language [demo.heldout]."
        ),
        agreement_prompts: int = typer.Option(
            None, "--agreement-prompts", hidden=True, help="[demo.agreement_prompts]"
        ),
        steps: int = typer.Option(
            None, "--steps", hidden=True, help="Fixed main steps instead of the budget [demo.max_steps]."
        ),
        align_steps: int = typer.Option(None, "--align-steps", hidden=True, help="[training.align_steps]"),
        readout: str = typer.Option(
            None,
            "--readout",
            hidden=True,
            help="embeddings: CTC-compressed token-embedding readout; adaptor: the paper's.",
        ),
        vocab_size: int = typer.Option(None, "--vocab-size", hidden=True, help="[synth.vocab_size] (0: any sentence)."),
        speech_dir: Path = typer.Option(None, "--speech-dir", hidden=True, help="[demo.speech_dir]"),
    ) -> None:
        """Fetch the demo models, synthesise speech, select the lowest-kappa tensors, train, measure WER and forgetting."""
        import json

        from conditune.recipes.demo import load_demo_config, run_demo

        config, overrides = split_arguments(arguments or [])
        if readout is not None and readout not in READOUTS:
            raise CondituneError(f"--readout must be one of {', '.join(READOUTS)}, not {readout!r}")
        given = {
            "demo.output": output, "demo.minutes": minutes, "training.seed": seed, "demo.count": count,
            "demo.train_per_language": train_utterances, "demo.dev_per_language": dev_utterances,
            "demo.test_per_language": test_utterances, "demo.heldout": heldout,
            "demo.agreement_prompts": agreement_prompts, "demo.max_steps": steps, "training.align_steps": align_steps,
            "demo.speech_dir": speech_dir,
        }  # fmt: skip
        options = {key: str(v) if isinstance(v, Path) else v for key, v in given.items() if v is not None}
        if vocab_size is not None:
            options["synth.vocab_size"] = vocab_size or None  # 0: any sentence
        if quiet:
            options["demo.progress"] = False
        options.update(READOUTS.get(readout, {}))
        from conditune.config import parse_overrides

        cfg = load_demo_config(config, {**parse_overrides(overrides), **options})  # options win over overrides
        result = run_demo(cfg)
        m = result.metrics
        keys = ("wer", "forgetting", "steps", "seconds", "setup_seconds")
        summary = {k: m[k] for k in keys}
        summary["forgetting"] = {k: v for k, v in m["forgetting"].items() if k != "items"}  # per text: metrics.json
        typer.echo(json.dumps({"output": str(result.output), **summary}))
