"""Training configuration: one YAML file, one section per concern, every key overridable as ``section.key=value``.

=============  ==========================================================================================
``model``      the speech LLM (:class:`~conditune.speech.configuration.SpeechLLMConfig`)
``data``       manifests, batching, the feature cache
``optimizer``  AdamW and its learning-rate schedule, gradient clipping
``training``   seed, steps (alignment stage, main steps), accumulation, precision, device, time budget
``evaluation`` dev WER during training: how often, on how many utterances, decoding settings
``output``     where runs, checkpoints and logs go
=============  ==========================================================================================

``conditune train configs/speech_demo.yaml training.max_steps=50 optimizer.lr=5e-4``. Configs written for
0.1.0 (a single ``train:`` section) still load: :data:`TrainConfig.RENAMED_KEYS` moves each key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from conditune.config import load_config, to_dict, to_yaml
from conditune.data.augment import AugmentConfig
from conditune.errors import CondituneError
from conditune.speech.configuration import SpeechLLMConfig
from conditune.validation import require_choice, require_range

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
# sections of other recipes that may share a file with a training config (the demo's recipe file)
RECIPE_SECTIONS = ("demo", "synth", "experiment")


@dataclass
class DataConfig:
    train: Any = None  # a JSONL manifest, or a list of them
    dev: Any = None
    strict: bool = False  # broken rows/audio: error instead of skip-and-count
    max_batch: int = 8  # utterances per micro-batch (length-bucketed)
    feature_cache: str | None = None  # folder for cached encoder outputs (None: $CONDITUNE_HOME/features)
    memory_cache: bool = True  # also keep encoder outputs in RAM
    encode_batch: int = 16
    max_text_tokens: int = 256  # longer transcripts are skipped (counted)
    # augmented copies of every training utterance besides the original (null: none), drawn from training.seed
    augment: AugmentConfig | None = None

    def manifests(self, split: str) -> list[str]:
        value = getattr(self, split)
        if value is None:
            return []
        return [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # adaptor learning rate (its post-norm attention layers do not train at 1e-3: docs/speech.md)
    llm_lr: float | None = None  # trainable LLM tensors (default: lr)
    align_lr: float | None = None  # adaptor learning rate in the alignment stage (default: lr)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "cosine"
    clip_norm: float | None = 1.0
    # torch's fused AdamW kernel (CPU and CUDA): the same update to rounding, in one pass over the tensors
    # instead of a loop of small ops (benchmarks/optimizer_step.py). Off by default: the committed results
    # ran the loop, and a resumed run keeps the arithmetic it started with.
    fused: bool = False


@dataclass
class TrainingConfig:
    seed: int = 0
    max_steps: int | None = None  # main optimizer steps (None: epochs decide); align_steps come before them
    # Alignment stage: CTC-only steps that train the adaptor alone (the LLM is not run, so a step costs a
    # small fraction of a main step) to emit the embeddings of the spoken tokens, in order.
    align_steps: int = 0
    ctc_weight: float = 0.0  # the same CTC loss, weighted, added to Algorithm 1's loss in the main steps
    epochs: int = 1
    max_seconds: float | None = None  # wall-clock budget; stops cleanly with a checkpoint
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (bf16 on GPU recommended)
    device: str | None = None  # None: accelerate's choice (GPU when there is one)
    # A checkpoint taken at the end of the alignment stage (step == align_steps) of a run with the same data,
    # seed and recipe: this run starts its main phase from it (adaptor + CTC head, their optimizer state, RNG,
    # data position, step) with its own trainable LLM tensors. One alignment stage serves many runs.
    init_from: str | None = None


@dataclass
class EvaluationConfig:
    every: int = 0  # main steps (after align_steps); 0: evaluate only at the end
    max_utterances: int | None = None  # dev subset scored, shared evenly between languages
    num_beams: int = 1
    max_new_tokens: int = 64
    batch_size: int = 8


@dataclass
class OutputConfig:
    dir: str = "runs/speech"
    overwrite: bool = False  # start afresh in a dir that holds checkpoints (they are deleted)
    save_every: int = 0  # steps; 0: only the final checkpoint
    keep_last: int = 3  # 0: keep every checkpoint
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


_OLD_TRAIN_SECTION = {  # 0.1.0's `train:` section -> today's sections
    **{f"train.{k}": f"output.{k}" for k in ("overwrite", "save_every", "keep_last", "log_every", "tensorboard")},
    **{f"train.{k}": f"output.{k}" for k in ("progress",)},
    "train.output_dir": "output.dir",
    **{f"train.{k}": f"optimizer.{k}" for k in ("lr", "llm_lr", "align_lr", "weight_decay", "beta1", "beta2")},
    **{f"train.{k}": f"optimizer.{k}" for k in ("warmup_steps", "schedule", "clip_norm")},
    **{f"train.{k}": f"training.{k}" for k in ("seed", "max_steps", "align_steps", "ctc_weight", "epochs")},
    **{f"train.{k}": f"training.{k}" for k in ("max_seconds", "grad_accum", "mixed_precision", "device")},
    "train.eval_every": "evaluation.every",
    "train.eval_max_utterances": "evaluation.max_utterances",
    "train.num_beams": "evaluation.num_beams",
    "train.max_new_tokens": "evaluation.max_new_tokens",
    "train.eval_batch": "evaluation.batch_size",
}


@dataclass
class TrainConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        **_OLD_TRAIN_SECTION,
        **{f"model.{old}": f"model.{new}" for old, new in SpeechLLMConfig.RENAMED_KEYS.items()},
    }

    model: SpeechLLMConfig = field(default_factory=SpeechLLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return to_yaml(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return load_config(cls, data)

    def validate(self, *, require_data: bool = True) -> None:
        """Every value in range, the key named; ``require_data=False`` for a recipe that fills ``data.train`` itself."""
        self.model.validate()
        o, t, e, d, out = self.optimizer, self.training, self.evaluation, self.data, self.output
        require_choice(o.schedule, "optimizer.schedule", SCHEDULES)
        require_choice(t.mixed_precision, "training.mixed_precision", PRECISIONS)
        for key, value in (("lr", o.lr), ("llm_lr", o.llm_lr), ("align_lr", o.align_lr)):
            require_range(value, f"optimizer.{key}", low=0, low_open=True, allow_none=True)
        require_range(o.weight_decay, "optimizer.weight_decay", low=0, allow_none=True)
        require_range(o.beta1, "optimizer.beta1", low=0, high=1, allow_none=True)
        require_range(o.beta2, "optimizer.beta2", low=0, high=1, allow_none=True)
        require_range(o.warmup_steps, "optimizer.warmup_steps", low=0, allow_none=True)
        require_range(o.clip_norm, "optimizer.clip_norm", low=0, low_open=True, allow_none=True)
        require_range(t.max_steps, "training.max_steps", low=1, allow_none=True)
        require_range(t.align_steps, "training.align_steps", low=0, allow_none=True)
        require_range(t.ctc_weight, "training.ctc_weight", low=0, allow_none=True)
        require_range(t.epochs, "training.epochs", low=1, allow_none=True)
        require_range(t.max_seconds, "training.max_seconds", low=0, low_open=True, allow_none=True)
        require_range(t.grad_accum, "training.grad_accum", low=1, allow_none=True)
        require_range(d.max_batch, "data.max_batch", low=1, allow_none=True)
        require_range(d.encode_batch, "data.encode_batch", low=1, allow_none=True)
        require_range(d.max_text_tokens, "data.max_text_tokens", low=1, allow_none=True)
        require_range(e.every, "evaluation.every", low=0, allow_none=True)
        require_range(e.max_utterances, "evaluation.max_utterances", low=1, allow_none=True)
        require_range(e.num_beams, "evaluation.num_beams", low=1, allow_none=True)
        require_range(e.max_new_tokens, "evaluation.max_new_tokens", low=1, allow_none=True)
        require_range(e.batch_size, "evaluation.batch_size", low=1, allow_none=True)
        for key in ("save_every", "log_every", "keep_last"):  # keep_last 0: keep every checkpoint
            require_range(getattr(out, key), f"output.{key}", low=0, allow_none=True)
        if self.model.ctc.compress and not (t.align_steps or t.ctc_weight):
            raise CondituneError(
                "model.ctc.compress needs a trained CTC head: set training.align_steps and/or training.ctc_weight"
            )
        if t.init_from is not None and not Path(t.init_from).is_dir():
            raise CondituneError(f"training.init_from: {t.init_from} is not a checkpoint folder")
        if require_data and not d.manifests("train"):
            raise CondituneError("data.train (a manifest) is not set")


def training_part(config: TrainConfig) -> TrainConfig:
    """A copy of the training sections of a recipe's config (which extends :class:`TrainConfig`)."""
    import copy
    import dataclasses

    return TrainConfig(**{f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(TrainConfig)})


def load_train_config(
    path: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or a mapping) and ``section.key=value`` overrides, validated;
    the sections of other recipes in the same file (``demo:``, ``synth:``, ``experiment:``) are left out."""
    return load_config(TrainConfig, path, overrides, ignore_sections=RECIPE_SECTIONS)
