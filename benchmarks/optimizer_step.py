#!/usr/bin/env python
"""AdamW's step over the real SmolLM2-135M: torch's per-tensor loop (conditune's default) against its fused
kernel (``optimizer.fused: true``), side by side, and how far apart their parameters are after the steps.

Both optimizers hold every parameter of the model as the trainer groups them (``build_optimizer``: decay on
matrices only, as the ``full`` arm trains), with the same seeded gradients each step. The two run interleaved
over ``--rounds`` so that a change of machine load hits them alike; the median step time of each is reported,
and the ratio. Writes ``results/bench/optimizer_step.{json,md}`` atomically (machine and load included).

    .venv/bin/python benchmarks/optimizer_step.py            # ~1 min on 2 cores (SmolLM2 from `conditune models fetch`)
    .venv/bin/python benchmarks/optimizer_step.py --quick    # a tiny Llama, seconds: the script's smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from conditune.io import atomic_write_json, atomic_write_text
from conditune.machine import machine_description
from conditune.training.config import OptimizerConfig
from conditune.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per optimizer and round")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2")
    p.add_argument("--output", type=Path, default=ROOT / "results" / "bench" / "optimizer_step")
    return p.parse_args(argv)


def load_model(quick: bool) -> tuple[torch.nn.Module, str]:
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        return LlamaForCausalLM(cfg), "tiny random Llama"
    from conditune.speech.configuration import LLMConfig
    from conditune.speech.loading import load_llm

    return load_llm(LLMConfig(path="demo:smollm2")), "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to float32)"


def seeded_gradients(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3


def main(argv=None) -> int:
    args = parse(argv)
    torch.manual_seed(0)
    model, name = load_model(args.quick)
    models = {"loop": model, "fused": copy.deepcopy(model)}
    optimizers = {
        kind: build_optimizer(m, SimpleNamespace(optimizer=OptimizerConfig(lr=1e-4, fused=kind == "fused")))
        for kind, m in models.items()
    }
    params = sum(p.numel() for p in model.parameters())
    load_before = machine_description()["load_average"]
    times: dict[str, list[float]] = {kind: [] for kind in models}
    step = 0
    for kind in models:  # warm-up: the optimizer states are created here
        seeded_gradients(models[kind], step)
        optimizers[kind].step()
    for _ in range(args.rounds):
        for kind in models:
            for k in range(args.steps):
                seeded_gradients(models[kind], step + 1 + k)
                started = time.perf_counter()
                optimizers[kind].step()
                times[kind].append(time.perf_counter() - started)
        step += args.steps
    with torch.no_grad():
        diff = max(
            float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
            for a, b in zip(models["loop"].parameters(), models["fused"].parameters())
        )
    median = {kind: statistics.median(t) for kind, t in times.items()}
    results = {
        "model": name,
        "parameters": params,
        "steps_each": len(times["loop"]),
        "rounds": args.rounds,
        "median_step_s": median,
        "min_step_s": {kind: min(t) for kind, t in times.items()},
        "speedup_fused": median["loop"] / median["fused"],
        "max_relative_parameter_difference": diff,
        "threads": torch.get_num_threads(),
        "machine": machine_description(),
        "load_average_before": load_before,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = args.output.with_name(args.output.name + ("_quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), results)
    m = results["machine"]
    atomic_write_text(
        out.with_suffix(".md"),
        "\n".join(
            [
                "# AdamW step: per-tensor loop vs fused kernel",
                "",
                f"{name}, {params / 1e6:.1f}M parameters, all trained; {results['steps_each']} steps each, "
                f"interleaved over {args.rounds} rounds, {results['threads']} threads.",
                f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average before "
                f"{load_before}, after {m['load_average']}; {results['date']}.",
                "",
                "| optimizer | median s/step | best s/step |",
                "|---|---|---|",
                *(f"| {kind} | {median[kind]:.4f} | {results['min_step_s'][kind]:.4f} |" for kind in times),
                "",
                f"Fused is {results['speedup_fused']:.2f}x the loop; after {step + 1} steps the parameters differ "
                f"by at most {diff:.1e} of a tensor's largest entry (rounding).",
                "",
            ]
        ),
    )
    print(f"loop {median['loop']:.4f} s/step, fused {median['fused']:.4f} s/step ({results['speedup_fused']:.2f}x); "
          f"max relative difference {diff:.1e} -> {out.with_suffix('.json')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
