"""The demo's ``report.md``: what was trained, on what, the results with their intervals, speeds and the plan,
example transcriptions, the machine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from conditune.io import atomic_write_text

READOUT_NOTE = {
    "embeddings": ", the LLM reading one position per CTC-labelled token (the CTC posterior times its own "
    "token embeddings)"
}
SET_NAMES = {"test": "test set", "test_heldout_voice": "held-out voice"}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _ci(ci: dict | None) -> str:
    if not ci or not isinstance(ci.get("value"), (int, float)) or not math.isfinite(ci["value"]):
        return "–"
    return f"{ci['value']:.1f} [{ci['low']:.1f}, {ci['high']:.1f}]"


def _cell(text: str, width: int = 140) -> str:
    text = " ".join((text or "").split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|") or "∅"


def _reference_hint(ev: dict[str, Any]) -> str:
    if any(s.get("whisper") for s in ev["sets"].values()):
        return ""
    return (" Whisper base's own decoder on the same audio (the reference row): `demo.whisper_reference=true`, "
            "or `benchmarks/whisper_reference.py`.")  # fmt: skip


def _wer_rows(ev: dict[str, Any]) -> list[str]:
    rows = ["| audio | model | English | German | all | utterances |", "|---|---|---|---|---|---|"]
    for name, s in ev["sets"].items():
        label = SET_NAMES.get(name, name) + (
            f" ({', '.join(s['voices'])})" if name != "test" and s.get("voices") else ""
        )
        rows.append(f"| {label} | this speech LLM | {_ci(s['ci'].get('en'))} | {_ci(s['ci'].get('de'))} | "
                    f"{_ci(s['ci'].get('all'))} | {s['utterances']} |")  # fmt: skip
        if s.get("whisper"):
            w = s["whisper"]["ci"]
            rows.append(f"| {label} | Whisper base's own decoder (reference) | {_ci(w.get('en'))} | {_ci(w.get('de'))} | "
                        f"{_ci(w.get('all'))} | {s['utterances']} |")  # fmt: skip
    return rows


def _forgetting_rows(metrics: dict[str, Any]) -> list[str]:
    rows = [
        "| language | perplexity base → adapted | KL(base ‖ adapted), nats/token | sentences |",
        "|---|---|---|---|",
    ]
    for lang, key in (("English", "forgetting"), ("German", "forgetting_de")):
        f = metrics.get(key) or {}
        if f:
            rows.append(f"| {lang} | {_fmt(f['perplexity_base'])} → {_fmt(f['perplexity_adapted'])} | "
                        f"{_fmt(f['kl_to_base'], 4)} | {f['texts']} |")  # fmt: skip
    a = metrics.get("agreement")
    if a:
        rows += ["", f"Greedy agreement with the base on {a['prompts']} instructions: {100 * a['agreement']:.1f} % of "
                     f"tokens, {100 * a['exact']:.0f} % identical answers."]  # fmt: skip
    return rows


def _plan_lines(metrics: dict[str, Any]) -> list[str]:
    speeds, plan = metrics.get("speeds"), metrics.get("plan")
    if not speeds or not plan:
        return ["Sizes and steps were fixed by the command (no plan)."]
    return [
        "Measured in this run (seconds): "
        + ", ".join(f"{k.removesuffix('_s')} {v:.3g}" for k, v in speeds.items())
        + ".",
        "",
        f"Plan: {plan['train_per_language']} training utterances per language, {plan['align_steps']} alignment + "
        f"{plan['main_steps']} main steps (training limit {plan['train_seconds']:.0f} s), data set-up "
        f"{plan['setup_seconds']:.0f} s, evaluation {plan['reserve_seconds']:.0f} s.",
    ]


def write_report(path: Path, metrics: dict[str, Any], ev: dict[str, Any], machine: dict[str, Any]) -> None:
    tr, t = metrics["trainable"], metrics["train"]
    align = metrics.get("align_steps")
    lines = [
        "# conditune demo report",
        "",
        f"Speech LLM: frozen Whisper base (CTranslate2) → adaptor → SmolLM2-135M-Instruct, training the adaptor and "
        f"the {tr['tensors']} lowest-κ LLM tensors ({tr['parameters']:,} LLM parameters + "
        f"{metrics.get('trainable_adaptor_parameters', 0):,} adaptor parameters) for {metrics['steps']} steps"
        f"{' after ' + str(align) + ' CTC alignment steps of the adaptor' if align else ''}"
        f"{READOUT_NOTE.get(metrics.get('readout'), '')}, on {t['train_utterances']} training utterances; "
        f"{metrics['seconds']:.0f} s in all (budget {metrics['budget_seconds']:.0f} s).",
        "",
        "## Word error rate, % [95 % bootstrap interval]",
        "",
        *_wer_rows(ev),
        "",
        "Synthetic open-vocabulary speech, sentences never trained on; Whisper-normalised text in spoken form. The "
        "held-out voice speaks the test sentences and no training utterance." + _reference_hint(ev),
        "",
        "## Forgetting: the LLM alone on general text that was never spoken",
        "",
        *_forgetting_rows(metrics),
        "",
        "## Budget",
        "",
        *_plan_lines(metrics),
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in metrics["timings"].items() if isinstance(v, (int, float))],
        "",
        f"Set-up before training: {metrics['setup_seconds']:.1f} s"
        f"{' (data, features and scan cached)' if metrics.get('setup_cached') else ''}.",
        "",
        "## Example transcriptions",
        "",
        "| set | lang | reference | transcription |",
        "|---|---|---|---|",
        *[
            f"| {p['set']} | {p['language']} | {_cell(p['reference'])} | {_cell(p['hypothesis'])} |"
            for p in _examples(ev, 3)
        ],
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items() if v is not None],
        "",
        "Plots: `training.png` (training loss and dev WER over steps), `kappa_selected.png` (κ of the selected "
        "vs frozen tensors). Numbers: `metrics.json`; every transcription: `predictions.jsonl`.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _examples(ev: dict[str, Any], per_language: int) -> list[dict[str, Any]]:
    out = []
    for s in ev["sets"].values():
        for lang in ("en", "de"):
            out += [p for p in s["predictions"] if p["language"] == lang][:per_language]
    return out
