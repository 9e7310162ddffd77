"""What several commands share: quiet libraries, finding and loading a trained speech model."""

from __future__ import annotations

import os
from pathlib import Path

from conditune.errors import CondituneError


def quiet_libraries() -> None:
    """No weight-loading / GGUF de-quantisation progress bars or info logs from transformers on the user's console."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - transformers missing or changed: its output is cosmetic
        pass


def resolve_model_dir(path: Path) -> Path:
    """A model folder, a checkpoint, or a training output folder (its ``final/`` or latest checkpoint)."""
    from conditune.speech.configuration import read_model_config
    from conditune.training.checkpoint import latest_checkpoint

    if not path.exists():
        raise CondituneError(f"{path} does not exist")
    for candidate in (path, path / "final"):
        try:
            read_model_config(candidate)
            return candidate
        except CondituneError:
            continue
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CondituneError(f"{path}: not a speech model, checkpoint or training output folder")


def load_for_inference(checkpoint: Path, *, device: str | None, llm: str | None = None, encoder: str | None = None,
                       cache_dir: Path | None = None):  # fmt: skip
    """(model, processor) of a trained speech LLM for transcription; ``llm`` / ``encoder`` when they moved."""
    from conditune.speech.modeling import SpeechLLM
    from conditune.speech.processing import SpeechProcessor

    quiet_libraries()
    overrides = {}
    if llm:
        overrides.update({"llm.path": llm, "llm.gguf_file": None})
    if encoder:
        overrides["encoder.path"] = encoder
    folder = resolve_model_dir(checkpoint)
    processor = SpeechProcessor.from_pretrained(folder, overrides=overrides, cache_dir=cache_dir)
    model = SpeechLLM.from_pretrained(folder, device=device, overrides=overrides)
    model.eval()
    return model, processor
