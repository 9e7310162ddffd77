#!/usr/bin/env python
"""Can the adaptor learn to read the frozen encoder? CTC alignment probes, side by side in one run.

The cheapest test of whether the adaptor can carry the words to the LLM: train it alone (the LLM is not
run) on the alignment stage's CTC loss, where every adaptor output is scored against the LLM's own frozen
token embeddings plus a learned blank (the CTC head, the same code as ``training.align_steps``), then
greedy-decode the dev set with ``SpeechLLM.ctc_greedy_ids`` and score it with the project's WER.

Each setting (adaptor learning rate x data set) trains a fresh adaptor from the same seed for the same
number of steps at the same batch size. Found with these probes on 2026-12-02: the adaptor's post-norm
Transformer layers do not leave CTC's blank plateau at lr 1e-3 (or 2e-3), but do at 3e-4; and a set where
most tokens are heard once (200 fortunes per language: 871 of 1,149 English token types occur once)
cannot teach token identities, while a limited-vocabulary set (``conditune data synth --vocab-size 1000``)
can.

    python benchmarks/adaptor_alignment.py --data data/speech_v1000 --data data/speech \\
        --lr 1e-3 --lr 3e-4 --steps 300 --output results/adaptor_alignment.json

Writes JSON (per setting: loss and dev WER every ``--eval-every`` steps, seconds, examples) and a Markdown
table beside it, atomically. The data sets must exist (``conditune data synth``); their audio is encoded
once into the feature cache.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from conditune.config import to_dict
from conditune.data.examples import balanced_subset, prepare_examples, read_manifests
from conditune.evaluation.wer import word_error_rate
from conditune.io import atomic_write_json, atomic_write_text
from conditune.machine import machine_description
from conditune.models import conditune_home
from conditune.speech.modeling import SpeechLLM
from conditune.speech.processing import SpeechProcessor
from conditune.training.config import load_train_config


def probe(
    model: SpeechLLM,
    fresh_state: dict,
    processor: SpeechProcessor,
    train_ex,
    dev_ex,
    *,
    lr: float,
    steps: int,
    batch: int,
    eval_every: int,
    seed: int,
) -> dict:
    model.ctc_head.vocabulary = torch.zeros(0, dtype=torch.long)  # the fresh state's shapes, then this data set's
    model.ctc_head.resize_table(0)
    model.adaptor.load_state_dict(fresh_state)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.set_ctc_vocabulary([t for e in train_ex for t in e.tokens])  # as training does: dev words can be missing
    params = [p for p in model.adaptor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = min(20, steps // 10)

    def frames(examples):
        return processor.frames([str(e.audio) for e in examples])

    def dev_wer() -> float:
        hyps = []
        for i in range(0, len(dev_ex), 16):
            hyps += processor.batch_decode(model.ctc_greedy_ids(*frames(dev_ex[i : i + 16])))
        return word_error_rate([e.text for e in dev_ex], hyps, [e.language for e in dev_ex])["all"]

    curve, step, start, losses = [], 0, time.perf_counter(), []
    model.adaptor.train()
    while step < steps:
        order = list(range(len(train_ex)))
        rng.shuffle(order)
        for b in range(0, len(order) - batch + 1, batch):
            batch_ex = [train_ex[i] for i in order[b : b + batch]]
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            loss = model(*frames(batch_ex), [e.tokens for e in batch_ex], run_llm=False).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % eval_every == 0 or step == steps:
                mean = sum(losses[-eval_every:]) / len(losses[-eval_every:])
                curve.append({"step": step, "ctc_loss": round(mean, 3), "dev_wer": round(dev_wer(), 1)})
                print(f"  step {step}: ctc loss {mean:.2f}, dev WER {curve[-1]['dev_wer']:.1f} %", flush=True)
            if step >= steps:
                break
    return {"curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def write_markdown(path: Path, output: dict) -> None:
    machine = output["machine"]
    described = ", ".join(f"{k} {v}" for k, v in machine.items()) if isinstance(machine, dict) else str(machine)
    lines = [
        f"# Adaptor CTC alignment probes ({output['date']})",
        "",
        f"Machine: {described}. "
        f"{output['steps']} adaptor-only CTC steps at batch {output['batch']}, seed {output['seed']}; dev WER of greedy "
        "CTC decoding against the LLM's token embeddings.",
        "",
        "| variant | data | train utts | token types (heard once) | lr | dev WER by step | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in output["settings"]:
        curve = ", ".join(f"{c['step']}: {c['dev_wer']:.0f} %" for c in s["curve"])
        lines.append(
            f"| {s.get('variant', 'baseline')} | {s['data']} | {s['train_utterances']} | {s['token_types']} ({s['types_heard_once']}) | "
            f"{s['lr']:g} | {curve} | {s['seconds']:.0f} |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def probe_variant(name: str, config, datasets, lrs, args) -> list[dict]:
    """Every (data set, lr) setting for one model variant, each from the same fresh adaptor."""
    torch.manual_seed(args.seed)
    processor = SpeechProcessor.from_config(
        config.model, cache_dir=config.data.feature_cache or conditune_home() / "features"
    )
    model = SpeechLLM.build(config.model, encoder_dim=processor.encoder.dim, tokenizer=processor.tokenizer)
    fresh_state = {k: v.clone() for k, v in model.adaptor.state_dict().items()}  # every setting starts here
    settings = []
    for folder in datasets:
        train_utts, _ = read_manifests(folder / "train.jsonl")
        dev_utts = balanced_subset(read_manifests(folder / "dev.jsonl")[0], args.dev_utterances)
        print(f"{folder}: encoding {len(train_utts) + len(dev_utts)} utterances (cached)", flush=True)
        train_ex = prepare_examples(train_utts, processor, max_text_tokens=256).examples
        dev_ex = prepare_examples(dev_utts, processor, max_text_tokens=256).examples
        tokens = [t for e in train_ex for t in e.tokens]
        once = sum(1 for n in Counter(tokens).values() if n == 1)
        for lr in lrs:
            print(f"{name}: {folder} lr {lr:g}", flush=True)
            result = probe(model, fresh_state, processor, train_ex, dev_ex, lr=lr, steps=args.steps, batch=args.batch,
                           eval_every=args.eval_every, seed=args.seed)  # fmt: skip
            settings.append({"variant": name, "data": str(folder), "train_utterances": len(train_ex),
                             "dev_utterances": len(dev_ex), "train_tokens": len(tokens), "token_types": len(set(tokens)),
                             "types_heard_once": once, "lr": lr, **result})  # fmt: skip
    return settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", type=Path, help="folder with train.jsonl/dev.jsonl (repeatable)")
    parser.add_argument("--lr", action="append", type=float, help="adaptor learning rate (repeatable)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--dev-utterances", type=int, default=80, help="dev utterances scored (first N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="configs/speech_demo.yaml", help="model section: encoder, LLM, adaptor")
    parser.add_argument("--output", type=Path, default=Path("results/adaptor_alignment.json"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE]",
                        help="a model variant to probe too (repeatable), e.g. learned=model.ctc.learn_table=true")  # fmt: skip
    args = parser.parse_args(argv)
    datasets, lrs = args.data or [Path("data/speech_v1000")], args.lr or [1e-3, 3e-4]
    for folder in datasets:
        if not (folder / "train.jsonl").is_file() or not (folder / "dev.jsonl").is_file():
            print(f"error: {folder}: no train.jsonl/dev.jsonl (make it with conditune data synth)", file=sys.stderr)
            return 2

    variants = {"baseline": []}
    for item in args.variant:
        name, _, rest = item.partition("=")
        variants[name] = [kv for kv in rest.split(";") if kv]
    settings = []
    for name, overrides in variants.items():
        config = load_train_config(args.config, ["model.trainable.mode=none", f"training.seed={args.seed}", *overrides])
        settings += probe_variant(name, config, datasets, lrs, args)
    output = {
        "benchmark": "adaptor_alignment",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "adaptor": to_dict(config.model.adaptor),
        "variants": variants,
        "settings": settings,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, output)
    write_markdown(args.output.with_suffix(".md"), output)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
