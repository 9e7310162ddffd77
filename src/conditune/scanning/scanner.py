"""Scan a checkpoint: one :class:`TensorRecord` per weight matrix, streamed, cached, resumable.

``scan_source`` is the library entry point (the CLI's ``conditune scan`` is a thin layer over it).
Tensors are loaded one at a time (the next one is read while the current one is analysed), each
finished record is appended to the resumable cache, and under ``torchrun`` the work is split over
the processes and merged on every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from conditune import __version__
from conditune.scanning.cache import ScanCache, cache_key
from conditune.scanning.records import FLAGGED, SKIPPED, TensorRecord
from conditune.scanning.sources import TensorInfo, TensorSource, iter_matrices, open_source
from conditune.scanning.spectrum import SMALL_WORK, MatrixProblem, analyse_matrix, matrix_work, single_threaded_blas
from conditune.theory.quantities import effective_rank, entropy_bits, kappa_random, stable_rank

# Bump when the numbers a scan produces change, so old cache entries are not reused.
SCAN_FORMAT = 2


@dataclass
class ScanOptions:
    spectrum: str = "fast"  # "fast" or "full" (all singular values, saved alongside)
    device: str = "auto"  # "auto", "cpu" or "cuda[:i]"

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            from conditune.errors import CondituneError

            raise CondituneError("--device cuda asked for, but torch sees no CUDA device")
        return self.device

    def cache_options(self) -> dict:
        # Device does not change results beyond their error bounds; the spectrum mode does.
        return {"spectrum": self.spectrum, "format": SCAN_FORMAT}


def scan_source(
    source,
    *,
    spectrum: str = "fast",
    device: str = "auto",
    cache: bool = True,
    cache_folder: str | Path | None = None,
    progress: bool | Callable = False,
    include: Callable[[str], bool] | None = None,
) -> tuple[list[TensorRecord], dict]:
    """Scan every weight tensor of ``source`` (see :func:`conditune.scanning.sources.open_source`).

    Returns the records in checkpoint order and a metadata dict (source, fingerprint, options,
    timings). With ``cache`` finished records are kept on disk under the checkpoint's fingerprint
    and reused: a killed scan resumes where it stopped. ``progress`` is True for a rich progress
    bar, or a callable ``(done_cost, total_cost, name)``.
    """
    if spectrum not in ("fast", "full"):
        from conditune.errors import CondituneError

        raise CondituneError(f"unknown spectrum mode {spectrum!r} (use fast or full)")
    options = ScanOptions(spectrum=spectrum, device=device)
    src = open_source(source)
    fingerprint = src.fingerprint()
    infos = [i for i in src.infos() if include is None or include(i.name)]
    store = (
        ScanCache(cache_key(fingerprint, options.cache_options()), Path(cache_folder) if cache_folder else None)
        if cache
        else None
    )
    done = store.load() if store else {}

    rank, world, own_group = _distributed_rank_world()
    todo = [i for i in infos if _needs_work(i, done)]
    mine = assign_work(todo, world)[rank]
    started = time.perf_counter()
    report = _progress_reporter(progress, mine, rank)
    try:
        new = _scan_tensors(src, mine, options, store, report)
    finally:
        report(None)  # the bar stops (and the terminal is restored) however the scan ends
    if world > 1:
        new = _gather(new)
        if (
            own_group
        ):  # a process group left at exit aborts gloo's threads ("terminate called without an active exception")
            import torch.distributed as dist

            dist.destroy_process_group()
    by_name = {**done, **{r.name: r for r in new}}
    records = [record for info in infos for record in _records_for(info, by_name)]
    meta = {
        "source": src.description,
        "fingerprint": fingerprint,
        "conditune_version": __version__,
        "spectrum": spectrum,
        "device": options.resolved_device(),
        "tensors": len(infos),
        "records": len(records),
        "computed": len(new),
        "reused_from_cache": sum(r.name in done for r in records),
        "seconds": round(time.perf_counter() - started, 3),
        "world_size": world,
    }
    return records, meta


# ----------------------------------------------------------------------------------------------
# work


def matrix_layout(info: TensorInfo) -> tuple[tuple[int, int], int]:
    """(shape of each scanned matrix, how many) for a tensor of >= 2 dims (see ``iter_matrices``)."""
    shape = info.shape
    if len(shape) == 2:
        return (shape[0], shape[1]), 1
    if len(shape) == 3 and "conv" not in info.name.lower():
        return (shape[1], shape[2]), shape[0]
    return (shape[0], math.prod(shape[1:])), 1


def _matrix_names(info: TensorInfo) -> list[str]:
    _, count = matrix_layout(info)
    return [f"{info.name}[{i}]" for i in range(count)] if _is_stack(info) else [info.name]


def _is_stack(info: TensorInfo) -> bool:
    return len(info.shape) == 3 and "conv" not in info.name.lower()


def _needs_work(info: TensorInfo, done: dict[str, TensorRecord]) -> bool:
    return len(info.shape) >= 2 and not all(name in done for name in _matrix_names(info))


def _records_for(info: TensorInfo, by_name: dict[str, TensorRecord]) -> list[TensorRecord]:
    if len(info.shape) < 2:
        return [
            TensorRecord(
                info.name, info.shape, info.dtype, info.numel, status=SKIPPED, reason=f"{len(info.shape)}-D tensor"
            )
        ]
    return [by_name[name] for name in _matrix_names(info) if name in by_name]


def work_cost(info: TensorInfo) -> float:
    """Flop count of the route each matrix most likely takes, for balancing, batching and ETA."""
    if len(info.shape) < 2:
        return 0.0
    shape, count = matrix_layout(info)
    return count * matrix_work(shape)


def assign_work(infos: list[TensorInfo], world: int) -> list[list[TensorInfo]]:
    """Split tensors over ``world`` workers, largest first to the least loaded (deterministic)."""
    shares: list[list[TensorInfo]] = [[] for _ in range(world)]
    loads = [0.0] * world
    for info in sorted(infos, key=lambda i: (-work_cost(i), i.name)):
        target = loads.index(min(loads))
        shares[target].append(info)
        loads[target] += work_cost(info)
    order = {info.name: k for k, info in enumerate(infos)}
    return [sorted(share, key=lambda i: order[i.name]) for share in shares]


def _scan_tensors(
    src: TensorSource, infos: list[TensorInfo], options: ScanOptions, store: ScanCache | None, report
) -> list[TensorRecord]:
    device = options.resolved_device()
    full = options.spectrum == "full"

    def run(info: TensorInfo, tensor: torch.Tensor) -> list[TensorRecord]:
        records = [analyse_record(name, matrix, info, full, device) for name, matrix in iter_matrices(info, tensor)]
        if store:
            store.append(records)
        report(info.name, work_cost(info))
        return records

    small = [i for i in infos if device == "cpu" and work_cost(i) < SMALL_WORK]
    large = [i for i in infos if i not in set(small)]
    out: list[TensorRecord] = []
    if small:  # several at a time, each with single-threaded BLAS (see spectrum.SMALL_WORK)
        with single_threaded_blas(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for records in pool.map(lambda info: run(info, src.load(info.name)), small):
                out.extend(records)
    # Large ones: read the next tensor (or dequantise it) while the current one is analysed.
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(src.load, large[0].name) if large else None
        for k, info in enumerate(large):
            report(info.name)
            tensor = pending.result()
            pending = reader.submit(src.load, large[k + 1].name) if k + 1 < len(large) else None
            out.extend(run(info, tensor))
            del tensor
    return out


def analyse_record(name: str, matrix: torch.Tensor, info: TensorInfo, full_spectrum: bool, device: str) -> TensorRecord:
    """The record of one matrix: spectrum, derived quantities, status."""
    shape = tuple(int(d) for d in matrix.shape)
    record = TensorRecord(name, shape, info.dtype, int(matrix.numel()))
    try:
        spec = analyse_matrix(matrix, full_spectrum=full_spectrum, device=device)
    except MatrixProblem as problem:
        record.status, record.reason = FLAGGED, problem.reason
        return record
    min_side = min(shape)
    record.sigma_max, record.sigma_min = spec.sigma_max, spec.sigma_min
    record.kappa, record.kappa_rel_err = spec.kappa, spec.kappa_rel_err
    record.log2_volume, record.frobenius, record.rank = spec.log2_volume, spec.frobenius, spec.rank
    record.stable_rank = stable_rank(spec.frobenius, spec.sigma_max)
    record.entropy_bits = entropy_bits(spec.log2_volume, spec.rank)
    record.kappa_mp = kappa_random(shape)
    record.kappa_norm = spec.kappa / record.kappa_mp
    record.method, record.seconds = spec.method, round(spec.seconds, 4)
    if spec.singular_values is not None:
        record.effective_rank = effective_rank(spec.singular_values)
        record.extra["singular_values"] = spec.singular_values.tolist()
    if spec.rank < min_side:
        record.status, record.reason = FLAGGED, f"rank-deficient (rank {spec.rank} of {min_side})"
    return record


# ----------------------------------------------------------------------------------------------
# distributed (torchrun): each rank scans its share, everyone gets everything


def _distributed_rank_world() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group: then the scan destroys it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size(), created


def _gather(records: list[TensorRecord]) -> list[TensorRecord]:
    import torch.distributed as dist

    gathered: list[list[TensorRecord] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [record for share in gathered for record in (share or [])]


# ----------------------------------------------------------------------------------------------
# progress


def _progress_reporter(progress, infos: list[TensorInfo], rank: int):
    """A ``report(name, cost=None)`` callback (``report(None)``: the end): a rich bar on stderr (stdout is for
    results) weighted by work, for good ETAs; or a callable's ``(done, total, name)``."""
    total = sum(work_cost(i) for i in infos) or 1.0
    state = {"done": 0.0}
    if callable(progress):

        def report(name, cost=None):
            state["done"] += cost or 0.0
            progress(state["done"], total, name)

        return report
    if not progress or rank != 0:
        return lambda name, cost=None: None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]scan[/bold] {task.fields[tensor]}", justify="left"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task("scan", total=total, tensor="")

    def report(name, cost=None):
        if name is None:
            if bar.live.is_started:
                bar.stop()
            return
        if not bar.live.is_started:
            bar.start()
        bar.update(task, advance=cost or 0.0, tensor=_short(name))

    return report


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
