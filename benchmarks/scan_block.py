#!/usr/bin/env python
"""Benchmark: one Llama-3-8B-shaped decoder block, conditune against the SVD-based tools, with a roofline.

Seven bf16 matrices with prescribed, realistic spectra (q, o 4096x4096; k, v 1024x4096; gate, up
14336x4096; down 4096x14336). Every tool starts from the bf16 tensor; the reference is the float64
LAPACK SVD of the same values. For conditune each matrix also gets its route's flop count (the
factorisations it needed), the rate it achieved, and its time against that flop count at this
machine's float32/float64 GEMM rates measured in the same run (the roofline).

    python benchmarks/scan_block.py                      # full size (writes results/bench/scan_block.{json,md})
    python benchmarks/scan_block.py --shrink 8           # smoke test, shapes / 8 (scan_block_div8.*)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from scan_common import (
    CACHE,
    PER_MATRIX_TOOLS,
    RESULTS,
    compare,
    fmt_e,
    fmt_s,
    fmt_x,
    gemm_rates,
    linear_module,
    load_average,
    log,
    machine_info,
    machine_markdown,
    roofline,
    run_peft,
    run_per_matrix_tool,
    run_weightwatcher,
    setup_logging,
    warm_up,
    write_results,
)

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
LARGE = 1e10  # matrices with a route this costly get the per-matrix roofline target

TARGET_SPEEDUP_SCIPY = 6.0
TARGET_SPEEDUP_PEFT = 10.0
TARGET_KAPPA_ERR = 1e-6
TARGET_TIMES_BOUND = 1.5


# ==============================================================================================
# the matrices


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
    return ((u * s) @ v.T).to(torch.bfloat16)


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
    CACHE.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
    os.close(fd)
    save_file(
        mats, tmp, metadata={"seed": str(seed), "shape_divisor": str(factor), "nominal_kappa": json.dumps(nominal)}
    )
    os.replace(tmp, path)
    return mats, nominal, perf_counter() - start


# ==============================================================================================
# the run


def run_block(args) -> dict:
    mats, nominal, gen_seconds = load_or_make_block(args.seed, args.shrink)
    names = [name for name, _, _ in BLOCK]
    slow_names = [n for n in names if not args.slow_subset or any(k in n for k in args.slow_subset)]
    section: dict = {
        "description": "One Llama-3-8B-shaped decoder block, prescribed spectra, stored bf16",
        "generation_seconds": gen_seconds,
        "matrices": {n: {"shape": list(mats[n].shape), "nominal_kappa": nominal[n]} for n in names},
        "load_avg_before": load_average(),
    }
    warm_up()
    section["gemm_rates_before"] = gemm_rates()
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
        tools["weightwatcher"] = {"label": "WeightWatcher analyze()", "available": False, "error": "skipped"}
    else:
        log.info("block: WeightWatcher analyze() on %d layers", len(slow_names))
        ww = run_weightwatcher(linear_module({n: mats[n] for n in slow_names}))
        tools["weightwatcher"] = {"label": "WeightWatcher analyze() (float64 SVD + power-law fits)", **ww}
    section["gemm_rates_after"] = gemm_rates()
    _summarise(section, tools, ref, names, slow_names)
    section["load_avg_after"] = load_average()
    return section


def _summarise(section: dict, tools: dict, ref: dict, names: list[str], slow_names: list[str]) -> None:
    """Errors and totals per tool, speed ratios, and conditune's roofline per matrix."""
    for key, tool in tools.items():
        if "per_matrix" not in tool:
            continue
        tool["matrices_timed"] = names if key in PER_MATRIX_TOOLS else slow_names
        tool["summary"] = compare(tool["per_matrix"], ref, tool["matrices_timed"])
    conditune = tools["conditune"]["per_matrix"]
    for key, tool in tools.items():
        if "summary" in tool and key != "conditune":
            c_secs = sum(conditune[n]["seconds"] for n in tool["matrices_timed"])
            tool["speedup_of_conditune"] = tool.get("total_seconds", tool["summary"]["seconds"]) / c_secs
    # the GEMM rate of the roofline: the better of the two measurements (the bound must be a bound)
    before, after = section["gemm_rates_before"], section["gemm_rates_after"]
    rates = {k: max(before[k], after[k]) for k in ("float32", "float64")}
    section["gemm_rates"] = rates
    for n in names:
        c = conditune[n]
        c["roofline"] = roofline(c["flops32"], c["flops64"], c["seconds"], rates)
    total = sum(conditune[n]["seconds"] for n in names)
    section["roofline_total"] = roofline(
        sum(conditune[n]["flops32"] for n in names), sum(conditune[n]["flops64"] for n in names), total, rates
    )
    section["conditune_bound_holds"] = all(
        conditune[n]["rel_err"] <= max(conditune[n]["kappa_rel_err_bound"], 1e-15) for n in names
    )
    section["slow_tools_subset"] = slow_names if slow_names != names else "all"
    section["tools"] = tools


def evaluate_targets(block: dict) -> list[dict]:
    tools = block["tools"]
    out = []

    def add(name, value, ok, note=""):
        out.append({"target": name, "value": value, "pass": bool(ok), "note": note})

    sp = tools.get("scipy_f32", {}).get("speedup_of_conditune")
    add(f"block >= {TARGET_SPEEDUP_SCIPY:g}x SciPy float32 svdvals", fmt_x(sp), sp and sp >= TARGET_SPEEDUP_SCIPY)
    pp = tools.get("peft", {}).get("speedup_of_conditune")
    note = "" if block["slow_tools_subset"] == "all" else f"on {block['slow_tools_subset']}"
    add(f"block >= {TARGET_SPEEDUP_PEFT:g}x PEFT KappaTuneSelector", fmt_x(pp), pp and pp >= TARGET_SPEEDUP_PEFT, note)
    err = tools["conditune"]["summary"]["max_rel_err"]
    add(f"kappa rel. error <= {TARGET_KAPPA_ERR:g}", fmt_e(err), err <= TARGET_KAPPA_ERR)
    add("conditune's error bounds hold", str(block["conditune_bound_holds"]), block["conditune_bound_holds"])
    for name, c in tools["conditune"]["per_matrix"].items():
        roof = c["roofline"]
        if roof["flops"] >= LARGE:
            add(
                f"{name}: within {TARGET_TIMES_BOUND:g}x of its route's flop bound",
                f"{roof['times_bound']:.2f}x ({c['method']})",
                roof["times_bound"] <= TARGET_TIMES_BOUND,
            )
    return out


# ==============================================================================================
# report


def render_markdown(results: dict) -> str:
    b = results["block"]
    title = "" if results["shrink"] == 1 else f" (shapes / {results['shrink']}: smoke test, ratios say nothing)"
    lines = [
        f"# conditune scan benchmark: one Llama-3-8B-shaped block{title}",
        "",
        f"Generated by `benchmarks/scan_block.py` on {results['machine']['date_utc']} ({' '.join(results['argv']) or 'no arguments'}).",
        "",
        *machine_markdown(results["machine"]),
        "## Targets",
        "",
        "| target | measured | result | note |",
        "|---|---|---|---|",
        *[
            f"| {t['target']} | {t['value']} | **{'PASS' if t['pass'] else 'FAIL'}** | {t['note']} |"
            for t in results["targets"]
        ],
        "",
        *_md_tools(b),
        *_md_roofline(b),
        *_md_per_matrix(b),
    ]
    return "\n".join(lines) + "\n"


def _md_tools(b: dict) -> list[str]:
    lines = [
        "## Tools",
        "",
        f"{b['description']}. W = U diag(s) Vᵀ (U, V from QR of float64 Gaussians), s = outliers + Marchenko–Pastur-like bulk "
        "stretched to a power law + geometric lower tail, entries RMS 0.02, rounded to bf16. Every tool starts from the bf16 "
        "tensor (its conversion is timed); PEFT and WeightWatcher run on an nn.Module holding the matrices as float32 nn.Linear layers. "
        f"Load average before/after: {b['load_avg_before']} / {b['load_avg_after']}.",
        "",
        "| tool | matrices | time (s) | conditune faster by | max rel. κ error | median rel. κ error |",
        "|---|---|---|---|---|---|",
    ]
    for key, t in b["tools"].items():
        if "summary" not in t:
            lines.append(f"| {t.get('label', key)} | — | — | — | {t.get('error', 'unavailable')} | — |")
            continue
        s = t["summary"]
        speed = "1 (itself)" if key == "conditune" else fmt_x(t.get("speedup_of_conditune"))
        errs = (
            ("reference", "reference")
            if key == "float64_svd"
            else (fmt_e(s["max_rel_err"]), fmt_e(s["median_rel_err"]))
        )
        lines.append(
            f"| {t['label']} | {s['n']} | {fmt_s(t.get('total_seconds', s['seconds']))} | {speed} | {errs[0]} | {errs[1]} |"
        )
    return [*lines, ""]


def _md_roofline(b: dict) -> list[str]:
    r, before, after = b["gemm_rates"], b["gemm_rates_before"], b["gemm_rates_after"]
    tot = b["roofline_total"]
    lines = [
        "## Roofline",
        "",
        f"GEMM rate of this machine, measured in this run (torch `mm` of {before['size']}², best of 3, before / after the tools): "
        f"float32 {before['float32']:.0f} / {after['float32']:.0f} GFLOP/s, float64 {before['float64']:.0f} / {after['float64']:.0f} GFLOP/s; "
        f"the bound uses the better ({r['float32']:.0f} / {r['float64']:.0f}). Flops: the factorisations each matrix needed "
        "(m n² + n³/3 for a Gram matrix and its Cholesky factor, 2n³/3 for an LU, 2mn² − 2n³/3 for a QR; every rung tried counts), "
        "at float32 or float64 as they ran. The Lanczos runs, the refinement against the matrix and the dtype conversions are "
        "what the bound leaves out.",
        "",
        "| matrix | method | flops float32 | flops float64 | bound (s) | measured (s) | × bound | achieved GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in b["tools"]["conditune"]["per_matrix"].items():
        roof = c["roofline"]
        lines.append(
            f"| {name} | {c['method']} | {c['flops32']:.2e} | {c['flops64']:.2e} | {roof['bound_seconds']:.3f} | "
            f"{c['seconds']:.3f} | {roof['times_bound']:.2f} | {roof['achieved_gflops']:.0f} |"
        )
    lines.append(
        f"| **block** | | | | {tot['bound_seconds']:.2f} | {sum(c['seconds'] for c in b['tools']['conditune']['per_matrix'].values()):.2f} | "
        f"{tot['times_bound']:.2f} | {tot['achieved_gflops']:.0f} |"
    )
    return [*lines, ""]


def _md_per_matrix(b: dict) -> list[str]:
    tools = b["tools"]
    keys = [
        k
        for k in ("float64_svd", "conditune", "scipy_f32", "torch_f32", "peft", "weightwatcher")
        if "per_matrix" in tools.get(k, {})
    ]
    head = "| matrix | shape | nominal κ | reference κ | " + " | ".join(f"{k} s" for k in keys)
    head += " | " + " | ".join(f"{k} err" for k in keys if k != "float64_svd") + " | conditune bound |"
    lines = ["## Per matrix", "", "Seconds and relative κ error against the float64 reference.", "", head]
    lines.append("|" + "---|" * (4 + 2 * len(keys)))
    for name, mat in b["matrices"].items():
        c = tools["conditune"]["per_matrix"][name]
        row = [name, "×".join(map(str, mat["shape"])), f"{mat['nominal_kappa']:.3g}", f"{mat['kappa_ref']:.6g}"]
        row += [fmt_s(tools[k]["per_matrix"].get(name, {}).get("seconds")) for k in keys]
        row += [fmt_e(tools[k]["per_matrix"].get(name, {}).get("rel_err")) for k in keys if k != "float64_svd"]
        row.append(fmt_e(c["kappa_rel_err_bound"]))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"conditune's own per-matrix error bound holds on every matrix: {b['conditune_bound_holds']}. "
        "PEFT computes κ = S[0] / (S[-1] + 1e-8) from float32 `torch.linalg.svdvals`; its per-matrix seconds are the svdvals calls, "
        "its total is the whole `get_best_targets()`. WeightWatcher's total includes its power-law fits.",
    ]
    for k in ("peft", "weightwatcher"):
        if tools.get(k, {}).get("error"):
            lines.append(f"{k}: {tools[k]['error']}")
    return [*lines, ""]


# ==============================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shrink", type=int, default=1, help="divide every shape by this (8: a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output", default=None, help="JSON results (markdown beside it); default results/bench/scan_block[_divN].json"
    )
    p.add_argument(
        "--slow-subset",
        default="",
        help="run PEFT and WeightWatcher only on matrices whose name contains one of these (comma list)",
    )
    p.add_argument("--no-weightwatcher", action="store_true")
    args = p.parse_args(argv)
    args.slow_subset = [x for x in args.slow_subset.split(",") if x]
    tag = "" if args.shrink == 1 else f"_div{args.shrink}"
    args.output = Path(args.output or RESULTS / f"scan_block{tag}.json")
    return args


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    results = {"shrink": args.shrink, "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine_info()}
    start = perf_counter()
    results["block"] = run_block(args)
    results["block"]["part_seconds"] = perf_counter() - start
    results["targets"] = evaluate_targets(results["block"])
    write_results(args.output, results, render_markdown(results))
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']} {t['note']}")
    log.info("wrote %s and %s", args.output, args.output.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
