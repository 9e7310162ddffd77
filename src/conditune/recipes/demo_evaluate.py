"""The demo's evaluation: WER with 95 % intervals on the test and held-out-voice sets, Whisper's own decoder on
the same audio, and forgetting of the LLM alone on general text the speech never said."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

SETS = {"test": "test set (voices of the training mix)", "test_heldout_voice": "held-out voice (never trained on)"}


def stage_evaluate(con, final_dir: Path, train_cfg, speech: dict[str, Path], demo) -> dict[str, Any]:
    import torch

    from conditune.evaluation.pair import load_trained_pair
    from conditune.machine import usable_cores
    from conditune.models import conditune_home

    torch.set_num_threads(usable_cores())
    cache = train_cfg.data.feature_cache or conditune_home() / "features"
    pair = load_trained_pair(final_dir, load_encoder=True, cache_dir=cache)
    timings: dict[str, float] = {}
    sets = {}
    for name in (n for n in SETS if n in speech):
        started = time.monotonic()
        sets[name] = evaluate_set(con, pair, speech[name], name, train_cfg, demo)
        timings[name] = time.monotonic() - started
    started = time.monotonic()
    forgetting = measure_forgetting(con, pair, speech, demo)
    timings["forgetting_and_agreement"] = time.monotonic() - started
    return {"sets": sets, "forgetting": forgetting.text, "agreement": forgetting.agreement.get("en"),
            "timings": timings, "adaptor_parameters": sum(p.numel() for p in pair.model.adaptor.parameters())}  # fmt: skip


def evaluate_set(con, pair, manifest: Path, name: str, train_cfg, demo) -> dict[str, Any]:
    """WER (+ interval) of the speech LLM on one manifest, and of Whisper's decoder beside it."""
    from conditune.data.examples import prepare_examples, read_manifests
    from conditune.evaluation.reference import whisper_reference
    from conditune.evaluation.transcription import evaluate_examples
    from conditune.training.progress import ProgressBar

    utts, _ = read_manifests(manifest)
    examples = prepare_examples(utts, pair.processor, batch_size=16).examples
    with ProgressBar(demo.progress, name, len(examples)) as bar:
        result = evaluate_examples(pair.model, pair.processor, examples, batch_size=8,
                                   max_new_tokens=train_cfg.evaluation.max_new_tokens, progress=bar.callback)  # fmt: skip
    out = {"wer": {k: result.wer.get(k, math.nan) for k in ("en", "de", "all")}, "ci": result.intervals(),
           "utterances": len(examples), "predictions": [{**p, "set": name} for p in result.predictions],
           "voices": sorted(_voices(manifest))}  # fmt: skip
    con.log(f"{SETS[name]}: WER " + ", ".join(f"{k} {_interval(out['ci'].get(k))}" for k in ("en", "de", "all"))
            + f" ({len(examples)} utterances)")  # fmt: skip
    if demo.whisper_reference:
        with ProgressBar(demo.progress, f"{name} (Whisper)", len(examples)) as bar:
            reference = whisper_reference(examples, pair.processor.encoder, progress=bar.callback)
        out["whisper"] = {"wer": {k: reference.wer.get(k, math.nan) for k in ("en", "de", "all")},
                          "ci": reference.intervals()}  # fmt: skip
        con.log("  Whisper base's own decoder: " + ", ".join(f"{k} {_interval(out['whisper']['ci'].get(k))}"
                                                              for k in ("en", "de", "all")))  # fmt: skip
    return out


def measure_forgetting(con, pair, speech: dict[str, Path], demo):
    from conditune.evaluation.forgetting import DEFAULT_INSTRUCTIONS, ForgettingProbe, read_texts

    probe = ForgettingProbe(
        texts={lang: read_texts(speech[f"heldout_{lang}"], limit=demo.heldout) for lang in ("en", "de")},
        prompts={"en": DEFAULT_INSTRUCTIONS["en"][: demo.agreement_prompts]} if demo.agreement_prompts else {},
        batch_size=16,
        max_tokens=128,
    )
    result = probe.measure(pair.base, pair.adapted, pair.processor.tokenizer)
    for lang, f in result.text.items():
        con.log(f"forgetting ({lang}, {f['texts']} general sentences never spoken, {f['tokens']} tokens): perplexity "
                f"{f['perplexity_base']:.2f} -> {f['perplexity_adapted']:.2f}, KL {f['kl_to_base']:.4f} nats/token")  # fmt: skip
    agreement = result.agreement.get("en")
    if agreement:
        con.log(f"greedy agreement on {agreement['prompts']} instructions: {100 * agreement['agreement']:.1f}% of "
                f"tokens, {100 * agreement['exact']:.0f}% identical answers")  # fmt: skip
    return result


def _voices(manifest: Path) -> set[str]:
    import json

    voices = set()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        tts = json.loads(line).get("tts") or {}
        if tts.get("id"):
            voices.add(str(tts["id"]))
    return voices


def _interval(ci: dict | None) -> str:
    if not ci or not isinstance(ci.get("value"), float) or not math.isfinite(ci["value"]):
        return "–"
    return f"{ci['value']:.1f}% [{ci['low']:.1f}, {ci['high']:.1f}]"
