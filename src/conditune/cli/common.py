"""What several commands share: loading a trained speech model for transcription."""

from __future__ import annotations

from pathlib import Path

from conditune.training.checkpoint import find_model_dir


def load_for_inference(checkpoint: Path, *, device: str | None, llm: str | None = None, encoder: str | None = None,
                       cache_dir: Path | None = None):  # fmt: skip
    """(model, processor) of a trained speech LLM for transcription; ``llm`` / ``encoder`` when they moved."""
    from conditune.speech.modeling import SpeechLLM
    from conditune.speech.processing import SpeechProcessor

    overrides = {}
    if llm:
        overrides.update({"llm.path": llm, "llm.gguf_file": None})
    if encoder:
        overrides["encoder.path"] = encoder
    folder = find_model_dir(checkpoint)
    processor = SpeechProcessor.from_pretrained(folder, overrides=overrides, cache_dir=cache_dir)
    model = SpeechLLM.from_pretrained(folder, device=device, overrides=overrides)
    model.eval()
    return model, processor


def speech_check(files) -> dict:
    """``{file: SpeechActivity}`` of each audio file's first 30 s (an energy check: silence and steady noise
    give confident nonsense when decoded); an unreadable file is one error line naming it."""
    from conditune.data.audio import load_audio, speech_activity

    return {f: speech_activity(load_audio(f, max_seconds=30.0)) for f in files}


def check_generation_options(*, batch_size: int, beams: int, max_new_tokens: int, device: str | None) -> None:
    """The options ``transcribe`` and ``evaluate`` share, checked before the model loads (one line each)."""
    from conditune.validation import require_device, require_int

    require_int(batch_size, "--batch-size", minimum=1)
    require_int(beams, "--beams", minimum=1)
    require_int(max_new_tokens, "--max-new-tokens", minimum=1)
    if device is not None:
        require_device(device, "--device", allow_auto=False)
