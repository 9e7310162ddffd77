"""The reference row: Whisper's *own* decoder on the same audio the speech LLM is scored on.

The speech LLM reads only the frozen encoder's frames; the decoder that was trained with that encoder
(on 680k hours) shows what the frames allow. Transcribed greedily with the utterance's language forced
(:meth:`conditune.speech.encoders.CT2WhisperEncoder.whisper_transcribe`) and scored with the same
normalisers and WER code as the speech LLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from conditune.errors import CondituneError
from conditune.evaluation.transcription import Evaluation, score


def whisper_reference(utterances: Sequence, encoder, *, progress: Callable[[int], None] | None = None) -> Evaluation:
    """Whisper's decoder on ``utterances`` (``.audio``, ``.text``, ``.language``): WER and predictions."""
    from conditune.data.audio import load_audio

    if not hasattr(encoder, "whisper_transcribe"):
        raise CondituneError(f"the {encoder.backend} encoder has no Whisper decoder to compare with (use ct2)")
    predictions = []
    for utt in utterances:
        language = getattr(utt, "language", None) or "en"
        wave = load_audio(utt.audio, max_seconds=encoder.config.max_seconds)
        text = encoder.whisper_transcribe(wave, language)
        predictions.append({"audio": str(utt.audio), "language": language, "reference": utt.text, "hypothesis": text})
        if progress:
            progress(1)
    wer = score([p["reference"] for p in predictions], [p["hypothesis"] for p in predictions],
                [p["language"] for p in predictions])  # fmt: skip
    return Evaluation(wer, predictions)
