"""Training configuration: one YAML file with ``model``, ``data`` and ``train`` sections.

Every key can be overridden on the command line as ``section.key=value`` (``train.lr=1e-4``,
``model.trainable.mode=lora``); values are parsed as YAML and checked against the field types.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conditune.errors import CondituneError
from conditune.speech.config import _DATACLASSES as _SPEECH_DATACLASSES
from conditune.speech.config import SpeechLLMConfig, build_dataclass

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class DataConfig:
    train: str | list[str] | None = None  # JSONL manifest(s)
    dev: str | list[str] | None = None
    strict: bool = False  # broken rows/audio: error instead of skip-and-count
    max_batch: int = 8  # utterances per micro-batch (length-bucketed)
    feature_cache: str | None = None  # folder for cached encoder outputs (None: $CONDITUNE_HOME/features)
    memory_cache: bool = True  # also keep encoder outputs in RAM
    encode_batch: int = 16
    max_text_tokens: int = 256  # longer transcripts are skipped (counted)


@dataclass
class OptimConfig:
    output_dir: str = "runs/speech"
    overwrite: bool = False  # start afresh in an output_dir that holds checkpoints (they are deleted)
    seed: int = 0
    lr: float = 3e-4  # adaptor learning rate (its post-norm attention layers do not train at 1e-3: docs/speech.md)
    llm_lr: float | None = None  # trainable LLM tensors (default: lr)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_steps: int | None = None  # main optimizer steps (None: epochs decide); align_steps come before them
    # Alignment stage: CTC-only steps that train the adaptor alone (the LLM is not run, so a step costs a
    # small fraction of a main step) to emit the embeddings of the spoken tokens, in order.
    align_steps: int = 0
    align_lr: float | None = None  # adaptor learning rate in the alignment stage (default: lr)
    ctc_weight: float = 0.0  # the same CTC loss, weighted, added to Algorithm 1's loss in the main steps
    epochs: int = 1
    max_seconds: float | None = None  # wall-clock budget; stops cleanly with a checkpoint
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (bf16 on GPU recommended)
    device: str | None = None  # None: accelerate's choice (GPU when there is one)
    log_every: int = 10
    eval_every: int = 0  # main steps (after align_steps); 0: evaluate only at the end
    eval_max_utterances: int | None = None  # dev subset scored in evaluations, shared evenly between languages
    save_every: int = 0  # steps; 0: only the final checkpoint
    keep_last: int = 3
    num_beams: int = 1
    max_new_tokens: int = 64
    eval_batch: int = 8
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    model: SpeechLLMConfig = field(default_factory=SpeechLLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = build_dataclass(cls, data or {}, "config", _REGISTRY)
        cfg.validate()
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        self.model.validate()
        t = self.train
        if t.schedule not in SCHEDULES:
            raise CondituneError(f"train.schedule must be one of {', '.join(SCHEDULES)}, not {t.schedule!r}")
        if t.mixed_precision not in PRECISIONS:
            raise CondituneError(
                f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, not {t.mixed_precision!r}"
            )
        if t.grad_accum < 1 or self.data.max_batch < 1:
            raise CondituneError("train.grad_accum and data.max_batch must be >= 1")
        if t.max_steps is not None and t.max_steps < 1:
            raise CondituneError("train.max_steps must be >= 1")
        if t.align_steps < 0 or t.ctc_weight < 0:
            raise CondituneError("train.align_steps and train.ctc_weight must be >= 0")
        if self.model.adaptor.ctc_compress and not (t.align_steps or t.ctc_weight):
            raise CondituneError(
                "model.adaptor.ctc_compress needs a trained CTC head: set train.align_steps and/or train.ctc_weight"
            )
        if not self.data.train:
            raise CondituneError("data.train (a manifest) is not set")


_REGISTRY = {
    **_SPEECH_DATACLASSES,
    "SpeechLLMConfig": SpeechLLMConfig,
    "DataConfig": DataConfig,
    "OptimConfig": OptimConfig,
}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CondituneError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise CondituneError(f"override {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise CondituneError(f"override {key}: {p} is not a section")
            node = child
        node[last] = value
    return data


def read_config_file(path: str | Path, sections: str = "model/data/train") -> dict[str, Any]:
    """A YAML config file as a dict; a missing, malformed or non-mapping file is a one-line error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise CondituneError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise CondituneError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CondituneError(f"{path}: expected a mapping with {sections} sections")
    return data


def load_train_config(path: str | Path | None, overrides: Sequence[str] | dict[str, Any] = ()) -> TrainConfig:
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    return TrainConfig.from_dict(apply_overrides(data, overrides))
