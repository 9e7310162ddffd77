"""Shared pieces of the scanner benchmarks (``scan_block.py``, ``scan_small.py``, ``scan_checkpoint.py``).

The machine description (CPU, load, BLAS, versions), the GEMM rates the roofline is measured
against, the competing tools (SciPy/torch float32 SVD, PEFT's KappaTuneSelector, WeightWatcher,
the float64 LAPACK reference), a subprocess meter (wall time, peak RSS) and atomic result files.
Timings on a shared machine are upper bounds: every result records the load average before and
after, and tools are compared side by side in one run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from time import perf_counter

import numpy as np
import psutil
import scipy
import scipy.linalg as sla
import torch
from torch import nn

from conditune.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = ROOT / "results" / "bench"
GiB = 1024**3

log = logging.getLogger("bench")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _uptime() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    return ""


def write_results(path: Path, results: dict, markdown: str) -> None:
    """The JSON results and their markdown beside them (same name, .md), both atomically."""
    atomic_write_json(path, results)
    atomic_write_text(path.with_suffix(".md"), markdown)


# ==============================================================================================
# GEMM rates: the roofline every route is measured against


def gemm_rates(size: int = 4096, reps: int = 3) -> dict:
    """Best-of-``reps`` GFLOP/s of a size^3 matrix product (torch, the library the scanner's Gram
    matrices and LU use) in float32 and float64, measured now (the machine may be shared)."""
    rates = {}
    gen = torch.Generator().manual_seed(0)
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        a = torch.randn(size, size, generator=gen, dtype=dtype)
        torch.mm(a, a)
        best = math.inf
        for _ in range(reps):
            start = perf_counter()
            torch.mm(a, a)
            best = min(best, perf_counter() - start)
        rates[name] = 2.0 * size**3 / best / 1e9
    rates["size"] = size
    return rates


def roofline(flops32: float, flops64: float, seconds: float, rates: dict) -> dict:
    """Time the flops would take at the measured GEMM rates, and how far the measured time is from it."""
    bound = flops32 / (rates["float32"] * 1e9) + flops64 / (rates["float64"] * 1e9)
    flops = flops32 + flops64
    return {
        "flops": flops,
        "bound_seconds": bound,
        "achieved_gflops": flops / seconds / 1e9 if seconds else None,
        "times_bound": seconds / bound if bound else None,
    }


# ==============================================================================================
# machine


def machine_info() -> dict:
    info: dict = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / GiB, 1),
        "load_avg_at_start": load_average(),
        "uptime": _uptime(),
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ
        },
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "blas": _blas_info(),
        "git_commit": _git_commit(),
    }
    return info


def machine_markdown(m: dict) -> list[str]:
    """The machine section of a result's markdown."""
    v = m["versions"]
    return [
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores (affinity {m['affinity_cores']}), "
        f"RAM {m['ram_gib']} GiB; `uptime` at start: {m.get('uptime') or m['load_avg_at_start']}",
        "- the machine is shared with other jobs: timings are upper bounds; ratios measured side by side in one run hold best",
        f"- threads: torch {m['torch_threads']}, env {m['thread_env'] or 'unset'}",
        f"- numpy {v['numpy']} ({m['blas'].get('numpy_blas', '?')}), scipy {v['scipy']}, torch {v['torch']} (BLAS {m['blas'].get('torch_blas_info', '?')}), "
        f"peft {v['peft']}, transformers {v['transformers']}, weightwatcher {v['weightwatcher']}, conditune {v['conditune']}",
        f"- git commit {m.get('git_commit')}",
        "",
    ]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _versions() -> dict:
    out = {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__}
    for mod in ("peft", "transformers", "safetensors", "gguf", "weightwatcher", "conditune"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing tool is a result, not a crash
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def _blas_info() -> dict:
    blas: dict = {}
    try:
        from threadpoolctl import threadpool_info

        blas["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads", "architecture", "filepath")}
            for p in threadpool_info()
        ]
    except Exception as exc:  # noqa: BLE001
        blas["threadpools"] = f"threadpoolctl unavailable ({type(exc).__name__})"
    with contextlib.suppress(Exception):
        cfg = np.show_config(mode="dicts")
        dep = cfg.get("Build Dependencies", {})
        blas["numpy_blas"] = f"{dep.get('blas', {}).get('name')} {dep.get('blas', {}).get('version')}"
        blas["numpy_lapack"] = f"{dep.get('lapack', {}).get('name')} {dep.get('lapack', {}).get('version')}"
    with contextlib.suppress(Exception):
        for key, value in re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", torch.__config__.show()):
            blas[f"torch_{key.lower()}"] = value
    return blas


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):  # read-only
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    return None


# ==============================================================================================
# kappa by each tool (per matrix). Input: a torch tensor (bf16 in the block) or a numpy array.


def _np64(x) -> np.ndarray:
    return x.detach().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _np32(x) -> np.ndarray:
    return x.detach().to(torch.float32).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def to_t32(x) -> torch.Tensor:
    return (
        x.detach().to(torch.float32)
        if isinstance(x, torch.Tensor)
        else torch.from_numpy(np.asarray(x, dtype=np.float32))
    )


def _from_sv(s) -> tuple[float, dict]:
    s = np.asarray(s, dtype=np.float64)
    smax, smin = float(s.max()), float(s.min())
    return smax / smin, {"sigma_max": smax, "sigma_min": smin}


def kappa_reference(x):
    """The reference: LAPACK float64 SVD (numpy) of the stored values, upcast exactly."""
    return _from_sv(np.linalg.svd(_np64(x), compute_uv=False))


def kappa_conditune(x):
    from conditune.scanning.spectrum import analyse_matrix

    spec = analyse_matrix(x, full_spectrum=False, device="cpu")
    return spec.kappa, {
        "sigma_max": spec.sigma_max,
        "sigma_min": spec.sigma_min,
        "method": spec.method,
        "kappa_rel_err_bound": spec.kappa_rel_err,
        "flops32": spec.flops32,
        "flops64": spec.flops64,
    }


def kappa_scipy32(x):
    return _from_sv(sla.svdvals(_np32(x), check_finite=False))


def kappa_torch32(x):
    return _from_sv(torch.linalg.svdvals(to_t32(x)).numpy())


PER_MATRIX_TOOLS = {
    "float64_svd": ("numpy.linalg.svd float64 (reference)", kappa_reference),
    "conditune": ("conditune analyse_matrix", kappa_conditune),
    "scipy_f32": ("scipy.linalg.svdvals float32", kappa_scipy32),
    "torch_f32": ("torch.linalg.svdvals float32", kappa_torch32),
}


def warm_up() -> None:
    """First calls load LAPACK/ARPACK code paths and thread pools; keep that out of the timings."""
    rng = np.random.default_rng(0)
    for shape in ((64, 64), (512, 700)):
        a = rng.standard_normal(shape)
        for _, fn in PER_MATRIX_TOOLS.values():
            fn(torch.from_numpy(a).to(torch.bfloat16))
            fn(a.astype(np.float32))


def run_per_matrix_tool(fn, matrices: dict, label: str) -> dict:
    out = {}
    for name, x in matrices.items():
        if math.prod(x.shape) >= 1 << 22:  # free the previous big temporaries (gc is slow with transformers loaded)
            gc.collect()
        start = perf_counter()
        kappa, extra = fn(x)
        seconds = perf_counter() - start
        out[name] = {"kappa": kappa, "seconds": seconds, **extra}
        log.info("  %-12s %-40s kappa %-12.6g %.3fs", label, name, kappa, seconds)
    return out


@contextlib.contextmanager
def timed_calls(owner, attr: str, calls: list):
    """Temporarily wrap ``owner.attr`` so each call's input shape and seconds land in ``calls``."""
    original = getattr(owner, attr)

    def wrapper(x, *args, **kwargs):
        start = perf_counter()
        result = original(x, *args, **kwargs)
        calls.append((tuple(x.shape), perf_counter() - start))
        return result

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def run_peft(model: nn.Module, names: list[str] | None = None) -> dict:
    """PEFT's KappaTuneSelector on ``model``: total ``get_best_targets`` time, kappa per module
    and (from a timing wrapper around torch.linalg.svdvals, which it calls once per layer) the SVD
    seconds per module. ``names``: the module names expected (for the per-module times)."""
    try:
        from peft.helpers import KappaTuneSelector
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    calls: list = []
    selector = KappaTuneSelector(model, show_progress=False)
    with timed_calls(torch.linalg, "svdvals", calls):
        start = perf_counter()
        targets = selector.get_best_targets()
        total = perf_counter() - start
    kappas = dict(selector._condition_numbers or {})  # the selector's own per-module values
    analysed = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in kappas]
    per = {}
    for i, name in enumerate(analysed):
        per[name] = {"kappa": float(kappas[name]), "seconds": calls[i][1] if len(calls) == len(analysed) else None}
    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in kappas]
    return {
        "available": True,
        "total_seconds": total,
        "per_matrix": per,
        "skipped": skipped,
        "n_targets": len(targets),
        "max_dim_size_to_analyze": selector.max_dim_size_to_analyze,
    }


def run_weightwatcher(model: nn.Module) -> dict:
    """WeightWatcher ``analyze()`` (defaults: power-law fits included) on ``model``; kappa from the
    sv_max / sv_min columns of its details; per-layer SVD seconds from a wrapper around its svd."""
    try:
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr):
            import weightwatcher as ww
            import weightwatcher.weightwatcher as wwm
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    calls: list = []
    try:
        with timed_calls(wwm, "svd_vals", calls), contextlib.redirect_stdout(sys.stderr):
            start = perf_counter()
            watcher = ww.WeightWatcher(model=model)
            details = watcher.analyze()
            total = perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        return {"available": True, "error": f"analyze failed: {type(exc).__name__}: {exc}"}
    per = {}
    rows = details.to_dict("records")
    for i, row in enumerate(rows):
        name = str(row.get("longname") or row.get("name"))
        smax, smin = float(row["sv_max"]), float(row["sv_min"])
        per[name] = {
            "kappa": smax / smin if smin > 0 else math.inf,
            "sigma_max": smax,
            "sigma_min": smin,
            "seconds": calls[i][1] if len(calls) == len(rows) else None,
            "alpha": _finite(row.get("alpha")),
        }
    return {
        "available": True,
        "version": getattr(ww, "__version__", "?"),
        "total_seconds": total,
        "per_matrix": per,
        "svd": "float64 scipy.linalg.svd (weightwatcher's CPU path), plus power-law fits",
    }


def _finite(v):
    with contextlib.suppress(TypeError, ValueError):
        v = float(v)
        return v if math.isfinite(v) else None
    return None


def linear_module(named: dict) -> nn.Module:
    """An nn.Module holding ``{dotted.name: (out,in) tensor}`` as bias-free float32 nn.Linear layers."""
    root = nn.Module()
    for name, w in named.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(to_t32(w).clone(), requires_grad=False)
        parent.add_module(leaf, layer)
    return root


def compare(results: dict, ref: dict, names: list[str]) -> dict:
    """Per tool: total seconds over ``names``, relative kappa errors vs ``ref``."""
    errs, secs = [], 0.0
    for n in names:
        r = results.get(n)
        if r is None:
            continue
        e = abs(r["kappa"] - ref[n]["kappa"]) / ref[n]["kappa"]
        r["rel_err"] = e
        errs.append(e)
        secs += r["seconds"] or 0.0
    return {
        "n": len(errs),
        "seconds": secs,
        "max_rel_err": max(errs) if errs else None,
        "median_rel_err": float(np.median(errs)) if errs else None,
    }


# ==============================================================================================
# a subprocess, measured


def conditune_command() -> list[str]:
    exe = Path(sys.executable).parent / "conditune"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "conditune"]


def cli_has_scan() -> bool:
    with contextlib.suppress(Exception):
        return (
            subprocess.run(
                conditune_command() + ["scan", "--help"], capture_output=True, timeout=120, cwd=ROOT
            ).returncode
            == 0
        )
    return False


def measure_subprocess(cmd: list[str], log_path: Path, timeout: float, poll: float = 0.05) -> dict:
    """Run ``cmd``; wall time, peak RSS of its process tree (psutil polling; total and anonymous =
    rss - file-backed/shared), and /usr/bin/time -v's maximum resident set size when available."""
    time_v = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").is_file() else None)
    time_file = log_path.with_suffix(".time.txt")
    full = ([time_v, "-v", "-o", str(time_file)] if time_v else []) + cmd
    peak_rss = peak_anon = 0
    samples = 0
    with open(log_path, "w") as out:
        start = perf_counter()
        proc = psutil.Popen(full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        timed_out = False
        while proc.poll() is None:
            rss = anon = 0
            with contextlib.suppress(psutil.Error):
                tree = [proc] + proc.children(recursive=True)
                for p in tree:
                    if time_v and p.pid == proc.pid:
                        continue  # /usr/bin/time itself
                    with contextlib.suppress(psutil.Error):
                        mem = p.memory_info()
                        rss += mem.rss
                        anon += mem.rss - getattr(mem, "shared", 0)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            samples += 1
            if perf_counter() - start > timeout:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # our own child's session only
                with contextlib.suppress(psutil.TimeoutExpired):
                    proc.wait(30)
                break
            time.sleep(poll)
        wall = perf_counter() - start
    result = {
        "command": cmd,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_seconds": wall,
        "peak_rss_bytes_psutil": peak_rss,
        "peak_anon_rss_bytes_psutil": peak_anon,
        "rss_samples": samples,
        "log": str(log_path),
    }
    if time_v and time_file.is_file():
        tv = parse_time_v(time_file.read_text())
        result["time_v"] = tv
        if "max_rss_kbytes" in tv:
            result["peak_rss_bytes_time_v"] = tv["max_rss_kbytes"] * 1024
    result["peak_rss_bytes"] = max(peak_rss, result.get("peak_rss_bytes_time_v", 0))
    with contextlib.suppress(OSError):
        result["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    return result


def parse_time_v(text: str) -> dict:
    keys = {
        "Maximum resident set size (kbytes)": "max_rss_kbytes",
        "User time (seconds)": "user_seconds",
        "System time (seconds)": "system_seconds",
        "Percent of CPU this job got": "cpu_percent",
        "Major (requiring I/O) page faults": "major_page_faults",
        "File system inputs": "fs_inputs_512b",
    }
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in keys:
            with contextlib.suppress(ValueError):
                out[keys[key]] = float(value.rstrip("%")) if "." in value or "%" in value else int(value)
    return out


# ==============================================================================================
# small helpers


def sum_by(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        out[key] = out.get(key, 0.0) + value
    return out


def count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def fmt_x(x) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def fmt_s(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_e(x) -> str:
    return "—" if x is None else f"{x:.1e}"
