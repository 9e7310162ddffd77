"""A tiny Llama written as a real GGUF file (float32 or quantised tensors) with gguf's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 32


def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in numpy (rows = out) order."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (HIDDEN,),
                f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
                f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
                f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
                f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
                f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
            }
        )
    return {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes.items()}


def write_tiny_gguf(
    path: Path, seed: int = 0, quant: str | None = None, raw_quant: str | None = None
) -> dict[str, np.ndarray]:
    """Write the tiny Llama; ``quant`` (e.g. "Q8_0") quantises the 2-D tensors with gguf's quantiser;
    ``raw_quant`` stores blk.0.ffn_up.weight as opaque bytes of that type (for unsupported types)."""
    import gguf

    tensors = tiny_llama_tensors(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(0)
    for name, array in tensors.items():
        if raw_quant and name == "blk.0.ffn_up.weight":
            qtype = gguf.GGMLQuantizationType[raw_quant]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((array.shape[0], array.shape[1] // block * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        elif quant and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
