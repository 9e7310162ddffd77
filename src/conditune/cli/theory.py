"""``conditune theory``: check the entropy / condition-number theory numerically and write a report."""

from __future__ import annotations

from pathlib import Path

import typer

from conditune.cli.base import EXIT_CHECK_FAILED


def register(app: typer.Typer) -> None:
    @app.command("theory")
    def theory_cmd(
        output: Path = typer.Option(
            Path("results/theory"), "--output", "-o", help="Directory for theory.md, theory.json and PNGs."
        ),
        scan: Path = typer.Option(
            None, "--scan", help="Scan file (.csv/.json/.parquet) of a real model to analyse as well."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of every random draw (the report is reproducible)."),
    ) -> None:
        """Check eq. 6, scale invariance, Theorem 1 and kappa_mp numerically; exit 2 if a check fails."""
        from conditune.io import check_writable
        from conditune.validation import require_int

        require_int(seed, "--seed", minimum=0)
        check_writable(output, folder=True)
        if scan is not None:
            from conditune.scanning.records import read_records

            read_records(scan)  # a bad scan file is refused before the checks run
        from conditune.theory.report import run_theory_report  # imports matplotlib: only when used

        report = run_theory_report(output, scan=scan, seed=seed)
        for check in report.all_checks:
            typer.echo(f"{check.status:4}  {check.title}: {check.summary}")
        typer.echo(f"wrote {output / 'theory.md'} and {output / 'theory.json'} in {report.seconds:.1f} s")
        if not report.passed:
            from conditune.theory.checks import FAIL

            failed = [check.title for check in report.all_checks if check.status == FAIL]
            typer.echo(f"failed: {len(failed)} of {len(report.all_checks)} checks ({'; '.join(failed)})", err=True)
            raise typer.Exit(EXIT_CHECK_FAILED)
