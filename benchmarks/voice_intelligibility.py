#!/usr/bin/env python
"""Is each synthetic voice intelligible? Whisper base's own decoder on every voice of the catalogue.

For each installed voice of ``conditune.data.engines.VOICES`` (one espeak-ng English accent stands
for the eight), the same ``--count`` sentences per language are spoken with that voice (prosody drawn
as for training) and transcribed by Whisper base's own decoder (CTranslate2, greedy, language forced:
``conditune.evaluation.reference.whisper_reference``, as ``benchmarks/whisper_reference.py``), scored
with the speech LLM's normalisers. A voice with a high WER produces speech even a strong recogniser
cannot read and should not be in the training mix; the synthesis seconds per utterance are measured on the same run.

The sentences are drawn from the language's text pool with their own seed (``--seed``), so they are
not the demo's test split. Writes ``results/data/voices.json`` and ``voices.md`` atomically, with
the machine and its load.

    python benchmarks/voice_intelligibility.py --count 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from conditune.data import engines, synth
from conditune.data.manifest import Utterance
from conditune.evaluation.reference import whisper_reference
from conditune.io import atomic_write_json, atomic_write_text
from conditune.machine import machine_description
from conditune.speech.configuration import EncoderConfig
from conditune.speech.encoders import build_encoder


def sentences_for(language: str, count: int, seed: int) -> list[str]:
    config = synth.SynthConfig(output=Path("."))
    pool = synth.language_pool(config, language, log=lambda message: None).sentences
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return [pool[i] for i in sorted(order)]


def voices_to_check() -> list[engines.Voice]:
    found = engines.available_engines(None)
    return [
        v
        for v in engines.VOICES
        if v.engine in found and engines.voice_installed(v) and (v.engine != "espeak-ng" or v.name in ("en-us", "de"))
    ]


def run_voice(voice, sentences, engine, encoder, scratch: Path) -> dict:
    utterances, settings, synth_seconds, audio_seconds = [], [], [], 0.0
    for index, text in enumerate(sentences):
        params = synth.voice_params(voice, synth.seeded_rng("intelligibility", voice.id, index))
        item = synth.SynthItem(f"{voice.id}-{index}", voice.language, "check", text, params, scratch / f"{index}.wav")
        duration, seconds = synth.synthesize_item(item, engine, synth.SAMPLE_RATE)
        synth_seconds.append(seconds)
        audio_seconds += duration
        utterances.append(Utterance(item.id, item.audio, text, voice.language))
        settings.append(params)
    evaluation = whisper_reference(utterances, encoder)
    return {
        "voice": voice.id,
        "language": voice.language,
        "human": voice.human,
        "weight": voice.weight,
        "utterances": len(utterances),
        "wer": evaluation.wer[voice.language],
        "synth_seconds_per_utterance": round(float(np.mean(synth_seconds)), 4),
        "audio_seconds_per_utterance": round(audio_seconds / len(utterances), 2),
        "predictions": [
            {"reference": p["reference"], "hypothesis": p["hypothesis"], "tts": tts}
            for p, tts in zip(evaluation.predictions, settings)
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=25, help="sentences per voice")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--languages", default="en,de")
    parser.add_argument("--output", type=Path, default=Path("results/data/voices.json"))
    args = parser.parse_args(argv)
    encoder = build_encoder(EncoderConfig(backend="ct2", path="demo:whisper-base"))
    found = engines.available_engines(None)
    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    texts = {lang: sentences_for(lang, args.count, args.seed) for lang in languages}
    load_before, start = os.getloadavg(), time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="conditune-voices-") as tmp:
        for voice in voices_to_check():
            if voice.language not in texts:
                continue
            result = run_voice(voice, texts[voice.language], found[voice.engine], encoder, Path(tmp))
            print(
                f"{voice.id}: WER {result['wer']:.1f} %, {result['synth_seconds_per_utterance']:.3f} s/utt", flush=True
            )
            results.append(result)
    report = {
        "what": "Whisper base's own decoder (CTranslate2, greedy, language forced) on each synthetic voice",
        "sentences_per_voice": args.count,
        "seed": args.seed,
        "missing_engines": engines.missing_engines(),
        "seconds": round(time.monotonic() - start, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "voices": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, report)
    atomic_write_text(args.output.with_suffix(".md"), markdown(report))
    print(json.dumps({r["voice"]: r["wer"] for r in results}))
    return 0


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Intelligibility of the synthetic voices (Whisper base's own decoder)",
        "",
        f"{report['sentences_per_voice']} sentences per voice (the same ones for every voice of a language, drawn "
        f"from the default text pool with seed {report['seed']}; prosody drawn as for training), "
        f"{report['date']}, {machine['cpu']} ({machine['cores']} cores), load average "
        f"{report['load_average_before'][0]:.2f} before and {report['load_average_after'][0]:.2f} after "
        f"({report['seconds']:.0f} s in all). Synthesis seconds are one thread's, under that load.",
        "",
        "| voice | language | human-derived | mix weight | WER % | synthesis s/utt | audio s/utt |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["voices"], key=lambda r: (r["language"], r["wer"])):
        lines.append(
            f"| {r['voice']} | {r['language']} | {'yes' if r['human'] else 'no'} | {r['weight']} | {r['wer']:.1f} | "
            f"{r['synth_seconds_per_utterance']:.3f} | {r['audio_seconds_per_utterance']:.1f} |"
        )
    if report["missing_engines"]:
        lines += ["", "Not installed: " + ", ".join(report["missing_engines"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from conditune.errors import CondituneError

    try:
        sys.exit(main())
    except CondituneError as exc:
        print(f"voice_intelligibility: {exc}", file=sys.stderr)
        sys.exit(1)
