#!/usr/bin/env python
"""Forgetting of a trained speech LLM's LLM alone, measured as the demo and the experiment measure it.

Perplexity and mean per-token KL(base ‖ adapted) on held-out sentences per language, and greedy-answer
agreement with the base model on the first ``--prompts`` English instructions of
``conditune.evaluation.forgetting.DEFAULT_INSTRUCTIONS``.

    python benchmarks/forgetting_of_run.py runs/speech_demo \\
        --heldout en=data/speech_v1000/heldout_text.en.txt --heldout de=data/speech_v1000/heldout_text.de.txt \\
        --output results/speech_listening/forgetting.json

Writes JSON (metrics per language, agreement, machine, seconds) atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from conditune.errors import CondituneError
from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, ForgettingProbe, read_texts
from conditune.evaluation.pair import load_trained_pair
from conditune.io import atomic_write_json
from conditune.machine import machine_description
from conditune.training.checkpoint import find_model_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="trained model folder, checkpoint, or training output folder")
    parser.add_argument(
        "--heldout", action="append", default=[], metavar="LANG=PATH", help="held-out text file per language"
    )
    parser.add_argument("--limit", type=int, default=100, help="held-out sentences per language")
    parser.add_argument("--prompts", type=int, default=10, help="English instructions for greedy agreement")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    heldout = {}
    for item in args.heldout:  # checked before the minute of model loading
        lang, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"forgetting_of_run: --heldout wants LANG=PATH, got {item!r}")
        heldout[lang] = path
    start = time.monotonic()
    probe = ForgettingProbe(
        texts={lang: read_texts(path, limit=args.limit) for lang, path in heldout.items()},
        prompts={"en": DEFAULT_INSTRUCTIONS["en"][: args.prompts]} if args.prompts else {},
        batch_size=16,
        max_tokens=128,
    )
    pair = load_trained_pair(find_model_dir(args.run))
    measured = probe.measure(pair.base, pair.adapted, pair.processor.tokenizer)
    for lang, m in measured.text.items():
        print(
            f"{lang}: perplexity {m['perplexity_base']:.2f} -> {m['perplexity_adapted']:.2f}, KL {m['kl_to_base']:.4f}"
        )
    result: dict = {"run": str(args.run), "machine": machine_description(), "forgetting": measured.text}
    if "en" in measured.agreement:
        result["agreement"] = measured.agreement["en"]
        print(f"greedy agreement: {100 * result['agreement']['agreement']:.1f}% of tokens")
    result["seconds"] = round(time.monotonic() - start, 1)
    atomic_write_json(args.output, result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CondituneError as exc:  # a missing run or text file: one line, not a traceback
        sys.exit(f"forgetting_of_run: {exc}")
