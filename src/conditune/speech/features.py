"""On-disk cache of frozen-encoder outputs.

One safetensors file per (encoder, audio) pair: ``<root>/<encoder identity>/<fp[:2]>/<fp>.safetensors``
where ``fp`` is :func:`conditune.data.audio.audio_fingerprint` of the file. Files are written atomically,
so a killed run never leaves a half-written entry; a later epoch or run skips the encoder entirely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from conditune.io import atomic_write
from conditune.speech.encoders import SpeechEncoder


def _load_audio(path, sample_rate=16000, max_seconds=None):
    from conditune.data.audio import load_audio

    return load_audio(path, sample_rate=sample_rate, max_seconds=max_seconds)


def _fingerprint(path) -> str:
    from conditune.data.audio import audio_fingerprint

    return audio_fingerprint(path)


class FeatureCache:
    """Encoder outputs for audio files, from disk when cached (``root=None``: memory only)."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        root: str | Path | None = None,
        *,
        memory: bool = True,
        load_audio: Callable | None = None,
    ):
        self.encoder = encoder
        self.root = Path(root) / encoder.identity if root is not None else None
        self.memory: dict[str, torch.Tensor] | None = {} if memory else None
        self._fingerprints: dict[str, str] = {}
        # only what the encoder reads is decoded (an hour-long file costs its first max_seconds, not its length)
        self._max_seconds = getattr(getattr(encoder, "config", None), "max_seconds", None)
        self._load_audio = load_audio or (lambda path: _load_audio(path, max_seconds=self._max_seconds))
        self.hits = 0
        self.misses = 0

    def fingerprint(self, item) -> str:
        """The cache key of an audio file (sha256 of its bytes) or of an augmented copy of one (file + params)."""
        key = str(item)
        if key not in self._fingerprints:
            if hasattr(item, "cache_key"):  # conditune.data.augment.AugmentedAudio
                self._fingerprints[key] = item.cache_key(self.fingerprint(item.path))
            else:
                self._fingerprints[key] = _fingerprint(item)
        return self._fingerprints[key]

    def _load(self, item):
        if hasattr(item, "load"):
            return item.load(max_seconds=self._max_seconds)
        return self._load_audio(item)

    def _file(self, fp: str) -> Path:
        assert self.root is not None
        return self.root / fp[:2] / f"{fp}.safetensors"

    def _lookup(self, fp: str) -> torch.Tensor | None:
        if self.memory is not None and fp in self.memory:
            return self.memory[fp]
        if self.root is not None:
            file = self._file(fp)
            if file.is_file():
                from safetensors.torch import load_file

                try:
                    frames = load_file(str(file))["frames"]
                except Exception:  # noqa: BLE001 - a damaged entry is recomputed
                    return None
                if self.memory is not None:
                    self.memory[fp] = frames
                return frames
        return None

    def _store(self, fp: str, frames: torch.Tensor) -> None:
        if self.memory is not None:
            self.memory[fp] = frames
        if self.root is not None:
            from safetensors.torch import save

            with atomic_write(self._file(fp), "wb") as handle:
                handle.write(save({"frames": frames.contiguous()}))

    def get(self, paths: Sequence[str | Path]) -> list[torch.Tensor]:
        """Encoder frames ``[T_i, D]`` for each audio file, encoding (and caching) only the missing ones."""
        fps = [self.fingerprint(p) for p in paths]
        result: list[torch.Tensor | None] = [self._lookup(fp) for fp in fps]
        missing = [i for i, r in enumerate(result) if r is None]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            waves = [self._load(paths[i]) for i in missing]
            frames, lengths = self.encoder.encode(waves)
            for row, i in enumerate(missing):
                item = frames[row, : int(lengths[row])].clone()
                self._store(fps[i], item)
                result[i] = item
        return result  # type: ignore[return-value]

    def length(self, path: str | Path) -> int | None:
        """Cached frame count of ``path`` (None when not cached); reads only the safetensors header."""
        fp = self.fingerprint(path)
        if self.memory is not None and fp in self.memory:
            return int(self.memory[fp].shape[0])
        if self.root is not None and self._file(fp).is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(self._file(fp)), framework="pt") as handle:
                    return int(handle.get_slice("frames").get_shape()[0])
            except Exception:  # noqa: BLE001
                return None
        return None

    def prepare(
        self,
        paths: Sequence[str | Path],
        *,
        strict: bool = False,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[dict[int, int], list[tuple[int, str]]]:
        """Make sure every file is encoded and cached.

        Returns ``({index: frames}, [(index, reason), ...])``: files that cannot be read or decoded are
        skipped and reported (``strict``: the first one raises its :class:`AudioError`).
        """
        from conditune.errors import CondituneError

        lengths: dict[int, int] = {}
        bad: list[tuple[int, str]] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            frames, lens = self.encoder.encode([w for _, w in pending])
            for row, (i, _) in enumerate(pending):
                item = frames[row, : int(lens[row])].clone()
                self._store(self.fingerprint(paths[i]), item)
                lengths[i] = int(lens[row])
            self.misses += len(pending)
            if progress:
                progress(len(pending))
            pending.clear()

        for i, path in enumerate(paths):
            try:
                cached = self.length(path)
                if cached is not None:
                    lengths[i] = cached
                    self.hits += 1
                    if progress:
                        progress(1)
                    continue
                pending.append((i, self._load(path)))
            except CondituneError as exc:  # AudioError and friends
                if strict:
                    raise
                bad.append((i, str(exc)))
                if progress:
                    progress(1)
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
        return lengths, bad

    def warm(
        self, paths: Sequence[str | Path], batch_size: int = 16, progress: Callable[[int], None] | None = None
    ) -> None:
        """Encode every file not yet cached (in batches); ``progress(n)`` after each batch."""
        todo = [p for p in paths if self._lookup(self.fingerprint(p)) is None]
        for start in range(0, len(todo), batch_size):
            self.get(todo[start : start + batch_size])
            if progress:
                progress(len(todo[start : start + batch_size]))


def pad_frames(items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[T_i, D]`` tensors into ``[B, T_max, D]`` (zeros) and lengths ``[B]``."""
    lengths = torch.tensor([int(t.shape[0]) for t in items], dtype=torch.long)
    out = torch.zeros(len(items), int(lengths.max()), items[0].shape[-1], dtype=torch.float32)
    for i, t in enumerate(items):
        out[i, : t.shape[0]] = t.to(torch.float32)
    return out, lengths


def as_numpy(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)
