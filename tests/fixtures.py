"""Test fixtures: tiny random models saved and loaded through the real paths, and synthetic audio.

One builder per kind of model:

* :func:`save_tiny_llama` - a tiny random Llama (transformers ``save_pretrained``), with a byte-level BPE
  tokenizer trained on ``texts`` when they are given (the speech tests need one);
* :func:`write_tiny_gguf` - a tiny Llama written as a real GGUF file with gguf's writer;
* :func:`make_tiny_whisper` - a tiny random Whisper (:func:`tiny_whisper_config`);
* :func:`speech_assets` - both tiny models and a corpus, for a module's fixture;
* :func:`make_corpus` - WAVs (tones) with a JSONL manifest.

No downloads: everything is generated in the test's temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXTS = ["open the door", "good morning", "turn left now", "yes please"]
SR = 16000


# ---------------------------------------------------------------------------------------------- Llama


def save_tiny_llama(
    path: Path, *, texts=None, hidden: int = 32, layers: int = 2, tie: bool = False, seed: int = 0
) -> Path:
    """A tiny random Llama saved in ``path``; with ``texts``, also a BPE tokenizer trained on them (and the
    vocabulary sized to it), else a 128-token vocabulary and no tokenizer."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    special = {}
    vocab = 128
    if texts is not None:
        tokenizer = _train_tokenizer(texts)
        tokenizer.save_pretrained(path)
        vocab = len(tokenizer)
        special = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        **special,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return Path(path)


def make_tiny_llm(directory: Path, texts=TEXTS, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """The speech tests' LLM: :func:`save_tiny_llama` with a tokenizer trained on ``texts``."""
    return save_tiny_llama(directory, texts=list(texts), hidden=hidden, layers=layers, seed=seed)


def load_tiny_llama(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)


def _train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def batch(seed: int = 0, size: int = 2, length: int = 8):
    """Random token ids for the 128-token tiny Llama, as ``{input_ids, labels}``."""
    import torch

    ids = torch.randint(0, 128, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------------------------------------- GGUF


GGUF_HIDDEN, GGUF_FFN, GGUF_LAYERS, GGUF_HEADS, GGUF_KV_HEADS, GGUF_VOCAB = 64, 128, 2, 4, 2, 32


def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in numpy (rows = out) order."""
    rng = np.random.default_rng(seed)
    head_dim = GGUF_HIDDEN // GGUF_HEADS
    shapes = {"token_embd.weight": (GGUF_VOCAB, GGUF_HIDDEN), "output_norm.weight": (GGUF_HIDDEN,)}
    for i in range(GGUF_LAYERS):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (GGUF_HIDDEN,),
                f"blk.{i}.attn_q.weight": (GGUF_HIDDEN, GGUF_HIDDEN),
                f"blk.{i}.attn_k.weight": (GGUF_KV_HEADS * head_dim, GGUF_HIDDEN),
                f"blk.{i}.attn_v.weight": (GGUF_KV_HEADS * head_dim, GGUF_HIDDEN),
                f"blk.{i}.attn_output.weight": (GGUF_HIDDEN, GGUF_HIDDEN),
                f"blk.{i}.ffn_norm.weight": (GGUF_HIDDEN,),
                f"blk.{i}.ffn_gate.weight": (GGUF_FFN, GGUF_HIDDEN),
                f"blk.{i}.ffn_up.weight": (GGUF_FFN, GGUF_HIDDEN),
                f"blk.{i}.ffn_down.weight": (GGUF_HIDDEN, GGUF_FFN),
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
    writer.add_block_count(GGUF_LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(GGUF_HIDDEN)
    writer.add_feed_forward_length(GGUF_FFN)
    writer.add_head_count(GGUF_HEADS)
    writer.add_head_count_kv(GGUF_KV_HEADS)
    writer.add_rope_dimension_count(GGUF_HIDDEN // GGUF_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(GGUF_VOCAB)
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


# ---------------------------------------------------------------------------------------------- speech


TEXTS = ["open the door", "good morning", "turn left now", "yes please"]
SR = 16000


def tiny_whisper_config(encoder_layers: int = 1):
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=encoder_layers,
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


def make_tiny_whisper(directory: Path) -> Path:
    import torch
    from transformers import WhisperModel

    torch.manual_seed(0)
    cfg = tiny_whisper_config()
    WhisperModel(cfg).save_pretrained(directory)
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


def speech_assets(root: Path) -> dict:
    """A tiny Whisper, a tiny LLM and a corpus of :data:`TEXTS` under ``root``, with a feature cache folder."""
    whisper, llm = make_tiny_whisper(root / "whisper"), make_tiny_llm(root / "llm")
    manifest, paths = make_corpus(root / "data")
    return {
        "root": root,
        "whisper": whisper,
        "llm": llm,
        "manifest": manifest,
        "paths": paths,
        "cache": root / "features",
    }


def model_config(whisper: Path, llm: Path, mode: str = "all", **trainable) -> dict:
    return {
        "encoder": {"backend": "hf", "path": str(whisper)},
        "llm": {"path": str(llm)},
        "adaptor": {"subsample": 4, "depth": 2, "heads": 4, "dropout": 0.0},
        "trainable": {"mode": mode, **trainable},
    }


def build_speech_model(config: dict, **kwargs):
    """(SpeechLLM, SpeechProcessor) for a ``model:`` config dict, through the real loaders."""
    from conditune.speech.configuration import SpeechLLMConfig
    from conditune.speech.modeling import SpeechLLM
    from conditune.speech.processing import SpeechProcessor

    cfg = SpeechLLMConfig.from_dict(config)
    processor = SpeechProcessor.from_config(cfg)
    model = SpeechLLM.build(cfg, encoder_dim=processor.encoder.dim, tokenizer=processor.tokenizer, **kwargs)
    return model, processor


def load_speech_model(directory):
    """(SpeechLLM, SpeechProcessor) of a saved model folder."""
    from conditune.speech.modeling import SpeechLLM
    from conditune.speech.processing import SpeechProcessor

    return SpeechLLM.from_pretrained(directory), SpeechProcessor.from_pretrained(directory)


def train_config(model: dict, data: dict, **flat):
    """A training config dict in today's sections from 0.1.0-style flat training keys (``lr=``, ``max_steps=``...),
    mapped through the one table of renamed keys."""
    from conditune.config import set_dotted
    from conditune.training.config import TrainConfig

    cfg = {"model": model, "data": data}
    for key, value in flat.items():
        set_dotted(cfg, TrainConfig.RENAMED_KEYS[f"train.{key}"], value)
    return cfg
