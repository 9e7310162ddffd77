"""A tiny random Llama for the selection and delta tests, saved and loaded the real way."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

transformers.utils.logging.disable_progress_bar()


def save_tiny_llama(path: Path, tie: bool = False, seed: int = 0) -> Path:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_tiny_llama(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path)


def batch(seed: int = 0, size: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}
