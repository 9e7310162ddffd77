"""``conditune scan``: condition numbers of every weight matrix of a checkpoint."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

import typer

from conditune.errors import CondituneError


def register(app: typer.Typer) -> None:
    @app.command("scan")
    def scan_cmd(
        source: str = typer.Argument(
            ..., help="Model folder, .safetensors, .gguf, .bin/.pt file, demo:<name>, or a hub id (online)."
        ),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write records to .csv, .json or .parquet."),
        spectrum: str = typer.Option(
            "fast", help="fast: extremes and log-volume; full: every singular value (saved beside the output)."
        ),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        cache: bool = typer.Option(
            True, "--cache/--no-cache", help="Reuse and extend the resumable cache of this checkpoint."
        ),
        include: str | None = typer.Option(None, help="Only tensors whose name matches this regular expression."),
        plot: Path | None = typer.Option(None, help="Draw the κ heatmap and histogram to this PNG."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
    ) -> None:
        """Scan every weight matrix: κ = σ_max/σ_min, log-volume, entropy, shape-normalised κ."""
        from conditune.io import check_writable
        from conditune.validation import require_choice, require_device

        # Everything a scan could fail on at its end is checked before it starts.
        if output is not None and output.suffix.lower() not in {".csv", ".json", ".parquet"}:
            raise CondituneError(f"{output}: unknown output format {output.suffix!r} (use .csv, .json or .parquet)")
        spectrum = require_choice(spectrum, "--spectrum", ("fast", "full"))
        device = require_device(device, "--device")
        pattern = _compile(include)
        for path in (
            output,
            plot,
            output.with_suffix(".spectra.safetensors") if output and spectrum == "full" else None,
        ):
            if path is not None:
                check_writable(path)
        if plot is not None and plot.suffix.lower() != ".png":
            raise CondituneError(f"--plot {plot}: the plot is a PNG (name it .png)")
        if cache:
            _check_cache_writable()
        from conditune.scanning import scan_source, write_records

        records, meta = scan_source(
            source,
            spectrum=spectrum,
            device=device,
            cache=cache,
            progress=not quiet,  # a work-weighted bar on stderr (stdout is for results), on the main process
            include=(lambda name: bool(pattern.search(name))) if pattern else None,
        )
        if not _is_main_process():
            return
        if output is not None:
            write_records(records, output, meta)
            if spectrum == "full":
                _write_spectra(records, output.with_suffix(".spectra.safetensors"))
        if plot is not None:
            from conditune.scanning.plot import plot_scan

            plot_scan(records, plot, title=meta["source"])
        if not quiet:
            print_summary(records, meta, output)


def _check_cache_writable() -> None:
    from conditune.io import OutputPathError, check_writable
    from conditune.scanning.cache import cache_dir

    try:
        check_writable(cache_dir(), folder=True)
    except OutputPathError as exc:
        raise CondituneError(f"scan cache: {exc} (scan with --no-cache, or set CONDITUNE_HOME)") from None


def _compile(pattern: str | None):
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CondituneError(f"--include {pattern!r}: bad regular expression ({exc})") from None


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _write_spectra(records, path: Path) -> None:
    import torch
    from safetensors.torch import save

    from conditune.io import atomic_write

    tensors = {
        r.name: torch.tensor(r.extra["singular_values"], dtype=torch.float64)
        for r in records
        if "singular_values" in r.extra
    }
    with atomic_write(path, "wb") as handle:
        handle.write(save(tensors, metadata={"content": "singular values, descending, float64"}))


def print_summary(records, meta: dict, output: Path | None) -> None:
    """Per tensor kind: count, median κ, κ range; then totals."""
    from rich.console import Console
    from rich.table import Table

    by_kind = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
    table = Table(title=f"{meta['source']}", title_justify="left")
    table.add_column("kind", no_wrap=True)
    for column in ("tensors", "ok", "flagged", "median κ", "min κ", "max κ", "median κ/κ_mp"):
        table.add_column(column, justify="right")
    for kind, group in sorted(by_kind.items(), key=lambda item: _median([r.kappa for r in item[1] if r.kappa]) or 0.0):
        ok = [r for r in group if r.status == "ok"]
        if not ok and all(r.status == "skipped" for r in group):
            continue  # 1-D norms and biases: counted below, not worth a row each
        kappas = [r.kappa for r in ok]
        table.add_row(
            kind,
            str(len(group)),
            str(len(ok)),
            str(sum(r.status == "flagged" for r in group)),
            _fmt(_median(kappas)),
            _fmt(min(kappas, default=None)),
            _fmt(max(kappas, default=None)),
            _fmt(_median([r.kappa_norm for r in ok])),
        )
    console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 120)
    console.print(table)
    counts = defaultdict(int)
    for r in records:
        counts[r.status] += 1
    flagged = [r for r in records if r.status == "flagged"]
    console.print(
        f"{len(records)} records: {counts['ok']} ok, {counts['skipped']} skipped (1-D), {counts['flagged']} flagged; "
        f"{meta['computed']} computed, {meta['reused_from_cache']} from cache, {meta['seconds']:.1f} s on {meta['device']}"
        + (f"; written to {output}" if output else "")
    )
    for r in flagged[:10]:
        console.print(f"  flagged {r.name}: {r.reason}")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3g}"
