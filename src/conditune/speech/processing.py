"""The speech LLM's processor: feature extraction (the frozen encoder, through the feature cache) and text.

As a transformers processor pairs a feature extractor with a tokenizer, :class:`SpeechProcessor` pairs

* :class:`SpeechFeatureExtractor`: 16 kHz audio -> frozen Whisper encoder frames (``input_features``
  ``[B, T, D]`` with an ``attention_mask``), from the on-disk :class:`~conditune.speech.features.FeatureCache`
  when the audio is a file it has seen; it is a transformers ``SequenceFeatureExtractor``, so the ASR
  pipeline can call it;
* the base LLM's tokenizer (``tokenize`` / ``decode``).

The encoder is frozen and referenced by path, so nothing of the processor is saved with a model: it is
rebuilt from the model's config (:meth:`SpeechProcessor.from_pretrained`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor

from conditune.errors import CondituneError
from conditune.speech.configuration import SpeechLLMConfig
from conditune.speech.encoders import SpeechEncoder, build_encoder
from conditune.speech.features import FeatureCache, pad_frames

SAMPLE_RATE = 16000


class SpeechFeatureExtractor(SequenceFeatureExtractor):
    """Audio -> frozen encoder frames. Files go through the feature cache; waveforms are encoded directly."""

    model_input_names = ["input_features", "attention_mask"]  # noqa: RUF012 - transformers' class attribute

    def __init__(self, encoder: SpeechEncoder, cache: FeatureCache | None = None, **kwargs):
        super().__init__(feature_size=encoder.dim, sampling_rate=SAMPLE_RATE, padding_value=0.0, **kwargs)
        self.encoder = encoder
        self.cache = cache if cache is not None else FeatureCache(encoder, None)

    def frames(self, inputs: Sequence[str | Path | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames [B, T, D], lengths [B])`` for audio files and/or 16 kHz waveforms."""
        items: list[torch.Tensor | None] = [None] * len(inputs)
        files = [i for i, x in enumerate(inputs) if isinstance(x, (str, Path))]
        if files:
            for i, frames in zip(files, self.cache.get([inputs[i] for i in files])):
                items[i] = frames
        waves = [i for i, x in enumerate(inputs) if not isinstance(x, (str, Path))]
        if waves:
            frames, lengths = self.encoder.encode([np.asarray(inputs[i], dtype=np.float32) for i in waves])
            for row, i in enumerate(waves):
                items[i] = frames[row, : int(lengths[row])]
        return pad_frames(items)

    def __call__(
        self,
        raw_speech: np.ndarray | Sequence[np.ndarray],
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        return_attention_mask: bool = True,
        **kwargs: Any,
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != SAMPLE_RATE:
            raise CondituneError(f"audio at {sampling_rate} Hz: the speech LLM takes {SAMPLE_RATE} Hz")
        batch = [raw_speech] if isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1 else list(raw_speech)
        frames, lengths = self.frames([np.asarray(w, dtype=np.float32).reshape(-1) for w in batch])
        data = {"input_features": frames}
        if return_attention_mask:
            data["attention_mask"] = (torch.arange(frames.shape[1])[None, :] < lengths[:, None]).long()
        return BatchFeature(data, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:  # the encoder is referenced by path in the model's config
        return {"feature_extractor_type": type(self).__name__, "encoder": str(self.encoder.path)}


class SpeechProcessor:
    """Feature extractor (frozen encoder + cache; None for text-only use) and tokenizer."""

    def __init__(self, *, feature_extractor: SpeechFeatureExtractor | None, tokenizer):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    @classmethod
    def from_config(
        cls,
        config: SpeechLLMConfig,
        *,
        load_encoder: bool = True,
        cache_dir: str | Path | None = None,
        memory_cache: bool = True,
    ) -> SpeechProcessor:
        """Encoder (unless ``load_encoder=False``) and tokenizer as ``config`` names them; encoder outputs cached
        under ``cache_dir`` (None: in memory only)."""
        from conditune.speech.loading import load_tokenizer

        extractor = None
        if load_encoder:
            encoder = build_encoder(config.encoder)
            extractor = SpeechFeatureExtractor(encoder, FeatureCache(encoder, cache_dir, memory=memory_cache))
        return cls(feature_extractor=extractor, tokenizer=load_tokenizer(config.llm))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        load_encoder: bool = True,
        cache_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> SpeechProcessor:
        return cls.from_config(
            SpeechLLMConfig.from_pretrained(directory, overrides), load_encoder=load_encoder, cache_dir=cache_dir
        )

    # ------------------------------------------------------------------ audio

    @property
    def encoder(self) -> SpeechEncoder:
        if self.feature_extractor is None:
            raise CondituneError("this processor was built without its encoder (load_encoder=False)")
        return self.feature_extractor.encoder

    @property
    def cache(self) -> FeatureCache:
        return self.feature_extractor.cache if self.feature_extractor is not None else None

    def frames(self, inputs: Sequence[str | Path | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames for audio files (through the cache) and/or 16 kHz waveforms."""
        if self.feature_extractor is None:
            raise CondituneError("this processor was built without its encoder (load_encoder=False)")
        return self.feature_extractor.frames(inputs)

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def batch_decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in rows]

    def special_token_ids(self) -> dict[str, int | None]:
        return {key: getattr(self.tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
