"""Frozen Whisper encoders behind one interface.

``encoder.encode(waveforms) -> (frames [B, T, D] float32, lengths [B])`` for 16 kHz mono float32 waveforms.
Both back-ends see the log-mel of the real length of each waveform (no padding to 30 s): the mel has
``samples // 160`` frames and the encoder halves it, so an utterance has ``ceil(mel_frames / 2)`` frames.

* ``hf``: a transformers Whisper folder (WhisperModel or WhisperForConditionalGeneration). Its
  ``WhisperEncoder.forward`` insists on exactly 3000 mel frames, so we run the same sub-modules ourselves
  with the positional embeddings sliced to the real length (what CTranslate2 and whisper.cpp do).
* ``ct2``: a CTranslate2 Whisper folder (``model.bin``), encoded with ``ctranslate2.models.Whisper.encode``,
  which accepts variable-length mel.

Waveforms are encoded in groups of equal mel length, so an utterance's frames never depend on what else
is in the batch (the feature cache relies on this).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from conditune.errors import CondituneError
from conditune.speech.configuration import EncoderConfig

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400


class WhisperMel:
    """Whisper log-mel features at the waveform's own length (``[n_mels, samples // 160]``)."""

    def __init__(self, n_mels: int = 80):
        from transformers import WhisperFeatureExtractor

        self.n_mels = n_mels
        self.extractor = WhisperFeatureExtractor(feature_size=n_mels)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        wav = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if wav.size < N_FFT:  # the STFT needs at least one window
            wav = np.pad(wav, (0, N_FFT - wav.size))
        feats = self.extractor(wav, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False, return_tensors="np")
        return np.asarray(feats["input_features"][0], dtype=np.float32)


def encoded_length(num_samples: int) -> int:
    """Encoder frames for a waveform of ``num_samples`` (mel frames halved by the strided conv)."""
    mel = max(num_samples, N_FFT) // HOP_LENGTH
    return math.ceil(mel / 2)


class SpeechEncoder:
    """Common part: mel, length grouping, padding. Subclasses implement ``_encode_mels``."""

    backend: str = ""
    dim: int = 0
    n_mels: int = 80
    max_mel_frames: int = 3000

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.path = Path(config.path)
        self.max_mel_frames = int(round(config.max_seconds * SAMPLE_RATE / HOP_LENGTH))
        self._mel: WhisperMel | None = None

    @property
    def mel(self) -> WhisperMel:
        if self._mel is None:
            self._mel = WhisperMel(self.n_mels)
        return self._mel

    @functools.cached_property
    def identity(self) -> str:
        """Stable id of this encoder's weights and settings (for the feature cache)."""
        digest = hashlib.sha256()
        digest.update(
            f"{self.backend}|{self.config.max_seconds}|{self.config.bucket_seconds}|{self.config.compute_type if self.backend == 'ct2' else ''}".encode()
        )
        for item in sorted(self.path.iterdir()) if self.path.is_dir() else [self.path]:
            if item.is_file() and item.suffix in (".json", ".bin", ".safetensors"):
                digest.update(item.name.encode())
                digest.update(_quick_file_hash(item).encode())
        return f"{self.backend}-{digest.hexdigest()[:16]}"

    def to(self, device) -> SpeechEncoder:
        return self

    @torch.no_grad()
    def encode(self, waveforms: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if not waveforms:
            raise ValueError("encode() needs at least one waveform")
        mels, valid = [], []
        bucket = int(round(self.config.bucket_seconds * SAMPLE_RATE))
        for wav in waveforms:
            wav = np.asarray(wav, dtype=np.float32).reshape(-1)
            real_mel = max(wav.size, N_FFT) // HOP_LENGTH
            if bucket > 0 and wav.size % bucket:
                wav = np.pad(wav, (0, bucket - wav.size % bucket))  # silence, as Whisper's own 30 s padding
            mel = self.mel(wav)
            if mel.shape[1] > self.max_mel_frames:
                warnings.warn(
                    f"audio longer than {self.config.max_seconds:g} s truncated for the encoder", stacklevel=2
                )
                mel = mel[:, : self.max_mel_frames]
                real_mel = min(real_mel, self.max_mel_frames)
            mels.append(mel)
            valid.append(math.ceil(real_mel / 2))
        outputs: list[np.ndarray | None] = [None] * len(mels)
        groups: dict[int, list[int]] = {}
        for i, mel in enumerate(mels):
            groups.setdefault(mel.shape[1], []).append(i)
        for _, idx in sorted(groups.items()):
            encoded = self._encode_mels(np.stack([mels[i] for i in idx]))
            for row, i in enumerate(idx):
                outputs[i] = encoded[row, : valid[i]]
        lengths = torch.tensor([o.shape[0] for o in outputs], dtype=torch.long)
        frames = torch.zeros(len(outputs), int(lengths.max()), outputs[0].shape[-1], dtype=torch.float32)
        for i, out in enumerate(outputs):
            frames[i, : out.shape[0]] = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return frames, lengths

    def _encode_mels(self, mels: np.ndarray) -> np.ndarray:  # [b, n_mels, T] -> [b, ceil(T/2), D]
        raise NotImplementedError


class HFWhisperEncoder(SpeechEncoder):
    backend = "hf"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        from transformers import WhisperModel

        if not (self.path / "config.json").is_file():
            raise CondituneError(f"{self.path}: not a transformers Whisper folder (no config.json)")
        try:
            model = WhisperModel.from_pretrained(str(self.path), dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - loader errors are user errors here
            raise CondituneError(f"cannot load Whisper encoder from {self.path}: {exc}") from None
        self.module = model.get_encoder().eval()
        del model
        self.module.requires_grad_(False)
        self.device = torch.device(config.device)
        self.module.to(self.device)
        self.dim = self.module.config.d_model
        self.n_mels = self.module.config.num_mel_bins
        self.max_mel_frames = min(self.max_mel_frames, 2 * self.module.config.max_source_positions)

    def to(self, device) -> HFWhisperEncoder:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def _encode_mels(self, mels: np.ndarray) -> np.ndarray:
        enc = self.module
        x = torch.from_numpy(mels).to(self.device, torch.float32)
        h = torch.nn.functional.gelu(enc.conv1(x))
        h = torch.nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        for layer in enc.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        h = enc.layer_norm(h)
        return h.float().cpu().numpy()


class CT2WhisperEncoder(SpeechEncoder):
    backend = "ct2"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        try:
            import ctranslate2
        except ImportError:
            raise CondituneError("the ct2 encoder back-end needs ctranslate2 (pip install ctranslate2)") from None
        if not (self.path / "model.bin").is_file():
            raise CondituneError(f"{self.path}: not a CTranslate2 Whisper folder (no model.bin)")
        self._ct2 = ctranslate2
        kwargs = {"device": config.device, "compute_type": config.compute_type}
        if config.threads:
            kwargs["intra_threads"] = config.threads
        try:
            self.model = ctranslate2.models.Whisper(str(self.path), **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise CondituneError(f"cannot load CTranslate2 Whisper from {self.path}: {exc}") from None
        self.n_mels = int(self.model.n_mels)
        self.dim = _ct2_dim(self.path, self)

    def _encode_mels(self, mels: np.ndarray) -> np.ndarray:
        out = self.model.encode(
            self._ct2.StorageView.from_array(np.ascontiguousarray(mels, dtype=np.float32)), to_cpu=True
        )
        return np.array(out, dtype=np.float32)


def _ct2_dim(path: Path, encoder: CT2WhisperEncoder) -> int:
    # the CTranslate2 config does not record d_model; one tiny encode tells it
    out = encoder._encode_mels(np.zeros((1, encoder.n_mels, 4), dtype=np.float32))
    return int(out.shape[-1])


def build_encoder(config: EncoderConfig) -> SpeechEncoder:
    from dataclasses import replace

    from conditune.speech.loading import resolve_path

    config = replace(config, path=resolve_path(config.path))
    path = Path(config.path)
    if not path.exists():
        raise CondituneError(f"encoder path {path} does not exist")
    if config.backend == "hf":
        return HFWhisperEncoder(config)
    if config.backend == "ct2":
        return CT2WhisperEncoder(config)
    raise CondituneError(f"unknown encoder backend {config.backend!r} (use hf or ct2)")


def _quick_file_hash(path: Path, block: int = 1 << 20) -> str:
    """sha256 of size + first and last MiB: cheap identity for large weight files."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(block))
        if size > 2 * block:
            handle.seek(size - block)
            digest.update(handle.read(block))
        elif size > block:
            digest.update(handle.read())
    return digest.hexdigest()


def describe(encoder: SpeechEncoder) -> str:
    return json.dumps({"backend": encoder.backend, "path": str(encoder.path), "dim": encoder.dim})
