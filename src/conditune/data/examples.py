"""Training and evaluation examples: manifests read, audio encoded once (cached), transcripts tokenised.

:func:`prepare_examples` is the one place where utterances become :class:`Example` s, for training, the
dev evaluation, ``conditune evaluate`` and the demo: what cannot be used (unreadable audio, a transcript
longer than ``max_text_tokens``) is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Example:
    audio: Path  # or an augmented copy of one (conditune.data.augment.AugmentedAudio)
    text: str
    language: str
    tokens: list[int]
    frames: int  # encoder frames (the length the batching sorts by)
    id: str = ""


@dataclass
class PreparedExamples:
    examples: list[Example]
    skipped: dict[str, int]  # reason -> count


def read_manifests(paths: str | Path | Sequence[str | Path] | None, *, strict: bool = False) -> tuple[list, int]:
    """Utterances of one or more JSONL manifests and the number of manifest lines skipped."""
    from conditune.data.manifest import read_manifest

    if not paths:
        return [], 0
    if isinstance(paths, (str, Path)):
        paths = [paths]
    utterances, skipped = [], 0
    for path in paths:
        data = read_manifest(path, strict=strict)
        utterances += data.utterances
        skipped += len(data.skipped)
    return utterances, skipped


def balanced_subset(utterances: Sequence, limit: int) -> list:
    """At most ``limit`` utterances, shared evenly between the languages (the first ones of each, in manifest
    order), so a dev subset of a manifest sorted by language still scores every language."""
    by_language: dict[str, list[int]] = {}
    for i, utt in enumerate(utterances):
        by_language.setdefault(getattr(utt, "language", "en") or "en", []).append(i)
    share, extra = divmod(limit, max(1, len(by_language)))
    chosen = {  # an uneven remainder goes to the first languages
        i for n, group in enumerate(by_language.values()) for i in group[: share + (n < extra)]
    }
    return [u for i, u in enumerate(utterances) if i in chosen]


def prepare_examples(
    utterances: Sequence,
    processor,
    *,
    strict: bool = False,
    batch_size: int = 16,
    max_text_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PreparedExamples:
    """Encode (or find cached) every utterance's audio with the processor's encoder and tokenise its text.

    Audio longer than the encoder's window (``model.encoder.max_seconds``) is skipped and counted: cut to
    the window it would no longer match its transcript."""
    long_audio = _longer_than(utterances, processor.encoder.config.max_seconds)
    if long_audio and strict:
        from conditune.errors import CondituneError

        first = utterances[min(long_audio)].audio
        raise CondituneError(f"{first}: longer than the encoder's {processor.encoder.config.max_seconds:g} s window")
    usable = [u for i, u in enumerate(utterances) if i not in long_audio]
    cache = processor.cache
    lengths, bad = cache.prepare([u.audio for u in usable], strict=strict, batch_size=batch_size, progress=progress)
    if progress and long_audio:
        progress(len(long_audio))
    examples, too_long = [], 0
    for i, utt in enumerate(usable):
        if i not in lengths:
            continue
        tokens = processor.tokenize(utt.text)
        if max_text_tokens and len(tokens) > max_text_tokens:
            too_long += 1
            continue
        language = getattr(utt, "language", "en") or "en"
        examples.append(Example(Path(utt.audio), utt.text, language, tokens, lengths[i], getattr(utt, "id", "")))
    skipped = {"bad_audio": len(bad), "audio_too_long": len(long_audio), "text_too_long": too_long}
    return PreparedExamples(examples, skipped)


ENCODER_FRAME_SECONDS = 0.02  # Whisper's encoder: 50 frames per second


def augment_examples(
    examples: Sequence[Example],
    processor,
    config,
    *,
    seed: int,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> PreparedExamples:
    """The training examples with their augmented copies (``data.augment``: :mod:`conditune.data.augment`): the
    originals first (unless ``keep_original`` is false: then each one's first copy takes its place), then the
    other copies. Each copy is encoded once into the feature cache, which keys it on (audio file, augmentation
    parameters); a pure function of the seed. A copy slowed down past the encoder's window is skipped and
    counted (its original stays), like any audio too long."""
    from conditune.data.augment import augmented_copies

    window = processor.encoder.config.max_seconds
    sources, owners, too_long = [], [], 0
    for n, example in enumerate(examples):
        for k, copy in enumerate(
            augmented_copies(example.id or str(example.audio), str(example.audio), config, seed=seed)
        ):
            speed = getattr(getattr(copy, "params", None), "speed", None) or 1.0
            if example.frames * ENCODER_FRAME_SECONDS / speed > window:
                too_long += 1
                continue
            sources.append(copy if hasattr(copy, "load") else Path(copy))
            owners.append((n, k))
    lengths, bad = processor.cache.prepare(sources, batch_size=batch_size, progress=progress)
    first, rest = {}, []
    for i, (source, (n, k)) in enumerate(zip(sources, owners)):
        if i not in lengths:
            continue
        owner = examples[n]
        copy = Example(source, owner.text, owner.language, owner.tokens, lengths[i], f"{owner.id}#aug{k}")
        if k == 0 and not config.keep_original:
            first[n] = copy
        else:
            rest.append(copy)
    kept = [first.get(n, example) for n, example in enumerate(examples)]
    return PreparedExamples(kept + rest, {"augment_bad_audio": len(bad), "augment_too_long": too_long})


def _longer_than(utterances: Sequence, seconds: float) -> set[int]:
    """Indices of the utterances whose audio (by its header) lasts longer than ``seconds``."""
    from conditune.data.audio import AudioError, audio_duration

    found = set()
    for i, utt in enumerate(utterances):
        try:
            if audio_duration(utt.audio) > seconds + 1e-3:
                found.add(i)
        except AudioError:
            continue  # unreadable: the encoding pass reports it
    return found
