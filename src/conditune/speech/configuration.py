"""Configuration of a speech LLM: frozen encoder -> adaptor (+ CTC head) -> partly trainable LLM.

``SpeechLLMConfig`` has one sub-config per part (``encoder``, ``adaptor``, ``ctc``, ``llm``, ``trainable``).
It is the ``model:`` section of a training config, and a saved model folder holds it as ``config.json``
(with ``model_type``, and the sizes and token ids resolved when the model was built), as a transformers
model folder does. The base LLM and the encoder are referenced by path, never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from conditune.config import build, rename_keys, to_dict
from conditune.errors import CondituneError
from conditune.validation import require_choice, require_range

ENCODER_BACKENDS = ("hf", "ct2")
TRAINABLE_MODES = ("names", "none", "all", "lora", "osf")
# LoRA initialisations (PEFT ``init_lora_weights``): "default" is PEFT's True; "pissa_niter_<k>" is PiSSA with k
# subspace iterations of the fast SVD. Initialisations that need data or another config (eva, corda, loftq) are not
# offered.
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
CTC_READOUTS = ("adaptor", "embeddings")
CONFIG_NAME = "config.json"
MODEL_TYPE = "conditune_speech_llm"


@dataclass
class EncoderConfig:
    backend: str = "ct2"  # "hf": transformers Whisper folder; "ct2": CTranslate2 Whisper folder
    path: str = ""
    device: str = "cpu"
    compute_type: str = "float32"  # CTranslate2 only
    threads: int = 0  # CTranslate2 intra-op threads (0: library default)
    max_seconds: float = 30.0  # Whisper's window: longer audio is not used for training (skipped and counted)
    bucket_seconds: float = 0.0  # >0: zero-pad audio up to a multiple of this before the encoder, so
    # utterances of similar length share one encoder call (outputs stay independent of the batch)


@dataclass
class LLMConfig:
    path: str = ""  # folder, hub id, or folder holding a GGUF file
    gguf_file: str | None = None  # GGUF file name inside ``path`` (or a full path to it)
    tokenizer: str | None = None  # defaults to ``path`` (+ gguf_file)
    dtype: str = "float32"
    # None: the tokenizer's (else the model config's); a built model records the ids it resolved
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


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


@dataclass
class CTCConfig:
    """The CTC head scores each adaptor output against the LLM's frozen token embeddings plus a blank."""

    # Compression (not in the paper): the LLM reads only the positions whose greedy CTC label is a token,
    # runs of the same label averaged, so about one position per spoken token, like text. Needs a trained
    # head (training.align_steps and/or training.ctc_weight).
    compress: bool = False
    # What the LLM reads at each compressed position: "adaptor" (the adaptor's own vector, averaged over the
    # run) or "embeddings" (the CTC posterior over tokens times the LLM's own token embeddings, averaged over
    # the run, as LegoSLM does): confident positions then look like text to the LLM. Needs compress.
    readout: str = "adaptor"
    # Learn an offset to each scored token embedding (not in the paper): the head's classes start as the LLM's
    # embeddings and move; the embeddings readout still mixes the LLM's own embeddings.
    learn_table: bool = False


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> rank (PEFT's rank_pattern)
    alpha_pattern: dict[str, int] = field(default_factory=dict)  # module regex -> alpha
    # default | gaussian | pissa | pissa_niter_<k> | olora | orthogonal (PEFT init_lora_weights). Initialisations
    # that read the base weights (PiSSA: the top singular triples, the base weight becomes the residual) run
    # with a fixed seed, so a saved model rebuilds the same residual when it is loaded.
    init: str = "default"


@dataclass
class OSFSectionConfig:
    """PEFT's orthogonal subspace fine-tuning: each target matrix keeps its top ``effective_rank`` singular
    directions frozen and trains the rest (U_low, S_low, V_low: r_low·(out + in + 1) parameters with
    r_low = min(out, in) − effective_rank), its gradients projected orthogonal to the frozen subspace."""

    effective_rank: Any = None  # int, or a fraction in (0, 1] of min(out, in); None: half of min(out, in)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank_pattern: dict[str, Any] = field(default_factory=dict)  # module regex (re.search) -> effective rank


@dataclass
class TrainableConfig:
    mode: str = "names"  # names | none | all | lora | osf
    names_file: str | None = None  # one tensor name a line (conditune select output)
    names: list[str] | None = None  # alternatively given inline
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    osf: OSFSectionConfig = field(default_factory=OSFSectionConfig)


@dataclass
class SpeechLLMConfig:
    model_type: ClassVar[str] = MODEL_TYPE
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "adaptor.ctc_compress": "ctc.compress",
        "adaptor.ctc_readout": "ctc.readout",
    }

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adaptor: AdaptorConfig = field(default_factory=AdaptorConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    # recorded when the model is built (None in a training config)
    encoder_dim: int | None = None
    llm_dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "model") -> SpeechLLMConfig:
        data = rename_keys(json.loads(json.dumps(data or {})), cls.RENAMED_KEYS, where)
        data.pop("model_type", None)
        data.pop("conditune_version", None)
        return build(cls, data, where)

    def save(self, directory: str | Path) -> Path:
        """``config.json`` in ``directory`` (atomically)."""
        from conditune import __version__
        from conditune.io import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        doc = {"model_type": MODEL_TYPE, "conditune_version": __version__, **self.to_dict()}
        atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: dict[str, Any] | None = None) -> SpeechLLMConfig:
        """The config of a saved model folder (``config.json``, or the ``speech_config.json`` of releases up to
        0.1.0 of 2026-12-02); ``overrides`` as dotted keys (``{"llm.path": ...}``)."""
        from conditune.config import set_dotted

        directory = Path(directory)
        data, file = read_model_config(directory)
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        return cls.from_dict(data, where=str(file))

    def validate(self) -> None:
        require_choice(self.encoder.backend, "model.encoder.backend", ENCODER_BACKENDS)
        if not self.encoder.path:
            raise CondituneError("model.encoder.path is not set")
        require_range(self.encoder.max_seconds, "model.encoder.max_seconds", low=0, low_open=True, allow_none=True)
        require_range(self.encoder.bucket_seconds, "model.encoder.bucket_seconds", low=0, allow_none=True)
        require_range(self.encoder.threads, "model.encoder.threads", low=0, allow_none=True)
        if not self.llm.path:
            raise CondituneError("model.llm.path is not set")
        require_choice(self.trainable.mode, "model.trainable.mode", TRAINABLE_MODES)
        if self.trainable.mode == "names" and not (self.trainable.names_file or self.trainable.names):
            raise CondituneError("model.trainable.mode is 'names' but neither names_file nor names is given")
        if self.trainable.mode == "lora":
            require_range(self.trainable.lora.r, "model.trainable.lora.r", low=1, allow_none=True)
            require_range(self.trainable.lora.dropout, "model.trainable.lora.dropout", low=0, high=1, allow_none=True)
            lora_init_option(self.trainable.lora.init)
        if self.trainable.mode == "osf":
            _check_osf_rank(self.trainable.osf.effective_rank, "model.trainable.osf.effective_rank")
            for pattern, rank in (self.trainable.osf.rank_pattern or {}).items():
                _check_osf_rank(rank, f"model.trainable.osf.rank_pattern.{pattern}")
        a = self.adaptor
        require_range(a.subsample, "model.adaptor.subsample", low=1, allow_none=True)
        require_range(a.heads, "model.adaptor.heads", low=1, allow_none=True)
        require_range(a.depth, "model.adaptor.depth", low=0, allow_none=True)
        require_range(a.ffn_multiplier, "model.adaptor.ffn_multiplier", low=1, allow_none=True)
        require_range(a.dropout, "model.adaptor.dropout", low=0, high=1, allow_none=True)
        require_choice(self.ctc.readout, "model.ctc.readout", CTC_READOUTS)
        if self.ctc.readout == "embeddings" and not self.ctc.compress:
            raise CondituneError("model.ctc.readout 'embeddings' needs model.ctc.compress: true")


def lora_init_option(init: str) -> bool | str:
    """``model.trainable.lora.init`` as PEFT's ``init_lora_weights`` value; one error line for an unknown one."""
    import re

    if init == "default":
        return True
    if init in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", str(init)):
        return str(init)
    raise CondituneError(
        f"model.trainable.lora.init must be one of {', '.join(LORA_INITS)} or pissa_niter_<k>, not {init!r}"
    )


def _check_osf_rank(value: Any, key: str) -> None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    ok = ok or (isinstance(value, float) and 0 < value <= 1)
    if not ok:
        raise CondituneError(f"{key} must be a positive integer or a fraction in (0, 1], not {value!r}")


def read_model_config(directory: Path) -> tuple[dict[str, Any], Path]:
    """The raw config of a model folder and the file it came from; one error line when there is none."""
    file = directory / CONFIG_NAME
    legacy = directory / "speech_config.json"
    if not file.is_file() and legacy.is_file():
        file = legacy
    if not file.is_file():
        raise CondituneError(f"{directory}: no {CONFIG_NAME} (not a conditune speech model or checkpoint)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CondituneError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CondituneError(f"{file}: expected a JSON object")
    if file is legacy:  # 0.1.0: the sizes and ids in a "_meta" block
        meta = data.pop("_meta", {}) or {}
        data["encoder_dim"], data["llm_dim"] = meta.get("encoder_dim"), meta.get("llm_dim")
        for key in ("bos_token_id", "eos_token_id"):
            if meta.get(key) is not None and (data.get("llm") or {}).get(key) is None:
                data.setdefault("llm", {})[key] = meta[key]
    elif data.get("model_type") not in (None, MODEL_TYPE):
        raise CondituneError(f"{file}: model_type {data.get('model_type')!r} is not a conditune speech model")
    return data, file
