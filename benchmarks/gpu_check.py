#!/usr/bin/env python
"""The GPU check (issue #16): run by ``benchmarks/gpu_check.sh`` on one GPU, in under 5 minutes.

Three parts, each written to ``--output`` (``gpu_check.json`` and ``.md``) as soon as it ends:

``block``       the Llama-3-8B-shaped block of ``scan_block.py`` (generated on the device), analysed
                on the CPU and on the GPU: the two kappas must agree within the sum of their bounds,
                and each must be within its bound of a float64 SVD.
``train``       the speech LLM through its public entry point (``conditune.training.train``): one
                float32 step against one bf16 step from the same start (loss within tolerance), then
                50 bf16 steps (tokens/s, every loss finite). Nothing can be fetched on the GPU
                machine and the demo models (~235 MB) do not travel, so the LLM is a randomly
                initialised Llama with SmolLM2-135M's architecture, the encoder a small random
                Whisper, the audio synthetic tones with random sentences; the trained tensors are
                the 100 lowest-kappa ones of a scan of that LLM.
``checkpoint``  a generated Llama-3-8B-shaped bf16 checkpoint (~15 GiB, sharded safetensors), scanned
                on the GPU by ``scan_source``: wall time, peak GPU memory, a float64 SVD check.

``--cpu-dry-run`` runs the same logic on the CPU at toy sizes (shapes / 8, a 2-layer checkpoint, a
tiny LLM, 3 steps) in well under a minute; the torch code path of the scanner
(``spectrum_torch``, what CUDA runs) is then the "GPU" side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from scan_common import GiB, load_average, machine_info, write_results

BF16_LOSS_TOLERANCE = 2e-2  # relative: bf16 autocast against float32 on the first step's loss


class Budget:
    def __init__(self, seconds: float):
        self.deadline = perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - perf_counter()


# ==============================================================================================
# part 1: the block, CPU against GPU


def make_block(shrink: int, device: str) -> dict[str, torch.Tensor]:
    """The block of scan_block.py (same spectra), generated with the device's QR, stored bf16."""
    from scan_block import BLOCK, realistic_spectrum

    gen = torch.Generator(device=device).manual_seed(0)
    mats = {}
    for name, (m, n), kappa in BLOCK:
        m, n = m // shrink, n // shrink
        r = min(m, n)
        s = torch.from_numpy(realistic_spectrum(m, n, kappa)).to(device)
        u = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, device=device, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, device=device, generator=gen))[0]
        mats[name] = ((u * s) @ v.T).to(torch.bfloat16).cpu()
    return mats


def part_block(args, device: str) -> dict:
    from conditune.scanning import analyse_matrix

    start = perf_counter()
    mats = make_block(args.shrink, device)
    out = {"generation_seconds": perf_counter() - start, "matrices": {}}
    for name, w in mats.items():
        cpu = analyse_matrix(w, device="cpu")
        gpu = _on_device(w, device)
        ref_start = perf_counter()
        s = torch.linalg.svdvals(w.to(device=device, dtype=torch.float64)).cpu().numpy()
        ref = float(s[0] / s[-1])
        row = {
            "shape": list(w.shape),
            "kappa_ref": ref,
            "reference_seconds": perf_counter() - ref_start,
            "cpu": _spec_row(cpu, ref),
            "gpu": _spec_row(gpu, ref),
        }
        row["agree"] = abs(gpu.kappa - cpu.kappa) <= (gpu.kappa_rel_err + cpu.kappa_rel_err) * cpu.kappa
        row["bounds_hold"] = row["cpu"]["rel_err"] <= cpu.kappa_rel_err and row["gpu"]["rel_err"] <= gpu.kappa_rel_err
        out["matrices"][name] = row
        print(
            f"block {name}: cpu {cpu.kappa:.8g} ({cpu.seconds:.2f} s) gpu {gpu.kappa:.8g} ({gpu.seconds:.2f} s) ref {ref:.8g}"
        )
    rows = out["matrices"].values()
    out["all_agree"] = all(r["agree"] for r in rows)
    out["all_bounds_hold"] = all(r["bounds_hold"] for r in rows)
    out["cpu_seconds"] = sum(r["cpu"]["seconds"] for r in rows)
    out["gpu_seconds"] = sum(r["gpu"]["seconds"] for r in rows)
    return out


def _on_device(w: torch.Tensor, device: str):
    """The scanner's device path: analyse_matrix(device=...), or its torch code on the CPU in a dry run."""
    from conditune.scanning import analyse_matrix

    if device == "cpu":
        import time

        from conditune.scanning.spectrum_torch import analyse_matrix_torch

        start = time.perf_counter()
        spec = analyse_matrix_torch(w, device="cpu")
        spec.seconds = time.perf_counter() - start
        return spec
    return analyse_matrix(w, device=device)


def _spec_row(spec, ref: float) -> dict:
    return {
        "kappa": spec.kappa,
        "bound": spec.kappa_rel_err,
        "rel_err": abs(spec.kappa - ref) / ref,
        "method": spec.method,
        "seconds": spec.seconds,
    }


# ==============================================================================================
# part 2: the speech LLM, 50 bf16 steps


SMOLLM2_135M = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
)
TINY_LLM = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
)
WORDS = [
    "the",
    "a",
    "door",
    "open",
    "close",
    "left",
    "right",
    "good",
    "morning",
    "yes",
    "no",
    "please",
    "turn",
    "now",
    "stop",
    "go",
    "water",
    "light",
    "house",
    "green",
]


def make_llm(folder: Path, dims: dict, texts: list[str]) -> Path:
    """A randomly initialised Llama (``dims``) with a byte-level BPE tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        **dims,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_whisper(folder: Path, tiny: bool) -> Path:
    """A random Whisper encoder: whisper-base's dimensions, or tiny ones in a dry run."""
    from transformers import WhisperConfig, WhisperModel

    d, layers, heads = (32, 1, 2) if tiny else (512, 6, 8)
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=4 * d,
        decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=4 * d, max_source_positions=1500, max_target_positions=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    WhisperModel(cfg).save_pretrained(folder)
    return folder


def make_corpus(folder: Path, count: int, seed: int = 0) -> tuple[Path, list[str]]:
    """``count`` WAVs (tones of 1-3 s, written by conditune's own writer) with random sentences."""
    from conditune.data.audio import save_wav

    rng = np.random.default_rng(seed)
    rows, texts = [], []
    for i in range(count):
        seconds = 1.0 + 2.0 * rng.random()
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (150 + 50 * (i % 7)) * t) + 0.02 * rng.standard_normal(t.size)
        path = folder / f"utt{i}.wav"
        folder.mkdir(parents=True, exist_ok=True)
        save_wav(path, wave.astype(np.float32))
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        texts.append(text)
        rows.append({"id": f"utt{i}", "audio": str(path), "text": text, "language": "en"})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, texts


def run_training(config: dict):
    """The one call into the trainer (the public entry point; adapt here if its interface moves)."""
    from conditune.training import train

    return train(config)


def training_config(work: Path, assets: dict, *, steps: int, precision: str, device: str, name: str) -> dict:
    return {
        "model": {
            "encoder": {"backend": "hf", "path": str(assets["whisper"]), "device": device},
            "llm": {"path": str(assets["llm"])},
            "adaptor": {"subsample": 4, "depth": 2, "heads": assets["heads"], "dropout": 0.0},
            "trainable": {"mode": "names", "names_file": str(assets["names"])},
        },
        "data": {"train": str(assets["manifest"]), "max_batch": 8, "feature_cache": str(work / "features")},
        "train": {
            "output_dir": str(work / name),
            "overwrite": True,
            "seed": 0,
            "lr": 3e-4,
            "llm_lr": 1e-4,
            "warmup_steps": 0,
            "schedule": "constant",
            "max_steps": steps,
            "mixed_precision": precision,
            "device": device,
            "log_every": 10,
            "save_every": 0,
            "tensorboard": False,
            "progress": False,
        },
    }


def part_train(args, device: str, work: Path) -> dict:
    from conditune.scanning import scan_source
    from conditune.selection import select, write_selection

    dims = TINY_LLM if args.cpu_dry_run else SMOLLM2_135M
    start = perf_counter()
    manifest, texts = make_corpus(work / "audio", 16 if args.cpu_dry_run else 64)
    assets = {
        "manifest": manifest,
        "llm": make_llm(work / "llm", dims, texts),
        "whisper": make_whisper(work / "whisper", tiny=args.cpu_dry_run),
        "heads": dims["num_attention_heads"],
    }
    records, meta = scan_source(assets["llm"], device=device, cache=False)
    count = 10 if args.cpu_dry_run else 100
    assets["names"] = write_selection(select(records, "lowest", count=count, meta=meta), work / "names.txt")
    out: dict = {
        "llm": {k: v for k, v in dims.items()},
        "llm_note": (
            "a tiny random Llama (dry run)"
            if args.cpu_dry_run
            else "randomly initialised, SmolLM2-135M's architecture (the demo models cannot travel)"
        )
        + "; encoder: a random Whisper; audio: synthetic tones with random sentences",
        "trained_tensors": count,
        "assets_seconds": perf_counter() - start,
    }
    first = {}
    for precision in ("no", "bf16"):  # the same first step in float32 and in bf16
        result = run_training(
            training_config(work, assets, steps=1, precision=precision, device=device, name=f"one_{precision}")
        )
        first[precision] = result.losses[min(result.losses)]
    out["first_loss_float32"], out["first_loss_bf16"] = first["no"], first["bf16"]
    out["first_loss_rel_diff"] = abs(first["bf16"] - first["no"]) / abs(first["no"])
    out["bf16_matches_float32"] = out["first_loss_rel_diff"] <= BF16_LOSS_TOLERANCE
    steps = 3 if args.cpu_dry_run else 50
    result = run_training(training_config(work, assets, steps=steps, precision="bf16", device=device, name="bf16"))
    losses = [result.losses[k] for k in sorted(result.losses)]
    out.update(
        {
            "steps": result.step,
            "losses_finite": all(math.isfinite(x) for x in losses) and len(losses) == steps,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "seconds_per_step": result.seconds_per_step,
            "tokens_per_second": result.tokens_per_second,
            "elapsed_seconds": result.elapsed_s,
        }
    )
    if device.startswith("cuda"):
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
    return out


# ==============================================================================================
# part 3: a whole 8B-shaped checkpoint on the GPU


def write_checkpoint(folder: Path, cfg: dict, device: str, shard_bytes: int) -> dict:
    """The tensors of scan_checkpoint.py's checkpoint (N(0, 0.02^2) bf16, generated on the device), in shards."""
    from safetensors.torch import save_file

    from scan_checkpoint import checkpoint_tensors

    specs = checkpoint_tensors(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, device=device, generator=gen) * 0.02).to(torch.bfloat16).cpu()
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
    total = sum(math.prod(s) * 2 for _, s in specs)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return {
        "tensors": len(specs),
        "n_matrices": sum(len(s) == 2 for _, s in specs),
        "gib": total / GiB,
        "shards": len(shards),
    }


def part_checkpoint(args, device: str, work: Path, budget: Budget) -> dict:
    from conditune.scanning import scan_source, write_records
    from scan_checkpoint import LLAMA3_8B

    cfg = dict(LLAMA3_8B)
    if args.cpu_dry_run:
        cfg = {k: (v // 8 if k != "layers" else 2) for k, v in cfg.items()}
    folder = work / "checkpoint"
    start = perf_counter()
    info = write_checkpoint(folder, cfg, device, 5 * 10**9 if not args.cpu_dry_run else 10**7)
    out: dict = {"config": cfg, **info, "generation_seconds": perf_counter() - start}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = perf_counter()
    done = {"tensors": 0, "cost": 0.0, "total": 0.0}

    def progress(cost_done: float, cost_total: float, name) -> None:
        done.update(tensors=done["tensors"] + (cost_done > done["cost"]), cost=cost_done, total=cost_total)
        if budget.left() < 10:  # stop in time to report: how far it got tells the full time
            raise TimeoutError(
                f"budget reached after {done['tensors']} tensors ({cost_done / cost_total:.0%} of the work)"
            )

    try:
        records, meta = scan_source(folder, device=device, cache=False, progress=progress)
    except TimeoutError as stop:
        out["stopped"] = str(stop)
        out["scan_seconds_so_far"] = perf_counter() - start
        out["scan_seconds_extrapolated"] = out["scan_seconds_so_far"] * done["total"] / max(done["cost"], 1.0)
        shutil.rmtree(folder, ignore_errors=True)
        return out
    out["scan_seconds"] = perf_counter() - start
    if device.startswith("cuda"):
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
    write_records(records, Path(args.output) / "gpu_checkpoint_records.json", meta)
    ok = [r for r in records if r.kappa is not None]
    out["records"] = len(records)
    out["methods"] = {m: sum(r.method == m for r in ok) for m in sorted({r.method for r in ok})}
    out["kappa_range"] = [min(r.kappa for r in ok), max(r.kappa for r in ok)]
    out["max_bound"] = max(r.kappa_rel_err for r in ok)
    out["verification"] = _verify(folder, records, device)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def _verify(folder: Path, records, device: str) -> dict:
    """float64 SVDs (on the device) of layer 0's matrices against the scan."""
    from conditune.scanning import open_source

    source = open_source(folder)
    out = {}
    for r in records:
        if r.name.startswith("model.layers.0.") and r.kappa is not None:
            s = torch.linalg.svdvals(source.load(r.name).to(device=device, dtype=torch.float64)).cpu().numpy()
            ref = float(s[0] / s[-1])
            out[r.name] = {"kappa": r.kappa, "ref": ref, "rel_err": abs(r.kappa - ref) / ref, "bound": r.kappa_rel_err}
    return out


# ==============================================================================================


def render_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# GPU check" + (" (CPU DRY RUN: toy sizes, logic only)" if results["cpu_dry_run"] else ""),
        "",
        f"`benchmarks/gpu_check.sh` on {m['date_utc']}; device {results['device_name']}; CPU {m['cpu_model']} ({m['logical_cores']} cores); "
        f"load {m['load_avg_at_start']}; torch {m['versions']['torch']}; git {m.get('git_commit')}.",
        "",
    ]
    for part in ("block", "train", "checkpoint"):
        section = results.get(part)
        if section is None:
            continue
        lines += [f"## {part}", ""]
        if "error" in section:
            lines += ["```", section["error"], "```", ""]
            continue
        lines += [f"- {k}: {v}" for k, v in section.items() if k not in ("matrices", "verification")]
        for name, row in section.get("matrices", {}).items():
            lines.append(
                f"- {name} {row['shape']}: ref κ {row['kappa_ref']:.8g}; cpu {row['cpu']['kappa']:.8g} ({row['cpu']['method']}, "
                f"{row['cpu']['seconds']:.2f} s, err {row['cpu']['rel_err']:.1e} ≤ {row['cpu']['bound']:.1e}); gpu {row['gpu']['kappa']:.8g} "
                f"({row['gpu']['method']}, {row['gpu']['seconds']:.2f} s, err {row['gpu']['rel_err']:.1e} ≤ {row['gpu']['bound']:.1e}); agree {row['agree']}"
            )
        for name, row in section.get("verification", {}).items():
            lines.append(
                f"- check {name}: κ {row['kappa']:.8g}, float64 SVD {row['ref']:.8g}, err {row['rel_err']:.1e} (bound {row['bound']:.1e})"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="results/gpu", help="folder for gpu_check.json/.md and the checkpoint's records")
    p.add_argument(
        "--cpu-dry-run", action="store_true", help="toy sizes on the CPU: checks the logic in well under a minute"
    )
    p.add_argument("--parts", default="block,train,checkpoint")
    p.add_argument(
        "--budget", type=float, default=280.0, help="seconds; a part is not started with less than its need left"
    )
    args = p.parse_args(argv)
    args.shrink = 8 if args.cpu_dry_run else 1
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --cpu-dry-run to check the logic on a CPU)", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CONDITUNE_HOME", tempfile.mkdtemp(prefix="conditune_home_"))
    budget = Budget(args.budget)
    results = {
        "cpu_dry_run": args.cpu_dry_run,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "machine": machine_info(),
    }
    # seconds each part needs at least (full size), so the last one is not started to be cut off
    needs = (
        {"block": 20, "train": 40, "checkpoint": 120}
        if not args.cpu_dry_run
        else {"block": 0, "train": 0, "checkpoint": 0}
    )
    status = 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for part in [x for x in args.parts.split(",") if x]:
            if budget.left() < needs[part]:
                results[part] = {
                    "error": f"not started: {budget.left():.0f} s of the budget left, needs ~{needs[part]} s"
                }
                continue
            start = perf_counter()
            print(f"== {part} (budget left {budget.left():.0f} s)", flush=True)
            try:
                if part == "block":
                    results[part] = part_block(args, device)
                elif part == "train":
                    results[part] = part_train(args, device, Path(tmp))
                else:
                    results[part] = part_checkpoint(args, device, Path(tmp), budget)
            except Exception:  # noqa: BLE001 - every part reports, the next still runs
                results[part] = {"error": traceback.format_exc(limit=8)}
                status = 1
            results[part]["part_seconds"] = perf_counter() - start
            results[part]["load_avg_after"] = load_average()
            write_results(out_dir / "gpu_check.json", results, render_markdown(results))
    checks = _verdicts(results)
    results["verdicts"] = checks
    write_results(out_dir / "gpu_check.json", results, render_markdown(results))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return status or (0 if all(checks.values()) else 1)


def _verdicts(results: dict) -> dict:
    block, tr, ck = results.get("block", {}), results.get("train", {}), results.get("checkpoint", {})
    return {
        "block: GPU and CPU kappas agree within their bounds": bool(block.get("all_agree")),
        "block: every bound holds against float64 SVD": bool(block.get("all_bounds_hold")),
        "train: bf16 first-step loss within 2% of float32": bool(tr.get("bf16_matches_float32")),
        "train: every bf16 loss finite": bool(tr.get("losses_finite")),
        "checkpoint: scanned, layer 0 within bounds": bool(ck.get("verification"))
        and all(v["rel_err"] <= v["bound"] for v in ck["verification"].values()),
    }


if __name__ == "__main__":
    sys.exit(main())
