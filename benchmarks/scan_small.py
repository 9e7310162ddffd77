#!/usr/bin/env python
"""Benchmark: the real SmolLM2-135M, 211 small matrices (576-1536 wide), conditune against the tools.

All 2-D tensors of the GGUF (Q4_1, the Q8_0 token embedding) dequantised to float32. Side by side
in one run: the float64 LAPACK reference, SciPy and torch float32 ``svdvals`` one matrix at a time,
conditune ``analyse_matrix`` one at a time, conditune ``analyse_matrices`` (the many small ones
several at a time, each on one BLAS thread, as ``conditune scan`` does), PEFT's KappaTuneSelector
on the model as transformers loads it, and ``scan_source`` on the GGUF end to end.

    python benchmarks/scan_small.py            # writes results/bench/scan_small.{json,md}
    python benchmarks/scan_small.py --quick    # blocks 0-3 + embedding (scan_small_quick.*)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from scan_common import (
    PER_MATRIX_TOOLS,
    RESULTS,
    compare,
    count,
    fmt_e,
    fmt_s,
    fmt_x,
    linear_module,
    load_average,
    log,
    machine_info,
    machine_markdown,
    run_peft,
    run_per_matrix_tool,
    setup_logging,
    warm_up,
    write_results,
)

TARGET_KAPPA_ERR = 1e-6

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


def run_batch(mats: dict) -> dict:
    """conditune.scanning.spectrum.analyse_matrices on all matrices at once: total wall time."""
    from conditune.scanning.spectrum import analyse_matrices

    names = list(mats)
    start = perf_counter()
    spectra = analyse_matrices([torch.from_numpy(mats[n]) for n in names])
    total = perf_counter() - start
    per = {
        n: {"kappa": s.kappa, "seconds": s.seconds, "method": s.method, "kappa_rel_err_bound": s.kappa_rel_err}
        for n, s in zip(names, spectra)
    }
    return {
        "label": "conditune analyse_matrices (small ones 2 at a time, 1 BLAS thread each)",
        "per_matrix": per,
        "total_seconds": total,
    }


def run_scan_source(quick: bool) -> dict:
    """``scan_source("demo:smollm2")`` end to end: GGUF parse + dequantisation + analysis."""
    from conditune.scanning import scan_source

    include = None
    if quick:
        include = lambda name: not name.startswith("model.layers.") or int(name.split(".")[2]) < 4  # noqa: E731
    start = perf_counter()
    records, meta = scan_source("demo:smollm2", cache=False, include=include)
    return {
        "wall_seconds": perf_counter() - start,
        "scan_seconds": meta["seconds"],
        "records": len(records),
        "methods": count(r.method for r in records if r.kappa is not None),
    }


def run_peft_on_transformers(path: Path, names: list[str], quick: bool) -> dict:
    """PEFT on the model as transformers loads it (the fair comparison), names mapped back to GGUF."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    load_seconds = perf_counter() - start
    if quick:  # the same subset as the other tools
        modules = dict(model.named_modules())
        model = linear_module({hf_name(n): modules[hf_name(n)].weight.detach() for n in names if hf_name(n) in modules})
    peft = run_peft(model)
    back = {hf_name(n): n for n in names}
    if "per_matrix" in peft:
        peft["per_matrix"] = {back[k]: v for k, v in peft["per_matrix"].items() if k in back}
        peft["skipped"] = [back.get(k, k) for k in peft["skipped"]]
    return {
        "label": "PEFT KappaTuneSelector.get_best_targets on the transformers model",
        "model_load_seconds": load_seconds,
        **peft,
    }


def run_small(args) -> dict:
    path, mats, info = load_smollm2(args.quick)
    names = list(mats)
    section: dict = {
        "description": "SmolLM2-135M-Instruct GGUF Q4_1, dequantised to float32",
        "model": str(path),
        "n_matrices": len(names),
        "subset": "blocks 0-3 + token_embd (quick)" if args.quick else "all 2-D tensors",
        **info,
        "load_avg_before": load_average(),
    }
    warm_up()
    tools: dict = {}
    for key, (label, fn) in PER_MATRIX_TOOLS.items():
        log.info("small: %s on %d matrices", label, len(names))
        tools[key] = {"label": label, "per_matrix": run_per_matrix_tool(fn, mats, key)}
    log.info("small: conditune analyse_matrices")
    tools["conditune_batch"] = run_batch(mats)
    log.info("small: PEFT")
    try:
        tools["peft"] = run_peft_on_transformers(path, names, args.quick)
    except Exception as exc:  # noqa: BLE001 - a tool that cannot run is a result
        tools["peft"] = {"label": "PEFT KappaTuneSelector", "available": False, "error": f"{type(exc).__name__}: {exc}"}
    gc.collect()
    log.info("small: scan_source on the GGUF")
    section["scan_source"] = run_scan_source(args.quick)
    _summarise(section, tools, names)
    section["load_avg_after"] = load_average()
    return section


def _summarise(section: dict, tools: dict, names: list[str]) -> None:
    ref = tools["float64_svd"]["per_matrix"]
    batch = tools["conditune_batch"]
    for key, tool in tools.items():
        if "per_matrix" not in tool:
            continue
        subset = [n for n in names if n in tool["per_matrix"]]
        tool["summary"] = compare(tool["per_matrix"], ref, subset)
        tool["ranking"] = ranking_agreement(tool["per_matrix"], ref, subset)
        total = tool.get("total_seconds", tool["summary"]["seconds"])
        if key != "conditune_batch":
            # conditune's batch on the same subset: its wall time scaled by the subset's share of its work
            share = sum(batch["per_matrix"][n]["seconds"] for n in subset) / sum(
                v["seconds"] for v in batch["per_matrix"].values()
            )
            tool["batch_faster_by"] = total / (batch["total_seconds"] * share)
    one = tools["conditune"]["per_matrix"]
    section["conditune_bound_holds"] = all(
        one[n]["rel_err"] <= max(one[n]["kappa_rel_err_bound"], 1e-15) for n in names
    )
    section["conditune_methods"] = count(v["method"] for v in one.values())
    section["kappa_ref_range"] = [min(r["kappa"] for r in ref.values()), max(r["kappa"] for r in ref.values())]
    section["tools"] = tools


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
        "max_rank_shift": max(abs(i - ref_rank[n]) for i, n in enumerate(by_tool)),
    }


def evaluate_targets(s: dict) -> list[dict]:
    tools = s["tools"]
    sp = tools["scipy_f32"]["batch_faster_by"]
    err = max(tools["conditune"]["summary"]["max_rel_err"], tools["conditune_batch"]["summary"]["max_rel_err"])
    return [
        {
            "target": "analyse_matrices faster than SciPy float32 one at a time",
            "value": fmt_x(sp),
            "pass": sp > 1.0,
            "note": "",
        },
        {
            "target": f"kappa rel. error <= {TARGET_KAPPA_ERR:g}",
            "value": fmt_e(err),
            "pass": err <= TARGET_KAPPA_ERR,
            "note": "",
        },
        {
            "target": "conditune's error bounds hold",
            "value": str(s["conditune_bound_holds"]),
            "pass": s["conditune_bound_holds"],
            "note": "",
        },
    ]


def render_markdown(results: dict) -> str:
    s = results["small"]
    tools = s["tools"]
    title = " (QUICK: blocks 0-3 only)" if results["quick"] else ""
    lines = [
        f"# conditune scan benchmark: SmolLM2-135M, many small matrices{title}",
        "",
        f"Generated by `benchmarks/scan_small.py` on {results['machine']['date_utc']} ({' '.join(results['argv']) or 'no arguments'}).",
        "",
        *machine_markdown(results["machine"]),
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        *[f"| {t['target']} | {t['value']} | **{'PASS' if t['pass'] else 'FAIL'}** |" for t in results["targets"]],
        "",
        "## Tools",
        "",
        f"{s['description']}; {s['n_matrices']} matrices ({s['subset']}), quantisation types {s['quant_types']}, reference κ range "
        f"{s['kappa_ref_range'][0]:.4g} … {s['kappa_ref_range'][1]:.4g}. conditune methods: {s['conditune_methods']}. "
        f"Load average before/after: {s['load_avg_before']} / {s['load_avg_after']}.",
        "",
        "| tool | matrices | time (s) | analyse_matrices faster by | max rel. κ error | median rel. κ error | lowest-k overlap with float64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, t in tools.items():
        if "summary" not in t:
            lines.append(f"| {t.get('label', key)} | — | — | — | {t.get('error', 'unavailable')} | — | — |")
            continue
        sm, rk = t["summary"], t["ranking"]
        speed = "1 (itself)" if key == "conditune_batch" else fmt_x(t.get("batch_faster_by"))
        errs = (
            ("reference", "reference")
            if key == "float64_svd"
            else (fmt_e(sm["max_rel_err"]), fmt_e(sm["median_rel_err"]))
        )
        lines.append(
            f"| {t['label']} | {sm['n']} | {fmt_s(t.get('total_seconds', sm['seconds']))} | {speed} | {errs[0]} | {errs[1]} | "
            f"{rk['overlap']}/{rk['k']} (max shift {rk['max_rank_shift']}) |"
        )
    src = s["scan_source"]
    peft = tools.get("peft", {})
    lines += [
        "",
        "Ranking: of the k lowest-κ matrices by each tool, how many are among the k lowest by the float64 reference (k = 100, or half "
        "the matrices in quick mode); max shift = largest rank displacement. A tool's row against analyse_matrices compares over the "
        "same matrices (PEFT skips the embedding).",
        f"conditune's own per-matrix error bound holds on every matrix: {s['conditune_bound_holds']}.",
        f'`scan_source("demo:smollm2")` end to end (GGUF parse, dequantisation, analysis): {src["wall_seconds"]:.1f} s, of which the scan '
        f"{src['scan_seconds']:.1f} s; {src['records']} records, methods {src['methods']}.",
    ]
    if peft.get("available"):
        lines.append(
            f"PEFT ran on the transformers-loaded model (load {fmt_s(peft.get('model_load_seconds'))} s, not counted); skipped (a side > "
            f"{peft.get('max_dim_size_to_analyze')}): {peft.get('skipped')}."
        )
    elif peft:
        lines.append(f"PEFT: {peft.get('error')}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="blocks 0-3 and the embedding only")
    p.add_argument("--output", default=None, help="JSON results (markdown beside it)")
    args = p.parse_args(argv)
    out = Path(args.output or RESULTS / f"scan_small{'_quick' if args.quick else ''}.json")
    results = {"quick": args.quick, "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine_info()}
    start = perf_counter()
    results["small"] = run_small(args)
    results["small"]["part_seconds"] = perf_counter() - start
    results["targets"] = evaluate_targets(results["small"])
    write_results(out, results, render_markdown(results))
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}")
    log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
