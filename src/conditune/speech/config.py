"""Configuration of a speech LLM: frozen encoder + trainable adaptor + (partly trainable) LLM.

Plain dataclasses that round-trip through ``to_dict``/``from_dict`` and JSON, so a saved model folder
holds a readable ``speech_config.json``. The base LLM and the encoder are referenced by path, never copied.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conditune.errors import CondituneError

ENCODER_BACKENDS = ("hf", "ct2")
TRAINABLE_MODES = ("names", "none", "all", "lora")
CTC_READOUTS = ("adaptor", "embeddings")


@dataclass
class EncoderConfig:
    backend: str = "ct2"  # "hf": transformers Whisper folder; "ct2": CTranslate2 Whisper folder
    path: str = ""
    device: str = "cpu"
    compute_type: str = "float32"  # CTranslate2 only
    threads: int = 0  # CTranslate2 intra-op threads (0: library default)
    max_seconds: float = 30.0  # longer audio is truncated (Whisper's window)
    bucket_seconds: float = 0.0  # >0: zero-pad audio up to a multiple of this before the encoder, so
    # utterances of similar length share one encoder call (outputs stay independent of the batch)


@dataclass
class LLMConfig:
    path: str = ""  # folder, hub id, or folder holding a GGUF file
    gguf_file: str | None = None  # GGUF file name inside ``path`` (or a full path to it)
    tokenizer: str | None = None  # defaults to ``path`` (+ gguf_file)
    dtype: str = "float32"
    bos_token_id: int | None = None  # defaults to the tokenizer's / model config's
    eos_token_id: int | None = None


@dataclass
class AdaptorConfig:
    subsample: int = 4  # consecutive encoder frames concatenated into one
    depth: int = 2  # self-attention layers
    heads: int = 8
    dropout: float = 0.1
    ffn_multiplier: int = 4
    # Scale the (layer-normed, RMS 1) outputs to the RMS of the LLM's token embeddings when the adaptor is
    # built. SmolLM2's embeddings have RMS 0.14: unscaled audio positions would be 7x louder than text.
    match_embedding_scale: bool = True
    # CTC compression (not in the paper): the LLM reads only the positions whose greedy CTC label is a token,
    # runs of the same label averaged, so about one position per spoken token, like text. Needs a trained
    # CTC head (train.align_steps and/or train.ctc_weight).
    ctc_compress: bool = False
    # What the LLM reads at each compressed position: "adaptor" (the adaptor's own vector, averaged over the
    # run) or "embeddings" (the CTC posterior over tokens times the LLM's own token embeddings, averaged over
    # the run, as LegoSLM does): confident positions then look like text to the LLM. Needs ctc_compress.
    ctc_readout: str = "adaptor"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> rank (PEFT's rank_pattern)
    alpha_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> alpha


@dataclass
class TrainableConfig:
    mode: str = "names"  # names | none | all | lora
    names_file: str | None = None  # one tensor name a line (conditune select output)
    names: list[str] | None = None  # alternatively given inline
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class SpeechLLMConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    adaptor: AdaptorConfig = field(default_factory=AdaptorConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechLLMConfig:
        return build_dataclass(cls, data or {}, "model")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> SpeechLLMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CondituneError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise CondituneError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def validate(self) -> None:
        if self.encoder.backend not in ENCODER_BACKENDS:
            raise CondituneError(
                f"model.encoder.backend must be one of {', '.join(ENCODER_BACKENDS)}, not {self.encoder.backend!r}"
            )
        if not self.encoder.path:
            raise CondituneError("model.encoder.path is not set")
        if not self.llm.path:
            raise CondituneError("model.llm.path is not set")
        if self.trainable.mode not in TRAINABLE_MODES:
            raise CondituneError(
                f"model.trainable.mode must be one of {', '.join(TRAINABLE_MODES)}, not {self.trainable.mode!r}"
            )
        if self.trainable.mode == "names" and not (self.trainable.names_file or self.trainable.names):
            raise CondituneError("model.trainable.mode is 'names' but neither names_file nor names is given")
        if self.adaptor.subsample < 1 or self.adaptor.depth < 0 or self.adaptor.heads < 1:
            raise CondituneError("model.adaptor: subsample and heads must be >= 1, depth >= 0")
        if self.adaptor.ctc_readout not in CTC_READOUTS:
            raise CondituneError(
                f"model.adaptor.ctc_readout must be one of {', '.join(CTC_READOUTS)}, not {self.adaptor.ctc_readout!r}"
            )
        if self.adaptor.ctc_readout == "embeddings" and not self.adaptor.ctc_compress:
            raise CondituneError("model.adaptor.ctc_readout 'embeddings' needs model.adaptor.ctc_compress: true")


def build_dataclass(cls, data: Any, where: str, registry: dict | None = None):
    """Build a (nested) dataclass from a dict, rejecting unknown keys with a one-line error."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise CondituneError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CondituneError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        reg = registry or _DATACLASSES
        sub = reg.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = (
            build_dataclass(sub, value, f"{where}.{name}", reg)
            if sub is not None
            else coerce(value, ftype, f"{where}.{name}")
        )
    return cls(**kwargs)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert YAML/CLI strings to the field's scalar type (YAML reads ``1e-4`` as a string)."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [k.strip() for k in ann.split("|")]
    if value is None or not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) and "float" in kinds and "int" not in kinds:
            return float(value)
        return value
    if value.strip().lower() in ("none", "null", "~") and "None" in kinds:
        return None
    try:
        if "int" in kinds:
            return int(value)
        if "float" in kinds:
            return float(value)
    except ValueError:
        raise CondituneError(f"{where} must be a number, not {value!r}") from None
    if "bool" in kinds:
        low = value.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise CondituneError(f"{where} must be true or false, not {value!r}")
    return value


_DATACLASSES = {
    "EncoderConfig": EncoderConfig,
    "LLMConfig": LLMConfig,
    "AdaptorConfig": AdaptorConfig,
    "LoRAConfig": LoRAConfig,
    "TrainableConfig": TrainableConfig,
}
