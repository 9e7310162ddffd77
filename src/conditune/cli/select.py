"""``conditune select``: choose the tensors to fine-tune from a scan and write them out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from conditune.errors import CondituneError

_SCAN_SUFFIXES = (".csv", ".json", ".parquet")


def register(app: typer.Typer) -> None:
    @app.command("select")
    def select_cmd(
        scan_file_or_source: str = typer.Argument(
            ..., metavar="SCAN_FILE_OR_SOURCE", help="A scan file (.csv/.json/.parquet) or a checkpoint to scan first."
        ),
        policy: str = typer.Option("lowest", "--policy", "-p", help="lowest | highest | random | threshold."),
        count: int | None = typer.Option(None, "--count", "-n", help="Number of tensors (default 100)."),
        budget: float | None = typer.Option(None, "--budget", help="Fraction of all model parameters, e.g. 0.05."),
        params: str | None = typer.Option(None, "--params", help="Parameter budget, e.g. 20M (K/M/B suffixes)."),
        threshold: float | None = typer.Option(None, "--threshold", help="Policy threshold: score <= T."),
        score: str = typer.Option(
            "kappa", "--score", help="kappa | kappa_norm | log2_volume | snr (Spectrum's; needs --spectrum full)."
        ),
        per_kind: bool = typer.Option(False, "--per-kind", help="Take the same share of every tensor kind."),
        include: list[str] | None = typer.Option(
            None, "--include", help="Only names matching this regex (repeatable)."
        ),
        exclude: list[str] | None = typer.Option(
            None, "--exclude", help="Drop names matching this regex (repeatable)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the random policy."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: names to stdout)."),
        fmt: str | None = typer.Option(
            None, "--format", "-f", help="names | json | axolotl | peft (default from the extension)."
        ),
    ) -> None:
        """Select the tensors to fine-tune (lowest condition number first, by default)."""
        from conditune.io import check_writable
        from conditune.selection import format_for, render, select, write_selection

        fmt = format_for(output, fmt)  # check before a possibly long scan
        if output is not None:
            check_writable(output)
        records, meta = _load_records(scan_file_or_source, full_spectrum=score == "snr")
        selection = select(
            records,
            policy,
            count=count,
            budget=budget,
            params=params,
            threshold=threshold,
            score=score,
            per_kind=per_kind,
            include=include or [],
            exclude=exclude or [],
            seed=seed,
            meta=meta,
        )
        for note in selection.notes:
            typer.echo(f"warning: {note}", err=True)
        if output is None:
            typer.echo(render(selection, fmt), nl=False)
        else:
            write_selection(selection, output, fmt)
        _print_summary(selection, output, fmt)


def _load_records(source: str, *, full_spectrum: bool = False) -> tuple[list, dict[str, Any]]:
    """Records of a scan file (with the singular values saved beside it, when a spectrum score needs them), or of
    a scan of a checkpoint (the full spectrum when a spectrum score needs it)."""
    from conditune.scanning.records import attach_spectra, read_records

    if Path(source).suffix.lower() in _SCAN_SUFFIXES:
        records, meta = read_records(source)
        if full_spectrum:
            attach_spectra(records, source)
        return records, meta
    try:
        from conditune.scanning import scan_source
    except ImportError as exc:
        raise CondituneError(f"{source}: not a scan file, and scanning is not available here ({exc})") from None
    return scan_source(source, spectrum="full" if full_spectrum else "fast")


def _print_summary(selection, output: Path | None, fmt: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from conditune.selection import format_params

    console = Console(stderr=True)
    console.print(
        f"Selected [bold]{len(selection.chosen)}[/] tensors of {selection.candidates} candidates "
        f"({selection.describe()}): [bold]{format_params(selection.selected_params)}[/] parameters, "
        f"{selection.share:.2%} of the model's {format_params(selection.model_params)}"
    )
    table = Table("kind", "tensors", "parameters", "share of model", box=None, pad_edge=False)
    for kind, (tensors, n) in selection.per_kind().items():
        share = n / selection.model_params if selection.model_params else 0.0
        table.add_row(kind, str(tensors), format_params(n), f"{share:.2%}")
    console.print(table)
    if output is not None:
        console.print(f"wrote {output} ({fmt})")
