"""Tiny random models and synthetic audio for the speech model / training tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXTS = ["open the door", "good morning", "turn left now", "yes please"]
SR = 16000


def make_tiny_whisper(directory: Path) -> Path:
    import torch
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    WhisperModel(cfg).save_pretrained(directory)
    return directory


def make_tiny_llm(directory: Path, texts=TEXTS, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer trained on ``texts``, saved together in ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def tone(seconds: float, freq: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = (
        0.4 * np.sin(2 * np.pi * freq * t)
        + 0.2 * np.sin(2 * np.pi * 2.7 * freq * t)
        + 0.02 * rng.standard_normal(t.size)
    )
    return wave.astype(np.float32)


def write_wav(path: Path, wave: np.ndarray) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, SR, subtype="PCM_16")
    return path


def make_corpus(directory: Path, texts=TEXTS, name: str = "train") -> tuple[Path, list[Path]]:
    """One WAV per text (distinct tones and lengths) and a JSONL manifest listing them."""
    paths = []
    rows = []
    for i, text in enumerate(texts):
        wav = write_wav(directory / "audio" / f"{name}{i}.wav", tone(0.6 + 0.25 * i, 220.0 * (1.5**i), seed=i))
        paths.append(wav)
        rows.append({"id": f"{name}{i}", "audio": str(wav), "text": text, "language": "en" if i % 2 == 0 else "de"})
    manifest = directory / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, paths


def model_config(whisper: Path, llm: Path, mode: str = "all", **trainable) -> dict:
    return {
        "encoder": {"backend": "hf", "path": str(whisper)},
        "llm": {"path": str(llm)},
        "adaptor": {"subsample": 4, "depth": 2, "heads": 4, "dropout": 0.0},
        "trainable": {"mode": mode, **trainable},
    }
