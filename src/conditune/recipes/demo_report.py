"""The demo's ``report.md``: what was trained, the results, timings, example transcriptions, the machine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from conditune.io import atomic_write_text

READOUT_NOTE = {
    "embeddings": ", the LLM reading one position per CTC-labelled token (the CTC posterior times its own "
    "token embeddings)"
}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(text: str, width: int = 140) -> str:
    text = " ".join((text or "").split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|") or "∅"


def _examples(predictions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    out = []
    for lang in ("en", "de"):
        out += [p for p in predictions if p["language"] == lang][: n // 2]
    return out


def _result_rows(metrics: dict[str, Any], agreement: dict[str, Any] | None) -> list[str]:
    w, f, fd = metrics["wer"], metrics["forgetting"], metrics.get("forgetting_de", {})
    rows = [
        f"| test WER, English | {_fmt(w['en'], 1)} % |",
        f"| test WER, German | {_fmt(w['de'], 1)} % |",
        f"| test WER, all | {_fmt(w['all'], 1)} % |",
        f"| held-out English perplexity, base → adapted | {_fmt(f['perplexity_base'])} → "
        f"{_fmt(f['perplexity_adapted'])} |",
        f"| KL(base ‖ adapted), English, nats/token | {_fmt(f['kl_to_base'], 4)} |",
    ]
    if fd:
        rows += [
            f"| held-out German perplexity, base → adapted | {_fmt(fd['perplexity_base'])} → "
            f"{_fmt(fd['perplexity_adapted'])} |",
            f"| KL(base ‖ adapted), German, nats/token | {_fmt(fd['kl_to_base'], 4)} |",
        ]
    if agreement:
        rows.append(
            f"| greedy agreement with the base on {agreement['prompts']} instructions | "
            f"{100 * agreement['agreement']:.1f} % of tokens, {100 * agreement['exact']:.0f} % identical |"
        )
    return rows


def write_report(
    path: Path,
    metrics: dict[str, Any],
    predictions: list[dict[str, Any]],
    machine: dict[str, Any],
    agreement: dict[str, Any] | None,
) -> None:
    tr = metrics["trainable"]
    align = metrics.get("align_steps")
    lines = [
        "# conditune demo report",
        "",
        f"Speech LLM: frozen Whisper base (CTranslate2) → adaptor → SmolLM2-135M-Instruct, training the adaptor and "
        f"the {tr['tensors']} lowest-κ LLM tensors ({tr['parameters']:,} LLM parameters + "
        f"{metrics.get('trainable_adaptor_parameters', 0):,} adaptor parameters) for {metrics['steps']} steps"
        f"{' after ' + str(align) + ' CTC alignment steps of the adaptor' if align else ''}"
        f"{READOUT_NOTE.get(metrics.get('readout'), '')}; "
        f"{metrics['seconds']:.0f} s in all (budget {metrics['budget_seconds']:.0f} s).",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *_result_rows(metrics, agreement),
        "",
        "WER: percent, Whisper-normalised text, test split (synthetic speech, sentences never trained on). "
        "Perplexity and KL: the LLM alone on held-out sentences that are in no transcript.",
        "",
        "## Timings",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in metrics["timings"].items()],
        "",
        f"Set-up before training: {metrics['setup_seconds']:.1f} s "
        f"({'cached data, features and scan' if metrics.get('setup_cached') else 'first run'}).",
        "",
        "## Example transcriptions",
        "",
        "| lang | reference | transcription |",
        "|---|---|---|",
        *[
            f"| {p['language']} | {_cell(p['reference'])} | {_cell(p['hypothesis'])} |"
            for p in _examples(predictions, 6)
        ],
    ]
    if agreement and agreement.get("samples"):
        lines += ["", "## Instruction following, base vs adapted (greedy, 24 tokens)", ""]
        lines += ["| prompt | base | adapted |", "|---|---|---|"]
        for s in agreement["samples"][:4]:
            lines.append(f"| {_cell(s['prompt'])} | {_cell(s['base'])} | {_cell(s['adapted'])} |")
    lines += ["", "## Machine", "", *[f"- {k}: {v}" for k, v in machine.items() if v is not None]]
    lines += [
        "",
        "Plots: `training.png` (training loss and dev WER over steps), `kappa_selected.png` (κ of the selected "
        "vs frozen tensors). Numbers: `metrics.json`; all test transcriptions: `predictions.jsonl`.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
