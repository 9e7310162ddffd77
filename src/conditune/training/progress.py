"""What a run reports while it trains: the metrics log (JSONL, optionally TensorBoard) and progress bars."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conditune.io import atomic_write_text

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """``metrics.jsonl`` in the run's folder: one JSON record a line (``kind``: train | eval)."""

    def __init__(self, output_dir: Path, tensorboard: bool):
        self.path = Path(output_dir) / METRICS_NAME
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard not installed: skip quietly
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run re-creates them)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """A rich progress bar on stderr (a no-op when disabled): ``with ProgressBar(...) as bar: bar.advance(n)``."""

    def __init__(self, enabled: bool, label: str, total: int, *, completed: int = 0, fields: dict | None = None):
        self.enabled = enabled and total > 0
        self.label, self.total, self.completed, self.fields = label, total, completed, fields or {}
        self.progress, self.task = None, None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn(f"{k} {{task.fields[{k}]}}") for k in self.fields]
            columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
            self.progress = Progress(*columns, console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, completed=self.completed, **self.fields)
        return self

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def update(self, *, completed: int, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, **fields)

    @property
    def callback(self) -> Callable[[int], None] | None:
        return self.advance if self.progress is not None else None

    def __exit__(self, *exc) -> bool:
        if self.progress is not None:
            self.progress.stop()
        return False
