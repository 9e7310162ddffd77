#!/usr/bin/env python
"""Benchmark of conditune's spectral scanner against SVD-based tools.

Three parts, each writing its own section of the results (see benchmarks/README.md):

``block``       one Llama-3-8B-shaped decoder block (7 matrices) with prescribed, realistic spectra
                stored in bf16; conditune vs PEFT KappaTuneSelector, SciPy/torch float32 svdvals,
                WeightWatcher and a float64 LAPACK SVD (the reference), timed per matrix.
``smollm2``     the real SmolLM2-135M (GGUF Q4_1, dequantised): all 211 matrices, errors, times and
                agreement of the lowest-100-by-kappa sets with the float64 reference.
``checkpoint``  a generated Llama-3-8B-shaped bf16 checkpoint (~16 GB, sharded safetensors) scanned
                end to end by ``conditune scan DIR --output FILE --no-cache`` in a subprocess: wall
                time and peak RSS.

    python benchmarks/bench_scan.py                      # full run (all parts)
    OMP_NUM_THREADS=1 python benchmarks/bench_scan.py --quick   # smoke test, shapes / 8

Results: ``--output`` (JSON) and the same name with ``.md``. Both are rewritten atomically after
every part; sections of parts not run this time are kept from an existing file of the same mode.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
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
GiB = 1024**3

# Llama-3-8B decoder block, nn.Linear (out, in) convention; nominal kappa of the prescribed spectrum.
# The stored bf16 matrix has a slightly different kappa (rounding); the reference is always the
# float64 SVD of the stored values.
BLOCK = [
    ("self_attn.q_proj", (4096, 4096), 1e4),
    ("self_attn.k_proj", (1024, 4096), 4.0),
    ("self_attn.v_proj", (1024, 4096), 25.0),
    ("self_attn.o_proj", (4096, 4096), 5e4),
    ("mlp.gate_proj", (14336, 4096), 60.0),
    ("mlp.up_proj", (14336, 4096), 300.0),
    ("mlp.down_proj", (4096, 14336), 1500.0),
]
LLAMA3_8B = dict(hidden=4096, intermediate=14336, kv=1024, vocab=128256, layers=32)
QUICK_FACTOR = 8

TARGET_SPEEDUP_SCIPY = 10.0
TARGET_SPEEDUP_PEFT = 50.0
TARGET_KAPPA_ERR = 1e-4
TARGET_SCAN_SECONDS = 20 * 60
TARGET_SCAN_RSS = 4 * GiB

log = logging.getLogger("bench_scan")


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
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ
        },
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "blas": _blas_info(),
        "git_commit": _git_commit(),
    }
    return info


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


def _t32(x) -> torch.Tensor:
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
    }


def kappa_scipy32(x):
    return _from_sv(sla.svdvals(_np32(x), check_finite=False))


def kappa_torch32(x):
    return _from_sv(torch.linalg.svdvals(_t32(x)).numpy())


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
        layer.weight = nn.Parameter(_t32(w).clone(), requires_grad=False)
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
# part 1: one Llama-3-8B-shaped block with prescribed spectra


def mp_quantiles(count: int, aspect: float) -> np.ndarray:
    """``count`` singular values at the quantiles of the Marchenko-Pastur law of aspect ratio
    ``aspect`` (descending, unit-variance scale): a random-matrix-like bulk."""
    lo, hi = (1 - aspect**0.5) ** 2, (1 + aspect**0.5) ** 2
    lam = np.linspace(lo, hi, 20001)
    dens = np.sqrt(np.clip((hi - lam) * (lam - lo), 0, None)) / (2 * np.pi * aspect * lam)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(lam))])
    q = (np.arange(count) + 0.5) / count
    return np.sqrt(np.interp(q, cdf / cdf[-1], lam))[::-1]


def realistic_spectrum(m: int, n: int, kappa: float, n_outliers: int = 4, tail_fraction: float = 0.02) -> np.ndarray:
    """Descending singular values with exactly ``kappa`` = s[0]/s[-1]: a few large outliers, an
    MP bulk stretched into a power-law-like shape, and a geometric lower tail (2 %), scaled so the
    entries have RMS 0.02 (like a trained Llama weight)."""
    r = min(m, n)
    aspect = min(r / max(m, n), 0.5)  # square matrices: a bulk with a finite lower edge
    n_tail = max(2, int(r * tail_fraction))
    bulk = mp_quantiles(r - n_outliers - n_tail, aspect)
    bulk /= bulk[0]
    ratio = 1.0 / bulk[-1]
    budget = kappa / ratio
    if budget <= 1.0:  # compress the bulk; no outliers, flat tail
        bulk = bulk ** (math.log(kappa) / math.log(ratio))
        outliers, tail = np.ones(n_outliers), np.full(n_tail, bulk[-1])
    else:  # outliers up to x3, half of the rest (in log) stretches the bulk, the tail takes the other half
        f_out = min(budget, 3.0)
        rest = budget / f_out
        p = 1.0 + 0.5 * math.log(rest) / math.log(ratio)
        bulk = bulk**p
        t = rest / ratio ** (p - 1.0)
        outliers = np.geomspace(f_out, f_out**0.3, n_outliers)
        tail = bulk[-1] * np.geomspace(1.0, 1.0 / t, n_tail + 1)[1:]
    s = np.concatenate([outliers, bulk, tail])
    return s * (0.02 * math.sqrt(m * n) / np.linalg.norm(s))


def make_matrix(shape: tuple[int, int], kappa: float, seed: int) -> torch.Tensor:
    """W = U diag(s) V^T with orthonormal U, V (QR of float64 Gaussians), stored in bf16."""
    m, n = shape
    r = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    s = torch.from_numpy(realistic_spectrum(m, n, kappa))
    u = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen))[0]
    w = (u * s) @ v.T
    return w.to(torch.bfloat16)


def load_or_make_block(seed: int, factor: int) -> tuple[dict, dict, float]:
    """The 7 block matrices (bf16, shapes / ``factor``), cached in benchmarks/.cache keyed by seed and size."""
    from safetensors.torch import load_file, save_file

    path = CACHE / f"block_seed{seed}_div{factor}_v1.safetensors"
    nominal = {name: kappa for name, _, kappa in BLOCK}
    if path.is_file():
        log.info("block: loading cached matrices from %s", path)
        return load_file(path), nominal, 0.0
    log.info("block: generating %d matrices (QR of Gaussians; cached afterwards in %s)", len(BLOCK), path)
    start = perf_counter()
    mats = {}
    for i, (name, (m, n), kappa) in enumerate(BLOCK):
        mats[name] = make_matrix((m // factor, n // factor), kappa, seed * 1000 + i)
        log.info("  generated %-18s %s", name, tuple(mats[name].shape))
    CACHE.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
    os.close(fd)
    save_file(
        mats, tmp, metadata={"seed": str(seed), "shape_divisor": str(factor), "nominal_kappa": json.dumps(nominal)}
    )
    os.replace(tmp, path)
    return mats, nominal, perf_counter() - start


def part_block(args) -> dict:
    mats, nominal, gen_seconds = load_or_make_block(args.seed, args.shrink)
    names = [name for name, _, _ in BLOCK]
    slow_names = [n for n in names if not args.slow_subset or any(k in n for k in args.slow_subset)]
    section: dict = {
        "description": "One Llama-3-8B-shaped decoder block, prescribed spectra, stored bf16",
        "generation_seconds": gen_seconds,
        "matrices": {n: {"shape": list(mats[n].shape), "nominal_kappa": nominal[n]} for n in names},
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }
    warm_up()
    tools: dict = {}
    for key, (label, fn) in PER_MATRIX_TOOLS.items():
        log.info("block: %s", label)
        tools[key] = {"label": label, "per_matrix": run_per_matrix_tool(fn, mats, key)}
    ref = tools["float64_svd"]["per_matrix"]
    for n in names:
        section["matrices"][n]["kappa_ref"] = ref[n]["kappa"]

    log.info("block: PEFT KappaTuneSelector on %d nn.Linear layers (float32)", len(slow_names))
    peft = run_peft(linear_module({n: mats[n] for n in slow_names}))
    tools["peft"] = {"label": "PEFT KappaTuneSelector.get_best_targets (torch.linalg.svdvals float32)", **peft}
    if args.no_weightwatcher:
        tools["weightwatcher"] = {
            "label": "WeightWatcher analyze()",
            "available": False,
            "error": "skipped (--no-weightwatcher)",
        }
    else:
        log.info("block: WeightWatcher analyze() on %d layers", len(slow_names))
        tools["weightwatcher"] = {
            "label": "WeightWatcher analyze() (float64 SVD + power-law fits)",
            **run_weightwatcher(linear_module({n: mats[n] for n in slow_names})),
        }

    for key, tool in tools.items():
        if "per_matrix" not in tool:
            continue
        subset = names if key in PER_MATRIX_TOOLS else slow_names
        tool["summary"] = compare(tool["per_matrix"], ref, subset)
        tool["matrices_timed"] = subset
    conditune = tools["conditune"]["per_matrix"]
    for key, tool in tools.items():
        if "summary" not in tool or key == "conditune":
            continue
        subset = tool["matrices_timed"]
        c_secs = sum(conditune[n]["seconds"] for n in subset)
        total = tool.get("total_seconds", tool["summary"]["seconds"])
        tool["speedup_of_conditune"] = total / c_secs if c_secs else None
    c = tools["conditune"]["per_matrix"]
    section["conditune_bound_holds"] = all(c[n]["rel_err"] <= max(c[n]["kappa_rel_err_bound"], 1e-15) for n in names)
    section["slow_tools_subset"] = slow_names if slow_names != names else "all"
    section["tools"] = tools
    section["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return section


# ==============================================================================================
# part 2: the real SmolLM2-135M

GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> transformers module name (the tied embedding is the lm_head)."""
    if gguf_name == "token_embd.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}"
    return None


def load_smollm2(quick: bool) -> tuple[Path, dict, dict]:
    """(gguf path, {gguf name: float32 (out,in) matrix}, info). Quick: blocks 0-3 + embedding."""
    import gguf

    from conditune.models import fetch

    path = Path(fetch("smollm2"))
    reader = gguf.GGUFReader(str(path))
    mats, types = {}, {}
    start = perf_counter()
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        if quick and t.name.startswith("blk.") and int(t.name.split(".")[1]) >= 4:
            continue
        mats[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return path, mats, {"dequantise_seconds": perf_counter() - start, "quant_types": types}


def part_smollm2(args) -> dict:
    path, mats, info = load_smollm2(args.quick)
    names = list(mats)
    section: dict = {
        "description": "SmolLM2-135M-Instruct GGUF Q4_1, dequantised to float32",
        "model": str(path),
        "n_matrices": len(names),
        "subset": "blocks 0-3 + token_embd (quick)" if args.quick else "all 2-D tensors",
        **info,
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }
    warm_up()
    tools: dict = {}
    for key, (label, fn) in PER_MATRIX_TOOLS.items():
        log.info("smollm2: %s on %d matrices", label, len(names))
        tools[key] = {"label": label, "per_matrix": run_per_matrix_tool(fn, mats, key)}
    ref = tools["float64_svd"]["per_matrix"]

    # PEFT on the model as transformers loads it (the fair comparison), names mapped back to GGUF.
    log.info("smollm2: loading with transformers for PEFT")
    try:
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        start = perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        load_seconds = perf_counter() - start
        if args.quick:  # the same subset as the other tools, sharing the loaded parameters
            modules = dict(model.named_modules())
            model = linear_module(
                {hf_name(n): modules[hf_name(n)].weight.detach() for n in names if hf_name(n) in modules}
            )
        log.info("smollm2: PEFT KappaTuneSelector")
        peft = run_peft(model)
        back = {hf_name(n): n for n in names}
        if "per_matrix" in peft:
            peft["per_matrix"] = {back[k]: v for k, v in peft["per_matrix"].items() if k in back}
            peft["skipped"] = [back.get(k, k) for k in peft["skipped"]]
        tools["peft"] = {
            "label": "PEFT KappaTuneSelector.get_best_targets on the transformers model",
            "model_load_seconds": load_seconds,
            **peft,
        }
        del model
    except Exception as exc:  # noqa: BLE001
        tools["peft"] = {"label": "PEFT KappaTuneSelector", "available": False, "error": f"{type(exc).__name__}: {exc}"}
    gc.collect()

    conditune = tools["conditune"]["per_matrix"]
    for key, tool in tools.items():
        if "per_matrix" not in tool:
            continue
        subset = [n for n in names if n in tool["per_matrix"]]
        tool["summary"] = compare(tool["per_matrix"], ref, subset)
        tool["ranking"] = ranking_agreement(tool["per_matrix"], ref, subset)
        if key != "conditune":
            c_secs = sum(conditune[n]["seconds"] for n in subset)
            tool["speedup_of_conditune"] = tool.get("total_seconds", tool["summary"]["seconds"]) / c_secs
    section["conditune_bound_holds"] = all(
        conditune[n]["rel_err"] <= max(conditune[n]["kappa_rel_err_bound"], 1e-15) for n in names
    )
    section["conditune_methods"] = _count(v["method"] for v in conditune.values())
    section["kappa_ref_range"] = [min(r["kappa"] for r in ref.values()), max(r["kappa"] for r in ref.values())]
    section["tools"] = tools
    section["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return section


def ranking_agreement(per: dict, ref: dict, subset: list[str], k: int = 100) -> dict:
    """How many of the ``k`` lowest-kappa matrices (by the tool) are among the reference's ``k``
    lowest, over the same matrices; also the largest rank displacement."""
    k = min(k, len(subset) // 2)
    by_tool = sorted(subset, key=lambda n: per[n]["kappa"])
    by_ref = sorted(subset, key=lambda n: ref[n]["kappa"])
    ref_rank = {n: i for i, n in enumerate(by_ref)}
    return {
        "k": k,
        "n": len(subset),
        "overlap": len(set(by_tool[:k]) & set(by_ref[:k])),
        "identical_order": by_tool == by_ref,
        "max_rank_shift": max(abs(i - ref_rank[n]) for i, n in enumerate(by_tool)),
    }


def _sum_by(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        out[key] = out.get(key, 0.0) + value
    return out


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# ==============================================================================================
# part 3: a whole Llama-3-8B-shaped bf16 checkpoint, scanned by the CLI


def checkpoint_config(args) -> dict:
    cfg = dict(LLAMA3_8B)
    cfg = {k: (v // args.shrink if k != "layers" else v) for k, v in cfg.items()}
    if args.quick:
        cfg["layers"] = 2
    if args.layers is not None:
        cfg["layers"] = args.layers
    return cfg


def checkpoint_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv, v = cfg["hidden"], cfg["intermediate"], cfg["kv"], cfg["vocab"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _tensor_chunks(name: str, shape: tuple[int, ...], seed: int, chunk: int = 1 << 25):
    """bf16 bytes of one tensor, generated in chunks: N(0, 0.02^2) for matrices, ones for norms."""
    numel = math.prod(shape)
    if len(shape) == 1:
        yield torch.ones(numel, dtype=torch.bfloat16).view(torch.int16).numpy()
        return
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    for start in range(0, numel, chunk):
        block = torch.randn(min(chunk, numel - start), generator=gen).mul_(0.02)
        yield block.to(torch.bfloat16).view(torch.int16).numpy()


def write_safetensors_streaming(path: Path, specs: list, seed: int) -> None:
    """Write a bf16 safetensors file tensor by tensor (header first, then the data streamed)."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, shape in specs:
            for data in _tensor_chunks(name, shape, seed):
                handle.write(memoryview(data))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    drop_page_cache(path)


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to evict a (clean) file from the page cache: the scan then reads from disk."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_checkpoint(cfg: dict, seed: int, shard_bytes: int) -> tuple[Path, dict]:
    folder = (
        CACHE / f"llama3-8b-shape_L{cfg['layers']}_h{cfg['hidden']}_i{cfg['intermediate']}_v{cfg['vocab']}_seed{seed}"
    )
    specs = checkpoint_tensors(cfg)
    total = sum(math.prod(s) * 2 for _, s in specs)
    info = {
        "folder": str(folder),
        "n_tensors": len(specs),
        "n_matrices": sum(len(s) == 2 for _, s in specs),
        "total_bytes": total,
        "total_gib": round(total / GiB, 2),
        "params": total // 2,
    }
    if (folder / ".complete").is_file():
        log.info("checkpoint: reusing %s (%.1f GiB)", folder, total / GiB)
        info["generation_seconds"] = 0.0
        info["cached"] = True
        return folder, info
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free
    info["disk_free_gib_before"] = round(free / GiB, 1)
    if free < total + 2 * GiB:
        raise RuntimeError(
            f"not enough disk for the checkpoint: {total / GiB:.1f} GiB needed (+2 GiB margin), {free / GiB:.1f} GiB free in {CACHE}"
        )
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log.info("checkpoint: writing %.1f GiB in %d shards to %s", total / GiB, len(shards), folder)
    start = perf_counter()
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(folder / fname, shard, seed)
        weight_map.update({name: fname for name, _ in shard})
        log.info("  wrote %s (%d tensors, %.1fs so far)", fname, len(shard), perf_counter() - start)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": cfg["hidden"],
                "intermediate_size": cfg["intermediate"],
                "num_hidden_layers": cfg["layers"],
                "num_attention_heads": cfg["hidden"] // 128,
                "num_key_value_heads": cfg["kv"] // 128 or 1,
                "vocab_size": cfg["vocab"],
                "torch_dtype": "bfloat16",
                "tie_word_embeddings": False,
            },
            indent=2,
        )
    )
    (folder / ".complete").write_text("ok\n")
    info["generation_seconds"] = perf_counter() - start
    info["cached"] = False
    info["n_shards"] = len(shards)
    return folder, info


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


def verify_against_reference(folder: Path, records: list, names: list[str]) -> dict:
    """float64 SVD kappa of a few checkpoint matrices vs the scan's records."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    by_name = {r.name: r for r in records}
    out = {}
    for name in names:
        rec = by_name.get(name) or by_name.get(name.removesuffix(".weight"))
        if rec is None or rec.kappa is None:
            out[name] = {"error": "no record with a kappa"}
            continue
        with safe_open(folder / index[name], framework="pt") as f:
            w = f.get_tensor(name)
        kappa_ref, _ = kappa_reference(w)
        out[name] = {
            "kappa_scan": rec.kappa,
            "kappa_ref": kappa_ref,
            "rel_err": abs(rec.kappa - kappa_ref) / kappa_ref,
            "bound": rec.kappa_rel_err,
            "method": rec.method,
        }
        log.info("  verify %-40s scan %.6g ref %.6g rel err %.2e", name, rec.kappa, kappa_ref, out[name]["rel_err"])
    return out


def part_checkpoint(args) -> dict:
    cfg = checkpoint_config(args)
    section: dict = {
        "description": "Generated Llama-3-8B-shaped bf16 checkpoint (N(0, 0.02^2) weights), scanned by the CLI",
        "config": cfg,
        "target_configuration": (not args.quick and cfg == LLAMA3_8B),
    }
    shard_bytes = 16 * 10**6 if args.quick else 5 * 10**9 // args.shrink**2
    folder, info = make_checkpoint(cfg, args.seed, shard_bytes)
    section["checkpoint"] = info
    try:
        return _scan_checkpoint(args, cfg, folder, section)
    finally:
        if args.delete_checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
            info["deleted_after_run"] = True


def _scan_checkpoint(args, cfg: dict, folder: Path, section: dict) -> dict:
    try:
        from conditune.scanning import scan_source  # noqa: F401

        section["scan_source_available"] = True
    except Exception as exc:  # noqa: BLE001
        section["scan_source_available"] = f"no ({type(exc).__name__}: {exc})"
    for f in folder.glob("*.safetensors"):
        drop_page_cache(f)  # cold-ish start: the scan reads from disk, not from RAM
    out_dir = Path(args.output).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    scan_out = out_dir / f"scan_checkpoint{args.tag}.json"
    cmd = conditune_command() + ["scan", str(folder), "--output", str(scan_out), "--no-cache"]
    if not cli_has_scan():  # the CLI command is not there yet: the same work through the library
        section["cli_fallback"] = (
            "`conditune scan` missing: ran scan_source(..., cache=False) + write_records in a subprocess"
        )
        code = (
            "import sys; from conditune.scanning import scan_source, write_records; "
            "records, meta = scan_source(sys.argv[1], cache=False, progress=False); write_records(records, sys.argv[2], meta)"
        )
        cmd = [sys.executable, "-c", code, str(folder), str(scan_out)]
    log.info("checkpoint: %s", " ".join(cmd))
    section["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
    run = measure_subprocess(cmd, out_dir / f"scan_checkpoint{args.tag}.log", timeout=args.scan_timeout)
    section["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    section["scan"] = run
    log.info(
        "checkpoint: rc %s, %.1fs, peak RSS %.2f GiB",
        run["returncode"],
        run["wall_seconds"],
        run["peak_rss_bytes"] / GiB,
    )
    if run["returncode"] == 0 and scan_out.is_file():
        from conditune.scanning.records import read_records

        records, meta = read_records(scan_out)
        ok = [r for r in records if r.kappa is not None]
        section["records"] = {
            "file": str(scan_out),
            "n": len(records),
            "status": _count(r.status for r in records),
            "methods": _count(r.method for r in records),
            "kappa_range": [min(r.kappa for r in ok), max(r.kappa for r in ok)] if ok else None,
            "max_kappa_rel_err_bound": max((r.kappa_rel_err for r in ok if r.kappa_rel_err is not None), default=None),
            "sum_record_seconds": sum(r.seconds or 0.0 for r in records),
            "seconds_by_kind": {
                k: round(v, 2) for k, v in _sum_by((r.kind, r.seconds or 0.0) for r in records).items()
            },
            "slowest": [
                (r.name, r.method, round(r.seconds, 2)) for r in sorted(ok, key=lambda r: -(r.seconds or 0.0))[:5]
            ],
        }
        verify = [n for n, s in checkpoint_tensors(cfg) if len(s) == 2]
        if not args.quick:  # float64 SVDs of 4096-wide matrices take a while: layer 0 attention only
            verify = [n for n in verify if n.startswith("model.layers.0.self_attn.")]
        log.info("checkpoint: verifying %d matrices against float64 SVD", len(verify))
        section["verification"] = verify_against_reference(folder, records, verify)
    return section


# ==============================================================================================
# targets and report


def evaluate_targets(results: dict) -> list[dict]:
    targets = []

    def add(name, value, ok, note=""):
        targets.append({"target": name, "value": value, "pass": ok, "note": note})

    block = results.get("block")
    if block:
        tools = block["tools"]
        sp = tools.get("scipy_f32", {}).get("speedup_of_conditune")
        add(
            f"block: conditune >= {TARGET_SPEEDUP_SCIPY:g}x faster than SciPy float32 svdvals",
            _fmt_x(sp),
            sp is not None and sp >= TARGET_SPEEDUP_SCIPY,
        )
        pp = tools.get("peft", {}).get("speedup_of_conditune")
        subset = block.get("slow_tools_subset")
        add(
            f"block: conditune >= {TARGET_SPEEDUP_PEFT:g}x faster than PEFT KappaTuneSelector",
            _fmt_x(pp),
            pp is not None and pp >= TARGET_SPEEDUP_PEFT,
            "" if subset == "all" else f"on the subset {subset}",
        )
        err = tools["conditune"]["summary"]["max_rel_err"]
        add(f"block: conditune kappa rel. error <= {TARGET_KAPPA_ERR:g}", f"{err:.2e}", err <= TARGET_KAPPA_ERR)
    sm = results.get("smollm2")
    if sm:
        err = sm["tools"]["conditune"]["summary"]["max_rel_err"]
        add(f"smollm2: conditune kappa rel. error <= {TARGET_KAPPA_ERR:g}", f"{err:.2e}", err <= TARGET_KAPPA_ERR)
    ck = results.get("checkpoint")
    if ck and "scan" in ck:
        run = ck["scan"]
        note = (
            "" if ck.get("target_configuration") else "not the target configuration (quick / --layers): indicative only"
        )
        ok_run = run["returncode"] == 0 and not run["timed_out"]
        add(
            f"checkpoint: 8B-shaped scan < {TARGET_SCAN_SECONDS // 60} min",
            f"{run['wall_seconds']:.1f} s" + ("" if ok_run else f" (rc {run['returncode']})"),
            ok_run and run["wall_seconds"] < TARGET_SCAN_SECONDS,
            note,
        )
        add(
            f"checkpoint: peak RSS < {TARGET_SCAN_RSS / GiB:g} GiB",
            f"{run['peak_rss_bytes'] / GiB:.2f} GiB",
            ok_run and run["peak_rss_bytes"] < TARGET_SCAN_RSS,
            note,
        )
    elif ck and "error" in ck:
        add("checkpoint: 8B-shaped scan", ck["error"], False)
    return targets


def _fmt_x(x) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def _s(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _e(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def render_markdown(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    title = " (QUICK: smoke test only)" if results["quick"] else ""
    if results.get("shrink", 1) != 1:
        title += f" (block and checkpoint shapes / {results['shrink']})"
    lines = [
        f"# conditune scan benchmark{title}",
        "",
        f"Generated by `benchmarks/bench_scan.py` on {m['date_utc']} ({' '.join(results['argv']) or 'no arguments'}).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores (affinity {m['affinity_cores']}), "
        f"RAM {m['ram_gib']} GiB; load average at start {m['load_avg_at_start']}",
        f"- threads: torch {m['torch_threads']}, env {m['thread_env'] or 'unset'}",
        f"- numpy {v['numpy']} ({m['blas'].get('numpy_blas', '?')}), scipy {v['scipy']}, torch {v['torch']} (BLAS {m['blas'].get('torch_blas_info', '?')}), "
        f"peft {v['peft']}, transformers {v['transformers']}, weightwatcher {v['weightwatcher']}, conditune {v['conditune']}",
        f"- git commit {m.get('git_commit')}",
        "",
    ]
    targets = results.get("targets", [])
    if targets:
        lines += ["## Targets", "", "| target | measured | result | note |", "|---|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['value']} | **{'PASS' if t['pass'] else 'FAIL'}** | {t['note']} |" for t in targets
        ]
        lines.append("")
    if "block" in results:
        lines += _md_block(results["block"])
    if "smollm2" in results:
        lines += _md_smollm2(results["smollm2"])
    if "checkpoint" in results:
        lines += _md_checkpoint(results["checkpoint"])
    return "\n".join(lines) + "\n"


def _md_tool_summary(tools: dict, extra_cols=()) -> list[str]:
    head = "| tool | matrices | time (s) | conditune faster by | max rel. κ error | median rel. κ error |" + "".join(
        f" {c} |" for c, _ in extra_cols
    )
    lines = [head, "|" + "---|" * (6 + len(extra_cols))]
    for key, t in tools.items():
        if "summary" not in t:
            lines.append(
                f"| {t.get('label', key)} | — | — | — | {t.get('error', 'unavailable')} | — |"
                + " — |" * len(extra_cols)
            )
            continue
        s = t["summary"]
        secs = t.get("total_seconds", s["seconds"])
        speed = "1 (itself)" if key == "conditune" else _fmt_x(t.get("speedup_of_conditune"))
        if key == "float64_svd":
            err_max = err_med = "reference"
        else:
            err_max, err_med = _e(s["max_rel_err"]), _e(s["median_rel_err"])
        lines.append(
            f"| {t['label']} | {s['n']} | {_s(secs)} | {speed} | {err_max} | {err_med} |"
            + "".join(f" {fn(t)} |" for _, fn in extra_cols)
        )
    return lines


def _md_block(b: dict) -> list[str]:
    tools = b["tools"]
    keys = [
        k
        for k in ("float64_svd", "conditune", "scipy_f32", "torch_f32", "peft", "weightwatcher")
        if "per_matrix" in tools.get(k, {})
    ]
    lines = [
        "## 1. One Llama-3-8B-shaped block (bf16, prescribed spectra)",
        "",
        f"{b['description']}. W = U diag(s) Vᵀ (U, V from QR of float64 Gaussians), s = outliers + Marchenko–Pastur-like "
        "bulk stretched to a power law + geometric lower tail, entries RMS 0.02, rounded to bf16. Reference: "
        "`numpy.linalg.svd(W.double(), compute_uv=False)` of the same bf16 values. Every tool starts from the bf16 tensor "
        "(its conversion is timed); PEFT and WeightWatcher run on an nn.Module holding the matrices as float32 nn.Linear layers.",
        f"Generation {_s(b['generation_seconds'])} s (0 = cached). Load average before/after: {b['load_avg_before']} / {b['load_avg_after']}.",
        "",
        *_md_tool_summary(tools),
        "",
        "Per matrix: seconds and relative κ error vs the float64 reference.",
        "",
        "| matrix | shape | nominal κ | reference κ | conditune method | "
        + " | ".join(f"{k} s" for k in keys)
        + " | "
        + " | ".join(f"{k} err" for k in keys if k != "float64_svd")
        + " |",
        "|" + "---|" * (5 + 2 * len(keys) - 1),
    ]
    for name, mat in b["matrices"].items():
        c = tools["conditune"]["per_matrix"][name]
        row = [
            name,
            "×".join(map(str, mat["shape"])),
            f"{mat['nominal_kappa']:.3g}",
            f"{mat['kappa_ref']:.6g}",
            c["method"],
        ]
        row += [_s(tools[k]["per_matrix"].get(name, {}).get("seconds")) for k in keys]
        row += [_e(tools[k]["per_matrix"].get(name, {}).get("rel_err")) for k in keys if k != "float64_svd"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"conditune's own per-matrix error bound holds on every matrix: {b['conditune_bound_holds']}.",
        "PEFT computes κ = S[0] / (S[-1] + 1e-8) from float32 `torch.linalg.svdvals`; its per-matrix seconds are the svdvals calls, "
        "its total is the whole `get_best_targets()`. WeightWatcher's total includes its power-law fits; per-matrix seconds are its SVD calls.",
    ]
    if b.get("slow_tools_subset") != "all":
        lines.append(
            f"PEFT and WeightWatcher ran on the subset {b['slow_tools_subset']}; their speed ratios compare against conditune on that subset."
        )
    for k in ("peft", "weightwatcher"):
        if tools.get(k, {}).get("error"):
            lines.append(f"{k}: {tools[k]['error']}")
    return lines + [""]


def _md_smollm2(s: dict) -> list[str]:
    tools = s["tools"]
    rank = (
        "lowest-k overlap with float64",
        lambda t: (
            f"{t['ranking']['overlap']}/{t['ranking']['k']} (max shift {t['ranking']['max_rank_shift']})"
            if "ranking" in t
            else "—"
        ),
    )
    lines = [
        "## 2. Real SmolLM2-135M (GGUF, dequantised)",
        "",
        f"{s['description']}; {s['n_matrices']} matrices ({s['subset']}), quantisation types {s['quant_types']}, reference κ range "
        f"{s['kappa_ref_range'][0]:.4g} … {s['kappa_ref_range'][1]:.4g}. conditune methods: {s['conditune_methods']}. "
        f"Load average before/after: {s['load_avg_before']} / {s['load_avg_after']}.",
        "",
    ]
    lines += _md_tool_summary(tools, [rank])
    peft = tools.get("peft", {})
    lines += [
        "",
        "Ranking: of the k lowest-κ matrices by each tool, how many are among the k lowest by the float64 reference (same matrix set; "
        "k = 100, or half the matrices in quick mode); max shift = largest rank displacement.",
        f"conditune's own per-matrix error bound holds on every matrix: {s['conditune_bound_holds']}.",
    ]
    if peft.get("available"):
        lines.append(
            f"PEFT ran on the transformers-loaded model (load {_s(peft.get('model_load_seconds'))} s, not counted); skipped (a side > "
            f"{peft.get('max_dim_size_to_analyze')}): {peft.get('skipped')}."
        )
    elif peft:
        lines.append(f"PEFT: {peft.get('error')}")
    return lines + [""]


def _md_checkpoint(c: dict) -> list[str]:
    lines = ["## 3. Whole Llama-3-8B-shaped bf16 checkpoint, `conditune scan`", ""]
    if "error" in c:
        return lines + [f"Not run: {c['error']}", ""]
    info, run = c["checkpoint"], c["scan"]
    lines += [
        f"{c['description']}: config {c['config']}, {info['n_tensors']} tensors ({info['n_matrices']} matrices), {info['total_gib']} GiB, "
        f"generation {_s(info.get('generation_seconds'))} s (0 = cached). Page cache of the shards dropped before the scan (posix_fadvise).",
        "",
        f"- command: `{' '.join(run['command'])}`" + (f" — {c['cli_fallback']}" if c.get("cli_fallback") else ""),
        f"- exit code {run['returncode']}{' (TIMED OUT)' if run['timed_out'] else ''}; wall time **{run['wall_seconds']:.1f} s**",
        f"- peak RSS **{run['peak_rss_bytes'] / GiB:.2f} GiB** (psutil process tree {run['peak_rss_bytes_psutil'] / GiB:.2f} GiB, of which anonymous "
        f"{run['peak_anon_rss_bytes_psutil'] / GiB:.2f} GiB; /usr/bin/time -v {run.get('peak_rss_bytes_time_v', 0) / GiB:.2f} GiB)",
    ]
    tv = run.get("time_v", {})
    if tv:
        lines.append(
            f"- CPU: user {tv.get('user_seconds')} s, system {tv.get('system_seconds')} s, {tv.get('cpu_percent')} % CPU; major page faults {tv.get('major_page_faults')}"
        )
    lines.append(f"- load average before/after: {c.get('load_avg_before')} / {c.get('load_avg_after')}")
    rec = c.get("records")
    if rec:
        kr = rec["kappa_range"]
        lines.append(
            f"- records: {rec['n']}, status {rec['status']}, methods {rec['methods']}, κ range {kr[0]:.4g} … {kr[1]:.4g}, "
            f"max κ error bound {_e(rec['max_kappa_rel_err_bound'])}"
        )
        lines.append(
            f"- scanner seconds by tensor kind (sum of record seconds {rec['sum_record_seconds']:.1f} s): {rec['seconds_by_kind']}"
        )
        lines.append(f"- slowest records: {rec['slowest']}")
    ver = c.get("verification")
    if ver:
        errs = [x["rel_err"] for x in ver.values() if "rel_err" in x]
        lines.append(
            f"- checked against float64 SVD: {len(errs)} matrices, max rel. κ error {_e(max(errs) if errs else None)}"
        )
    if run["returncode"] != 0:
        lines += ["", "Log tail:", "", "```", *run.get("log_tail", []), "```"]
    return lines + [""]


# ==============================================================================================


PARTS = {"block": part_block, "smollm2": part_smollm2, "checkpoint": part_checkpoint}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke test: shapes / 8, SmolLM2 blocks 0-3, a 2-layer checkpoint"
    )
    p.add_argument("--parts", default="block,smollm2,checkpoint", help="comma list of: block, smollm2, checkpoint")
    p.add_argument(
        "--output",
        default=None,
        help="JSON results (markdown beside it, .md); default results/bench/scan_benchmark[_quick|_divN].json",
    )
    p.add_argument("--shrink", type=int, default=1, help="divide all block/checkpoint shapes by this (--quick: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layers", type=int, default=None, help="checkpoint: number of decoder layers (default 32; 2 with --quick)"
    )
    p.add_argument(
        "--slow-subset",
        default="",
        help="block: run PEFT and WeightWatcher only on matrices whose name contains one of these (comma list)",
    )
    p.add_argument("--no-weightwatcher", action="store_true", help="block: skip WeightWatcher")
    p.add_argument(
        "--scan-timeout", type=float, default=3 * 3600, help="checkpoint: kill the scan after this many seconds"
    )
    p.add_argument(
        "--delete-checkpoint", action="store_true", help="checkpoint: delete the generated checkpoint afterwards"
    )
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)} (known: {', '.join(PARTS)})")
    args.slow_subset = [x for x in args.slow_subset.split(",") if x]
    if args.quick:
        args.shrink = QUICK_FACTOR
    args.tag = "_quick" if args.quick else (f"_div{args.shrink}" if args.shrink != 1 else "")
    if args.layers is not None and args.layers != LLAMA3_8B["layers"]:
        args.tag += f"_L{args.layers}"
    if args.output is None:
        args.output = str(ROOT / "results" / "bench" / f"scan_benchmark{args.tag}.json")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    out = Path(args.output)
    md = out.with_suffix(".md")
    results: dict = {}
    if out.is_file():  # keep the sections of parts not run now (same mode only)
        with contextlib.suppress(Exception):
            old = json.loads(out.read_text())
            if old.get("quick") == args.quick and old.get("shrink", 1) == args.shrink:
                results = {k: old[k] for k in PARTS if k in old}
    results.update(
        {
            "quick": args.quick,
            "shrink": args.shrink,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "machine": machine_info(),
        }
    )
    status = 0
    for part in args.parts:
        log.info("=== part %s", part)
        start = perf_counter()
        try:
            section = PARTS[part](args)
        except Exception as exc:
            log.exception("part %s failed", part)
            section = {"error": f"{type(exc).__name__}: {exc}"}
            status = 1
        section["part_seconds"] = perf_counter() - start
        results[part] = section
        results["targets"] = evaluate_targets(results)
        ordered = {k: results[k] for k in ("quick", "shrink", "argv", "machine", "targets", *PARTS) if k in results}
        atomic_write_json(out, ordered)
        atomic_write_text(md, render_markdown(ordered))
        log.info("=== part %s done in %.1fs; wrote %s and %s", part, section["part_seconds"], out, md)
    for t in results.get("targets", []):
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']} {t['note']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
