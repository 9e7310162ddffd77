#!/usr/bin/env python
"""Benchmark: a whole generated Llama-3-8B-shaped bf16 checkpoint scanned end to end by ``conditune scan``.

32 layers (q, o 4096²; k, v 1024x4096; gate, up 14336x4096; down 4096x14336; two norms each), the
128256x4096 embedding and an untied lm_head: ~8.0 B parameters, ~15 GiB in ~5 GB safetensors shards,
N(0, 0.02²) weights in HF naming, written tensor by tensor (never more than one 32 M-element chunk in
memory). The shards are evicted from the page cache before the scan, which runs as a subprocess
(``conditune scan DIR --output FILE --no-cache``): wall time, peak RSS of the process tree, CPU time,
page faults, the records' methods, and a float64 SVD check of some matrices.

    python benchmarks/scan_checkpoint.py --delete-checkpoint      # writes results/bench/scan_checkpoint.{json,md}
    python benchmarks/scan_checkpoint.py --shrink 8 --layers 2    # smoke test (scan_checkpoint_div8_L2.*)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path
from time import perf_counter

import torch

from scan_common import (
    CACHE,
    RESULTS,
    GiB,
    conditune_command,
    count,
    fmt_e,
    fmt_s,
    kappa_reference,
    load_average,
    log,
    machine_info,
    machine_markdown,
    measure_subprocess,
    setup_logging,
    sum_by,
    write_results,
)

LLAMA3_8B = dict(hidden=4096, intermediate=14336, kv=1024, vocab=128256, layers=32)
TARGET_SCAN_SECONDS = 8 * 60
TARGET_SCAN_RSS = 4 * GiB


def checkpoint_config(args) -> dict:
    cfg = dict(LLAMA3_8B)
    cfg = {k: (v // args.shrink if k != "layers" else v) for k, v in cfg.items()}
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


def run_checkpoint(args) -> dict:
    cfg = checkpoint_config(args)
    section: dict = {
        "description": "Generated Llama-3-8B-shaped bf16 checkpoint (N(0, 0.02^2) weights), scanned by the CLI",
        "config": cfg,
        "target_configuration": cfg == LLAMA3_8B,
    }
    shard_bytes = 5 * 10**9 // args.shrink**2
    folder, info = make_checkpoint(cfg, args.seed, shard_bytes)
    section["checkpoint"] = info
    try:
        return _scan_checkpoint(args, cfg, folder, section)
    finally:
        if args.delete_checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
            info["deleted_after_run"] = True


def _scan_checkpoint(args, cfg: dict, folder: Path, section: dict) -> dict:
    for f in folder.glob("*.safetensors"):
        drop_page_cache(f)  # cold-ish start: the scan reads from disk, not from RAM
    out_dir = Path(args.output).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    scan_out = out_dir / f"scan_checkpoint{args.tag}_records.json"
    cmd = conditune_command() + ["scan", str(folder), "--output", str(scan_out), "--no-cache"]
    if args.device != "auto":
        cmd += ["--device", args.device]
    log.info("checkpoint: %s", " ".join(cmd))
    section["load_avg_before"] = load_average()
    run = measure_subprocess(cmd, out_dir / f"scan_checkpoint{args.tag}.log", timeout=args.scan_timeout)
    section["load_avg_after"] = load_average()
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
            "status": count(r.status for r in records),
            "methods": count(r.method for r in records),
            "kappa_range": [min(r.kappa for r in ok), max(r.kappa for r in ok)] if ok else None,
            "max_kappa_rel_err_bound": max((r.kappa_rel_err for r in ok if r.kappa_rel_err is not None), default=None),
            "sum_record_seconds": sum(r.seconds or 0.0 for r in records),
            "seconds_by_kind": {k: round(v, 2) for k, v in sum_by((r.kind, r.seconds or 0.0) for r in records).items()},
            "slowest": [
                (r.name, r.method, round(r.seconds, 2)) for r in sorted(ok, key=lambda r: -(r.seconds or 0.0))[:5]
            ],
        }
        verify = [n for n, s in checkpoint_tensors(cfg) if len(s) == 2]
        if args.shrink == 1:  # float64 SVDs of 4096-wide matrices take a while: layer 0 attention only
            verify = [n for n in verify if n.startswith("model.layers.0.self_attn.")]
        log.info("checkpoint: verifying %d matrices against float64 SVD", len(verify))
        section["verification"] = verify_against_reference(folder, records, verify)
    return section


def _md_checkpoint(c: dict) -> list[str]:
    lines = ["## The scan", ""]
    if "error" in c:
        return lines + [f"Not run: {c['error']}", ""]
    info, run = c["checkpoint"], c["scan"]
    lines += [
        f"{c['description']}: config {c['config']}, {info['n_tensors']} tensors ({info['n_matrices']} matrices), {info['total_gib']} GiB, "
        f"generation {fmt_s(info.get('generation_seconds'))} s (0 = cached). Page cache of the shards dropped before the scan (posix_fadvise).",
        "",
        f"- command: `{' '.join(run['command'])}`",
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
            f"max κ error bound {fmt_e(rec['max_kappa_rel_err_bound'])}"
        )
        lines.append(
            f"- scanner seconds by tensor kind (sum of record seconds {rec['sum_record_seconds']:.1f} s): {rec['seconds_by_kind']}"
        )
        lines.append(f"- slowest records: {rec['slowest']}")
    ver = c.get("verification")
    if ver:
        errs = [x["rel_err"] for x in ver.values() if "rel_err" in x]
        lines.append(
            f"- checked against float64 SVD: {len(errs)} matrices, max rel. κ error {fmt_e(max(errs) if errs else None)}"
        )
    if run["returncode"] != 0:
        lines += ["", "Log tail:", "", "```", *run.get("log_tail", []), "```"]
    return lines + [""]


def evaluate_targets(ck: dict) -> list[dict]:
    if "scan" not in ck:
        return [{"target": "checkpoint scan", "value": ck.get("error", "not run"), "pass": False, "note": ""}]
    run = ck["scan"]
    note = (
        "" if ck.get("target_configuration") else "not the target configuration (--shrink / --layers): indicative only"
    )
    ok_run = run["returncode"] == 0 and not run["timed_out"]
    return [
        {
            "target": f"8B-shaped scan <= {TARGET_SCAN_SECONDS // 60} min",
            "value": f"{run['wall_seconds']:.1f} s" + ("" if ok_run else f" (rc {run['returncode']})"),
            "pass": ok_run and run["wall_seconds"] <= TARGET_SCAN_SECONDS,
            "note": note,
        },
        {
            "target": f"peak RSS < {TARGET_SCAN_RSS / GiB:g} GiB",
            "value": f"{run['peak_rss_bytes'] / GiB:.2f} GiB",
            "pass": ok_run and run["peak_rss_bytes"] < TARGET_SCAN_RSS,
            "note": note,
        },
    ]


def render_markdown(results: dict) -> str:
    lines = [
        "# conditune scan benchmark: a whole Llama-3-8B-shaped checkpoint",
        "",
        f"Generated by `benchmarks/scan_checkpoint.py` on {results['machine']['date_utc']} ({' '.join(results['argv']) or 'no arguments'}).",
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
        *_md_checkpoint(results["checkpoint"]),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shrink", type=int, default=1, help="divide every shape by this")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="passed to conditune scan --device")
    p.add_argument("--scan-timeout", type=float, default=3 * 3600, help="kill the scan after this many seconds")
    p.add_argument("--delete-checkpoint", action="store_true", help="delete the generated checkpoint afterwards")
    p.add_argument("--output", default=None, help="JSON results (markdown beside it)")
    args = p.parse_args(argv)
    args.tag = (f"_div{args.shrink}" if args.shrink != 1 else "") + (
        f"_L{args.layers}" if args.layers not in (None, LLAMA3_8B["layers"]) else ""
    )
    args.output = Path(args.output or RESULTS / f"scan_checkpoint{args.tag}.json")
    return args


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    results = {"argv": sys.argv[1:] if argv is None else list(argv), "machine": machine_info()}
    start = perf_counter()
    try:
        results["checkpoint"] = run_checkpoint(args)
    except Exception as exc:  # noqa: BLE001 - the failure is written into the results
        log.exception("checkpoint benchmark failed")
        results["checkpoint"] = {"error": f"{type(exc).__name__}: {exc}"}
    results["checkpoint"]["part_seconds"] = perf_counter() - start
    results["targets"] = evaluate_targets(results["checkpoint"])
    write_results(args.output, results, render_markdown(results))
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']} {t['note']}")
    return 0 if "scan" in results["checkpoint"] else 1


if __name__ == "__main__":
    sys.exit(main())
