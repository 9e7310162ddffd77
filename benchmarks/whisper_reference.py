#!/usr/bin/env python
"""What the demo's frozen encoder can reach: Whisper base's *own* decoder on the demo's test audio.

The speech LLM sees only Whisper base's encoder frames; the Whisper decoder that was trained with that
encoder on 680k hours is a natural reference for the WER a small adaptor + 135M LLM could hope for on
the same audio. This transcribes a manifest with the CTranslate2 Whisper model (log-mel padded to 30 s
as Whisper was trained, greedy, the utterance's language forced, no timestamps) and scores it with the
same normalisers and WER code as ``conditune evaluate``.

    python benchmarks/whisper_reference.py                       # the demo's cached test split
    python benchmarks/whisper_reference.py --manifest data/speech/test.jsonl --output results/demo/whisper_reference.json

Writes JSON (WER per language, every transcription, machine) and a short Markdown beside it, atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from conditune.data.manifest import read_manifest
from conditune.evaluation.reference import whisper_reference
from conditune.io import atomic_write_json, atomic_write_text
from conditune.machine import machine_description
from conditune.models import conditune_home
from conditune.speech.configuration import EncoderConfig
from conditune.speech.encoders import build_encoder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=conditune_home() / "demo" / "speech" / "test.jsonl")
    parser.add_argument(
        "--model", default="demo:whisper-base", help="a CTranslate2 Whisper folder or demo:whisper-base"
    )
    parser.add_argument("--output", type=Path, default=Path("results/demo/whisper_reference.json"))
    args = parser.parse_args(argv)
    encoder = build_encoder(EncoderConfig(backend="ct2", path=args.model))
    data = read_manifest(args.manifest)
    start = time.monotonic()
    reference = whisper_reference(data.utterances, encoder)
    seconds = time.monotonic() - start
    rows, wer = reference.predictions, reference.summary()
    result = {
        "what": "Whisper base's own decoder (CTranslate2, greedy, 30 s padding, language forced)",
        "manifest": str(args.manifest),
        "utterances": len(rows),
        "wer": wer,
        "wer_ci": reference.intervals(),
        "seconds": round(seconds, 1),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "predictions": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, result)
    lines = [
        f"# Whisper base's own decoder on `{args.manifest.name}`",
        "",
        f"{len(rows)} utterances from `{args.manifest.name}`, {seconds:.0f} s on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores), {result['date']}.",
        "",
        "| language | WER % | 95 % bootstrap interval |",
        "|---|---|---|",
    ]
    ci = result["wer_ci"]
    lines += [f"| {k} | {v:.1f} | [{ci[k]['low']:.1f}, {ci[k]['high']:.1f}] |" for k, v in wer.items()]
    atomic_write_text(args.output.with_suffix(".md"), "\n".join(lines) + "\n")
    print(json.dumps({"wer": wer, "utterances": len(rows), "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    from conditune.errors import CondituneError

    try:
        sys.exit(main())
    except CondituneError as exc:  # missing manifest or model: one line, exit 1
        print(f"whisper_reference: {exc}", file=sys.stderr)
        sys.exit(1)
