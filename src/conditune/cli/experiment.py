"""``conditune experiment CONFIG.yaml --output DIR [section.key=value ...]``: compare what to fine-tune."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment_cmd(
        config: Path = typer.Argument(..., help="Experiment config (YAML: experiment + training sections)."),
        overrides: list[str] = typer.Argument(None, help="Overrides as section.key=value, e.g. experiment.seeds=[0]."),
        output: Path = typer.Option(..., "--output", "-o", help="Experiment folder (re-run it to resume)."),
        report_only: bool = typer.Option(
            False, "--report-only", help="Only rebuild results.csv, summary.md and plots."
        ),
    ) -> None:
        """Train several arms (lowest/highest κ, random, LoRA matched, full, ...) on identical data over seeds."""
        import json

        from conditune.recipes.experiment import run_experiment

        log = lambda m: typer.echo(m, err=True)  # noqa: E731
        result = run_experiment(config, output, overrides or [], log=log, report_only=report_only)
        typer.echo(json.dumps({
            "ran": [f"{a}/seed{s}" for a, s in result["ran"]],
            "ran_long_horizon": [f"{a}/seed{s}" for a, s in result.get("ran_long", [])],
            "skipped": [f"{a}/seed{s}" for a, s in result["skipped"]],
            **{k: result[k] for k in ("summary", "results", "plots")},
        }))  # fmt: skip
