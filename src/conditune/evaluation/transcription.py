"""The one transcribe-and-score path: audio -> transcripts -> WER per language.

Used by ``conditune transcribe`` / ``evaluate``, the trainer's dev evaluation, the demo and the
experiment. Generation is greedy (``num_beams=1``) or beam search, batched; prepared examples are
transcribed in order of length (little padding) and returned in their own order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Evaluation:
    wer: dict[str, Any]  # {"all": %, "<lang>": %, "counts": {...}} (see conditune.evaluation.wer)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # audio, reference, hypothesis, language

    def intervals(self, *, seed: int = 0) -> dict[str, dict[str, float]]:
        """95 % bootstrap interval of each WER (utterances resampled): ``{group: {"value", "low", "high"}}``."""
        from conditune.evaluation.wer import wer_intervals

        p = self.predictions
        return wer_intervals([x["reference"] for x in p], [x["hypothesis"] for x in p], [x["language"] for x in p],
                             seed=seed)  # fmt: skip

    def summary(self) -> dict[str, float]:
        """The WER per group without the counts."""
        return {k: v for k, v in self.wer.items() if k != "counts"}


def transcribe(
    model,
    processor,
    inputs: Sequence[str | Path | np.ndarray],
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    autocast: Callable[[], Any] | None = None,
) -> list[str]:
    """Transcripts of audio files (through the processor's feature cache) or 16 kHz waveforms, in input order."""
    items = list(inputs)
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        frames, lengths = processor.frames(items[start : start + batch_size])
        with autocast() if autocast is not None else contextlib.nullcontext():
            rows = model.generate_ids(frames, lengths, num_beams=num_beams, max_new_tokens=max_new_tokens)
        texts += processor.batch_decode(rows)
    return texts


def transcribe_examples(
    model,
    processor,
    examples: Sequence,
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    autocast: Callable[[], Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Transcripts of prepared examples (``.audio``, ``.frames``), batched by length, in the examples' order."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].frames)
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = transcribe(
            model,
            processor,
            [examples[i].audio for i in idx],
            batch_size=len(idx),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            autocast=autocast,
        )
        by_index.update(zip(idx, texts))
        if progress:
            progress(len(idx))
    return [by_index[i] for i in range(len(examples))]


def score(references: Sequence[str], hypotheses: Sequence[str], languages: Sequence[str]) -> dict[str, Any]:
    """Corpus WER (percent, Whisper-normalised) overall and per language; ``{"all": nan}`` for no utterance."""
    from conditune.evaluation.wer import word_error_rate

    if not references:
        return {"all": math.nan}
    return word_error_rate(list(references), list(hypotheses), list(languages))


def evaluate_examples(model, processor, examples: Sequence, **generation: Any) -> Evaluation:
    """Transcribe ``examples`` and score them: WER per language (+ ``all``) and every prediction."""
    hypotheses = transcribe_examples(model, processor, examples, **generation)
    predictions = [
        {"audio": str(e.audio), "reference": e.text, "hypothesis": h, "language": e.language}
        for e, h in zip(examples, hypotheses)
    ]
    return Evaluation(score([e.text for e in examples], hypotheses, [e.language for e in examples]), predictions)
